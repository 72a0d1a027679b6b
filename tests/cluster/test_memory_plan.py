"""The memory plan: hand-computed arithmetic, exact parameter counts of the shipped model configs,
and the verdicts on the production config and on one that cannot fit."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster import memory_plan as mp
from cluster.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
GPU = str(ROOT / "configs/gpu_kontext_qwenvl.yaml")
MODELS = ROOT / "configs/models"


def setup(**change):
    base = dict(params=1000, trainable=1000, weight_bytes=2, zero_stage=0, dp=4, reference=True, lora=False,
                largest_layer_params=100, activations=50.0)
    return mp.LearnerSetup(**{**base, **change})


def test_learner_memory_by_zero_stage():
    # bf16: 2 bytes weights, 2 bytes gradients, 12 bytes fp32 master + Adam moments, per parameter
    assert mp.learner_memory(setup()).parts == {
        "weights": 2000, "gradients": 2000, "optimizer": 12000, "reference": 2000, "zero3_gather": 0,
        "activations": 50, "lora_merged": 0}
    assert mp.learner_memory(setup()).total == 18050
    assert mp.learner_memory(setup(zero_stage=1)).parts["optimizer"] == 3000  # sharded over 4 ranks
    z2 = mp.learner_memory(setup(zero_stage=2)).parts
    assert (z2["gradients"], z2["optimizer"], z2["weights"]) == (500, 3000, 2000)
    z3 = mp.learner_memory(setup(zero_stage=3)).parts
    assert (z3["weights"], z3["gradients"], z3["optimizer"], z3["reference"], z3["zero3_gather"]) == (
        500, 500, 3000, 500, 400)  # gather: 2 layers x 100 params x 2 bytes
    assert mp.learner_memory(setup(zero_stage=3, dp=1)).parts["zero3_gather"] == 0  # nothing to gather


def test_fp32_training_has_no_separate_master_copy_below_zero3():
    parts = mp.learner_memory(setup(weight_bytes=4, reference=False)).parts
    assert (parts["weights"], parts["gradients"], parts["optimizer"], parts["reference"]) == (4000, 4000, 8000, 0)
    # ZeRO-3 keeps an fp32 partition of its own: 12 bytes per parameter, over 4 ranks
    assert mp.learner_memory(setup(weight_bytes=4, zero_stage=3)).parts["optimizer"] == 3000


def test_lora_trains_adapters_only_and_its_reference_costs_nothing():
    parts = mp.learner_memory(setup(trainable=10, lora=True)).parts
    assert (parts["weights"], parts["gradients"], parts["optimizer"], parts["reference"]) == (2020, 20, 120, 0)
    # rank 0 keeps the merged copies of the adapted layers for the sync: 600 base weights x 2 bytes
    assert mp.learner_memory(setup(trainable=10, lora=True, merged_params=600)).parts["lora_merged"] == 1200
    assert mp.learner_memory(setup(merged_params=600)).parts["lora_merged"] == 0  # no LoRA, no merged copies


def test_bad_learner_setup_is_refused():
    with pytest.raises(ValueError, match="dp=0"):
        mp.learner_memory(setup(dp=0))


def test_activations_with_and_without_checkpointing():
    assert mp.layer_activation_bytes(10, 4) == 34 * 10 * 4
    assert mp.activation_bytes(10, 4, 3, checkpointing=False) == 3 * 34 * 40  # 4080
    assert mp.activation_bytes(10, 4, 3, checkpointing=True) == 3 * 2 * 40 + 34 * 40  # inputs + one layer: 1600
    assert mp.activation_bytes(10, 4, 3, checkpointing=False, act_bytes=4) == 2 * 4080
    assert mp.logits_bytes(2, 3, 5) == 240  # fp32 logits and their gradient


def test_lora_params_match_targets_like_peft():
    linears = [("model.layers.0.self_attn.q_proj", 8, 8), ("model.layers.0.self_attn.k_proj", 8, 2),
               ("model.layers.0.mlp.up_proj", 8, 16), ("lm_head", 8, 100)]
    assert mp.lora_params(linears, 2, ["q_proj", "k_proj"]) == 2 * 16 + 2 * 10
    assert mp.lora_params(linears, 2, "all-linear") == 2 * (16 + 10 + 24)  # the output layer is left out
    assert mp.lora_params(linears, 2, ["proj"]) == 0  # a suffix of a name segment is no match
    assert mp.lora_adapted_params(linears, ["q_proj", "k_proj"]) == 64 + 16
    assert mp.lora_adapted_params(linears, "all-linear") == 64 + 16 + 128
    with pytest.raises(ValueError, match="rank 0"):
        mp.lora_params(linears, 0, ["q_proj"])


def test_kv_cache_per_token_budget_and_tokens():
    assert mp.kv_bytes_per_token(28, 4, 128, 1, 2) == 57344  # Qwen2.5-VL-7B in bf16: 56 KiB
    assert mp.kv_bytes_per_token(28, 4, 128, 8, 2) == 14336  # TP 8 > 4 KV heads: each GPU keeps one head
    assert mp.kv_cache_budget(100.0, 0.9, 30.0) == pytest.approx(60.0)
    est = mp.engine_memory(1000, 2, 2, layers=1, kv_heads=2, head_dim=4, utilization=0.5, gpu_bytes=10000)
    assert (est.weights, est.kv_budget, est.bytes_per_token, est.kv_tokens) == (1000, 4000, 16, 250)
    assert mp.engine_memory(1000, 2, 1, 1, 2, 4, 0.5, None).kv_tokens is None


def test_shipped_model_configs_give_the_published_parameter_counts():
    from cluster.model_shapes import lm_shape, pipeline_shape

    small = lm_shape(MODELS / "qwen2.5-vl-7b-instruct")
    assert small.params == 8_292_166_656
    assert (small.layers, small.hidden, small.kv_heads, small.head_dim, small.vocab) == (28, 3584, 4, 128, 152064)
    assert lm_shape(MODELS / "qwen2.5-vl-72b-instruct").params == 73_406_351_360
    flux = pipeline_shape(MODELS / "flux.1-kontext-dev")
    assert flux.transformer_params == 11_901_408_320
    assert (flux.transformer_layers, flux.transformer_hidden) == (19 + 38, 3072)
    assert flux.other_params == {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683}


def test_production_config_fits_its_hardware():
    from cluster.launch_plan import check_launch, memory_plan

    cfg = load_config(GPU)
    plans = {p.role: p for p in memory_plan(cfg)}
    assert set(plans) == {"text_workers", "diffusion_workers", "judge_replicas", "text_learners",
                          "diffusion_learners"}
    assert all(p.fits for p in plans.values()), {r: p.total for r, p in plans.items()}
    assert plans["judge_replicas"].parts["weights"] == pytest.approx(73_406_351_360 * 2 / 4)
    check_launch(cfg, list(plans.values()))


def test_the_papers_lora_setting_fits_one_node_of_8_gpus():
    from cluster.launch_plan import check_launch, memory_plan

    cfg = load_config(str(ROOT / "configs/gpu_qwen25vl_kontext_lora.yaml"))
    hw = cfg.cluster.hardware
    assert (hw.nodes, hw.gpus_per_node, hw.gpu_memory_gb) == (1, 8, 80)
    plans = {p.role: p for p in memory_plan(cfg)}
    assert all(p.fits for p in plans.values()), {r: p.total for r, p in plans.items()}
    for role in ("text_learners", "diffusion_learners"):  # adapters only: no reference copy, small optimizer
        assert plans[role].parts["reference"] == 0 and plans[role].parts["optimizer"] < 0.1 * plans[role].parts["weights"]
    check_launch(cfg, list(plans.values()))


def test_full_fine_tuning_at_zero1_does_not_fit_and_names_the_ways_out():
    from cluster.launch_plan import check_launch, memory_plan

    cfg = load_config(GPU, ["flow_grpo.zero_stage=1", "flow_grpo.gradient_checkpointing=false"])
    plan = {p.role: p for p in memory_plan(cfg)}["diffusion_learners"]
    # 11.9 B params over 8 learners: bf16 weights, gradients and reference whole, Adam state sharded
    assert plan.parts["optimizer"] == pytest.approx(11_901_408_320 * 12 / 8)
    assert plan.parts["weights"] == plan.parts["gradients"] == plan.parts["reference"] == 11_901_408_320 * 2
    assert plan.fits is False and plan.total > 80e9
    fixes = " ".join(plan.fixes)
    for way_out in ("lora.rank", "zero_stage=3", "offload", "micro_batch_size=1", "gradient_checkpointing=true"):
        assert way_out in fixes
    with pytest.raises(ConfigError, match="diffusion_learners: does not fit"):
        check_launch(cfg)


def test_a_vllm_engine_on_part_of_a_gpu_must_keep_its_utilization_within_its_share():
    """vLLM sizes its cache from gpu_memory_utilization of the whole device, whatever Ray reserved."""
    from cluster.launch_plan import check_launch, memory_plan

    smoke = str(ROOT / "configs/gpu_smoke.yaml")
    hw = "cluster.hardware={nodes: 1, gpus_per_node: 1, gpu_memory_gb: 80}"
    ok = {p.role: p for p in memory_plan(load_config(smoke, [hw]))}["text_workers"]
    assert ok.fits and ok.parts["kv_cache"] == pytest.approx(0.2 * 80e9 - ok.parts["weights"])
    cfg = load_config(smoke, [hw, "models.reasoner.gpu_memory_utilization=0.8"])
    bad = {p.role: p for p in memory_plan(cfg)}["text_workers"]
    assert bad.fits is False and "models.reasoner.gpu_memory_utilization <= 0.2" in " ".join(bad.fixes)
    with pytest.raises(ConfigError, match="gpu_memory_utilization=0.8 of the whole GPU"):
        check_launch(cfg)


def test_missing_model_folder_without_a_config_folder_is_refused():
    from cluster.launch_plan import memory_plan

    cfg = load_config(GPU, ["models.reasoner.config=null"])
    with pytest.raises(ConfigError, match="set models.reasoner.config"):
        memory_plan(cfg)
    with pytest.raises(ConfigError, match="models.generator.config: folder 'no/such/folder' does not exist"):
        memory_plan(load_config(GPU, ["models.generator.config=no/such/folder"]))


def test_dry_run_prints_the_plan_without_model_folders_and_refuses_what_cannot_fit():
    ok = subprocess.run([sys.executable, "-m", "cluster.train", "--config", GPU, "--dry-run"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "memory plan" in ok.stdout and "KV cache budget" in ok.stdout and "does not fit" not in ok.stdout
    assert ok.stdout.count(": fits") == 5
    bad = subprocess.run([sys.executable, "-m", "cluster.train", "--config", GPU, "--dry-run",
                          "flow_grpo.zero_stage=1", "flow_grpo.gradient_checkpointing=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "diffusion_learners: does not fit" in bad.stderr and "Ways out" in bad.stderr
    assert "Traceback" not in bad.stderr and "dry run: no engines started" not in bad.stdout


def test_meta_count_equals_the_loaded_tiny_model():
    """The plan's parameter count (meta device) is that of the weights a learner loads."""
    import torch
    from transformers import AutoModelForImageTextToText

    from cluster.model_shapes import lm_shape
    from cluster.session import resolve_model_path

    path = resolve_model_path("tiny:vlm")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    shape = lm_shape(path)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert mp.learner_memory(setup(params=shape.params, trainable=shape.params, weight_bytes=4, reference=False,
                                   activations=0)).parts["weights"] == sum(
        p.numel() * p.element_size() for p in model.parameters())


def test_cpu_dry_run_has_nothing_to_plan(capsys):
    from cluster.train import main

    assert main(["--config", str(ROOT / "configs/cpu_tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "no role has GPUs: nothing to plan" in out
