"""ShapesWorld results: reflection accuracy, plateau round and the written files, by hand."""

from __future__ import annotations

import json
import math

import pytest

from examples.shapesworld.results import (
    console_summary,
    edit_outcomes,
    fix_naming,
    plateau_round,
    reflection_accuracy,
    summarize_run,
    write_results,
)
from rollout.evaluation import summarize
from rollout.trajectory import Round, Trajectory


def _traj(tag: str, rounds: list[tuple[bool, bool, float]]) -> Trajectory:
    """rounds: (correct, stopped, score) per round; round 0 never stops."""
    return Trajectory(
        prompt=f"a {tag}",
        metadata={"tag": tag},
        rounds=[Round(index=i, stage="eval", correct=c, stopped=s, score=x) for i, (c, s, x) in enumerate(rounds)],
    )


def test_reflection_accuracy_counts_each_decision_until_the_stop() -> None:
    trajs = [
        # wrong → edits (right), fixed → stops (right): 2 of 2
        _traj("a", [(False, False, 0.2), (True, False, 1.0), (True, True, 1.0)]),
        # correct → edits (wrong), still correct → edits (wrong), then stops on a correct one (right)
        _traj("b", [(True, False, 1.0), (True, False, 1.0), (True, False, 1.0), (True, True, 1.0)]),
        # wrong → stops (wrong); later rounds are not decisions
        _traj("a", [(False, False, 0.1), (False, True, 0.1), (False, True, 0.1)]),
    ]
    r = reflection_accuracy(trajs)
    assert r["decisions"] == 6
    assert r["accuracy"] == pytest.approx(3 / 6)
    # correct images looked at: a:round1, b:rounds 0,1,2 -> stops on 2 of 4
    assert r["stop_when_correct"] == pytest.approx(2 / 4)
    # wrong images looked at: a:round0 (edited), a':round0 (stopped) -> 1 of 2
    assert r["edit_when_wrong"] == pytest.approx(1 / 2)
    assert r["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 2) / 2)


def test_balanced_reflection_accuracy_sees_through_always_editing() -> None:
    # 1 correct and 9 wrong round-0 images; the reasoner edits every one of them
    trajs = [_traj("c", [(True, False, 1.0), (True, False, 1.0)])] + [
        _traj(f"w{i}", [(False, False, 0.2), (False, False, 0.2)]) for i in range(9)
    ]
    r = reflection_accuracy(trajs)
    assert r["accuracy"] == pytest.approx(0.9) and r["balanced_accuracy"] == pytest.approx(0.5)


def _fix_round(i: int, correct: bool, stopped: bool, instruction: str = "", fixes: list | None = None) -> Round:
    details = {"fixes": fixes} if fixes else {}
    return Round(index=i, stage="eval", correct=correct, stopped=stopped, instruction=instruction, judge_details=details)


def test_fix_naming_counts_exact_fixes_among_decisions_on_wrong_images() -> None:
    change = [{"kind": "change", "object": "square", "attribute": "blue", "text": "change the red square to blue"}]
    add = [{"kind": "add", "object": "circle", "attribute": "green", "text": "add a green circle"}]
    trajs = [
        # wrong -> the exact fix (other words allowed), fixed -> stop: 1 exact of 1 wrong decision
        Trajectory("p", {}, 0, [_fix_round(0, False, False, fixes=change),
                                _fix_round(1, True, False, "please change the square to blue", change),
                                _fix_round(2, True, True)]),
        # wrong -> right kind and object, wrong colour (not exact); still wrong -> stop (no fix named)
        Trajectory("q", {}, 1, [_fix_round(0, False, False, fixes=change),
                                _fix_round(1, False, False, "change the square to green", add),
                                _fix_round(2, False, True)]),
        # wrong -> "add" for an add fix, exact; the round after the stop is not a decision
        Trajectory("r", {}, 2, [_fix_round(0, False, False, fixes=add),
                                _fix_round(1, False, False, "add a green circle", add),
                                _fix_round(2, False, True), _fix_round(3, False, True)]),
        # a correct image edited: not a decision on a wrong image
        Trajectory("s", {}, 3, [_fix_round(0, True, False), _fix_round(1, True, True)]),
    ]  # fmt: skip
    r = fix_naming(trajs)
    # decisions on wrong images: p r0, q r0, q r1, r r0, r r1 = 5; edits among them: p, q r0, r r0 = 3
    assert (r["on_wrong_images"], r["edits_on_wrong_images"], r["exact_fixes"]) == (5, 3, 2)
    assert r["exact_fix_rate"] == pytest.approx(2 / 5)
    assert r["on_wrong_images_with_fix"] == 5


def test_fix_naming_counts_only_wrong_images_whose_judge_named_a_fix() -> None:
    add = [{"kind": "add", "object": "circle", "attribute": "green", "text": "add a green circle"}]
    named = Trajectory("p", {}, 0, [_fix_round(0, False, False, fixes=add), _fix_round(1, True, False, "add a green circle"),
                                    _fix_round(2, True, True)])  # fmt: skip
    unnamed = Trajectory("q", {}, 1, [_fix_round(0, False, False), _fix_round(1, False, True)])
    r = fix_naming([named, unnamed])
    assert (r["on_wrong_images"], r["on_wrong_images_with_fix"], r["exact_fix_rate"]) == (2, 1, 1.0)
    assert math.isnan(fix_naming([unnamed])["exact_fix_rate"])  # a judge that names no fixes: not measured


def test_fix_naming_without_wrong_images_is_nan() -> None:
    assert math.isnan(fix_naming([Trajectory("s", {}, 0, [_fix_round(0, True, False), _fix_round(1, True, True)])])["exact_fix_rate"])


def test_reflection_accuracy_without_decisions_is_nan() -> None:
    r = reflection_accuracy([_traj("a", [(True, False, 1.0)])])
    assert r["decisions"] == 0 and math.isnan(r["accuracy"])


@pytest.mark.parametrize(
    ("acc", "expected"),
    [([0.1, 0.3, 0.5, 0.5], 2), ([0.4, 0.4, 0.4], 0), ([0.1, 0.5, 0.495, 0.2], 1), ([0.2, 0.1, 0.25], 2)],
)
def test_plateau_round(acc: list[float], expected: int) -> None:
    assert plateau_round(acc) == expected


def test_edit_outcomes_count_each_edit_by_the_verdicts_around_it() -> None:
    trajs = [
        _traj("a", [(False, False, 0.2), (True, False, 1.0), (True, True, 1.0)]),  # fixed, then a stop
        _traj("a", [(True, False, 1.0), (False, False, 0.5), (False, False, 0.4)]),  # broken, still wrong
        _traj("b", [(True, False, 1.0), (True, False, 1.0)]),  # kept
        _traj("b", [(False, False, 0.0), (False, True, 0.0)]),  # a stop is not an edit
    ]
    assert edit_outcomes(trajs) == {"fixed": 1, "still_wrong": 1, "kept": 1, "broken": 1}
    trajs.append(_traj("b", [(False, False, 0.0), (True, False, 1.0), (True, False, 1.0)]))  # fixed, kept
    acc = summarize(trajs, [t.metadata["tag"] for t in trajs], 3).overall
    e = edit_outcomes(trajs)
    assert acc[-1].accuracy - acc[0].accuracy == pytest.approx((e["fixed"] - e["broken"]) / len(trajs))


def test_plateau_round_needs_rounds() -> None:
    with pytest.raises(ValueError, match="at least one round"):
        plateau_round([])


def test_summary_markdown_and_plot(tmp_path) -> None:
    before = [_traj("a", [(False, False, 0.0), (False, False, 0.2), (False, False, 0.2)]),
              _traj("b", [(True, False, 1.0), (True, True, 1.0), (True, True, 1.0)])]
    after = [_traj("a", [(False, False, 0.0), (True, False, 1.0), (True, True, 1.0)]),
             _traj("b", [(True, False, 1.0), (True, True, 1.0), (True, True, 1.0)])]
    rows = [{"step": i, "generate/score_mean": 0.1 * i, "refine/score_mean": 0.05 * i} for i in range(3)]
    res = summarize_run(summarize(before, ["a", "b"], 3), summarize(after, ["a", "b"], 3), rows, {"note": 1})
    assert res["before"]["accuracy_per_round"] == [0.5, 0.5, 0.5]
    assert res["after"]["accuracy_per_round"] == [0.5, 1.0, 1.0]
    assert res["delta"]["final_round_accuracy"] == pytest.approx(0.5)
    assert res["before"]["plateau_round"] == 0 and res["after"]["plateau_round"] == 1
    assert res["after"]["accuracy_per_tag"] == {"a": [0.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]}
    assert res["note"] == 1 and len(res["reward_curve"]) == 3
    paths = write_results(tmp_path / "out", res)
    md = paths["md"].read_text()
    assert "| a | 0.0 → 0.0 | 0.0 → 100.0 | 0.0 → 100.0 |" in md
    assert "| final-round accuracy (%) | 50.0 | 100.0 | +50.0 points |" in md
    assert "Accuracy in % (before RL → after RL), 2 prompts, ODE" in md
    assert "| edits that fixed a wrong image | 0 of 2 | 1 of 1 | |" in md  # a: 2 edits, still wrong / fixed
    assert "| edits that broke a correct image | 0 of 0 | 0 of 0 | |" in md  # b stops at once
    assert json.loads(paths["json"].read_text())["delta"]["plateau_round"] == 1
    summary = console_summary({**res, "config": {"steps": 3}}, tmp_path / "run").splitlines()
    assert summary[0] == "ShapesWorld R3: 3 RL steps; evaluation on 2 prompts of the held-out split, exact judge"
    assert summary[1].split() == ["accuracy", "per", "round", "round", "0", "round", "1", "round", "2"]
    assert summary[2].split() == ["before", "RL", "50.0", "%", "50.0", "%", "50.0", "%"]
    assert summary[3].split() == ["after", "RL", "50.0", "%", "100.0", "%", "100.0", "%"]
    assert summary[-2] == f"gallery: {tmp_path / 'run' / 'eval-final' / 'gallery.html'} (before RL: eval-before/gallery.html)"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.size == (1000, 400)
        assert len(set(im.convert("RGB").getdata())) > 10  # drew lines, not a blank canvas


def test_repeated_prompts_are_counted_as_samples(tmp_path) -> None:
    """A tag-balanced evaluation repeats prompts (`data.eval_per_category`); the table says so."""
    trajs = [_traj("a", [(False, False, 0.0)]), _traj("a", [(True, False, 1.0)]), _traj("b", [(True, False, 1.0)])]
    report = summarize(trajs, ["a", "a", "b"], 1)
    res = summarize_run(report, report, [])
    assert res["before"]["num_prompts"] == 3 and res["before"]["distinct_prompts"] == 2
    md = write_results(tmp_path, res)["md"].read_text()
    assert "3 samples of 2 distinct prompts (repeats with their own noise)" in md
    assert "| a | 50.0 → 50.0 |" in md


def test_before_eval_of_a_resumed_run_comes_from_the_run_it_resumed(tmp_path) -> None:
    from examples.shapesworld.run import before_eval_dir

    origin, resumed = tmp_path / "first", tmp_path / "second"
    ckpt = origin / "checkpoints" / "step-000100"
    ckpt.mkdir(parents=True)
    resumed.mkdir()
    with pytest.raises(FileNotFoundError, match="step-000100"):  # neither run has one yet
        before_eval_dir(resumed, ckpt)
    (origin / "eval-before").mkdir()
    (origin / "eval-before" / "eval.json").write_text("{}")
    assert before_eval_dir(resumed, ckpt) == origin / "eval-before"
    with pytest.raises(FileNotFoundError, match="eval_before"):  # a fresh run without one
        before_eval_dir(resumed, None)
    (resumed / "eval-before").mkdir()
    (resumed / "eval-before" / "eval.json").write_text("{}")
    assert before_eval_dir(resumed, ckpt) == resumed / "eval-before"  # its own comes first
