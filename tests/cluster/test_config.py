"""Config validation: good configs load, bad ones exit 2 naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, R3Config, load_config
from cluster.placement import plan_placement
from cluster.train import main

ROOT = Path(__file__).resolve().parents[2]
CPU = str(ROOT / "configs/cpu_tiny.yaml")
GPU = str(ROOT / "configs/gpu_kontext_qwenvl.yaml")


def test_shipped_configs_validate():
    cpu = load_config(CPU, check_paths=True)
    gpu = load_config(GPU)  # model folders live on the GPU cluster, not here
    assert cpu.r3.mode == "tree" and cpu.models.reasoner.path == "tiny:vlm"
    assert gpu.cluster.text_workers.count == 4 and gpu.cluster.text_workers.num_gpus == 1
    assert gpu.cluster.judge_replicas.max_replicas == 2 and gpu.judge.tensor_parallel_size == 4
    assert gpu.grpo.zero_stage == 3


def test_documented_key_paths_exist():
    keys = [
        "cluster.text_workers.count=3", "cluster.diffusion_workers.count=2", "cluster.judge_replicas.count=2",
        "cluster.text_learners.count=2", "cluster.diffusion_learners.count=2", "r3.mode=chain",
        "r3.group_size=8", "r3.max_rounds=3", "grpo.clip_low=0.1", "grpo.clip_high=0.28",
        "grpo.kl_coef=0.01", "flow_grpo.noise_level=0.5", "flow_grpo.clip_range=0.1",
        "flow_grpo.num_steps=10", "train.steps=7", "train.seed=3", "flow_grpo.lr_schedule=cosine",
        "grpo.min_lr_ratio=0.1",
    ]
    cfg = load_config(CPU, keys)
    assert (cfg.cluster.text_workers.count, cfg.r3.mode, cfg.grpo.clip_high, cfg.train.seed) == (3, "chain", 0.28, 3)
    assert cfg.flow_grpo.num_steps == 10 and cfg.flow_grpo.noise_level == 0.5
    assert (cfg.flow_grpo.lr_schedule, cfg.grpo.min_lr_ratio) == ("cosine", 0.1)


def test_role_count_shorthand_and_worker_count_leaves_learners_alone():
    base = {p.role: p for p in plan_placement(load_config(CPU))}
    more = {p.role: p for p in plan_placement(load_config(CPU, ["cluster.text_workers=3", "cluster.diffusion_workers=4"]))}
    assert more["text_workers"].count == 3 and more["diffusion_workers"].count == 4
    assert more["text_learners"] == base["text_learners"]
    assert more["diffusion_learners"] == base["diffusion_learners"]
    assert more["text_workers"].actor_names == ["text-worker-0", "text-worker-1", "text-worker-2"]


BAD = [
    (["cluster.text_workers.count=-1"], "cluster.text_workers.count"),
    (["cluster.text_workers=0"], "cluster.text_workers.count"),
    (["grpo.clip_hgih=0.3"], "did you mean 'grpo.clip_high'"),
    (["r3.group_size=abc"], "r3.group_size"),
    (["grpo.clip_low=1.5"], "grpo.clip_low"),
    (["models.reasoner.path=/no/such/model"], "models.reasoner.path"),
    (["r3.group_size=0"], "r3.group_size"),
    (["r3.mode=forest"], "r3.mode"),
    (["flow_grpo.window=[5,2]"], "flow_grpo"),
    (["grpo.betas=[0.9,1.5]"], "grpo.betas"),
    (["judge.kind=remote"], "judge.url and judge.remote_model"),
    (["cluster.judge_replicas.min_replicas=3", "cluster.judge_replicas.max_replicas=1"], "min_replicas"),
    (["flow_grpo.noise_level=-0.1"], "flow_grpo.noise_level"),
    (["train.steps=0"], "train.steps"),
    (["models.generator.height=50"], "models.generator.height"),
    (["nosuchsection.x=1"], "nosuchsection"),
    (["grpo.clip_high"], "must look like key.path=value"),
    (["models.reasoner.path=tiny:gpt5"], "models.reasoner.path"),
    (["grpo.loss_agg=sum"], "grpo.loss_agg"),
    (["flow_grpo.lr_schedule=linear"], "flow_grpo.lr_schedule"),
    (["grpo.min_lr_ratio=1.5"], "grpo.min_lr_ratio"),
    (["grpo.lr_schedule=cosine", "grpo.warmup_steps=4", "train.steps=4"], "grpo.lr_schedule=cosine decays over the run's 4 updates (train.steps 4 x 1 per step)"),
    (["logging.wandb=true"], "logging.wandb_project is not set"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_overrides_exit_2_naming_the_field(overrides, expected, capsys):
    assert main(["--config", CPU, "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_lr_decay_steps_follow_the_schedule():
    cfg = load_config(CPU, ["flow_grpo.lr_schedule=cosine", "train.steps=30"])
    assert cfg.lr_decay_steps(cfg.flow_grpo) == 30
    assert cfg.lr_decay_steps(cfg.grpo) == 0  # constant after warm-up, the default
    # several updates per rollout batch: the cosine spans every update of the run, not its first half
    cfg = load_config(CPU, ["flow_grpo.lr_schedule=cosine", "train.steps=30", "flow_grpo.updates_per_batch=2"])
    assert cfg.lr_decay_steps(cfg.flow_grpo) == 60


def test_cosine_needs_more_updates_than_its_warm_up():
    with pytest.raises(ConfigError, match=r"decays over the run's 8 updates \(train.steps 4 x 2 per step\)"):
        load_config(CPU, ["flow_grpo.lr_schedule=cosine", "train.steps=4", "flow_grpo.updates_per_batch=2",
                          "flow_grpo.warmup_steps=8"])  # fmt: skip
    load_config(CPU, ["flow_grpo.lr_schedule=cosine", "train.steps=4", "flow_grpo.updates_per_batch=2",
                      "flow_grpo.warmup_steps=7"])  # fmt: skip


def test_unknown_key_in_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("r3:\n  group_sise: 4\n")
    assert main(["--config", str(bad), "--dry-run"]) == 2
    assert "r3.group_sise: unknown key" in capsys.readouterr().err


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "x.yaml")


def test_defaults_are_a_valid_config():
    assert R3Config().r3.p_perfect == 0.15


def test_dry_run_cli_prints_plan_and_exits_0():
    out = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--config", CPU, "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "placement plan" in out.stdout and "text-worker-0" in out.stdout and "diffusion-learner-0" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--config", CPU, "--dry-run", "r3.group_size=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "r3.group_size" in bad.stderr and "Traceback" not in bad.stderr


def test_learner_kwargs_carry_the_schedule_and_match_the_constructors():
    """Every key the roles pass is a parameter of the learner (a typo would fail at actor start)."""
    import inspect

    from cluster.roles import ModelPaths, diffusion_learner_kwargs, text_learner_kwargs
    from learners.diffusion_learner import DiffusionLearner
    from learners.text_learner import TextLearner

    cfg = load_config(CPU, ["grpo.lr_schedule=cosine", "grpo.min_lr_ratio=0.1", "train.steps=50",
                            "grpo.gradient_checkpointing=true"])
    paths = ModelPaths("/r", "/g", None)
    text, diffusion = text_learner_kwargs(cfg, paths), diffusion_learner_kwargs(cfg, paths)
    assert (text["lr_decay_steps"], text["min_lr_ratio"], text["model_path"]) == (50, 0.1, "/r")
    assert (diffusion["lr_decay_steps"], diffusion["model_path"]) == (0, "/g")
    assert (text["gradient_checkpointing"], diffusion["gradient_checkpointing"]) == (True, False)
    cfg = load_config(CPU, ["flow_grpo.gradient_checkpointing=true"])
    assert diffusion_learner_kwargs(cfg, paths)["gradient_checkpointing"] is True
    assert text_learner_kwargs(cfg, paths)["gradient_checkpointing"] is False
    for kwargs, cls in ((text, TextLearner), (diffusion, DiffusionLearner)):
        assert set(kwargs) <= set(inspect.signature(cls.__init__).parameters)


def _float_paths(model: type = R3Config, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a tuple of floats) of every float field of every section, found from the schema."""
    import typing

    from pydantic import BaseModel

    def holds_float(ann) -> bool:
        return ann is float or any(holds_float(a) for a in typing.get_args(ann))

    out = []
    for name, info in model.model_fields.items():
        ann, key = info.annotation, f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_paths(ann, key + ".")
        elif holds_float(ann):
            out.append((key, typing.get_origin(ann) is tuple))
    return out


FLOAT_PATHS = _float_paths()


def test_the_schema_walk_finds_the_float_fields():
    keys = dict(FLOAT_PATHS)
    assert len(keys) >= 30
    assert {"grpo.lr", "flow_grpo.lr", "r3.wrong_stop_penalty", "cluster.text_workers.num_cpus",
            "cluster.judge_replicas.num_gpus", "judge.timeout_s", "train.remote_timeout_s", "sync.bucket_mb"} <= set(keys)
    assert keys["grpo.betas"] and keys["flow_grpo.betas"]


@pytest.mark.parametrize(("key", "is_tuple"), FLOAT_PATHS, ids=[k for k, _ in FLOAT_PATHS])
@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_no_float_field_accepts_nan_or_inf(key, is_tuple, text):
    override = f"{key}=[{text}, 0.5]" if is_tuple else f"{key}={text}"
    with pytest.raises(ConfigError) as e:
        load_config(CPU, [override])
    field = f"{key}.0" if is_tuple else key
    assert f"{field}: got " in str(e.value) and "must be a finite number" in str(e.value), str(e.value)
    shown = str(e.value).split(f"{field}: got ", 1)[1].split(":", 1)[0].strip("'").lower()
    assert shown in ("inf", "-inf", "nan"), str(e.value)


@pytest.mark.parametrize("override", ["grpo.lr=.inf", "flow_grpo.lr=.nan", "r3.wrong_stop_penalty=.inf"])
def test_nonfinite_override_exits_2_naming_key_and_value(override, capsys):
    assert main(["--config", CPU, "--dry-run", override]) == 2
    err = capsys.readouterr().err
    key, value = override.split("=")
    assert f"{key}: got {value.lstrip('.')}: must be a finite number" in err and "Traceback" not in err, err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.org", "10.0.0.1"])
def test_a_remote_dashboard_host_is_refused_unless_allowed(host, capsys):
    assert main(["--config", CPU, "--dry-run", f"cluster.dashboard_host={host}"]) == 2
    err = capsys.readouterr().err
    assert f"cluster.dashboard_host={host!r} is not a loopback address" in err, err
    assert "submit jobs" in err and "cluster.allow_remote_dashboard=true" in err
    cfg = load_config(CPU, [f"cluster.dashboard_host={host}", "cluster.allow_remote_dashboard=true"])
    assert cfg.cluster.dashboard_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_dashboard_hosts_are_accepted(host):
    assert load_config(CPU, [f"cluster.dashboard_host={host}"]).cluster.dashboard_host == host
    assert R3Config().cluster.allow_remote_dashboard is False


def test_max_nonfinite_steps_default_and_bounds():
    assert R3Config().train.max_nonfinite_steps == 3
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps"):
        load_config(CPU, ["train.max_nonfinite_steps=0"])
