"""Checkpoints of a run (a `Trainer` mixin): save, load, and the checkpoint of the last completed step that
a stop signal or a worker failure leaves behind.

A checkpoint holds every learner rank's state, the driver's prompt cursor and rollout buffer, the
versions and, in one-step-off mode, the rollout made ahead (see docs/operations.md#checkpoints-and-resume).
A step abandoned in its rollout is checkpointed as of its start: the learners never saw it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cluster.failures import WorkerFailure
from cluster.pools import WorkerReplacementError

__all__ = ["TrainerCheckpoints"]

log = logging.getLogger(__name__)


class TrainerCheckpoints:
    """Needs what a `cluster.driver.Trainer` has: `cfg`, `roles`, `run_dir`, `prompts`, `buffer`, `metrics`,
    `step_index`, `_pending`, `_resume_state`, `_learners_touched`, `_target_version`, `last_checkpoint`,
    `_checkpoint_step`, `_learners_guarded`, `_push_weights`, `_auto_checkpoint`."""

    cfg: Any
    roles: Any
    run_dir: Path
    prompts: Any
    buffer: Any
    metrics: Any
    step_index: int
    last_checkpoint: Path | None
    _checkpoint_step: int | None
    _pending: Any
    _resume_state: Any
    _learners_touched: bool
    _target_version: int

    def _driver_state(self) -> tuple[dict[str, Any], Any, Any]:
        """The prompt cursor, a copy of the rollout buffer and the pending rollout, as of now."""
        return self.prompts.state_dict(), self.buffer.snapshot(), self._pending

    def _worker_failure(self, error: WorkerReplacementError, i: int) -> WorkerFailure:
        """Checkpoint the last completed step, then the `WorkerFailure` that names it. If the learners had
        already updated (the sync or the version query failed), that update completes step `i`."""
        phase = "weight sync" if self._learners_touched else "rollout"
        if self._learners_touched:
            self.step_index, self.roles.version = i + 1, max(self.roles.version, self._target_version)
            self._resume_state = None
        try:
            checkpoint = self.checkpoint_last_completed()
        except Exception as e:  # the failure stays the news; the message names the older checkpoint
            log.error("could not write a checkpoint after the worker failure: %s", e)
            checkpoint = self.last_checkpoint
        failure = WorkerFailure([f"{error.role} {error.indices}"], i, phase, checkpoint, str(error),
                                self._auto_checkpoint())
        log.error("%s", failure)
        return failure

    def checkpoint_last_completed(self) -> Path | None:
        """A checkpoint of the last completed step (the current step's start if one is under way with the
        learners untouched); the existing one if nothing completed since. None if no step completed."""
        if self._checkpoint_step == self.step_index and self.last_checkpoint is not None:
            return self.last_checkpoint
        if self.step_index == 0:
            return None
        return self.save_checkpoint(self._resume_state)


    def save_checkpoint(self, driver_state: tuple[dict[str, Any], Any, Any] | None = None) -> Path:
        """Weights + optimizer + schedule + RNG of every learner rank, data cursor, buffer, versions, and in
        one-step-off mode the rollout already made for the next step (so a resume continues exactly).

        `driver_state` (prompt cursor, buffer, pending rollout) replaces the live ones: the state of the
        current step's start when that step is abandoned (`_driver_state`)."""
        import ray

        from cluster.checkpoint import CheckpointDir, checkpoints_dir, save_pending_rollout
        from learners.checkpointing import save_learner_state

        ck = CheckpointDir(checkpoints_dir(self.run_dir), self.step_index)
        refs = []
        for kind, group in (("text_learner", self.roles.text_learners), ("diffusion_learner", self.roles.diffusion_learners)):
            refs += [a.__ray_call__.remote(save_learner_state, str(ck.path / kind)) for a in group.actors]
        with self._learners_guarded("saving a checkpoint"):
            ray.get(refs, timeout=self.cfg.train.remote_timeout_s)
        prompts, buffer, pending = driver_state or (self.prompts.state_dict(), self.buffer, self._pending)
        driver = {"prompts": prompts, "buffer": buffer.state_dict()}
        (ck.path / "driver.json").write_text(json.dumps(driver))
        if pending is not None:  # its prompts and buffer draws are already in the cursor/buffer above
            save_pending_rollout(ck.path / "pending", *pending)
        meta = {"step": self.step_index, "version": self.roles.version, "saved_at": time.time(),
                "pending_rollout": pending is not None,
                "learners": {"text": self.roles.text_learners.num_learners,
                             "diffusion": self.roles.diffusion_learners.num_learners}}
        final = ck.commit(meta, keep=self.cfg.checkpoint.keep)
        self.last_checkpoint, self._checkpoint_step = final, self.step_index
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
        self._checkpoint_step = int(meta["step"])
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
        dropped = self.metrics.drop_rows_from(self.step_index)  # the steps this resume redoes: one row each
        if dropped:
            log.info("metrics.jsonl: dropped %d rows of steps >= %d (this resume redoes them)", dropped, self.step_index)
        if self.roles.version > 0:
            try:
                with self._learners_guarded("loading a checkpoint", timeouts_are_learners=False):
                    self._push_weights(self.roles.version)
            except WorkerReplacementError as e:
                raise WorkerFailure([f"{e.role} {e.indices}"], self.step_index, "loading a checkpoint", path,
                                    str(e), self._auto_checkpoint()) from e
        log.info("resumed from %s at step %d (weights version %d)", path, self.step_index, self.roles.version)

