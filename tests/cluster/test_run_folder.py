"""Runs that cannot collide: the run-folder lock, `--resume` config comparison, and `--resume auto`
ignoring other runs' unreadable checkpoints. Pure or subprocess-only: no Ray, no engines (a refused run
stops before any starts)."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import yaml

from cluster import train
from cluster.checkpoint import CheckpointDir, checkpoints_dir, resolve_resume
from cluster.config import load_config
from cluster.driver import make_run_dir
from cluster.failures import RunRefused
from cluster.run_folder import (
    RESUME_CHANGES,
    ConfigChange,
    check_resume_config,
    classify_change,
    config_changes,
    lock_run_dir,
)
from cluster.run_loop import run_training

CFG = "configs/cpu_tiny.yaml"


def _checkpoint(run_dir, step, saved_at=None):
    ck = CheckpointDir(checkpoints_dir(run_dir), step)
    return ck.commit({"step": step, "saved_at": time.time() if saved_at is None else saved_at}, keep=2)


def _run_with_checkpoint(root, name, *overrides):
    """A finished run's folder as the driver leaves it: config.yaml and one complete checkpoint."""
    cfg = load_config(CFG, [f"train.run_dir={root}", f"train.run_name={name}", *overrides])
    return cfg, _checkpoint(make_run_dir(cfg), 2)


# ------------------------------------------------------------------------------------- the lock


def test_a_second_lock_is_refused_naming_the_folder_and_the_holder(tmp_path):
    with lock_run_dir(tmp_path) as lock:
        assert lock == tmp_path / ".lock" and f"pid {os.getpid()}" in lock.read_text()
        with pytest.raises(RunRefused, match="in use by another run") as info:
            with lock_run_dir(tmp_path):
                pass
        assert str(tmp_path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert info.value.exit_code == 2
    with lock_run_dir(tmp_path):  # released on leaving
        pass


def test_the_lock_is_released_on_an_exception_and_a_stale_lock_file_does_not_block(tmp_path):
    with pytest.raises(KeyError), lock_run_dir(tmp_path):
        raise KeyError("boom")
    (tmp_path / ".lock").write_text("pid 999999 on gone\n")  # left behind by a killed run: no holder
    with lock_run_dir(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.read_text()


def test_a_lock_held_by_another_process_refuses_and_is_freed_when_it_ends(tmp_path):
    code = ("import sys, time; from cluster.run_folder import lock_run_dir\n"
            "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunRefused, match=f"pid {holder.pid} on "):
            with lock_run_dir(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel still drops the lock
        holder.wait()
        holder.stdout.close()
    with lock_run_dir(tmp_path):
        pass


def test_train_exits_2_when_the_run_folder_is_locked(tmp_path, capsys):
    run = tmp_path / "runs" / "same"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("the first run's\n")
    with lock_run_dir(run):
        rc = train.main(["--config", CFG, f"train.run_dir={tmp_path / 'runs'}", "train.run_name=same"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"error: run folder {run} is in use by another run (pid {os.getpid()}")
    assert (run / "config.yaml").read_text() == "the first run's\n"  # nothing of the first run was overwritten


def test_the_shapesworld_run_exits_2_when_the_run_folder_is_locked(tmp_path, capsys):
    from examples.shapesworld import run

    folder = tmp_path / "runs" / "demo"
    folder.mkdir(parents=True)
    with lock_run_dir(folder):
        rc = run.main([f"train.run_dir={tmp_path / 'runs'}", "train.run_name=demo"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith(f"error: run folder {folder} is in use")


# ------------------------------------------------------------------------------ config changes


def test_config_changes_lists_each_differing_dotted_key_sorted():
    old = {"r3": {"mode": "tree", "group_size": 4}, "train": {"steps": 4, "seed": 0}, "data": {"limit": None},
           "checkpoint": {"resume": None}, "gone": 1}
    new = {"r3": {"mode": "chain", "group_size": 4}, "train": {"steps": 8, "seed": 0}, "data": {"limit": 16},
           "checkpoint": {"resume": "auto", "allow_config_changes": True}, "added": [1, 2]}
    assert config_changes(old, new) == [
        ConfigChange("added", None, [1, 2]), ConfigChange("data.limit", None, 16), ConfigChange("gone", 1, None),
        ConfigChange("r3.mode", "tree", "chain"), ConfigChange("train.steps", 4, 8),
    ]
    assert config_changes(old, old) == []


@pytest.mark.parametrize(("key", "effect"), [
    ("cluster.text_learners.count", "never"), ("cluster.diffusion_learners.count", "never"),
    ("r3.mode", "inexact"), ("train.seed", "inexact"), ("data.train", "inexact"), ("data.limit", "inexact"),
    ("train.steps", "recorded"), ("grpo.lr", "recorded"), ("cluster.text_workers.count", "recorded"),
    ("train.run_name", "recorded"), ("cluster.text_learners.num_cpus", "recorded"),
    ("data.eval_limit", "recorded"), ("data.eval_per_category", "recorded"),
])
def test_classify_change(key, effect):
    assert classify_change(key) == effect


def test_resume_refuses_inexact_changes_listing_each_key_old_to_new(tmp_path):
    _, ckpt = _run_with_checkpoint(tmp_path, "a")
    new = load_config(CFG, ["r3.mode=chain", "data.limit=16", "train.seed=3", "train.steps=9"]).model_dump(mode="json")
    out = tmp_path / "b"
    out.mkdir()
    with pytest.raises(RunRefused) as info:
        check_resume_config(ckpt, new, out, allow=False)
    msg = str(info.value)
    for line in ("r3.mode: 'tree' -> 'chain'", "data.limit: None -> 16", "train.seed: 0 -> 3"):
        assert line in msg
    assert "train.steps" not in msg and "checkpoint.allow_config_changes=true" in msg
    assert not (out / RESUME_CHANGES).exists()


def test_allowed_and_harmless_changes_are_logged_and_recorded(tmp_path, caplog):
    _, ckpt = _run_with_checkpoint(tmp_path, "a")
    out = tmp_path / "b"
    out.mkdir()
    new = load_config(CFG, [f"train.run_dir={tmp_path}", "train.run_name=b", "r3.mode=chain", "grpo.lr=0.5"])
    with caplog.at_level(logging.WARNING, logger="cluster.run_folder"):
        changes = check_resume_config(ckpt, new.model_dump(mode="json"), out, allow=True)
    assert {c.key for c in changes} == {"r3.mode", "grpo.lr", "train.run_name"}
    assert "changes r3.mode: 'tree' -> 'chain' (breaks exactness" in caplog.text and "grpo.lr" in caplog.text
    [record] = json.loads((out / RESUME_CHANGES).read_text())
    assert record["checkpoint"] == str(ckpt) and record["compared_with"] == str(tmp_path / "a" / "config.yaml")
    assert {c["key"]: (c["new"], c["effect"]) for c in record["changes"]}["r3.mode"] == ("chain", "inexact")
    check_resume_config(ckpt, new.model_dump(mode="json"), out, allow=True)  # a second resume is appended
    assert len(json.loads((out / RESUME_CHANGES).read_text())) == 2
    same = load_config(CFG, [f"train.run_dir={tmp_path}", "train.run_name=a"]).model_dump(mode="json")
    assert check_resume_config(ckpt, same, tmp_path / "a", allow=False) == []
    assert not (tmp_path / "a" / RESUME_CHANGES).exists()  # nothing changed: nothing written


def test_learner_counts_can_never_change_even_when_allowed(tmp_path):
    _, ckpt = _run_with_checkpoint(tmp_path, "a")
    new = load_config(CFG, ["cluster.text_learners=2"]).model_dump(mode="json")
    with pytest.raises(RunRefused, match=r"cluster.text_learners.count: 1 -> 2\n.*learner counts must match"):
        check_resume_config(ckpt, new, tmp_path, allow=True)


def test_a_checkpoint_without_a_run_config_resumes_with_a_warning(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path / "bare", 1)
    with caplog.at_level(logging.WARNING, logger="cluster.run_folder"):
        assert check_resume_config(ckpt, {"r3": {"mode": "chain"}}, tmp_path, allow=False) == []
    assert "without comparing configs" in caplog.text


def test_train_exits_2_before_any_engine_on_a_refused_resume(tmp_path, capsys):
    _, ckpt = _run_with_checkpoint(tmp_path, "a")
    rc = train.main(["--config", CFG, "--resume", str(ckpt), f"train.run_dir={tmp_path}", "train.run_name=b",
                     "r3.mode=chain", "cluster.diffusion_learners=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith(f"error: --resume {ckpt}")
    assert "cluster.diffusion_learners.count: 1 -> 2" in err and "r3.mode: 'tree' -> 'chain'" in err
    assert not (tmp_path / "b").exists()  # the refused run left no folder behind
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["r3"]["mode"] == "tree"


def test_run_training_resuming_its_own_folder_compares_before_overwriting_config(tmp_path):
    cfg, ckpt = _run_with_checkpoint(tmp_path, "a")
    cfg2 = load_config(CFG, [f"train.run_dir={tmp_path}", "train.run_name=a", "checkpoint.resume=auto", "data.limit=3"])
    with pytest.raises(RunRefused, match=r"data.limit: None -> 3"):
        run_training(cfg2)
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    assert (tmp_path / "a").is_dir() and ckpt.is_dir()  # an existing run folder is never removed


# --------------------------------------------------------------------------------- resume auto


def test_auto_skips_another_runs_unreadable_meta_with_a_warning(tmp_path, caplog):
    good = _checkpoint(tmp_path / "good", 2, saved_at=1.0)
    bad = _checkpoint(tmp_path / "bad", 5, saved_at=2.0)
    (bad / "meta.json").write_text("{ torn")
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        assert resolve_resume("auto", tmp_path) == good
    assert f"skips {bad}" in caplog.text and "unreadable" in caplog.text
    (bad / "meta.json").write_text(json.dumps({"step": 5}))  # no saved_at
    assert resolve_resume("auto", tmp_path) == good


def test_auto_prefers_the_named_runs_own_checkpoint(tmp_path):
    own = _checkpoint(tmp_path / "mine", 2, saved_at=1.0)
    newer = _checkpoint(tmp_path / "other", 7, saved_at=2.0)
    (own / "meta.json").write_text("corrupt, but never read: the step is in the folder name")
    assert resolve_resume("auto", tmp_path, "mine") == own
    assert resolve_resume("auto", tmp_path) == newer
    assert resolve_resume("auto", tmp_path, "fresh") == newer  # a run with no checkpoint: the newest of any run
