"""Lean learners under ZeRO-3: no rank holds a whole copy, and the results equal ZeRO-1's.

Two TextLearner ranks (gloo, CPU, Ray actors) on a 57M-parameter Qwen2 (every matrix above
ZeRO-3's persistence threshold), with a KL reference (kl_coef > 0): under ZeRO-1 each rank holds
the whole policy and the whole reference; under ZeRO-3 the policy is built partitioned
(`deepspeed.zero.Init`, filled from rank 0: `lean_init.load_pretrained_partitioned`) and the reference is a second,
optimizer-less ZeRO-3 engine. Measured per rank (`LearnerBase.memory_stats`): policy and reference
each hold half of a full copy (ZeRO-1: a whole one each), from construction on (the report also
prints each rank's RSS around the load); and one update gives the same loss, KL, gradient norm and
weights (fp32, 1e-5). Filling partitions from rank 0 (two gloo subprocesses) gives the checkpoint's
values, keeps tied embeddings tied, takes a VLM's names from its own loader and refuses a checkpoint
that lacks a name of the built model.
What a rank holds is also set beside the memory plan's arithmetic (`cluster.memory_plan`); the
ZeRO-3 bucket sizes and the config wiring are unit-tested here too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

RAY_NUM_CPUS = 4
TEMPERATURE = 0.8
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]
# adam_eps 1e-6: see tests/learners/test_text_learner.py (Adam's first step amplifies float noise)
COMMON = dict(lr=1e-3, adam_eps=1e-6, warmup_steps=0, grad_clip=1.0, temperature=TEMPERATURE, kl_coef=0.05,
              kl_kind="k3", loss_agg="token-mean", dtype="float32", micro_batch_size=1)


# ------------------------------------------------------------------------------------ config and buckets


def test_zero3_buckets_follow_the_model_width_and_only_under_zero3():
    import learners.ds_engine as ds

    assert ds.zero3_bucket_sizes(768) == {"reduce_bucket_size": 589824, "stage3_prefetch_bucket_size": 530841,
                                          "stage3_param_persistence_threshold": 7680,
                                          "stage3_max_live_parameters": 5898240, "stage3_max_reuse_distance": 5898240}
    with pytest.raises(ValueError, match="hidden_size"):
        ds.zero3_bucket_sizes(0)
    kw = dict(lr=1.0, betas=(0.9, 0.9), weight_decay=0, adam_eps=1e-8, grad_clip=0, micro_batch_size=1,
              world_size=2, dtype=torch.bfloat16, hidden_size=768)
    assert ds.build_ds_config(zero_stage=3, **kw)["zero_optimization"]["reduce_bucket_size"] == 589824
    assert ds.build_ds_config(zero_stage=1, **kw)["zero_optimization"] == {"stage": 1}
    assert ds.build_ds_config(zero_stage=1, **kw)["bf16"] == {"enabled": True}


def test_config_dtype_and_checkpointing_reach_the_learners():
    from cluster.config import load_config
    from cluster.roles import ModelPaths, diffusion_learner_kwargs, text_learner_kwargs

    cfg = load_config(None, ["grpo.dtype=bfloat16", "grpo.gradient_checkpointing=true", "flow_grpo.dtype=bfloat16",
                             "flow_grpo.gradient_checkpointing=true", "grpo.zero_stage=3"])
    paths = ModelPaths("lm", "flux", None)
    text, image = text_learner_kwargs(cfg, paths), diffusion_learner_kwargs(cfg, paths)
    assert (text["dtype"], text["gradient_checkpointing"], text["zero_stage"]) == ("bfloat16", True, 3)
    assert (image["dtype"], image["gradient_checkpointing"]) == ("bfloat16", True)
    default = load_config(None, [])
    assert text_learner_kwargs(default, paths)["dtype"] == diffusion_learner_kwargs(default, paths)["dtype"] == "float32"


def test_learner_dtype_is_refused_unless_float32_or_bfloat16():
    from cluster.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match="dtype"):
        load_config(None, ["grpo.dtype=float16"])


# ------------------------------------------------------------------------------- real engines, 2 ranks


def _build_mid_lm(tiny_lm: Path, out: Path) -> Path:
    """Qwen2 with the tiny tokenizer: 6 layers, hidden 768, MLP 3072 (57M parameters, 229 MB fp32)."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_lm)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 768, 3072, 6
    cfg.num_attention_heads = cfg.num_key_value_heads = 12
    cfg.head_dim = 64
    cfg.layer_types = ["full_attention"] * 6
    torch.manual_seed(5)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    for f in tiny_lm.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def mid_lm(tiny_models, tmp_path_factory) -> Path:
    return _build_mid_lm(tiny_models.lm, tmp_path_factory.mktemp("mid-lm"))


def _one_update(stage: int, model_path: Path, batch: list) -> dict:
    """Memory after construction and after one update on every rank, the metrics and the weights."""
    from learners.group import LearnerGroup

    group = LearnerGroup("text", 2, num_cpus_per=1, name_prefix=f"test-lean-z{stage}", model_path=str(model_path),
                         zero_stage=stage, gradient_checkpointing=stage == 3, **COMMON)
    try:
        built = group.call_all("memory_stats")
        metrics = group.train_step(batch, ADVANTAGES)
        trained = group.call_all("memory_stats")
        weights = group.call_all("full_state_dict")[0]
    finally:
        group.shutdown()
    return {"built": built, "trained": trained, "metrics": metrics, "weights": weights}


@pytest.fixture(scope="module")
def runs(ray_cluster, mid_lm, make_text_batch) -> dict[int, dict]:
    batch = make_text_batch(mid_lm, TEMPERATURE, n=4, seed=0)
    return {stage: _one_update(stage, mid_lm, batch) for stage in (1, 3)}


def _report(runs: dict[int, dict]) -> str:
    mb = 2**20
    lines = []
    for stage, run in runs.items():
        for rank, m in enumerate(run["trained"]):
            lines.append(f"ZeRO-{stage} rank {rank}: params {m['params_bytes'] / mb:.1f} MB, reference "
                         f"{m['reference_bytes'] / mb:.1f}, grads {m['grads_bytes'] / mb:.1f}, optimizer "
                         f"{m['optimizer_bytes'] / mb:.1f}, tensors {m['total_bytes'] / mb:.1f} "
                         f"(full model {m['full_model_bytes'] / mb:.1f}); RSS built "
                         f"{run['built'][rank]['rss_bytes'] / mb:.0f} MB, peak {m['peak_rss_bytes'] / mb:.0f} MB")
        for rank, b in enumerate(run["built"]):
            lines.append(f"ZeRO-{stage} rank {rank} loading: RSS {b['load_rss_before_bytes'] / mb:.0f} -> "
                         f"{b['load_rss_after_bytes'] / mb:.0f} MB, peak growth {b['load_peak_growth_bytes'] / mb:.0f} "
                         f"MB, keeps {(b['params_bytes'] + b['reference_bytes']) / mb:.0f} MB")
    return "\n".join(lines)


@pytest.mark.integration
def test_zero3_rank_holds_no_full_copy(runs):
    print(_report(runs))
    full = runs[3]["trained"][0]["full_model_bytes"]
    for z1, z3 in zip(runs[1]["trained"], runs[3]["trained"], strict=True):
        # ZeRO-1: a whole policy and a whole reference on every rank
        assert z1["params_bytes"] >= full and z1["reference_bytes"] >= full
        # ZeRO-3: half of the policy and half of the reference (+ the small persistent norms)
        assert z3["params_bytes"] < 0.55 * full and z3["reference_bytes"] < 0.55 * full
        # fp32: half a policy and half a reference less, less the fp32 partition ZeRO-3 keeps of its own
        assert z3["total_bytes"] < z1["total_bytes"] - 0.4 * full
    for built in runs[3]["built"]:  # right after construction too
        assert built["params_bytes"] < 0.55 * full and built["reference_bytes"] < 0.55 * full


@pytest.mark.integration
def test_zero3_loading_never_holds_a_full_copy_beyond_the_source_rank(runs):
    """Resident memory, not only tensors: while the policy and the reference load, a rank's RSS grows by
    what it keeps (half a policy and half a reference: one model's bytes) plus far less than another whole
    copy; rank 0 also reads the checkpoint, so it may hold one whole source copy more. Without the allocator
    setting (`learners.memory.return_freed_memory_promptly`) a non-source rank grew by 1.5 models' bytes."""
    full = runs[3]["trained"][0]["full_model_bytes"]
    for rank, built in enumerate(runs[3]["built"]):
        kept = built["params_bytes"] + built["reference_bytes"]
        transient = built["load_peak_growth_bytes"] - kept
        allowed = (1.0 if rank == 0 else 0.0) * full + 0.4 * full
        assert built["load_peak_reset"] == 1.0  # the high-water mark was the load's own
        assert transient < allowed, (rank, transient / full)


def _planned(stage: int, full_bytes: float) -> dict[str, float]:
    from cluster.memory_plan import LearnerSetup, learner_memory

    numel = int(full_bytes) // 4
    setup = LearnerSetup(params=numel, trainable=numel, weight_bytes=4, zero_stage=stage, dp=2, reference=True,
                         lora=False, largest_layer_params=0, activations=0.0)
    return learner_memory(setup).parts


@pytest.mark.integration
def test_what_a_rank_holds_matches_the_memory_plan(runs):
    for stage, run in runs.items():
        for m in run["trained"]:
            plan = _planned(stage, m["full_model_bytes"])
            assert m["params_bytes"] == pytest.approx(plan["weights"], rel=0.02), stage
            assert m["reference_bytes"] == pytest.approx(plan["reference"], rel=0.02), stage
    for m in runs[3]["trained"]:  # after the step: gradient partition, fp32 partition and Adam moments
        plan = _planned(3, m["full_model_bytes"])
        assert m["grads_bytes"] + m["optimizer_bytes"] == pytest.approx(plan["gradients"] + plan["optimizer"],
                                                                        rel=0.05)


@pytest.mark.integration
def test_zero3_update_equals_zero1(runs):
    z1, z3 = runs[1], runs[3]
    for key in ("pg_loss", "kl_loss", "num_tokens"):
        assert z3["metrics"][key] == pytest.approx(z1["metrics"][key], abs=1e-6), key
    assert z3["metrics"]["kl"] < 1e-8  # the sharded reference's forward equals the policy's before the update
    assert z3["metrics"]["grad_norm"] == pytest.approx(z1["metrics"]["grad_norm"], rel=1e-5)
    assert set(z3["weights"]) == set(z1["weights"])
    for name, w in z1["weights"].items():
        torch.testing.assert_close(z3["weights"][name], w, atol=1e-5, rtol=0, msg=name)


# ------------------------------------------------------------------ filling partitions from rank 0, 2 ranks

FILL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers
    from learners import ds_engine, lean_init

    rank, port, folder, misfit, cls_name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    cls = getattr(transformers, cls_name)
    ds_engine.set_dist_env(rank, 2, "127.0.0.1", port)
    ds_engine.init_distributed("gloo")
    config = ds_engine.build_ds_config(zero_stage=3, lr=1e-3, betas=(0.9, 0.9), weight_decay=0.0,
                                       adam_eps=1e-8, grad_clip=0.0, micro_batch_size=1, world_size=2,
                                       dtype=torch.float32, hidden_size=128)
    load = lambda: cls.from_pretrained(misfit if misfit != "-" else folder)
    build = lambda: cls.from_config(transformers.AutoConfig.from_pretrained(folder))
    try:
        models = lean_init.load_pretrained_partitioned(load, build, config, copies=2)
    except ValueError as e:
        print("RESULT " + json.dumps({"error": str(e)}))
        sys.exit(0)
    plain = cls.from_pretrained(folder)
    want = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    out = {"tied": [], "max_diff": 0.0, "names": True, "partitioned": True}
    for m in models:
        out["tied"].append(m.get_output_embeddings().weight is m.get_input_embeddings().weight)
        got = {**ds_engine.full_state_dict(m), **dict(m.named_buffers())}
        out["names"] &= sorted(got) == sorted(want)
        out["max_diff"] = max([out["max_diff"]] + [float((got[k].float() - want[k].float()).abs().max()) for k in got])
        out["partitioned"] &= all(p.ds_tensor.numel() < p.ds_numel for p in m.parameters() if p.ds_numel > 64)
    print("RESULT " + json.dumps(out))
    """
)


def _tied_lm(tiny_lm: Path, out: Path, layers: int = 2) -> Path:
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_lm)
    cfg.tie_word_embeddings, cfg.num_hidden_layers = True, layers
    cfg.layer_types = ["full_attention"] * layers
    torch.manual_seed(3)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def _fill_on_two_ranks(folder: Path, misfit: Path | None, cls: str = "AutoModelForCausalLM") -> list[dict]:
    """Each of two gloo ranks (subprocesses) loads `folder` into two partitioned copies; their results."""
    from rollout.ports import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FILL_SCRIPT, str(rank), str(port), str(folder),
                               str(misfit or "-"), cls], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


@pytest.mark.integration
def test_partitions_filled_from_rank0_equal_the_checkpoint_and_stay_tied(tiny_models, tmp_path):
    folder = _tied_lm(tiny_models.lm, tmp_path / "tied")
    for r in _fill_on_two_ranks(folder, misfit=None):
        assert r["tied"] == [True, True] and r["names"] and r["partitioned"], r
        assert r["max_diff"] == 0.0


@pytest.mark.integration
def test_a_vlm_is_filled_under_the_names_its_own_loader_gives(tiny_models):
    """The VLM's checkpoint names pass through transformers' renames on rank 0 (`from_pretrained`)."""
    for r in _fill_on_two_ranks(tiny_models.vlm, misfit=None, cls="AutoModelForImageTextToText"):
        assert r["tied"] == [False, False] and r["names"] and r["partitioned"], r
        assert r["max_diff"] == 0.0


@pytest.mark.integration
def test_partitions_refuse_a_checkpoint_that_lacks_their_names(tiny_models, tmp_path):
    folder = _tied_lm(tiny_models.lm, tmp_path / "tied")
    shallow = _tied_lm(tiny_models.lm, tmp_path / "shallow", layers=1)
    for r in _fill_on_two_ranks(folder, misfit=shallow):  # every rank raises; none waits in a gather
        assert "missing from the loaded model" in r["error"] and "model.layers.1.mlp.up_proj.weight" in r["error"]
