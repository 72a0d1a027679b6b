"""The training driver: each step runs rollout -> judge -> advantages -> learners (in parallel) -> weight sync.

It holds no algorithm code: the step's R3 logic is `cluster.r3_step`, the math is in `learners.algos`
and `rollout.flow_sde`, the roles are built by `cluster.roles`. It times every phase, logs one metrics
row per step, writes trajectories as parquet, checkpoints, and evaluates at the end. Every remote wait
is bounded by `train.remote_timeout_s`; a dead or unresponsive learner raises
`cluster.failures.LearnerFailure` (which names the actor, the step and the checkpoint to resume from),
`train.max_nonfinite_steps` skipped updates in a row raise `cluster.failures.NonFiniteFailure`, and a
step whose judge failed on more than `judge.max_error_fraction` of its items raises
`cluster.failures.JudgeFailure` before its update. A rollout worker found dead anywhere (rollout,
weight sync, version query, resize, evaluation) is replaced and re-synced (`cluster.pools`); one that
cannot be replaced within `train.retries` tries raises `cluster.failures.WorkerFailure` after a
checkpoint of the last completed step. A stop signal is honoured between steps or by abandoning a
step's rollout (`cluster.stopping`). The run loop itself (lock, resume, steps, evaluation, stop) is
`cluster.run_loop`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.config import R3Config
from cluster.console import Console, format_round_accuracy
from cluster.elastic import TrainerElastic
from cluster.failures import (
    JudgeFailure,
    NonFiniteFailure,
    NonFiniteStreak,
    bounded,
    judge_failure_cause,
    learner_failure,
)
from cluster.pools import WorkerReplacementError
from cluster.run_folder import run_dir_path, write_config
from cluster.settings import eval_settings, load_prompt_sets, step_settings
from cluster.stopping import GracefulStop, StopRequested
from cluster.trainer_checkpoints import TrainerCheckpoints

__all__ = ["make_run_dir", "Trainer"]

log = logging.getLogger(__name__)


def make_run_dir(cfg: R3Config) -> Path:
    """Create `train.run_dir/<train.run_name or a timestamp>` and write its `config.yaml` (no lock:
    `cluster.run_loop.run_training` takes one before writing anything)."""
    run_dir = run_dir_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir)
    return run_dir


class Trainer(TrainerCheckpoints, TrainerElastic):
    """Owns the roles, data and buffer of one run; `step()` is one full R3 RL step."""

    def __init__(self, cfg: R3Config, run_dir: Path, console: Console | None = None):
        from cluster.metrics import MetricsLogger
        from cluster.roles import build_roles, resolve_paths
        from rollout.buffer import RolloutBuffer
        from rollout.datasets import PromptIterator

        self.cfg, self.run_dir = cfg, run_dir
        self.console = console if console is not None else Console.verbose()
        self.train_prompts, self.test_prompts = load_prompt_sets(cfg)
        self.prompts = PromptIterator(self.train_prompts, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        self.buffer = RolloutBuffer(cfg.r3.buffer_size, p_perfect=cfg.r3.p_perfect, seed=cfg.train.seed)
        self.settings = step_settings(cfg)
        self.paths = resolve_paths(cfg)
        self.roles = build_roles(cfg, self.paths)
        self.step_index = 0
        self.metrics = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard,
                                     wandb_project=cfg.logging.wandb_project if cfg.logging.wandb else None)
        self.phase_log: list[dict[str, Any]] = []
        self._uncond: Any = None
        self._closed = False
        self._pending: tuple[Any, float] | None = None  # one-step-off: the rollout already made for the next step
        self.last_checkpoint: Path | None = None  # saved or loaded by this trainer: where a resume continues
        self._checkpoint_step: int | None = None  # the step of last_checkpoint
        self._nonfinite = NonFiniteStreak(cfg.train.max_nonfinite_steps)
        # (prompt cursor, buffer copy, pending rollout) of the current step's start while the learners are
        # untouched, or of a completed step whose next rollout was abandoned: what a checkpoint written now holds
        self._resume_state: tuple[dict[str, Any], Any, Any] | None = None
        self._learners_touched = False  # the current step's update has begun (the step must then complete)
        self._target_version = 0  # the weight version the current step's update makes

    # ------------------------------------------------------------------------------- one step

    def step(self, stop: GracefulStop | None = None) -> dict[str, Any]:
        """One step. With `train.async_one_step_off`, the rollout of step t+1 runs while the learners
        train on step t (its samples are then one weight version stale, never more).

        With `stop` (the run's signal state), a rollout still running `train.stop_grace_s` after a stop
        signal is abandoned (`StopRequested`; no metrics row, the learners untouched); a rollout of the
        next step abandoned that way in one-step-off mode ends the run after this step.
        """
        stop = stop if stop is not None else GracefulStop(0.0)  # never installed: never requested
        i = self.step_index
        self._resume_state, self._learners_touched = self._driver_state(), False
        try:
            flat, abandoned_ahead = self._step(i, stop)
        except WorkerReplacementError as e:
            raise self._worker_failure(e, i) from e
        self._resume_state = abandoned_ahead[1] if abandoned_ahead else None
        self._learners_touched = False
        if abandoned_ahead:
            raise abandoned_ahead[0]
        return flat

    def _step(self, i: int, stop: GracefulStop) -> tuple[dict[str, Any], tuple[StopRequested, Any] | None]:
        cfg, roles = self.cfg, self.roles
        phases: dict[str, float] = {}
        if self._pending is not None:
            result, phases["rollout"] = self._pending
            self._pending = None
        else:
            result = stop.wait(lambda: self._rollout(i, phases), f"the rollout of step {i}")
        self._stop_if_judge_failed(i, result)
        staleness = self._staleness(result)
        abandoned_ahead = None
        if cfg.train.async_one_step_off and i + 1 < cfg.train.steps:
            before_ahead = self._driver_state()
            ex = ThreadPoolExecutor(1)
            try:
                ahead: dict[str, float] = {}
                future = ex.submit(self._rollout, i + 1, ahead)
                text_m, image_m = self._learn_timed(result, i, phases)
                try:
                    rollout = stop.wait(lambda: future.result(timeout=cfg.train.remote_timeout_s),
                                        f"the rollout of step {i + 1}")
                    self._pending = (rollout, ahead["rollout"])
                except StopRequested as s:  # this step still completes; the checkpoint resumes before i+1
                    abandoned_ahead = (s, before_ahead)
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
        else:
            text_m, image_m = self._learn_timed(result, i, phases)
        with _timed(phases, "sync", self.phase_log, i):
            text_sync, image_sync = self._sync_weights()
        versions = self._worker_versions()
        row = {
            **result.metrics,
            "stages": "+".join(result.stages),
            "text_learner": text_m,
            "diffusion_learner": image_m,
            "sync": {"text_seconds": text_sync.seconds, "text_bytes": text_sync.bytes,
                     "image_seconds": image_sync.seconds, "image_bytes": image_sync.bytes},
            "time": {**phases, "step": sum(phases.values())},
            "version": {"policy": roles.version, "text_workers_min": min(versions["text_workers"]),
                        "diffusion_workers_min": min(versions["diffusion_workers"]), "max_staleness": staleness},
            "samples": {"trajectories": len(result.trajectories), "text": len(result.text_batch),
                        "image": len(result.image_batch)},
            "workers": {"text_replacements": roles.text_pool.replacements,
                        "diffusion_replacements": roles.diffusion_pool.replacements},
        }
        flat = self.metrics.log(i, row)
        self._write_trajectories(result.trajectories)
        self._stop_if_nonfinite(i, text_m, image_m)
        self.step_index += 1
        return flat, abandoned_ahead

    def _stop_if_judge_failed(self, i: int, result: Any) -> None:
        """Raise `JudgeFailure` (before the update) if the judge failed on more than `judge.max_error_fraction`
        of this step's items."""
        items = sum(result.metrics[f"{s}/samples"] for s in result.stages)
        cause = judge_failure_cause(i, result.metrics["judge/errors"], items, self.cfg.judge.max_error_fraction,
                                    self.cfg.judge.kind)
        if cause is not None:
            raise JudgeFailure(i, self.last_checkpoint, cause, self._auto_checkpoint())

    def _auto_checkpoint(self) -> Path | None:
        """What `--resume auto` would pick now (named in failure messages)."""
        from cluster.checkpoint import resolve_resume

        return resolve_resume("auto", Path(self.cfg.train.run_dir).resolve(), self.cfg.train.run_name)

    def _stop_if_nonfinite(self, i: int, text_m: dict[str, float], image_m: dict[str, float]) -> None:
        """Raise `NonFiniteFailure` once `train.max_nonfinite_steps` steps in a row had an update skipped."""
        skipped = [name for name, m in (("text learner", text_m), ("diffusion learner", image_m))
                   if m.get("skipped_nonfinite")]
        cause = self._nonfinite.observe(i, skipped)
        if cause is not None:
            raise NonFiniteFailure(i, "learners training", self.last_checkpoint, cause, self._auto_checkpoint())

    def _rollout(self, i: int, phases: dict[str, float]) -> Any:
        from cluster.r3_step import run_r3_step, tree_stages

        roles = self.roles
        with _timed(phases, "rollout", self.phase_log, i):
            needs_prompts = self.settings.mode == "chain" or "generate" in tree_stages(i, self.settings, self.buffer)
            prompts = self.prompts.next_batch(self.cfg.r3.prompts_per_step) if needs_prompts else []
            return run_r3_step(i, prompts, roles.reasoner, roles.generator, roles.judge, self.buffer, self.settings)

    def _learn_timed(self, result: Any, i: int, phases: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        with _timed(phases, "learn", self.phase_log, i), self._learners_guarded("learners training"):
            return self._learn(result)

    def _sync_weights(self) -> tuple[Any, Any]:
        """Push the new weights to every worker (bounded waits); the policy version advances on success."""
        with self._learners_guarded("weight sync", timeouts_are_learners=False):  # a stuck worker also times out
            text, image = self._push_weights(self._target_version)
        self.roles.version = self._target_version
        return text, image

    def _push_weights(self, version: int) -> tuple[Any, Any]:
        """Both models' weights to every worker as `version`. Dead workers are replaced first (the group
        must not include them); a worker that dies during the sync is replaced and the sync redone, at
        most `train.retries` times (then `WorkerReplacementError`)."""
        import ray

        roles, timeout, retries = self.roles, self.cfg.train.remote_timeout_s, self.cfg.train.retries
        reports = []
        for name, sync, learners, pool in (("text", roles.text_sync, roles.text_learners, roles.text_pool),
                                           ("diffusion", roles.diffusion_sync, roles.diffusion_learners,
                                            roles.diffusion_pool)):
            for attempt in range(retries + 1):
                pool.ensure_alive()
                try:
                    reports.append(bounded(lambda s=sync, ls=learners, p=pool: s.sync(ls, p.actors, version),
                                           timeout, f"{name} weight sync"))
                    break
                except ray.exceptions.RayActorError as e:
                    dead = pool.slots_named_by(e)
                    if not dead:  # a learner died: the guard around this turns it into a LearnerFailure
                        raise
                    if attempt == retries:
                        raise WorkerReplacementError(pool.role, dead, "weight sync", retries, type(e).__name__) from e
                    log.warning("%s weight sync: a worker died (%s); replacing it and syncing again (%d of %d)",
                                name, type(e).__name__, attempt + 1, retries)
        return reports[0], reports[1]

    @contextmanager
    def _learners_guarded(self, phase: str, timeouts_are_learners: bool = True) -> Iterator[None]:
        """Turn an error into a LearnerFailure when a learner is dead (or, with `timeouts_are_learners`, on
        any timeout: only learners were being waited for)."""
        try:
            yield
        except Exception as e:
            groups = (self.roles.text_learners, self.roles.diffusion_learners)
            auto = self._auto_checkpoint()
            failure = learner_failure(e, groups, self.step_index, phase, self.last_checkpoint, auto,
                                      timeouts_are_learners)
            if failure is None:
                raise
            raise failure from e

    def _staleness(self, result: Any) -> int:
        """Policy version minus the oldest weight version any training sample was drawn with."""
        versions = [it.sample.weight_version for it in result.text_batch + result.image_batch]
        return self.roles.version - min(versions) if versions else 0

    def _worker_versions(self) -> dict[str, list[int]]:
        versions = {}
        for role, pool in (("text_workers", self.roles.text_pool), ("diffusion_workers", self.roles.diffusion_pool)):
            versions[role] = pool.call_each("version")
            stats = pool.call_each("stats")
            for k, (st, v) in enumerate(zip(stats, versions[role], strict=True)):
                st.update(name=f"{role.removesuffix('s').replace('_', '-')}-{k}", weight_version=v)
            self.metrics.log_workers(role, stats)
        return versions

    def _learn(self, result: Any) -> tuple[dict[str, float], dict[str, float]]:
        """Text and diffusion learners train at the same time (two threads waiting on Ray)."""
        roles, timeout = self.roles, self.cfg.train.remote_timeout_s
        text = _trim(result.text_batch, roles.text_learners.num_learners)
        image = _trim(result.image_batch, roles.diffusion_learners.num_learners)
        negative_embeds = self._negative_embeds() if image else None  # before any learner starts
        self._learners_touched, self._target_version = True, roles.version + 1

        def train_text() -> dict[str, float]:
            if not text:
                return {"skipped": 1.0}
            images = [it.images[0] if it.images else None for it in text]
            return roles.text_learners.train_step(
                [it.sample for it in text], [it.advantage for it in text],
                images=images if any(x is not None for x in images) else None, timeout_s=timeout,
            )

        def train_image() -> dict[str, float]:
            if not image:
                return {"skipped": 1.0}
            return roles.diffusion_learners.train_step([it.sample for it in image], [it.advantage for it in image],
                                                       negative_embeds=negative_embeds, timeout_s=timeout)

        pool = ThreadPoolExecutor(2)
        try:
            t, m = pool.submit(train_text), pool.submit(train_image)
            return t.result(timeout=timeout), m.result(timeout=timeout)
        finally:  # on a failure, do not wait for the other learner: the run stops and its cleanup kills it
            pool.shutdown(wait=False, cancel_futures=True)

    def _negative_embeds(self) -> Any:
        """Unconditional (empty-prompt) embeddings for train-time CFG, encoded once by a diffusion worker."""
        if self.cfg.flow_grpo.train_cfg_scale == 1.0:
            return None
        if self._uncond is None:
            embeds, pooled = self.roles.diffusion_pool.call_one(0, "encode", [""])
            self._uncond = (embeds[0], pooled[0])
        return self._uncond

    def _write_trajectories(self, trajectories: list[Any]) -> None:
        from rollout.trajectory import write_trajectories

        keep = trajectories[: self.cfg.logging.trajectories_per_step]
        if keep:
            out = self.run_dir / "trajectories"
            out.mkdir(exist_ok=True)
            write_trajectories(out / f"step-{self.step_index:06d}.parquet", keep)

    # ------------------------------------------------------------------------------- evaluation

    def evaluate(self, tag: str = "final") -> Any:
        from cluster.ema_eval import ema_on_workers
        from cluster.gallery import write_gallery
        from rollout.evaluation import evaluate
        from rollout.trajectory import write_trajectories

        settings = eval_settings(self.cfg)
        self.console.line(f"evaluating ({tag}): {len(self.test_prompts)} prompts, up to {settings.max_rounds} rounds each")
        start = time.perf_counter()
        with ema_on_workers(self.cfg, self.roles, self.cfg.train.remote_timeout_s):  # the EMA, if kept
            report = evaluate(self.test_prompts, self.roles.reasoner, self.roles.generator, self.roles.judge, settings)
        out = self.run_dir / f"eval-{tag}"
        out.mkdir(exist_ok=True)
        (out / "eval.json").write_text(report.to_json())
        (out / "eval.md").write_text(report.to_markdown())
        write_trajectories(out / "trajectories.parquet", report.trajectories)
        if self.cfg.logging.gallery:
            write_gallery(out / "gallery.html", report.trajectories, title=f"R3RL evaluation ({tag})")
        self.console.line(f"evaluation ({tag}), accuracy per round: "
                          f"{format_round_accuracy([s.accuracy for s in report.overall])} "
                          f"[{time.perf_counter() - start:.0f} s; {out}]")
        return report

    def close(self, hurry: bool = False) -> None:
        """Stop every role (idempotent); actor names are free again afterwards. `hurry` (after a stop signal
        or abandoned work: workers may still be busy) waits at most 10 s for the workers' own shutdown."""
        if self._closed:
            return
        self._closed = True
        if hurry:
            for pool in (self.roles.text_pool, self.roles.diffusion_pool):
                pool.timeout_s = min(pool.timeout_s, 10.0)
        self.metrics.close()
        (self.run_dir / "phases.json").write_text(json.dumps(self.phase_log, indent=1))
        self.roles.shutdown()


def _trim(batch: list[Any], ranks: int) -> list[Any]:
    """Learner groups need a batch divisible by their rank count: drop the remainder (logged)."""
    keep = len(batch) - len(batch) % ranks
    if keep != len(batch):
        log.info("dropping %d of %d samples so the batch splits over %d learner ranks", len(batch) - keep, len(batch), ranks)
    return batch[:keep]


@contextmanager
def _timed(phases: dict[str, float], name: str, timeline: list[dict[str, Any]], step: int):
    start = time.time()
    try:
        yield
    finally:
        end = time.time()
        phases[name] = end - start
        timeline.append({"step": step, "phase": name, "start": start, "end": end})

