"""The training driver: each step runs rollout -> judge -> advantages -> learners (in parallel) -> weight sync.

It holds no algorithm code: the step's R3 logic is `cluster.r3_step`, the math is in `learners.algos`
and `rollout.flow_sde`, the roles are built by `cluster.roles`. It times every phase, logs one metrics
row per step, writes trajectories as parquet, checkpoints, and evaluates at the end. Every remote wait
is bounded by `train.remote_timeout_s`; a dead or unresponsive learner raises
`cluster.failures.LearnerFailure` (which names the actor, the step and the checkpoint to resume from),
`train.max_nonfinite_steps` skipped updates in a row raise `cluster.failures.NonFiniteFailure`, and a
step whose judge failed on more than `judge.max_error_fraction` of its items raises
`cluster.failures.JudgeFailure` before its update. `run_training` holds the run folder's lock for the
run's life and checks a resume's config against the checkpoint's run before any engine starts
(`cluster.run_folder`; both refuse with `cluster.failures.RunRefused`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cluster.config import R3Config
from cluster.console import Console, format_round_accuracy
from cluster.failures import (
    JudgeFailure,
    NonFiniteFailure,
    NonFiniteStreak,
    RunRefused,
    bounded,
    judge_failure_cause,
    learner_failure,
)
from cluster.settings import eval_settings, load_prompt_sets, step_settings

__all__ = ["run_training", "make_run_dir", "Trainer"]

log = logging.getLogger(__name__)


def make_run_dir(cfg: R3Config) -> Path:
    """Create `train.run_dir/<train.run_name or a timestamp>` and write its `config.yaml` (no lock:
    `run_training` takes one before writing anything)."""
    run_dir = _run_dir_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, run_dir)
    return run_dir


def _run_dir_path(cfg: R3Config) -> Path:
    name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.train.run_dir).resolve() / name


def _write_config(cfg: R3Config, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


class Trainer:
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
        self._nonfinite = NonFiniteStreak(cfg.train.max_nonfinite_steps)

    # ------------------------------------------------------------------------------- one step

    def step(self) -> dict[str, Any]:
        """One step. With `train.async_one_step_off`, the rollout of step t+1 runs while the learners
        train on step t (its samples are then one weight version stale, never more)."""
        cfg, roles, i = self.cfg, self.roles, self.step_index
        phases: dict[str, float] = {}
        if self._pending is not None:
            result, phases["rollout"] = self._pending
            self._pending = None
        else:
            result = self._rollout(i, phases)
        self._stop_if_judge_failed(i, result)
        staleness = self._staleness(result)
        if cfg.train.async_one_step_off and i + 1 < cfg.train.steps:
            with ThreadPoolExecutor(1) as ex:
                ahead: dict[str, float] = {}
                future = ex.submit(self._rollout, i + 1, ahead)
                text_m, image_m = self._learn_timed(result, i, phases)
                self._pending = (future.result(timeout=cfg.train.remote_timeout_s), ahead["rollout"])
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
        return flat

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
        roles, timeout = self.roles, self.cfg.train.remote_timeout_s
        version = roles.version + 1
        with self._learners_guarded("weight sync", timeouts_are_learners=False):  # a stuck worker also times out
            text = bounded(lambda: roles.text_sync.sync(roles.text_learners, roles.text_pool.actors, version),
                           timeout, "text weight sync")
            image = bounded(lambda: roles.diffusion_sync.sync(roles.diffusion_learners, roles.diffusion_pool.actors,
                                                              version), timeout, "diffusion weight sync")
        roles.version = version
        return text, image

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
            versions[role] = pool.call_all("version")
            stats = pool.call_all("stats")
            for k, (st, v) in enumerate(zip(stats, versions[role], strict=True)):
                st.update(name=f"{role.removesuffix('s').replace('_', '-')}-{k}", weight_version=v)
            self.metrics.log_workers(role, stats)
        return versions

    def _learn(self, result: Any) -> tuple[dict[str, float], dict[str, float]]:
        """Text and diffusion learners train at the same time (two threads waiting on Ray)."""
        roles, timeout = self.roles, self.cfg.train.remote_timeout_s
        text = _trim(result.text_batch, roles.text_learners.num_learners)
        image = _trim(result.image_batch, roles.diffusion_learners.num_learners)

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
                                                       negative_embeds=self._negative_embeds(), timeout_s=timeout)

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
            import ray

            embeds, pooled = ray.get(self.roles.diffusion_pool.actors[0].encode.remote([""]),
                                     timeout=self.cfg.train.remote_timeout_s)
            self._uncond = (embeds[0], pooled[0])
        return self._uncond

    def _write_trajectories(self, trajectories: list[Any]) -> None:
        from rollout.trajectory import write_trajectories

        keep = trajectories[: self.cfg.logging.trajectories_per_step]
        if keep:
            out = self.run_dir / "trajectories"
            out.mkdir(exist_ok=True)
            write_trajectories(out / f"step-{self.step_index:06d}.parquet", keep)

    # ------------------------------------------------------------------------------- elasticity

    def resize_workers(self, text_workers: int | None = None, diffusion_workers: int | None = None) -> dict[str, list[int]]:
        """Change rollout worker counts between steps; new workers get the current weights before serving.

        Learners are untouched. Returns the indices of the new workers per role.
        """
        new: dict[str, list[int]] = {}
        for role, pool, count in (("text_workers", self.roles.text_pool, text_workers),
                                  ("diffusion_workers", self.roles.diffusion_pool, diffusion_workers)):
            if count is not None and count != len(pool):
                log.info("resizing %s: %d -> %d", role, len(pool), count)
                new[role] = pool.resize(count)
        return new

    def apply_control_file(self) -> dict[str, list[int]]:
        """`<run>/control.yaml` (e.g. `text_workers: 3`) rescales workers before the next step.

        The file is renamed to `control.applied-step-N.yaml`, or to `.rejected-…` with the reason logged
        (bad keys or values, or more workers than the cluster's free resources can place); the run goes on.
        """
        import ray

        from cluster.placement import resize_requests, resize_shortfall

        path = self.run_dir / "control.yaml"
        if not path.is_file():
            return {}
        stamp = f"step-{self.step_index:06d}"
        try:
            data = yaml.safe_load(path.read_text()) or {}
            allowed = {"text_workers", "diffusion_workers"}
            if not isinstance(data, dict) or set(data) - allowed:
                raise ValueError(f"control.yaml keys must be among {sorted(allowed)}, got {data!r}")
            for key, value in data.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"control.yaml {key}={value!r}: must be an integer >= 1")
            pools = {"text_workers": self.roles.text_pool, "diffusion_workers": self.roles.diffusion_pool}
            shortfall = resize_shortfall(resize_requests(self.cfg, pools, data), ray.available_resources())
            if shortfall is not None:
                raise ValueError(shortfall)
            new = self.resize_workers(**data)
        except (ValueError, RuntimeError, yaml.YAMLError) as e:  # RuntimeError: a new worker's group was not placed
            log.error("rejected %s: %s", path, e)
            self.console.line(f"control.yaml rejected: {e}")
            path.rename(self.run_dir / f"control.rejected-{stamp}.yaml")
            return {}
        path.rename(self.run_dir / f"control.applied-{stamp}.yaml")
        return new

    # ------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Weights + optimizer + schedule + RNG of every learner rank, data cursor, buffer, versions, and in
        one-step-off mode the rollout already made for the next step (so a resume continues exactly)."""
        import ray

        from cluster.checkpoint import CheckpointDir, checkpoints_dir, save_pending_rollout
        from learners.checkpointing import save_learner_state

        ck = CheckpointDir(checkpoints_dir(self.run_dir), self.step_index)
        refs = []
        for kind, group in (("text_learner", self.roles.text_learners), ("diffusion_learner", self.roles.diffusion_learners)):
            refs += [a.__ray_call__.remote(save_learner_state, str(ck.path / kind)) for a in group.actors]
        with self._learners_guarded("saving a checkpoint"):
            ray.get(refs, timeout=self.cfg.train.remote_timeout_s)
        driver = {"prompts": self.prompts.state_dict(), "buffer": self.buffer.state_dict()}
        (ck.path / "driver.json").write_text(json.dumps(driver))
        if self._pending is not None:  # its prompts and buffer draws are already in the cursor/buffer above
            save_pending_rollout(ck.path / "pending", *self._pending)
        meta = {"step": self.step_index, "version": self.roles.version, "saved_at": time.time(),
                "pending_rollout": self._pending is not None,
                "learners": {"text": self.roles.text_learners.num_learners,
                             "diffusion": self.roles.diffusion_learners.num_learners}}
        final = ck.commit(meta, keep=self.cfg.checkpoint.keep)
        self.last_checkpoint = final
        log.info("checkpoint saved: %s", final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Continue exactly where `path` left off; workers get the checkpoint's weights before serving."""
        import ray

        from cluster.checkpoint import load_pending_rollout
        from learners.checkpointing import load_learner_state

        meta = json.loads((path / "meta.json").read_text())
        for kind, group in (("text", self.roles.text_learners), ("diffusion", self.roles.diffusion_learners)):
            if meta["learners"][kind] != group.num_learners:
                raise ValueError(f"checkpoint {path} has {meta['learners'][kind]} {kind} learners, this run "
                                 f"{group.num_learners}: resume with the same cluster.{kind}_learners")
        refs = []
        for kind, group in (("text_learner", self.roles.text_learners), ("diffusion_learner", self.roles.diffusion_learners)):
            refs += [a.__ray_call__.remote(load_learner_state, str(path / kind)) for a in group.actors]
        self.last_checkpoint = path  # still the place to resume from if a learner dies while loading it
        with self._learners_guarded("loading a checkpoint"):
            ray.get(refs, timeout=self.cfg.train.remote_timeout_s)
        driver = json.loads((path / "driver.json").read_text())
        self.prompts.load_state_dict(driver["prompts"])
        self.buffer.load_state_dict(driver["buffer"])
        self.step_index, self.roles.version = int(meta["step"]), int(meta["version"])
        self._pending = load_pending_rollout(path / "pending") if meta.get("pending_rollout") else None
        if self._pending is not None and self._pending[0].step_index != self.step_index:
            raise ValueError(f"checkpoint {path}: pending rollout is for step {self._pending[0].step_index}, "
                             f"the checkpoint's step is {self.step_index}")
        if self.roles.version > 0:
            self.roles.text_sync.sync(self.roles.text_learners, self.roles.text_pool.actors, self.roles.version)
            self.roles.diffusion_sync.sync(self.roles.diffusion_learners, self.roles.diffusion_pool.actors,
                                           self.roles.version)
        log.info("resumed from %s at step %d (weights version %d)", path, self.step_index, self.roles.version)

    # ------------------------------------------------------------------------------- evaluation

    def evaluate(self, tag: str = "final") -> Any:
        from cluster.gallery import write_gallery
        from rollout.evaluation import evaluate
        from rollout.trajectory import write_trajectories

        settings = eval_settings(self.cfg)
        self.console.line(f"evaluating ({tag}): {len(self.test_prompts)} prompts, up to {settings.max_rounds} rounds each")
        start = time.perf_counter()
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

    def close(self) -> None:
        """Stop every role (idempotent); actor names are free again afterwards."""
        if self._closed:
            return
        self._closed = True
        self.metrics.close()
        (self.run_dir / "phases.json").write_text(json.dumps(self.phase_log, indent=1))
        self.roles.shutdown()


def run_training(cfg: R3Config, verbose: bool = True) -> Path:
    """The whole job: connect, build roles, train `train.steps` steps, evaluate, shut down.

    With `verbose=False` the engines' logs go to `<run>/engine.log` and the terminal shows only a
    progress bar, a line per evaluation and where things are (`cluster.console`).

    Raises:
        RunRefused: another run holds the run folder's lock, or the resume changes what the checkpoint's
            run may not (`cluster.run_folder`); nothing was started or written then.
    """
    from cluster.checkpoint import resolve_resume
    from cluster.run_folder import check_resume_config, lock_run_dir

    run_dir = _run_dir_path(cfg)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_dir(run_dir) as lock:
        resume = resolve_resume(cfg.checkpoint.resume, Path(cfg.train.run_dir).resolve(), cfg.train.run_name)
        if resume is not None:
            try:
                check_resume_config(resume, cfg.model_dump(mode="json"), run_dir, cfg.checkpoint.allow_config_changes)
            except RunRefused:
                if created:  # leave no empty run folder behind
                    lock.unlink()
                    run_dir.rmdir()
                raise
        _write_config(cfg, run_dir)
        if verbose:
            _run(cfg, run_dir, Console.verbose(), resume)
            return run_dir
        with Console.quiet(run_dir / "engine.log") as console:
            console.line(f"run directory: {run_dir} (engine logs: {console.log_path.name})")
            _run(cfg, run_dir, console, resume)
    return run_dir


def _run(cfg: R3Config, run_dir: Path, console: Console, resume: Path | None) -> None:
    from cluster.session import connect_ray

    log.info("run directory: %s", run_dir)
    console.line("starting Ray and the roles (rollout workers, judge, learners)")
    start = time.perf_counter()
    started = connect_ray(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, console)
        console.line(f"roles ready in {time.perf_counter() - start:.0f} s")
        if resume is not None:
            trainer.load_checkpoint(resume)
            console.line(f"resumed from {resume} at step {trainer.step_index}")
        elif cfg.checkpoint.resume == "auto":
            log.info("checkpoint.resume=auto: no complete checkpoint under %s; starting fresh", cfg.train.run_dir)
        if cfg.train.eval_before and trainer.step_index == 0:
            trainer.evaluate(tag="before")
        _train_steps(cfg, trainer, console)
        if not cfg.checkpoint.every or trainer.step_index % cfg.checkpoint.every:
            trainer.save_checkpoint()  # a clean stop always leaves a checkpoint
        report = trainer.evaluate()
        if console.is_quiet:
            log.info("final evaluation\n%s", report.to_markdown())
        else:
            print(report.to_markdown())
    finally:
        if trainer is not None:
            trainer.close()
        if started:
            import ray

            ray.shutdown()


def _train_steps(cfg: R3Config, trainer: Trainer, console: Console) -> None:
    """Steps until `train.steps`, with checkpoints, periodic evaluations and the progress bar."""
    bar = console.progress(cfg.train.steps, trainer.step_index, enabled=cfg.logging.progress)
    while trainer.step_index < cfg.train.steps:
        trainer.apply_control_file()
        row = trainer.step()
        if cfg.checkpoint.every and trainer.step_index % cfg.checkpoint.every == 0:
            trainer.save_checkpoint()
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in
                         ("generate/score_mean", "refine/score_mean", "time/rollout", "time/learn", "time/sync")
                         if isinstance(row.get(k), float)})
        if cfg.train.eval_every and trainer.step_index % cfg.train.eval_every == 0 < cfg.train.steps - trainer.step_index:
            trainer.evaluate(tag=f"step-{trainer.step_index:06d}")
    bar.close()


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

