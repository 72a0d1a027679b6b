"""Checkpoint folders of a run: written to a temp folder and renamed, so `auto` never picks a torn one.

Layout: `<run>/checkpoints/step-000004/` with `meta.json` (step, versions, data cursor, config
hash), `driver/` (rollout buffer + driver RNG, pickle-free), `text_learner/`, `diffusion_learner/`
(each rank's state, see learners.checkpointing), and in one-step-off mode `pending/` (the rollout
already made for the next step, see `save_pending_rollout`). A folder counts only once `COMPLETE`
exists in it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CheckpointDir", "find_latest", "require_complete", "checkpoints_dir", "run_dir_of", "resolve_resume", "save_pending_rollout", "load_pending_rollout"]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{6})$")
COMPLETE = "COMPLETE"


class CheckpointDir:
    """A checkpoint being written: `path` is the temp folder until `commit()` renames it."""

    def __init__(self, root: Path, step: int):
        self.root = Path(root)
        self.final = self.root / f"step-{step:06d}"
        self.path = self.root / f".tmp-step-{step:06d}"
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def commit(self, meta: dict[str, Any], keep: int) -> Path:
        (self.path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (self.path / COMPLETE).write_text("ok\n")
        if self.final.exists():
            shutil.rmtree(self.final)
        self.path.rename(self.final)
        _prune(self.root, keep)
        return self.final


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (temp and incomplete folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def require_complete(path: str | Path, name: str | None = None) -> Path:
    """`path` as a Path if it is a complete checkpoint folder; else ValueError naming it (`name`, default the path)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{name or path} is not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


def checkpoints_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints: `<run>/checkpoints/step-N` (`run_dir_of` inverts it)."""
    return Path(run_dir) / "checkpoints"


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint folder belongs to (`<run>/checkpoints/step-N` -> `<run>`)."""
    return Path(checkpoint).parent.parent


def resolve_resume(resume: str | None, run_root: Path, run_name: str | None = None) -> Path | None:
    """`None` -> fresh start; a path -> that checkpoint, which must be complete; `auto` -> the newest
    complete checkpoint of the run `run_name` (`train.run_name`) if it has one, else the one saved last
    (`meta.json`'s `saved_at`) of any run under `run_root`, else None. A checkpoint of another run whose
    `meta.json` is unreadable is skipped with a warning: it never stops this run's resume."""
    if resume is None:
        return None
    if resume != "auto":
        return require_complete(resume, f"checkpoint.resume={resume!r}")
    if run_name:
        own = find_latest(checkpoints_dir(Path(run_root) / run_name))
        if own is not None:
            return own
    saved = [(t, c) for c in (find_latest(checkpoints_dir(d)) for d in sorted(Path(run_root).glob("*")) if d.is_dir())
             if c is not None and (t := _saved_at(c)) is not None]
    return max(saved, key=lambda tc: tc[0])[1] if saved else None


def save_pending_rollout(directory: Path, result: Any, rollout_seconds: float) -> None:
    """Store a `cluster.r3_step.StepResult` (trajectories and both training batches, with every sample's
    behaviour log-probs and weight version) pickle-free: arrays in safetensors, the rest in JSON."""
    from rollout.state_io import save_tree

    tree = {
        "step_index": result.step_index, "stages": list(result.stages), "metrics": dict(result.metrics),
        "rollout_seconds": float(rollout_seconds),
        "trajectories": [dataclasses.asdict(t) for t in result.trajectories],
        "text_batch": [dataclasses.asdict(it) for it in result.text_batch],
        "image_batch": [dataclasses.asdict(it) for it in result.image_batch],
    }
    save_tree(tree, directory, "rollout")


def load_pending_rollout(directory: Path) -> tuple[Any, float]:
    """(StepResult, rollout seconds) as `save_pending_rollout` stored them."""
    from cluster.r3_step import ImageItem, StepResult, TextItem
    from rollout.state_io import load_tree
    from rollout.trajectory import ImageSample, Round, TextSample, Trajectory

    tree = load_tree(directory, "rollout")

    def text(d: dict | None) -> TextSample | None:
        return None if d is None else TextSample(**d)

    def image(d: dict | None) -> ImageSample | None:
        return None if d is None else ImageSample(**d)

    def round_(d: dict) -> Round:
        return Round(**{**d, "text": text(d["text"]), "image": image(d["image"])})

    trajectories = [Trajectory(**{**t, "rounds": [round_(r) for r in t["rounds"]]}) for t in tree["trajectories"]]
    texts = [TextItem(**{**it, "sample": text(it["sample"]), "images": tuple(it["images"])}) for it in tree["text_batch"]]
    images = [ImageItem(**{**it, "sample": image(it["sample"])}) for it in tree["image_batch"]]
    result = StepResult(int(tree["step_index"]), list(tree["stages"]), trajectories, texts, images, tree["metrics"])
    return result, float(tree["rollout_seconds"])


def _saved_at(checkpoint: Path) -> float | None:
    """When `checkpoint` was saved (its `meta.json`), or None with a warning if that cannot be read."""
    try:
        return float(json.loads((checkpoint / "meta.json").read_text())["saved_at"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("--resume auto skips %s: its meta.json is unreadable (%s: %s)", checkpoint, type(e).__name__, e)
        return None


def _prune(root: Path, keep: int) -> None:
    done = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in done[:-keep]:
        shutil.rmtree(old)
