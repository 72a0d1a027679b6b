"""Checkpoint folders of a run: written to a temp folder and renamed, so `auto` never picks a torn one.

Layout: `<run>/checkpoints/step-000004/` with `meta.json` (step, versions, data cursor, config
hash), `driver/` (rollout buffer + driver RNG, pickle-free), `text_learner/`, `diffusion_learner/`
(each rank's state, see learners.checkpointing). A folder counts only once `COMPLETE` exists in it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CheckpointDir", "find_latest", "resolve_resume"]

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


def resolve_resume(resume: str | None, run_root: Path) -> Path | None:
    """`None` -> fresh start; `auto` -> newest complete checkpoint of any run under run_root (or None);
    a path -> that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        candidates = [c for c in (find_latest(d / "checkpoints") for d in Path(run_root).glob("*") if d.is_dir()) if c]
        return max(candidates, key=lambda p: (json.loads((p / "meta.json").read_text())["saved_at"]), default=None)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


def _prune(root: Path, keep: int) -> None:
    done = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in done[:-keep]:
        shutil.rmtree(old)
