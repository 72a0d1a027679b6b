"""Failures the run cannot recover from, turned into one clear message instead of a Ray traceback.

Rollout workers and judge replicas are replaceable (their state is the weights, re-sent on start).
Learners are not: their optimizer state lives only in the actor, so a dead or unresponsive learner
stops the run. The message names the actor, the step, the last complete checkpoint and the resume
command; `python -m cluster.train` exits with `LearnerFailure.exit_code`. Training that keeps
producing non-finite values (`train.max_nonfinite_steps` skipped updates in a row, or weights that
a checkpoint refuses) stops the same way with `NonFiniteFailure` (exit 4), and a step whose judge
failed on more than `judge.max_error_fraction` of its items with `JudgeFailure` (exit 5). A run that
must not start (its folder is locked by another run, or a resume changes what it may not) raises
`RunRefused` (exit 2, like a config mistake) before any engine starts. A rollout worker that died is
replaced and re-synced (`cluster.pools`); one that cannot be replaced within `train.retries` tries
stops the run with `WorkerFailure` (exit 6). A stop signal ends the run with `StoppedBySignal`
(exit 143 for SIGTERM, 130 for SIGINT; `cluster.stopping`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["LearnerFailure", "LEARNER_FAILURE_EXIT_CODE", "NonFiniteFailure", "NONFINITE_EXIT_CODE", "NonFiniteStreak",
           "JudgeFailure", "JUDGE_FAILURE_EXIT_CODE", "judge_failure_cause", "RunRefused", "RUN_REFUSED_EXIT_CODE",
           "find_dead_learners", "learner_failure", "bounded", "WorkerFailure", "WORKER_FAILURE_EXIT_CODE",
           "StoppedBySignal"]

log = logging.getLogger(__name__)

LEARNER_FAILURE_EXIT_CODE = 3  # 0 ok, 2 config error (cluster.train), 3 a learner died or timed out
NONFINITE_EXIT_CODE = 4  # training produced non-finite values it could not get past
JUDGE_FAILURE_EXIT_CODE = 5  # the judge failed on more than judge.max_error_fraction of a step's items
RUN_REFUSED_EXIT_CODE = 2  # the same status as a config mistake: nothing was started
WORKER_FAILURE_EXIT_CODE = 6  # a dead rollout worker could not be replaced within train.retries tries
T = TypeVar("T")


class LearnerFailure(RuntimeError):
    """A learner actor died (or did not answer within `train.remote_timeout_s`) during a step.

    Attributes: `actors` (names of the dead learners; empty after a timeout with none dead), `step`
    (0-based index of the step that failed), `phase` (what the driver was waiting for), `checkpoint`
    (the last complete checkpoint this run saved or resumed from, or None), `auto` (what
    `--resume auto` would pick now), `exit_code`.
    """

    exit_code = LEARNER_FAILURE_EXIT_CODE

    def __init__(self, actors: Sequence[str], step: int, phase: str, checkpoint: Path | None, cause: str,
                 auto: Path | None = None):
        self.actors, self.step, self.phase = list(actors), step, phase
        self.checkpoint, self.auto = checkpoint, auto
        what = f"{', '.join(self.actors)} died" if self.actors else "a learner actor did not answer in time"
        super().__init__(
            f"learner failure: {what} during step {step} ({phase}): {cause}\n"
            "Learners hold the optimizer state, so the run stopped instead of replacing them.\n"
            + _resume_advice(checkpoint, auto)
        )


class NonFiniteFailure(LearnerFailure):
    """Training produced NaN or ±inf it could not get past: `train.max_nonfinite_steps` updates in a row
    were skipped (non-finite advantages, losses or gradients), or a learner refused to save or load
    non-finite weights. Attributes as `LearnerFailure` (`actors` is empty); exit status 4.

    A skipped update leaves the weights unchanged, so the last complete checkpoint is good: every
    checkpoint's weights were checked finite when it was written.
    """

    exit_code = NONFINITE_EXIT_CODE

    def __init__(self, step: int, phase: str, checkpoint: Path | None, cause: str, auto: Path | None = None):
        self.actors, self.step, self.phase = [], step, phase
        self.checkpoint, self.auto = checkpoint, auto
        RuntimeError.__init__(
            self,
            f"non-finite training: {cause} (step {step}, {phase}).\n"
            "Lower the learning rates (grpo.lr, flow_grpo.lr) or look for extreme rewards; the metrics rows "
            "(*/skipped_nonfinite, *_adv/nonfinite, judge/errors) show where it began.\n"
            + _resume_advice(checkpoint, auto),
        )


class NonFiniteStreak:
    """Counts the steps in a row whose update a learner skipped for non-finite values (pure).

    `observe(step, skipped)` with `skipped` the names of the learners that skipped this step's update;
    returns the cause of a `NonFiniteFailure` once `limit` steps in a row had one, else None.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {limit}")
        self.limit, self.count, self.first = limit, 0, None

    def observe(self, step: int, skipped: Sequence[str]) -> str | None:
        if not skipped:
            self.count, self.first = 0, None
            return None
        self.count += 1
        self.first = step if self.first is None else self.first
        log.warning("step %d: update skipped for non-finite values (%s); %d of train.max_nonfinite_steps=%d in a row",
                    step, ", ".join(skipped), self.count, self.limit)
        if self.count < self.limit:
            return None
        steps = f"steps {self.first}-{step}" if step != self.first else f"step {step}"
        return (f"the updates of {steps} ({self.count} in a row, train.max_nonfinite_steps={self.limit}) were "
                f"skipped for non-finite advantages, losses or gradients (last: {', '.join(skipped)}); the "
                "weights did not change in those steps")


class RunRefused(ValueError):
    """A run that must not start, found before any engine starts: its folder is locked by another run
    (`cluster.run_folder.lock_run_dir`), or `--resume` changes what the checkpoint's run may not
    (`cluster.run_folder.check_resume_config`). The message says what and how to proceed; exit status 2."""

    exit_code = RUN_REFUSED_EXIT_CODE


class JudgeFailure(LearnerFailure):
    """The judge failed (error results: timeouts, unparsable or non-finite answers) on more than
    `judge.max_error_fraction` of a step's items; the run stops before that step's update, so rewards
    made of errors never train the policy. Attributes as `LearnerFailure` (`actors` is empty); exit 5."""

    exit_code = JUDGE_FAILURE_EXIT_CODE

    def __init__(self, step: int, checkpoint: Path | None, cause: str, auto: Path | None = None):
        self.actors, self.step, self.phase = [], step, "judging"
        self.checkpoint, self.auto = checkpoint, auto
        RuntimeError.__init__(
            self,
            f"judge failure: {cause}.\n"
            "The step's update was not made. Check the judge (its replicas' logs, judge.url and "
            "train.remote_timeout_s for a remote one), or raise judge.max_error_fraction to accept more errors.\n"
            + _resume_advice(checkpoint, auto),
        )


class WorkerFailure(LearnerFailure):
    """A dead rollout worker could not be replaced (its replacement died or did not start) more than
    `train.retries` times in a row during one call. The run stops with a checkpoint of the last
    completed step; attributes as `LearnerFailure` (`actors` names the workers); exit status 6."""

    exit_code = WORKER_FAILURE_EXIT_CODE

    def __init__(self, actors: Sequence[str], step: int, phase: str, checkpoint: Path | None, cause: str,
                 auto: Path | None = None):
        self.actors, self.step, self.phase = list(actors), step, phase
        self.checkpoint, self.auto = checkpoint, auto
        RuntimeError.__init__(
            self,
            f"rollout worker failure: {', '.join(self.actors) or 'a worker'} could not be replaced during step "
            f"{step} ({phase}): {cause}.\nCheck the workers' logs (engine.log, the Ray dashboard) and the cluster's "
            "free resources; raise train.retries to try more replacements.\n" + _resume_advice(checkpoint, auto),
        )


class StoppedBySignal(RuntimeError):
    """The run stopped cleanly after SIGTERM/SIGINT (`cluster.stopping`). Attributes: `signum`, `step`
    (completed steps), `checkpoint` (where a resume continues; None if none was written), `abandoned`
    (what was cut short, or None), `exit_code` (128 + signum: 143 SIGTERM, 130 SIGINT)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, abandoned: str | None = None):
        import signal

        self.signum, self.step, self.checkpoint, self.abandoned = signum, step, checkpoint, abandoned
        self.exit_code = 128 + int(signum)
        cut = f" (abandoned {abandoned})" if abandoned else ""
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (no step completed)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after {step} completed steps{cut}; {where}")


def judge_failure_cause(step: int, errors: float, items: float, max_fraction: float, kind: str) -> str | None:
    """The cause of a `JudgeFailure` if the judge failed on more than `max_fraction` of a step's items (pure).

    Args:
        step: 0-based index of the step.
        errors: items whose judgement was an error result (the row's `judge/errors`).
        items: items judged in the step (the sum of the row's `<stage>/samples`).
        max_fraction: `judge.max_error_fraction`, in [0, 1]; 1 never stops.
        kind: `judge.kind`, named in the message.

    Returns:
        None when `errors / items <= max_fraction` (or nothing was judged), else the message's cause.
    """
    if items <= 0 or errors <= max_fraction * items:
        return None
    return (f"the {kind!r} judge (judge.kind) failed on {errors:g} of {items:g} items in step {step} "
            f"(fraction {errors / items:.2f} > judge.max_error_fraction={max_fraction:g})")


def find_dead_learners(groups: Sequence[Any], error: BaseException | None = None) -> list[str]:
    """Names of the dead learner actors of `groups` (LearnerGroups).

    The actor that `error` (a RayActorError) names, plus every learner whose name Ray no longer lists
    (a dead actor's name is released). No call is made to the learners: a busy one would not answer.
    """
    import ray

    from learners.group import learner_actor_name

    names = {a._actor_id.hex(): learner_actor_name(g.kind, k) for g in groups for k, a in enumerate(g.actors)}
    live = set(ray.util.list_named_actors())
    dead = [names[error.actor_id]] if isinstance(error, ray.exceptions.RayActorError) and error.actor_id in names else []
    return dead + [n for n in names.values() if n not in live and n not in dead]


def learner_failure(error: BaseException, groups: Sequence[Any], step: int, phase: str, checkpoint: Path | None,
                    auto: Path | None = None, timeouts_are_learners: bool = True) -> LearnerFailure | None:
    """A `LearnerFailure` if a learner is dead, or `error` is a timeout while only learners were being
    waited for (`timeouts_are_learners`); a `NonFiniteFailure` if a learner refused non-finite weights
    (`learners.finite.NonFiniteError`); else None: the caller re-raises the original error."""
    import ray

    from learners.finite import NonFiniteError

    original = getattr(error, "cause", None) or error  # a RayTaskError carries the actor's exception
    if isinstance(original, NonFiniteError):  # a learner refused to save or load non-finite weights
        failure = NonFiniteFailure(step, phase, checkpoint, str(original), auto)
        log.error("%s", failure)
        return failure
    if not isinstance(error, ray.exceptions.RayError | TimeoutError):
        return None
    dead = find_dead_learners(groups, error)
    if not dead and not (timeouts_are_learners and isinstance(error, TimeoutError)):
        return None  # a worker, the judge or the learner's own code failed: the caller re-raises the original
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    failure = LearnerFailure(dead, step, phase, checkpoint, f"{type(error).__name__}: {cause}", auto)
    log.error("%s", failure)
    return failure


def _resume_advice(checkpoint: Path | None, auto: Path | None) -> str:
    """Where a stopped run can continue from, and the command that does it."""
    if checkpoint is None:
        return ("This run has no complete checkpoint yet, so it cannot be resumed: start it again "
                "(set checkpoint.every=K to save every K steps).")
    how = (f"`--resume auto` (picks that checkpoint) or `--resume {checkpoint}`" if auto == checkpoint else
           f"`--resume {checkpoint}` (`--resume auto` would pick {auto}, which is newer under train.run_dir)")
    return (f"The last complete checkpoint is {checkpoint} (no newer one was completed).\n"
            f"Resume with the same command plus {how}.")


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` and wait at most `timeout_s` for it (the thread is abandoned, not joined, on timeout).

    For remote waits that have no timeout of their own (e.g. a weight sync): the caller's cleanup
    kills the actors, which ends the abandoned wait.
    """
    ex = ThreadPoolExecutor(1, thread_name_prefix=what)
    try:
        future = ex.submit(fn)
        if not wait([future], timeout=timeout_s).done:
            raise TimeoutError(f"{what} did not finish within train.remote_timeout_s={timeout_s:g} s")
        return future.result()
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
