"""A dead learner stops the run with one clear message and exit status 3 (pure parts, no Ray).

The integration half (a real text learner killed mid-step, checkpoint left intact) is
`test_learner_killed_mid_step_stops_with_a_clear_message` in test_operations.py, which reuses that
module's trainer.
"""

import threading
import time

import pytest

from cluster import train
from cluster.failures import LEARNER_FAILURE_EXIT_CODE, LearnerFailure, bounded


def test_message_names_actor_step_checkpoint_and_resume(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    e = LearnerFailure(["text-learner-0"], 4, "learners training", ckpt, "ActorDiedError: gone", auto=ckpt)
    msg = str(e)
    assert "text-learner-0" in msg and "step 4" in msg and "learners training" in msg
    assert f"last complete checkpoint is {ckpt}" in msg and "--resume auto` (picks that checkpoint)" in msg
    assert e.exit_code == LEARNER_FAILURE_EXIT_CODE == 3


def test_message_when_auto_would_pick_another_run_or_nothing_is_saved(tmp_path):
    mine, other = tmp_path / "a" / "step-000002", tmp_path / "b" / "step-000006"
    msg = str(LearnerFailure(["diffusion-learner-1"], 7, "weight sync", mine, "x", auto=other))
    assert f"--resume {mine}" in msg and f"--resume auto` would pick {other}" in msg
    msg = str(LearnerFailure([], 0, "learners training", None, "GetTimeoutError: slow"))
    assert "a learner actor did not answer in time during step 0" in msg
    assert "no complete checkpoint yet" in msg and "checkpoint.every" in msg


def test_train_main_exits_3_with_the_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    import cluster.driver

    def die(cfg, verbose=True):
        raise LearnerFailure(["text-learner-0"], 1, "learners training", None, "ActorDiedError: killed")

    monkeypatch.setattr(cluster.driver, "run_training", die)
    rc = train.main(["--config", "configs/cpu_tiny.yaml", f"train.run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 3
    assert err.startswith("error: learner failure: text-learner-0 died during step 1") and "Traceback" not in err


def test_bounded_returns_raises_and_times_out():
    assert bounded(lambda: 7, 5.0, "quick") == 7
    with pytest.raises(KeyError):
        bounded(lambda: {}["missing"], 5.0, "failing")
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stuck sync did not finish within train.remote_timeout_s=0.2 s"):
        bounded(release.wait, 0.2, "stuck sync")
    assert time.monotonic() - start < 20  # the stuck thread is abandoned, not joined (no hang)
    release.set()
