"""Checkpoint folders: atomic commit, pruning, `auto` never picks an incomplete one."""

import json
import time

import pytest

from cluster.checkpoint import CheckpointDir, find_latest, resolve_resume


def _save(root, step, keep=2):
    ck = CheckpointDir(root, step)
    (ck.path / "x.txt").write_text(str(step))
    return ck.commit({"step": step, "saved_at": time.time()}, keep=keep)


def test_commit_prune_and_latest(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for s in (1, 2, 3):
        _save(root, s)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-000002", "step-000003"]
    assert find_latest(root).name == "step-000003"
    assert json.loads((root / "step-000003" / "meta.json").read_text())["step"] == 3


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 2)
    torn = CheckpointDir(root, 4)  # killed while writing: never committed
    (torn.path / "half").write_text("")
    fake = root / "step-000005"  # a folder without the COMPLETE marker
    fake.mkdir()
    assert find_latest(root).name == "step-000002"
    assert resolve_resume("auto", tmp_path).name == "step-000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(fake), tmp_path)
    assert resolve_resume(None, tmp_path) is None
