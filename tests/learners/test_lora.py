"""LoRA on both learners (`learners.lora`): merge math, config, the learners through DeepSpeed, sync and resume.

Shows: the merge W + (alpha/r)·B·A equals hand-computed values; target_modules that match nothing
are refused, by the config before engines start and by the learner; with adapters the first update
of both learners runs at ratio 1 and the reference (the base with adapters off, no second copy)
gives KL 0 before it; after a broadcast the real workers (vLLM, diffusers) hold exactly the
learner's merged weights (checksums; vLLM's greedy answers equal transformers' on the merged
weights), and the sync after the first one sends only the adapted layers (bytes measured and
printed: full vs LoRA); a toy reward rises with LoRA through vLLM, DeepSpeed and the sync; a resume
from a LoRA checkpoint continues bitwise; two ZeRO-3 ranks with gradient checkpointing give one
ZeRO-1 rank's update (1e-5), and the generator's adapters learn the same with checkpointing as without;
a bf16 learner's update moves only the adapted layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learners.lora import (
    AdaptersOff,
    LoraAdapters,
    lora_scale,
    merge_into_state,
    merged_weight,
    unmatched_targets,
    unwrapped_name,
)

RAY_NUM_CPUS = 6  # the `ray_cluster` fixture's: learner ranks plus workers
LM_LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
FLUX_LORA = dict(rank=4, alpha=8.0, dropout=0.0,
                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"])


# ---------------------------------------------------------------------------------- pure functions


def test_merged_weight_equals_hand_computed():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (out 2, in 2)
    a = torch.tensor([[1.0, 0.0]])  # (r 1, in 2)
    b = torch.tensor([[2.0], [1.0]])  # (out 2, r 1)
    # B·A = [[2, 0], [1, 0]]; times 0.5 = [[1, 0], [0.5, 0]]
    assert torch.equal(merged_weight(base, a, b, 0.5), torch.tensor([[2.0, 2.0], [3.5, 4.0]]))
    assert lora_scale(8, 16.0) == 2.0 and lora_scale(4, 1.0) == 0.25
    with pytest.raises(ValueError, match="do not fit"):
        merged_weight(base, torch.ones(1, 3), b, 1.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lora_scale(4, 0.0)


def test_merged_weight_keeps_a_bf16_base_dtype_and_adds_in_fp32():
    base = torch.full((2, 2), 256.0, dtype=torch.bfloat16)
    a, b = torch.ones(1, 2), torch.ones(2, 1)
    out = merged_weight(base, a, b, 1.0)  # 257 is not a bf16 number: rounds to 256 only at the end
    assert out.dtype == torch.bfloat16 and torch.equal(out, (torch.full((2, 2), 257.0)).to(torch.bfloat16))


def test_merge_into_state_folds_each_adapter_into_its_layer():
    base = {"m.q.weight": torch.zeros(2, 2), "m.q.bias": torch.ones(2), "m.k.weight": torch.eye(2)}
    adapters = {"m.q.lora_A.default.weight": torch.tensor([[1.0, 1.0]]),
                "m.q.lora_B.default.weight": torch.tensor([[1.0], [2.0]])}
    out = merge_into_state(base, adapters, 3.0)
    assert torch.equal(out["m.q.weight"], torch.tensor([[3.0, 3.0], [6.0, 6.0]]))
    assert out["m.k.weight"] is base["m.k.weight"] and out["m.q.bias"] is base["m.q.bias"]
    with pytest.raises(ValueError, match="does not fit the base"):
        merge_into_state({"x.weight": torch.zeros(2, 2)}, adapters, 1.0)


def test_target_matching_follows_peft_and_names_what_is_missing():
    names = ["", "model.layers.0.self_attn.q_proj", "blocks.0.attn.to_out.0", "blocks.0.attn.to_out"]
    assert unmatched_targets(names, ["q_proj", "to_out.0", "attn.to_out", "proj", "k_proj"]) == ["proj", "k_proj"]
    assert unwrapped_name("a.q_proj.base_layer.weight") == "a.q_proj.weight"
    assert unwrapped_name("a.q_proj.bias") == "a.q_proj.bias"


def test_config_refuses_bad_lora_settings_before_engines():
    from cluster.config import ConfigError, load_config

    cfg = load_config(None, ["grpo.lora.rank=8", "flow_grpo.lora.rank=4"], check_paths=True)
    assert cfg.grpo.lora.target_modules[:2] == ["q_proj", "k_proj"]
    assert "to_out.0" in cfg.flow_grpo.lora.target_modules and cfg.flow_grpo.lora.alpha > 0
    assert load_config().grpo.lora.rank == 0 and load_config().flow_grpo.lora.rank == 0  # off by default
    for overrides, message in (
        (["grpo.lora.alpha=0"], "grpo.lora.alpha"),
        (["flow_grpo.lora.dropout=1.0"], "flow_grpo.lora.dropout"),
        (["grpo.lora.target_modules=[]"], "grpo.lora.target_modules"),
        (["grpo.lora.target_modules=['q_proj|k_proj']"], "not module names"),
        (["grpo.lora.rank=4", "grpo.lora.target_modules=[q_proj, to_q]"], r"\['to_q'\] match no module"),
        (["flow_grpo.lora.rank=4", "flow_grpo.lora.target_modules=[to_q, q_proj]"], r"\['q_proj'\] match no module"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides, check_paths=True)


def test_roles_pass_the_lora_settings_to_the_learners():
    from cluster.config import load_config
    from cluster.roles import ModelPaths, diffusion_learner_kwargs, text_learner_kwargs

    cfg = load_config(None, ["grpo.lora.rank=8", "grpo.lora.alpha=32"])
    paths = ModelPaths("r", "g", None)
    assert text_learner_kwargs(cfg, paths)["lora"] == {"rank": 8, "alpha": 32.0, "dropout": 0.0,
                                                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert diffusion_learner_kwargs(cfg, paths)["lora"]["rank"] == 0


# ------------------------------------------------------------------------- adapters on the real models


@pytest.fixture(scope="module")
def adapted_lm(tiny_models):
    """(tiny LM with adapters whose B is random, so they change the output; the untouched base)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models.lm), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models.lm), dtype=torch.float32).eval()
    lora = LoraAdapters.apply(model, **LM_LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    return model, base, lora


def test_adapters_train_only_themselves_and_switch_off_to_the_base(adapted_lm):
    model, base, _ = adapted_lm
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        adapted, off, plain = model(input_ids=ids).logits, AdaptersOff(model)(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.equal(off, plain)  # the reference is exactly the base
    assert float((adapted - plain).abs().max()) > 1e-2
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # switching off kept them


def test_merged_state_is_the_adapted_model_under_base_names(adapted_lm):
    model, base, lora = adapted_lm
    import copy

    merged = lora.merged_state_dict(model)
    assert set(merged) == {n for n, _ in base.named_parameters()}
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged, strict=True)
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    changed = {n for n, _ in lora.sync_tensors(model, changed_only=True, rank=0)}
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" not in changed
    assert not any("mlp" in n for n in changed)


def test_adapter_dropout_acts_only_in_gradient_forwards(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models.lm), dtype=torch.float32).eval()
    lora = LoraAdapters.apply(model, **{**LM_LORA, "dropout": 0.5})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    policy = lora.forward_of(model, model, reference=False)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        scored = [policy(input_ids=ids).logits for _ in range(2)]
    assert torch.equal(scored[0], scored[1])  # scoring forwards never drop: the first ratio is 1
    torch.manual_seed(0)
    trained = policy(input_ids=ids).logits
    assert trained.requires_grad and float((trained.detach() - scored[0]).abs().max()) > 1e-3
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, scored[0])  # and it is off again afterwards


def test_learner_side_refuses_a_target_the_model_lacks(tiny_models):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(tiny_models.flux), subfolder="transformer")
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no module of FluxTransformer2DModel"):
        LoraAdapters.apply(model, rank=2, alpha=2.0, target_modules=["to_q", "q_proj"])


# ------------------------------------------------------------------- the learners through DeepSpeed

TEXT_COMMON = dict(lr=1e-2, adam_eps=1e-6, warmup_steps=0, temperature=0.8, kl_coef=0.05, kl_kind="k3",
                   dtype="float32", lora=LM_LORA)
TEXT_ADVANTAGES = [1.0, -0.5, 0.25, -1.0]


def lm_lora_group(tiny_models, name: str, ranks: int = 1, **kw):
    from learners.group import LearnerGroup

    return LearnerGroup("text", ranks, num_cpus_per=0.5, name_prefix=name, model_path=str(tiny_models.lm),
                        **{"zero_stage": 1, "micro_batch_size": 2, **TEXT_COMMON, **kw})


def changed_names(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.integration
def test_text_learner_with_lora_first_ratio_one_reference_is_base(ray_cluster, tiny_models, make_text_batch):
    from tests.learners.test_text_learner import assert_ratio_one

    batch = make_text_batch(tiny_models.lm, 0.8, n=4, seed=0)
    group = lm_lora_group(tiny_models, "test-lora-text")
    try:
        policy = group.call_rank0("compute_logprobs", batch)
        reference = group.call_rank0("compute_logprobs", batch, reference=True)
        before = group.call_all("merged_state_dict")[0]
        metrics = group.train_step(batch, TEXT_ADVANTAGES)
        after = group.call_all("merged_state_dict")[0]
        reference_after = group.call_rank0("compute_logprobs", batch, reference=True)
        policy_after = group.call_rank0("compute_logprobs", batch)
    finally:
        group.shutdown()
    assert_ratio_one(batch, policy)
    assert reference == policy  # B = 0: the adapted model starts as the base
    assert abs(metrics["ratio_min"] - 1) < 1e-4 and abs(metrics["ratio_max"] - 1) < 1e-4
    assert metrics["kl"] < 1e-8 and metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0
    changed = changed_names(before, after)  # only the adapted layers' weights moved
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for n in changed)
    assert reference_after == reference  # the frozen base did not move
    assert policy_after != policy


@pytest.fixture(scope="module")
def lora_image_samples(tiny_models) -> list:
    """4 images (2 generations, 2 edits), SDE at every step but the last: 3 stored steps each."""
    from actors.diffusion_worker import DiffusionWorker
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=4, noise_level=0.7, stochastic="all", guidance=3.5, height=32, width=32)
        gen = worker.sample([ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(2)],
                            settings)
        edits = worker.sample([ImageRequest(prompt="make it blue", seed=10 + i, noise_seed=1,
                                            source_image=gen[i].image) for i in range(2)], settings)
    finally:
        worker.shutdown()
    return gen + edits


@pytest.mark.integration
def test_diffusion_learner_with_lora_first_ratio_one_reference_is_base(ray_cluster, tiny_models, lora_image_samples):
    from learners.group import LearnerGroup

    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-lora-diffusion",
                         model_path=str(tiny_models.flux), zero_stage=1, micro_batch_size=3, lr=1e-2, adam_eps=1e-6,
                         warmup_steps=0, kl_coef=0.05, kl_mode="mean", dtype="float32", lora=FLUX_LORA)
    try:
        policy = group.call_rank0("compute_log_probs", lora_image_samples)
        reference = group.call_rank0("compute_log_probs", lora_image_samples, reference=True)
        before = group.call_all("merged_state_dict")[0]
        metrics = group.train_step(lora_image_samples, [1.0, -1.0, 0.5, -0.5])
        after = group.call_all("merged_state_dict")[0]
        reference_after = group.call_rank0("compute_log_probs", lora_image_samples, reference=True)
    finally:
        group.shutdown()
    for sample, recomputed in zip(lora_image_samples, policy, strict=True):
        for old, new in zip(sample.log_probs.tolist(), recomputed, strict=True):
            assert abs(math.exp(new - old) - 1.0) < 1e-5
    assert reference == policy
    assert abs(metrics["ratio_min"] - 1) < 1e-5 and abs(metrics["ratio_max"] - 1) < 1e-5
    assert metrics["kl_loss"] < 1e-10 and metrics["num_steps"] == 12
    changed = changed_names(before, after)
    assert changed and all(n.split(".attn.", 1)[-1] in {f"{t}.weight" for t in FLUX_LORA["target_modules"]}
                           for n in changed)
    assert reference_after == reference


# ------------------------------------------------------------------------------ weight sync, LoRA-merged


@pytest.fixture(scope="module")
def lora_text_setup(ray_cluster, tiny_models) -> Iterator:
    """Two LoRA TextLearner ranks (ZeRO-1) and two vLLM workers on the tiny LM."""
    import ray

    from actors.text_worker import remote_text_worker

    learners = lm_lora_group(tiny_models, "test-lora-sync", ranks=2, micro_batch_size=4, temperature=1.0, kl_coef=0.0)
    workers = [remote_text_worker(i, num_cpus=0.5, num_gpus=0, model_path=str(tiny_models.lm), max_model_len=256)
               for i in range(2)]
    ray.get([w.version.remote() for w in workers])
    yield learners, workers
    for w in workers:
        ray.get(w.shutdown.remote())
    learners.shutdown()


def save_merged(learners, base_dir: Path, out: Path) -> Path:
    """The learner's merged weights as an HF folder next to the base's config and tokenizer."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for f in base_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file(learners.call_all("merged_state_dict")[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.integration
def test_broadcast_of_lora_learner_lands_merged_and_later_sends_only_adapted_layers(lora_text_setup, tiny_models,
                                                                                  tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    from learners.weight_sync import make_weight_sync
    from rollout.interfaces import ChatMessage, TextRequest
    from tests.learners.test_weight_sync import PROMPTS, assert_workers_hold, train_once

    learners, workers = lora_text_setup
    sync = make_weight_sync("broadcast", bucket_mb=1.0)
    try:
        full = sync.sync(learners, workers, version=1)  # the first sync of a group sends everything
        assert_workers_hold(workers, learners, version=1)
        train_once(learners, workers, seed=1)
        lora = sync.sync(learners, workers, version=2)
        assert_workers_hold(workers, learners, version=2)
        train_once(learners, workers, seed=2)
        lora_again = sync.sync(learners, workers, version=3)
        assert_workers_hold(workers, learners, version=3)
        object_store = make_weight_sync("object_store")
        object_store.sync(learners, workers, version=4)  # everything, then the adapted layers only
        train_once(learners, workers, seed=3)
        store_lora = object_store.sync(learners, workers, version=5)
        assert_workers_hold(workers, learners, version=5)
    finally:
        sync.shutdown()
    print(f"text sync bytes: full {full.bytes}, LoRA-merged {lora.bytes} ({lora.bytes / full.bytes:.1%})")
    total = sum(t.numel() for t in learners.call_all("merged_state_dict")[0].values())
    assert full.bytes == 4 * total and lora.bytes == lora_again.bytes
    assert store_lora.bytes < lora.bytes * 1.1  # the same tensors, plus the safetensors header
    assert lora.bytes * 3 < full.bytes
    # the workers answer as transformers does on the learner's merged weights
    model = AutoModelForCausalLM.from_pretrained(save_merged(learners, tiny_models.lm, tmp_path / "merged"),
                                                 dtype=torch.float32).eval()
    requests = [TextRequest(messages=(ChatMessage("user", p),), n=1, temperature=0.0, max_tokens=10) for p in PROMPTS]
    for worker in workers:
        for group in ray.get(worker.generate.remote(requests)):
            sample = group[0]
            with torch.no_grad():
                ref = model.generate(torch.tensor([sample.prompt_ids]), max_new_tokens=10, do_sample=False,
                                     pad_token_id=model.config.pad_token_id)[0, len(sample.prompt_ids):].tolist()
            assert sample.answer_ids == ref[: len(sample.answer_ids)]


@pytest.mark.integration
def test_lora_diffusion_sync_lands_merged_in_every_worker(ray_cluster, tiny_models):
    import numpy as np
    import ray

    from actors.diffusion_worker import remote_diffusion_worker
    from learners.group import LearnerGroup
    from learners.weight_sync import make_weight_sync
    from tests.learners.test_weight_sync import assert_workers_hold, images_of, train_diffusion_once

    learners = LearnerGroup("diffusion", 2, num_cpus_per=0.5, name_prefix="test-lora-dsync",
                            model_path=str(tiny_models.flux), zero_stage=1, lr=5e-2, micro_batch_size=8,
                            lora=FLUX_LORA)
    workers = [remote_diffusion_worker(i, num_cpus=0.5, num_gpus=0, model_path=str(tiny_models.flux))
               for i in range(2)]
    sync = make_weight_sync("broadcast", bucket_mb=0.05)
    try:
        before = images_of(workers[0])
        full = sync.sync(learners, workers, version=1)
        assert_workers_hold(workers, learners, version=1)
        train_diffusion_once(learners, workers, seed=1)
        lora = sync.sync(learners, workers, version=2)
        assert_workers_hold(workers, learners, version=2)
        after = [images_of(w) for w in workers]
        object_store = make_weight_sync("object_store")
        store = object_store.sync(learners, workers, version=3)  # a new coordinator: everything
        assert_workers_hold(workers, learners, version=3)
        train_diffusion_once(learners, workers, seed=3)
        store_lora = object_store.sync(learners, workers, version=4)  # then the adapted layers only
        assert_workers_hold(workers, learners, version=4)
    finally:
        sync.shutdown()
        ray.get([w.shutdown.remote() for w in workers])
        learners.shutdown()
    print(f"image sync bytes: full {full.bytes}, LoRA-merged {lora.bytes} ({lora.bytes / full.bytes:.1%}); "
          f"object store: full {store.bytes}, LoRA-merged {store_lora.bytes}")
    assert lora.bytes * 5 < full.bytes and store_lora.bytes * 5 < store.bytes
    for a, b in zip(after[0], after[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after[0], strict=True))


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.integration
def test_text_reward_rises_with_lora_through_vllm_deepspeed_and_sync(ray_cluster, tiny_models):
    import ray

    from actors.text_worker import remote_text_worker
    from learners.algos import group_advantages
    from learners.group import LearnerGroup
    from learners.weight_sync import make_weight_sync
    from rollout.interfaces import ChatMessage, TextRequest
    from tests.learners.test_learning_e2e import TEXT_PROMPTS, char_frequency, rises_clearly

    group_size, steps = 8, 12
    worker = remote_text_worker(9, num_cpus=0.5, num_gpus=0, model_path=str(tiny_models.lm), max_model_len=256)
    learners = LearnerGroup("text", 2, num_cpus_per=0.5, name_prefix="test-lora-learn", model_path=str(tiny_models.lm),
                            zero_stage=1, lr=LEARN_LR, micro_batch_size=16, temperature=1.0, seed=0,
                            lora={**LM_LORA, "rank": 8, "alpha": 16.0, "target_modules": LEARN_TARGETS})
    sync = make_weight_sync("broadcast", bucket_mb=1.0)
    curve = []
    try:
        for step in range(steps):
            requests = [TextRequest(messages=(ChatMessage("user", p),), n=group_size, temperature=1.0,
                                    max_tokens=16, seed=1000 * step + i) for i, p in enumerate(TEXT_PROMPTS)]
            samples = [s for group in ray.get(worker.generate.remote(requests)) for s in group]
            rewards = torch.tensor([char_frequency(s.text) for s in samples])
            curve.append(float(rewards.mean()))
            learners.train_step(samples, group_advantages(rewards, group_size, std="group").tolist())
            sync.sync(learners, [worker], version=step + 1)
        print("LoRA text reward curve", [round(c, 3) for c in curve])
        assert rises_clearly(curve, margin=0.1), curve
    finally:
        sync.shutdown()
        learners.shutdown()
        ray.get(worker.shutdown.remote())


LEARN_LR = 5e-2
# every linear layer, the output head included: on a 2-layer random LM the attention alone barely moves
# which characters come out
LEARN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


# -------------------------------------------------------------------------------------------- resume


@pytest.mark.integration
def test_resume_from_a_lora_checkpoint_is_bitwise(ray_cluster, tiny_models, make_text_batch, tmp_path):
    import ray

    from learners.checkpointing import load_learner_state, parameters_sha256, save_learner_state

    batch_a = make_text_batch(tiny_models.lm, 0.8, n=4, seed=1)
    batch_b = make_text_batch(tiny_models.lm, 0.8, n=4, seed=2)

    def on_rank0(group, fn, *args):
        return ray.get(group.actors[0].__ray_call__.remote(fn, *args))

    first = lm_lora_group(tiny_models, "test-lora-resume-a", warmup_steps=2)
    try:
        first.train_step(batch_a, TEXT_ADVANTAGES)
        on_rank0(first, save_learner_state, str(tmp_path / "ck"))
        expected_metrics = first.train_step(batch_b, TEXT_ADVANTAGES)
        expected = on_rank0(first, parameters_sha256)
    finally:
        first.shutdown()
    weights = tmp_path / "ck" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["adapters.safetensors", "lora.json"]  # adapters only
    second = lm_lora_group(tiny_models, "test-lora-resume-b", warmup_steps=2)
    try:
        fresh = on_rank0(second, parameters_sha256)
        assert on_rank0(second, load_learner_state, str(tmp_path / "ck")) == 1
        metrics = second.train_step(batch_b, TEXT_ADVANTAGES)
        got = on_rank0(second, parameters_sha256)
    finally:
        second.shutdown()
    assert got == expected != fresh
    assert metrics["lr"] == expected_metrics["lr"] and metrics["pg_loss"] == expected_metrics["pg_loss"]


@pytest.mark.integration
def test_resume_refuses_other_lora_settings(ray_cluster, tiny_models, tmp_path):
    import ray

    from learners.checkpointing import load_learner_state, save_learner_state

    group = lm_lora_group(tiny_models, "test-lora-refuse")
    try:
        ray.get(group.actors[0].__ray_call__.remote(save_learner_state, str(tmp_path / "ck")))
    finally:
        group.shutdown()
    other = lm_lora_group(tiny_models, "test-lora-refuse-b", lora={**LM_LORA, "alpha": 4.0})
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="same grpo.lora / flow_grpo.lora settings"):
            ray.get(other.actors[0].__ray_call__.remote(load_learner_state, str(tmp_path / "ck")))
    finally:
        other.shutdown()


@pytest.mark.integration
def test_lora_under_zero3_with_checkpointing_on_two_ranks_matches_one_rank(ray_cluster, tiny_models, make_text_batch):
    batch = make_text_batch(tiny_models.lm, 0.8, n=4, seed=0)
    one = lm_lora_group(tiny_models, "test-lora-z1")
    try:
        one_metrics = one.train_step(batch, TEXT_ADVANTAGES)
        expected = one.call_all("merged_state_dict")[0]
    finally:
        one.shutdown()
    two = lm_lora_group(tiny_models, "test-lora-z3", ranks=2, zero_stage=3, micro_batch_size=1,
                        gradient_checkpointing=True)  # the frozen embeddings still let gradients through
    try:
        ready = two.call_all("ready")
        metrics = two.train_step(batch, TEXT_ADVANTAGES)
        got = two.call_all("merged_state_dict")
        checksums = two.call_all("weights_checksum")
    finally:
        two.shutdown()
    assert [r["zero_stage"] for r in ready] == [3, 3]
    assert metrics["grad_norm"] == pytest.approx(one_metrics["grad_norm"], rel=1e-4)
    for name, want in expected.items():
        torch.testing.assert_close(got[0][name], want, atol=1e-5, rtol=0)
        assert torch.equal(got[0][name], got[1][name])
    assert checksums[0] == pytest.approx(sum(float(t.double().sum()) for t in got[0].values()), rel=1e-9)


@pytest.mark.integration
def test_lora_generator_with_gradient_checkpointing_matches_without(ray_cluster, tiny_models, lora_image_samples):
    from learners.group import LearnerGroup

    states = []
    for checkpointing in (False, True):
        group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix=f"test-lora-ckpt-{checkpointing}",
                             model_path=str(tiny_models.flux), zero_stage=1, micro_batch_size=6, lr=1e-2,
                             adam_eps=1e-6, warmup_steps=0, dtype="float32", lora=FLUX_LORA,
                             gradient_checkpointing=checkpointing)
        try:
            before = group.call_all("merged_state_dict")[0]
            group.train_step(lora_image_samples, [1.0, -1.0, 0.5, -0.5])
            states.append(group.call_all("merged_state_dict")[0])
        finally:
            group.shutdown()
    assert changed_names(before, states[1])  # the checkpointed adapters did learn
    for name, want in states[0].items():
        torch.testing.assert_close(states[1][name], want, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_lora_in_bf16_updates_only_the_adapted_layers(ray_cluster, tiny_models, make_text_batch):
    batch = make_text_batch(tiny_models.lm, 0.8, n=4, seed=0)
    group = lm_lora_group(tiny_models, "test-lora-bf16", dtype="bfloat16", kl_coef=0.0)
    try:
        before = group.call_all("merged_state_dict")[0]
        metrics = group.train_step(batch, TEXT_ADVANTAGES)
        after = group.call_all("merged_state_dict")[0]
    finally:
        group.shutdown()
    assert metrics["skipped_nonfinite"] == 0 and abs(metrics["ratio_mean"] - 1) < 0.05  # bf16 forward
    changed = changed_names(before, after)
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for n in changed)
