"""The run from start to end: lock the run folder, check a resume, start Ray and the roles, train, evaluate.

`run_training` is what `python -m cluster.train` calls. The loop honours a stop signal
(`cluster.stopping`): between steps, by abandoning a step's rollout after `train.stop_grace_s`, or by
abandoning an evaluation at once; it then writes a checkpoint of the last completed step (also with
`checkpoint.every: 0`), shuts the roles and Ray down and raises `cluster.failures.StoppedBySignal`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cluster.config import R3Config
from cluster.console import Console
from cluster.failures import RunRefused, StoppedBySignal
from cluster.pools import WorkerReplacementError
from cluster.stopping import GracefulStop, StopRequested

__all__ = ["run_training"]

log = logging.getLogger(__name__)


def run_training(cfg: R3Config, verbose: bool = True) -> Path:
    """The whole job: connect, build roles, train `train.steps` steps, evaluate, shut down.

    With `verbose=False` the engines' logs go to `<run>/engine.log` and the terminal shows only a
    progress bar, a line per evaluation and where things are (`cluster.console`).

    Raises:
        RunRefused: another run holds the run folder's lock, or the resume changes what the checkpoint's
            run may not (`cluster.run_folder`); nothing was started or written then.
        StoppedBySignal: SIGTERM or SIGINT stopped the run cleanly (it names the checkpoint written).
        LearnerFailure: a learner died, training stayed non-finite, the judge failed too often, or a
            rollout worker could not be replaced (`cluster.failures`; each names the checkpoint).
    """
    from cluster.checkpoint import resolve_resume
    from cluster.run_folder import check_resume_config, lock_run_dir, run_dir_path, write_config

    run_dir = run_dir_path(cfg)
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
        write_config(cfg, run_dir)
        if verbose:
            _run(cfg, run_dir, Console.verbose(), resume)
            return run_dir
        with Console.quiet(run_dir / "engine.log") as console:
            console.line(f"run directory: {run_dir} (engine logs: {console.log_path.name})")
            _run(cfg, run_dir, console, resume)
    return run_dir


def _run(cfg: R3Config, run_dir: Path, console: Console, resume: Path | None) -> None:
    from cluster.driver import Trainer
    from cluster.session import connect_ray

    log.info("run directory: %s", run_dir)
    console.line("starting Ray and the roles (rollout workers, judge, learners)")
    start = time.perf_counter()
    stop = GracefulStop(cfg.train.stop_grace_s, console.line)
    started = connect_ray(cfg)
    stop.install()  # after ray.init, which sets its own SIGTERM handler
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, console)
        console.line(f"roles ready in {time.perf_counter() - start:.0f} s")
        if resume is not None:
            trainer.load_checkpoint(resume)
            console.line(f"resumed from {resume} at step {trainer.step_index}")
        elif cfg.checkpoint.resume == "auto":
            log.info("checkpoint.resume=auto: no complete checkpoint under %s; starting fresh", cfg.train.run_dir)
        try:
            if cfg.train.eval_before and trainer.step_index == 0:
                _evaluate(trainer, stop, "before")
            _train_steps(cfg, trainer, console, stop)
            if not cfg.checkpoint.every or trainer.step_index % cfg.checkpoint.every:
                trainer.save_checkpoint()  # a clean stop always leaves a checkpoint
            stop.check()
            report = _evaluate(trainer, stop, "final")
        except WorkerReplacementError as e:  # outside a step: an evaluation or a resize
            raise trainer._worker_failure(e, trainer.step_index) from e
        if console.is_quiet:
            log.info("final evaluation\n%s", report.to_markdown())
        else:
            print(report.to_markdown())
    except StopRequested as s:
        raise _stopped(s, trainer) from None
    finally:
        if trainer is not None:
            trainer.close(hurry=stop.requested)
        if started:
            import ray

            ray.shutdown()
        stop.restore()


def _evaluate(trainer: Any, stop: GracefulStop, tag: str) -> Any:
    """An evaluation that a stop signal abandons at once (a resume needs nothing from it)."""
    stop.check()
    return stop.wait(lambda: trainer.evaluate(tag=tag), f"the evaluation {tag!r}", grace_s=0.0)


def _stopped(s: StopRequested, trainer: Any) -> StoppedBySignal:
    """Checkpoint the last completed step after a stop signal; the exception that reports it."""
    checkpoint, step = None, 0
    if trainer is not None:
        step = trainer.step_index
        try:
            checkpoint = trainer.checkpoint_last_completed()
        except Exception as e:  # report the stop anyway, naming the older checkpoint
            log.error("stop: could not write a checkpoint: %s", e)
            checkpoint = trainer.last_checkpoint
    stopped = StoppedBySignal(s.signum, step, checkpoint, s.abandoned)
    log.warning("%s", stopped)
    return stopped


def _train_steps(cfg: R3Config, trainer: Any, console: Console, stop: GracefulStop) -> None:
    """Steps until `train.steps`, with checkpoints, periodic evaluations and the progress bar."""
    bar = console.progress(cfg.train.steps, trainer.step_index, enabled=cfg.logging.progress)
    try:
        while trainer.step_index < cfg.train.steps:
            stop.check()
            trainer.apply_control_file()
            row = trainer.step(stop)
            if cfg.checkpoint.every and trainer.step_index % cfg.checkpoint.every == 0:
                trainer.save_checkpoint()
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in
                             ("generate/score_mean", "refine/score_mean", "time/rollout", "time/learn", "time/sync")
                             if isinstance(row.get(k), float)})
            if cfg.train.eval_every and trainer.step_index % cfg.train.eval_every == 0 < cfg.train.steps - trainer.step_index:
                _evaluate(trainer, stop, f"step-{trainer.step_index:06d}")
    finally:
        bar.close()
