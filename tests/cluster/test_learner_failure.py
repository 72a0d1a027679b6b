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
    import cluster.run_loop

    def die(cfg, verbose=True):
        raise LearnerFailure(["text-learner-0"], 1, "learners training", None, "ActorDiedError: killed")

    monkeypatch.setattr(cluster.run_loop, "run_training", die)
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


def test_nonfinite_streak_counts_steps_in_a_row_and_resets():
    from cluster.failures import NonFiniteStreak

    streak = NonFiniteStreak(3)
    assert streak.observe(0, ["text learner"]) is None
    assert streak.observe(1, []) is None  # a good step resets the count
    assert [streak.observe(s, ["diffusion learner"]) for s in (2, 3)] == [None, None]
    cause = streak.observe(4, ["text learner", "diffusion learner"])
    assert cause.startswith("the updates of steps 2-4 (3 in a row, train.max_nonfinite_steps=3) were skipped")
    assert "(last: text learner, diffusion learner)" in cause and "weights did not change" in cause
    assert NonFiniteStreak(1).observe(5, ["text learner"]).startswith("the updates of step 5 (1 in a row")
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteStreak(0)


def test_nonfinite_failure_exits_4_naming_step_and_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import cluster.run_loop
    from cluster.failures import NONFINITE_EXIT_CODE, NonFiniteFailure

    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    e = NonFiniteFailure(6, "learners training", ckpt, "the updates of steps 4-6 were skipped", auto=ckpt)
    assert isinstance(e, LearnerFailure) and e.exit_code == NONFINITE_EXIT_CODE == 4
    assert (e.step, e.checkpoint, e.actors) == (6, ckpt, [])
    msg = str(e)
    assert msg.startswith("non-finite training: the updates of steps 4-6 were skipped (step 6, learners training)")
    assert f"last complete checkpoint is {ckpt}" in msg and "--resume auto` (picks that checkpoint)" in msg

    def diverge(cfg, verbose=True):
        raise e

    monkeypatch.setattr(cluster.run_loop, "run_training", diverge)
    assert train.main(["--config", "configs/cpu_tiny.yaml", f"train.run_dir={tmp_path}"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite training:") and "Traceback" not in err


def test_a_refused_non_finite_checkpoint_becomes_a_nonfinite_failure(tmp_path):
    from types import SimpleNamespace

    from cluster.failures import NonFiniteFailure, learner_failure
    from learners.finite import NonFiniteError

    refusal = NonFiniteError("refusing to save weights to /r/w: tensor 'bias' has 1 of 2 entries NaN or ±inf")
    wrapped = RuntimeError("ray::TextLearner.__ray_call__() ... traceback ...")
    wrapped.cause = refusal  # what a RayTaskError carries
    for error in (refusal, wrapped):
        f = learner_failure(error, [SimpleNamespace(kind="text", actors=[])], 3, "saving a checkpoint", None)
        assert isinstance(f, NonFiniteFailure) and f.exit_code == 4
        assert "tensor 'bias'" in str(f) and "(step 3, saving a checkpoint)" in str(f)
        assert "no complete checkpoint yet" in str(f)


def test_driver_stops_after_max_nonfinite_steps_in_a_row(tmp_path):
    from cluster.config import load_config
    from cluster.driver import Trainer
    from cluster.failures import NonFiniteFailure, NonFiniteStreak

    t = Trainer.__new__(Trainer)  # only what the check reads
    t.cfg = load_config("configs/cpu_tiny.yaml", [f"train.run_dir={tmp_path}", "train.max_nonfinite_steps=2"])
    t._nonfinite, t.last_checkpoint = NonFiniteStreak(2), tmp_path / "r" / "checkpoints" / "step-000001"
    ok, skipped = {"skipped_nonfinite": 0.0}, {"skipped_nonfinite": 1.0}
    t._stop_if_nonfinite(1, skipped, ok)
    t._stop_if_nonfinite(2, ok, {"skipped": 1.0})  # an empty batch is not a non-finite step
    t._stop_if_nonfinite(3, ok, skipped)
    with pytest.raises(NonFiniteFailure) as info:
        t._stop_if_nonfinite(4, skipped, skipped)
    assert info.value.step == 4 and info.value.checkpoint == t.last_checkpoint
    assert "steps 3-4 (2 in a row" in str(info.value) and "(last: text learner, diffusion learner)" in str(info.value)


@pytest.mark.parametrize(("errors", "items", "limit", "stops"), [
    (0, 8, 0.5, False), (4, 8, 0.5, False), (5, 8, 0.5, True), (8, 8, 0.5, True),
    (1, 8, 0.0, True), (0, 8, 0.0, False), (8, 8, 1.0, False), (0, 0, 0.5, False),
])
def test_judge_failure_cause_stops_above_the_fraction(errors, items, limit, stops):
    from cluster.failures import judge_failure_cause

    cause = judge_failure_cause(3, errors, items, limit, "remote")
    assert (cause is not None) == stops
    if stops:
        assert cause == (f"the 'remote' judge (judge.kind) failed on {errors} of {items} items in step 3 "
                         f"(fraction {errors / items:.2f} > judge.max_error_fraction={limit:g})")


def test_judge_failure_exits_5_naming_step_fraction_and_kind(tmp_path, monkeypatch, capsys):
    import cluster.run_loop
    from cluster.failures import JUDGE_FAILURE_EXIT_CODE, JudgeFailure, judge_failure_cause

    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    e = JudgeFailure(4, ckpt, judge_failure_cause(4, 6, 8, 0.5, "vlm"), auto=ckpt)
    assert isinstance(e, LearnerFailure) and e.exit_code == JUDGE_FAILURE_EXIT_CODE == 5
    assert (e.step, e.phase, e.checkpoint, e.actors) == (4, "judging", ckpt, [])

    def judge_down(cfg, verbose=True):
        raise e

    monkeypatch.setattr(cluster.run_loop, "run_training", judge_down)
    assert train.main(["--config", "configs/cpu_tiny.yaml", f"train.run_dir={tmp_path}"]) == 5
    err = capsys.readouterr().err
    assert err.startswith("error: judge failure: the 'vlm' judge (judge.kind) failed on 6 of 8 items in step 4 "
                          "(fraction 0.75 > judge.max_error_fraction=0.5)") and "Traceback" not in err
    assert "update was not made" in err and f"last complete checkpoint is {ckpt}" in err


def test_driver_stops_before_the_update_of_a_step_whose_judge_failed_too_often(tmp_path):
    from types import SimpleNamespace

    from cluster.config import load_config
    from cluster.driver import Trainer
    from cluster.failures import JudgeFailure

    t = Trainer.__new__(Trainer)  # only what the check reads
    t.cfg = load_config("configs/cpu_tiny.yaml", [f"train.run_dir={tmp_path}", "judge.max_error_fraction=0.25",
                                                  "judge.kind=constant"])
    t.last_checkpoint = None
    metrics = {"generate/samples": 4.0, "refine/samples": 4.0, "judge/errors": 2.0}
    t._stop_if_judge_failed(5, SimpleNamespace(stages=["generate", "refine"], metrics=metrics))  # 2 of 8: 0.25
    metrics["judge/errors"] = 3.0
    with pytest.raises(JudgeFailure, match=r"'constant' judge .* failed on 3 of 8 items in step 5 \(fraction 0.38"):
        t._stop_if_judge_failed(5, SimpleNamespace(stages=["generate", "refine"], metrics=metrics))


def test_a_learner_failure_message_survives_a_corrupt_meta_json_in_another_run(tmp_path):
    """`--resume auto` (named in the message) skips another run's unreadable checkpoint instead of raising."""
    from cluster.checkpoint import CheckpointDir, checkpoints_dir
    from cluster.config import load_config
    from cluster.driver import Trainer

    bad = CheckpointDir(checkpoints_dir(tmp_path / "other"), 3).commit({"saved_at": 1.0}, keep=1)
    (bad / "meta.json").write_text("{")
    t = Trainer.__new__(Trainer)
    t.cfg = load_config("configs/cpu_tiny.yaml", [f"train.run_dir={tmp_path}", "train.run_name=mine"])
    assert t._auto_checkpoint() is None
