"""ShapesWorld claims as arm − null (examples.shapesworld.arms_report), on hand-made measures."""

import math
from pathlib import Path

import pytest

from examples.shapesworld.arms import _parse
from examples.shapesworld.arms_report import arm_claims, arm_levels, claims_markdown

ROOT = Path(__file__).resolve().parents[3]


def _m(arm, seed, train, test, final, refl=(6, 10, 0.5, 4, 0.75, 6), fixes=(1, 6)):
    hits, n, pc, nc, pw, nw = refl
    return {
        "arm": arm, "seed": seed, "probe": {"train": train, "test": test},
        "eval": {"prompts": ["a", "b", "c", "d"], "round0": test, "final": final,
                 "reflection": {"correct_decisions": hits, "decisions": n, "stop_when_correct": pc,
                                "on_correct_images": nc, "edit_when_wrong": pw, "on_wrong_images": nw,
                                "stops_on_correct": round(pc * nc)},
                 "fix_naming": {"exact_fixes": fixes[0], "on_wrong_images_with_fix": fixes[1]}},
    }  # fmt: skip


MEASURES = [
    _m("rl", 0, [1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]),
    _m("null", 0, [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]),
    _m("rl", 1, [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], refl=(8, 10, 1.0, 2, 0.5, 8), fixes=(4, 8)),
    _m("null", 1, [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]),
]


def test_claims_by_hand():
    c = arm_claims(MEASURES, "rl")
    train = c["generator_round0_train"]  # per seed d = [1,0,0,1] and [0,0,0,0]
    assert train.mean == pytest.approx(0.25) and train.se == pytest.approx(0.25)
    assert train.se_within == pytest.approx(math.sqrt(1 / 12) / 2)
    assert c["generator_round0_heldout"].mean == 0.0 and c["r3_final_round_heldout"].se == 0.0
    # reflection: seed 0 6/10 vs 6/10, seed 1 8/10 vs 6/10 -> mean 0.1
    assert c["reflection_accuracy"].per_seed == pytest.approx((0.0, 0.2))
    # balanced: seed 1 rl (1.0 + 0.5)/2 = 0.75 vs null (0.5 + 0.75)/2 = 0.625 -> +0.125;
    # its variance (0/2 + 0.25/8)/4 + (0.25/4 + 0.1875/6)/4 = 0.0078125 + 0.0234375
    bal = c["reflection_balanced_accuracy"]
    assert bal.per_seed == pytest.approx((0.0, 0.125))
    v0 = 2 * (0.25 / 4 + 0.1875 / 6) / 4
    assert bal.se_within == pytest.approx(math.sqrt(v0 + 0.0078125 + 0.0234375) / 2)
    # stop when correct: seed 0 2/4 vs 2/4, seed 1 2/2 vs 2/4 -> +0.5; variances 2 * 0.0625 and 0 + 0.0625
    stop = c["stop_when_correct"]
    assert stop.per_seed == pytest.approx((0.0, 0.5)) and stop.n_per_seed == (4, 2)
    assert stop.se_within == pytest.approx(math.sqrt(0.125 + 0.0625) / 2)
    # exact fix: seed 0 1/6 vs 1/6, seed 1 4/8 vs 1/6 -> per seed 0 and 1/3, mean 1/6
    fix = c["exact_fix_rate"]
    assert fix.per_seed == pytest.approx((0.0, 1 / 3)) and fix.mean == pytest.approx(1 / 6)
    assert list(c) == ["generator_round0_train", "generator_round0_heldout", "r3_round0_heldout",
                       "r3_final_round_heldout", "reflection_accuracy", "reflection_balanced_accuracy",
                       "stop_when_correct", "exact_fix_rate"]  # the METRICS order, as the tables print  # fmt: skip


def test_levels_and_markdown():
    lv = {a: arm_levels(MEASURES, a) for a in ("rl", "null")}
    assert lv["rl"]["generator_round0_train"] == pytest.approx(0.375)
    assert lv["null"]["reflection_accuracy"] == pytest.approx(0.6)
    assert lv["rl"]["exact_fix_rate"] == pytest.approx((1 / 6 + 4 / 8) / 2)
    assert lv["rl"]["stop_when_correct"] == pytest.approx(0.75)
    md = claims_markdown({"rl": arm_claims(MEASURES, "rl")}, lv, "null", [0, 1], {"generator_round0_train": 0.1})
    assert "| generator round 0, fixed training prompts (optimisation) | **+25.0** | 25.0 | 14.4 | 25.0 | +50.0, +0.0 | 4, 4 |" in md
    assert "| 37.5 | 12.5 | 10.0 |" in md


def test_no_exact_fix_claim_where_a_judge_named_no_fixes():
    unnamed = [dict(m) for m in MEASURES]
    unnamed[1] = {**unnamed[1], "eval": {**unnamed[1]["eval"], "fix_naming": {"exact_fixes": 0, "on_wrong_images_with_fix": 0}}}
    assert "exact_fix_rate" not in arm_claims(unnamed, "rl") and "stop_when_correct" in arm_claims(unnamed, "rl")
    lv = {a: arm_levels(unnamed, a) for a in ("rl", "null")}
    assert math.isnan(lv["null"]["exact_fix_rate"])
    md = claims_markdown({"rl": arm_claims(unnamed, "rl")}, lv, "null", [0, 1])
    assert "| exact fix named (reflect decisions on wrong images), held-out | 33.3 | – |" in md


def test_unpaired_or_missing_seeds_are_refused():
    bad = [dict(m) for m in MEASURES]
    bad[1] = {**bad[1], "eval": {**bad[1]["eval"], "prompts": ["x", "b", "c", "d"]}}
    with pytest.raises(ValueError, match="seed 0: 'rl' and 'null' were evaluated on different prompts"):
        arm_claims(bad, "rl")
    with pytest.raises(ValueError, match="share no finished seed"):
        arm_claims(MEASURES[:1], "rl")


def test_command_line():
    args = _parse(["--config", "c.yaml", "--arms", "rl=", "null=train.null_advantages=true", "--arms", "x=a.b=1",
                   "--steps", "5", "--out", "o", "r3.group_size=4"])  # fmt: skip
    assert args.arms == ["rl=", "null=train.null_advantages=true", "x=a.b=1"] and args.overrides == ["r3.group_size=4"]
    assert (args.seeds, args.train_prompts, args.per_tag) == (2, 36, 30)


def test_run_measures_read_the_evaluation_in_sample_order(tmp_path):
    from types import SimpleNamespace

    from examples.shapesworld.arms import run_measures
    from rollout.trajectory import Round, Trajectory, write_trajectories

    def traj(g, rounds):  # (correct, stopped) per round
        return Trajectory(f"p{g}", {"tag": "t"}, g, [Round(index=i, stage="eval", correct=c, stopped=s, score=float(c))
                                                   for i, (c, s) in enumerate(rounds)])  # fmt: skip

    (tmp_path / "eval-final").mkdir()
    # written out of order; sample 1 stops on its correct round-0 image, sample 0 is fixed by an edit
    write_trajectories(tmp_path / "eval-final" / "trajectories.parquet",
                       [traj(1, [(True, False), (True, True)]), traj(0, [(False, False), (True, False)])])  # fmt: skip
    run = SimpleNamespace(arm="rl", seed=1, run_dir=tmp_path)
    m = run_measures(run, {"train": {"correct": [True], "scores": [1.0]}, "test": {"correct": [False], "scores": [0.5]}})
    assert m["eval"]["prompts"] == ["p0", "p1"]
    assert m["eval"]["round0"] == [False, True] and m["eval"]["final"] == [True, True]
    assert m["eval"]["reflection"]["correct_decisions"] == 2 and m["eval"]["reflection"]["decisions"] == 2
    assert m["eval"]["fix_naming"]["on_wrong_images"] == 1 and m["eval"]["fix_naming"]["on_wrong_images_with_fix"] == 0
    assert m["probe"] == {"train": [True], "test": [False]} and (m["arm"], m["seed"]) == ("rl", 1)
    assert m["probe_score"] == {"train": [1.0], "test": [0.5]}


def test_the_probe_draws_with_the_ema_when_the_run_kept_one(tmp_path):
    from examples.shapesworld.arms import probe_weights

    (tmp_path / "diffusion_learner" / "weights").mkdir(parents=True)
    assert probe_weights(tmp_path) == tmp_path / "diffusion_learner" / "weights"
    (tmp_path / "diffusion_learner" / "ema_weights").mkdir()
    assert probe_weights(tmp_path) == tmp_path / "diffusion_learner" / "ema_weights"


@pytest.mark.integration
def test_report_of_finished_runs_probes_them_and_splits_the_claim(tmp_path, capsys):
    """`main` on runs that finished before: it keeps them and writes the report. Both runs draw with a
    copy of the warm start's transformer, so the probe (same noise for sample i in every run) must
    give each of them the warm start's verdicts sample by sample, and every claim and group is 0."""
    import json
    import logging
    import shutil

    from examples.shapesworld.arms import main
    from rollout.trajectory import Round, Trajectory, write_trajectories

    warm = ROOT / "examples" / "shapesworld" / "warmstart" / "flux" / "transformer"
    for name in ("rl-seed0", "null-seed0"):
        run = tmp_path / name
        ckpt = run / "checkpoints" / "step-000001"
        shutil.copytree(warm, ckpt / "diffusion_learner" / "weights")
        (ckpt / "COMPLETE").write_text("")
        (run / "eval-final").mkdir(parents=True)
        (run / "eval-final" / "eval.json").write_text("{}")
        evals = [Trajectory(f"p{g}", {"tag": "t"}, g, [  # an edit fixes the image, then a stop
            Round(index=0, stage="eval", correct=False, score=0.5), Round(index=1, stage="eval", correct=True, score=1.0),
            Round(index=2, stage="eval", correct=True, stopped=True, score=1.0)]) for g in range(2)]  # fmt: skip
        write_trajectories(run / "eval-final" / "trajectories.parquet", evals)
        (run / "trajectories").mkdir()
        write_trajectories(run / "trajectories" / "step-000000.parquet",
                           [Trajectory("a photo of a circle", {}, 0, [Round(index=0, stage="generate", score=s)])
                            for s in (0.5, 1.0)])  # fmt: skip
    handlers, level = logging.root.handlers[:], logging.root.level  # main configures logging for a console
    try:
        rc = main(["--config", "examples/shapesworld/configs/shapes_cpu.yaml", "--arms", "rl=",
                   "null=train.null_advantages=true", "--seeds", "1", "--steps", "1", "--train-prompts", "9",
                   "--per-tag", "2", "--out", str(tmp_path)])  # fmt: skip
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    assert rc == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "arms.json").read_text())
    warm_train = out["warm_start_probe"]["train"]
    assert len(warm_train) == len(out["prompts"]["train"]) == 18
    assert [r["probe"]["train"] for r in out["runs"]] == [warm_train, warm_train]
    assert out["claims"]["rl"]["generator_round0_train"]["mean"] == 0.0
    md = (tmp_path / "arms.md").read_text()
    assert "**Where the gain of rl − null on the training prompts comes from**" in md
    assert "| all | 9 | 100 % | | | | | +0.0 |" in md
