"""Guards of a run folder: one run at a time, and a resume that says what it changed.

`lock_run_dir` holds an OS lock (`fcntl.flock` on `<run>/.lock`) for the run's life, so a second run
on the same folder is refused (`cluster.failures.RunRefused`, exit 2) instead of overwriting the first
one's files; the kernel drops the lock when its process ends however it ends, so a `.lock` file left
behind never blocks. `check_resume_config` compares the config of the run a checkpoint belongs to
(`<run>/config.yaml`) with the new one before any engine starts: changes that break exactness are
refused unless `checkpoint.allow_config_changes`, and every change is recorded in
`<run>/resume-changes.json`. Assumes a POSIX system (`fcntl`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import yaml

from cluster.failures import RunRefused

if TYPE_CHECKING:
    from cluster.config import R3Config

__all__ = ["LOCK_NAME", "RESUME_CHANGES", "ConfigChange", "lock_run_dir", "config_changes", "classify_change",
           "check_resume_config", "run_dir_path", "write_config"]

log = logging.getLogger(__name__)


def run_dir_path(cfg: R3Config) -> Path:
    """`train.run_dir/<train.run_name or a timestamp>`, absolute (not created here)."""
    name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.train.run_dir).resolve() / name


def write_config(cfg: R3Config, run_dir: Path) -> None:
    """The resolved config of the run, as `<run>/config.yaml` (what `--resume` compares against)."""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

LOCK_NAME = ".lock"
RESUME_CHANGES = "resume-changes.json"
IGNORED = frozenset({"checkpoint.resume", "checkpoint.allow_config_changes"})  # differ on every resume
NEVER = frozenset({"cluster.text_learners.count", "cluster.diffusion_learners.count"})  # per-rank optimizer state
INEXACT = frozenset({"r3.mode", "train.seed"})  # plus every data.* key that training reads
EVALUATION_ONLY = frozenset({"data.eval_limit", "data.eval_per_category"})  # what is evaluated, not trained

Effect = Literal["never", "inexact", "recorded"]


class ConfigChange(NamedTuple):
    """One config key whose value differs: dotted `key`, `old` (the checkpoint's run), `new`."""

    key: str
    old: Any
    new: Any


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[Path]:
    """Hold `<run_dir>/.lock` (exclusive, non-blocking) while inside; the file names the holder's pid.

    Raises:
        RunRefused: another process holds the lock (the message names the folder and that process).
    """
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise RunRefused(
                f"run folder {run_dir} is in use by another run ({holder}); two runs on one folder would "
                "overwrite each other's checkpoints and metrics. Wait for it to end, or choose another "
                "train.run_name (or train.run_dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[ConfigChange]:
    """Every dotted key whose value differs between two nested config dicts, sorted by key (pure).

    A key missing on one side has the value None there (e.g. a field added since the old run).
    Keys that differ on every resume (`checkpoint.resume`, `checkpoint.allow_config_changes`) are left out.
    """
    a, b = _flatten(old), _flatten(new)
    return [ConfigChange(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if k not in IGNORED and a.get(k) != b.get(k)]


def classify_change(key: str) -> Effect:
    """What a resume may do about a change of `key` (pure): "never" (learner counts: the checkpoint holds
    each rank's optimizer state), "inexact" (`r3.mode`, `data.*` but the evaluation-only keys, `train.seed`:
    the resumed run would not continue the original one; refused unless `checkpoint.allow_config_changes`),
    or "recorded"."""
    if key in NEVER:
        return "never"
    if key in INEXACT or (key.startswith("data.") and key not in EVALUATION_ONLY):
        return "inexact"
    return "recorded"


def check_resume_config(checkpoint: Path, new: Mapping[str, Any], run_dir: Path, allow: bool) -> list[ConfigChange]:
    """Compare the config of the run `checkpoint` belongs to with `new` (the resumed run's, as
    `R3Config.model_dump(mode="json")`); log and record the changes in `<run_dir>/resume-changes.json`.

    Returns the changes (none: nothing is written). A checkpoint whose run has no readable
    `config.yaml` is resumed with a warning: there is nothing to compare.

    Raises:
        RunRefused: a learner count changed, or (unless `allow`) a change that breaks exactness; the
            message lists each such key, old -> new.
    """
    from cluster.checkpoint import run_dir_of

    source = run_dir_of(checkpoint) / "config.yaml"
    try:
        old = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as e:
        log.warning("resuming from %s without comparing configs: cannot read %s (%s)", checkpoint, source, e)
        return []
    if not isinstance(old, dict):
        log.warning("resuming from %s without comparing configs: %s holds no mapping", checkpoint, source)
        return []
    changes = config_changes(old, new)
    never = [c for c in changes if classify_change(c.key) == "never"]
    inexact = [c for c in changes if classify_change(c.key) == "inexact"]
    if never or (inexact and not allow):
        lines = "\n".join(f"  {c.key}: {c.old!r} -> {c.new!r}" for c in never + ([] if allow else inexact))
        how = ("learner counts must match the checkpoint's (each rank's optimizer state is saved)" if never else
               "set checkpoint.allow_config_changes=true to resume anyway (the run will not continue exactly)")
        raise RunRefused(f"--resume {checkpoint}: this config changes what the checkpoint's run ({source}) "
                         f"cannot continue exactly with:\n{lines}\n{how}")
    if changes:
        for c in changes:
            log.warning("resume from %s changes %s: %r -> %r%s", checkpoint, c.key, c.old, c.new,
                        " (breaks exactness; allowed by checkpoint.allow_config_changes)"
                        if classify_change(c.key) == "inexact" else "")
        _record(run_dir / RESUME_CHANGES, checkpoint, source, changes)
    return changes


def _record(path: Path, checkpoint: Path, source: Path, changes: list[ConfigChange]) -> None:
    """Append one resume's changes to the JSON list at `path` (a run resumed twice keeps both)."""
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"checkpoint": str(checkpoint), "compared_with": str(source),
                    "changes": [{"key": c.key, "old": c.old, "new": c.new, "effect": classify_change(c.key)}
                                for c in changes]})
    path.write_text(json.dumps(history, indent=2, default=str))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
