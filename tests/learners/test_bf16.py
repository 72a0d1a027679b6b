"""bf16 end to end: learners train in bf16 (fp32 master weights), weights travel in the workers' dtype.

Unit part (a real localhost gloo group, no DeepSpeed): a bf16 module reaches bf16 receivers bit for
bit with half the bytes of an fp32 wire; an fp32 learner's weights are rounded once, on the sender.
Integration part (DeepSpeed on the CPU, Ray actors): the text learner in bf16 recomputes a bf16
vLLM worker's log-probs (first ratio 1 within bf16 rounding) and the worker then holds the
learner's weights; two ZeRO-3 diffusion ranks in bf16 (built partitioned, sharded reference)
recompute a bf16 DiffusionWorker's step log-probs, and after one update and a sync the worker holds
exactly the learner's bf16 weights, with half the bytes of the same sync in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from learners.weight_sync import make_weight_sync
from tests.learners.sync_doubles import Receiver, Sender, run_together

RAY_NUM_CPUS = 4


def _net(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)], torch.nn.LayerNorm(16)).to(dtype)


def _broadcast(sender: Sender, receivers: list[Receiver], port: int, wire: str, version: int) -> dict:
    run_together(lambda: sender.init_weight_group("127.0.0.1", port, len(receivers) + 1),
              *[lambda r=r, i=i: r.join_weight_group("127.0.0.1", port, i + 1, len(receivers) + 1)
                for i, r in enumerate(receivers)])
    meta = sender.weight_bucket_meta(1.0, wire)
    stats, *_ = run_together(lambda: sender.broadcast_weights(version, 1.0, "bucketed", wire),
                          *[lambda r=r: r.receive_weights(version, meta) for r in receivers])
    sender.leave_weight_group()
    for r in receivers:
        r.leave_weight_group()
    return stats


def test_bf16_wire_is_bitwise_and_half_the_bytes_of_fp32(free_port):
    sender = Sender(_net(0, torch.bfloat16))
    numel = sum(p.numel() for p in sender.engine.module.parameters())
    sent = {}
    for version, wire in enumerate(("float32", "bfloat16"), start=1):
        receivers = [Receiver(_net(1, torch.bfloat16)), Receiver(_net(2, torch.bfloat16))]
        sent[wire] = _broadcast(sender, receivers, free_port(), wire, version)["bytes"]
        for r in receivers:
            for (name, p), (_, q) in zip(sender.engine.module.named_parameters(),
                                         r.transformer.named_parameters(), strict=True):
                assert q.dtype == torch.bfloat16 and torch.equal(p, q), (wire, name)
    assert sent == {"float32": 4 * numel, "bfloat16": 2 * numel}


def test_fp32_learner_to_bf16_workers_is_rounded_once_on_the_sender(free_port):
    sender, receiver = Sender(_net(0, torch.float32)), Receiver(_net(1, torch.bfloat16))
    meta = sender.weight_bucket_meta(1.0, "bfloat16")
    assert {d for m in meta for d in m["dtypes"]} == {"bfloat16"} == {m["buffer_dtype"] for m in meta}
    _broadcast(sender, [receiver], free_port(), "bfloat16", 1)
    for (name, p), (_, q) in zip(sender.engine.module.named_parameters(), receiver.transformer.named_parameters(),
                                 strict=True):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_object_store_blob_travels_in_the_wire_dtype():
    from safetensors.torch import load

    sender = Sender(_net(0, torch.bfloat16))
    blob16, blob32 = sender.export_weights_bytes("bfloat16"), sender.export_weights_bytes("float32")
    assert {t.dtype for t in load(blob16).values()} == {torch.bfloat16}
    assert len(blob16) < 0.6 * len(blob32)
    receiver = Receiver(_net(3, torch.bfloat16))
    receiver.load_weights_bytes(1, blob16)
    for p, q in zip(sender.engine.module.parameters(), receiver.transformer.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unknown_wire_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="bf16"):
        make_weight_sync("broadcast", wire_dtype="bf16")


# --------------------------------------------------------------------------------- real engines


def _worker_state(worker) -> dict[str, torch.Tensor]:
    import ray

    return ray.get(worker.__ray_call__.remote(
        lambda self: {n: p.detach().clone() for n, p in self.transformer.named_parameters()}))


@pytest.mark.integration
def test_text_learner_bf16_recomputes_bf16_vllm_and_syncs_half_the_bytes(ray_cluster, tiny_models):
    import ray

    from actors.text_worker import remote_text_worker
    from learners.group import LearnerGroup
    from rollout.interfaces import ChatMessage, TextRequest

    worker = remote_text_worker(0, num_cpus=1, num_gpus=0, model_path=str(tiny_models.lm), max_model_len=256,
                                dtype="bfloat16")
    learners = LearnerGroup("text", 1, num_cpus_per=1, name_prefix="test-bf16-text", model_path=str(tiny_models.lm),
                            zero_stage=1, dtype="bfloat16", lr=1e-2, temperature=1.0, kl_coef=0.05,
                            micro_batch_size=2)
    try:
        requests = [TextRequest(messages=(ChatMessage("user", p),), n=2, temperature=1.0, max_tokens=8, seed=i)
                    for i, p in enumerate(["plan a red circle", "what is shown?"])]
        samples = [s for group in ray.get(worker.generate.remote(requests)) for s in group]
        recomputed = learners.call_rank0("compute_logprobs", samples)
        ratios = [math.exp(new - old) for s, lps in zip(samples, recomputed, strict=True)
                  for old, new in zip(s.logprobs, lps, strict=True)]
        print(f"text bf16: max |ratio - 1| = {max(abs(r - 1) for r in ratios):.2e}")
        assert max(abs(r - 1) for r in ratios) < 2e-2  # bf16 weights and activations on both sides
        metrics = learners.train_step(samples, [1.0, -1.0, 0.5, -0.5])
        assert metrics["skipped_nonfinite"] == 0 and metrics["kl"] < 1e-6 and metrics["grad_norm"] > 0
        sent = {}
        for version, wire in enumerate(("float32", "bfloat16"), start=1):
            sync = make_weight_sync("broadcast", bucket_mb=1.0, wire_dtype=wire)
            sent[wire] = sync.sync(learners, [worker], version).bytes
            sync.shutdown()
            assert ray.get(worker.weights_checksum.remote()) == learners.call_all("weights_checksum")[0]
    finally:
        learners.shutdown()
        ray.get(worker.shutdown.remote())
    print(f"text sync bytes: {sent}")
    assert sent["bfloat16"] * 2 == sent["float32"] > 0


@pytest.mark.integration
def test_zero3_bf16_diffusion_learner_ratio_one_and_workers_hold_its_weights(ray_cluster, tiny_models):
    import ray

    from actors.diffusion_worker import remote_diffusion_worker
    from learners.group import LearnerGroup
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = remote_diffusion_worker(0, num_cpus=0.5, num_gpus=0, model_path=str(tiny_models.flux),
                                     dtype="bfloat16")
    learners = LearnerGroup("diffusion", 2, num_cpus_per=1, name_prefix="test-bf16-diffusion",
                            model_path=str(tiny_models.flux), zero_stage=3, dtype="bfloat16", lr=1e-2,
                            kl_coef=0.05, micro_batch_size=3, gradient_checkpointing=True)
    try:
        settings = SamplerSettings(num_steps=4, noise_level=0.7, stochastic="all", guidance=3.5, height=64, width=64)
        samples = ray.get(worker.sample.remote(
            [ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(4)], settings))
        before = _worker_state(worker)
        recomputed = learners.call_all("compute_log_probs", samples[:2])[0]  # collective under ZeRO-3
        for sample, lps in zip(samples[:2], recomputed, strict=True):
            for old, new in zip(sample.log_probs.tolist(), lps, strict=True):
                print(f"image bf16 ratio - 1: {math.exp(new - old) - 1:.2e}")
                assert abs(math.exp(new - old) - 1) < 1e-3
        metrics = learners.train_step(samples, [1.0, -1.0, 0.5, -0.5])
        assert abs(metrics["ratio_min"] - 1) < 1e-3 and abs(metrics["ratio_max"] - 1) < 1e-3
        assert metrics["skipped_nonfinite"] == 0 and metrics["kl_loss"] < 1e-8
        learner = learners.call_all("full_state_dict")[0]  # fp32 images of the bf16 weights (exact)
        sent = {}
        for version, wire in enumerate(("float32", "bfloat16"), start=1):
            sync = make_weight_sync("broadcast", bucket_mb=0.05, wire_dtype=wire)
            sent[wire] = sync.sync(learners, [worker], version).bytes
            sync.shutdown()
            held = _worker_state(worker)
            assert set(held) == set(learner)
            for name, w in learner.items():
                assert held[name].dtype == torch.bfloat16 and torch.equal(held[name].float(), w), (wire, name)
    finally:
        learners.shutdown()
        ray.get(worker.shutdown.remote())
    assert any(not torch.equal(before[n], held[n]) for n in before)  # the update moved the weights
    print(f"image sync bytes: {sent}")
    assert sent["bfloat16"] * 2 == sent["float32"] > 0


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_resume_keeps_the_fp32_master_weights(zero_stage, ray_cluster, tiny_models, make_text_batch, tmp_path):
    """The next update after a resume is bitwise the one without: the checkpoint holds the fp32
    master weights (in the ZeRO-0 bf16 optimizer's own state dict, as flat partitions at ZeRO-1),
    not only the bf16 weights they round to."""
    import ray

    from learners.checkpointing import load_learner_state, parameters_sha256, save_learner_state
    from learners.group import LearnerGroup

    batch_a, batch_b = (make_text_batch(tiny_models.lm, 1.0, n=4, seed=s) for s in (1, 2))
    advantages = [1.0, -0.5, 0.25, -1.0]

    def group(name: str) -> LearnerGroup:
        return LearnerGroup("text", 1, num_cpus_per=1, name_prefix=name, model_path=str(tiny_models.lm),
                            zero_stage=zero_stage, dtype="bfloat16", lr=1e-3, temperature=1.0, micro_batch_size=2)

    def on_rank0(g: LearnerGroup, fn, *args):
        return ray.get(g.actors[0].__ray_call__.remote(fn, *args))

    first = group(f"test-bf16-resume-a{zero_stage}")
    try:
        first.train_step(batch_a, advantages)
        on_rank0(first, save_learner_state, str(tmp_path / "ck"))
        first.train_step(batch_b, advantages)
        expected = on_rank0(first, parameters_sha256)
    finally:
        first.shutdown()
    second = group(f"test-bf16-resume-b{zero_stage}")
    try:
        assert on_rank0(second, load_learner_state, str(tmp_path / "ck")) == 1
        second.train_step(batch_b, advantages)
        assert on_rank0(second, parameters_sha256) == expected
    finally:
        second.shutdown()
