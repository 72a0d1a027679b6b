"""Planning the runs of arms × seeds (cluster.arms): parsing arms, the override order, refusals."""

from pathlib import Path

import pytest

from cluster.arms import Arm, check_arm_configs, is_finished, parse_arm, plan_arm_runs, read_metrics
from cluster.config import ConfigError


def test_parse_arm():
    assert parse_arm("rl=") == Arm("rl", ())
    assert parse_arm("null=train.null_advantages=true") == Arm("null", ("train.null_advantages=true",))
    assert parse_arm("cps=flow_grpo.window=[0,0.5]; flow_grpo.lr=5e-5").overrides == (
        "flow_grpo.window=[0,0.5]",
        "flow_grpo.lr=5e-5",
    )
    for bad in ("rl", "r l=", "=x=1"):
        with pytest.raises(ValueError, match="NAME=OVERRIDE"):
            parse_arm(bad)
    with pytest.raises(ValueError, match="override 'lr' is not a dotted key=value"):
        parse_arm("x=lr")


def test_plan_is_seed_major_and_the_arm_overrides_after_the_common_ones(tmp_path: Path):
    arms = [Arm("rl", ()), Arm("null", ("train.null_advantages=true",))]
    runs = plan_arm_runs(arms, [0, 1], ["train.steps=3"], tmp_path)
    assert [(r.arm, r.seed) for r in runs] == [("rl", 0), ("null", 0), ("rl", 1), ("null", 1)]
    null1 = runs[3]
    assert null1.run_dir == tmp_path.resolve() / "null-seed1"
    assert null1.overrides == (
        "train.steps=3", "train.null_advantages=true", "train.seed=1", f"train.run_dir={tmp_path.resolve()}",
        "train.run_name=null-seed1",
    )  # fmt: skip
    with pytest.raises(ValueError, match="arm names must differ"):
        plan_arm_runs([Arm("a", ()), Arm("a", ())], [0], [], tmp_path)
    with pytest.raises(ValueError, match="distinct seeds"):
        plan_arm_runs(arms, [0, 0], [], tmp_path)


def test_configs_are_checked_before_anything_runs(tmp_path: Path):
    runs = plan_arm_runs([Arm("rl", ()), Arm("null", ("train.null_advantages=maybe",))], [0], [], tmp_path)
    with pytest.raises(ConfigError, match="null_advantages"):
        check_arm_configs("configs/cpu_tiny.yaml", runs)
    ok = plan_arm_runs([Arm("rl", ()), Arm("null", ("train.null_advantages=true",))], [0], [], tmp_path)
    cfgs = check_arm_configs("configs/cpu_tiny.yaml", ok)
    assert [c.train.null_advantages for c in cfgs] == [False, True] and cfgs[1].train.run_name == "null-seed0"


def test_finished_and_metrics(tmp_path: Path):
    (run,) = plan_arm_runs([Arm("rl", ())], [0], [], tmp_path)
    assert not is_finished(run)
    (run.run_dir / "eval-final").mkdir(parents=True)
    (run.run_dir / "eval-final" / "eval.json").write_text("{}")
    (run.run_dir / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert is_finished(run) and [r["step"] for r in read_metrics(run.run_dir)] == [1, 2]
