"""Weight sync into a vLLM engine at tensor_parallel_size 2 (CPU, multiprocess executor).

Every tensor-parallel process joins the broadcast group under its own rank (rollout.sync_ranks),
receives the full tensors and keeps its shard: after one broadcast of perturbed weights, vLLM's
greedy answer must equal transformers' on those weights. A rank collision or a process that
missed the broadcast hangs the rendezvous or leaves half the shards stale, and the answers differ.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
import torch

from actors.weight_receiver import EXTENSION_CLS, TextWeightReceiver
from learners.weight_sender import WeightSenderMixin
from rollout.sync_ranks import sync_world_size, worker_first_ranks

pytestmark = pytest.mark.integration
TP = 2
PROMPT_IDS = [[5, 17, 42, 9, 100], [3, 250, 7]]


class Sender(WeightSenderMixin):
    def __init__(self, module: torch.nn.Module) -> None:
        self.engine, self.rank = SimpleNamespace(module=module), 0


class EngineHolder(TextWeightReceiver):
    """The receiving half of `TextWorker` around a bare engine."""

    def __init__(self, llm) -> None:
        self.llm, self._version = llm, 0

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()


@pytest.fixture(scope="module")
def tp_engine(tiny_models):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < TP:
        pytest.skip(f"tensor_parallel_size {TP} on CPU binds one core per process; {len(cpus)} allowed here")
    from actors.text_worker import _ensure_importable_by_worker

    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in cpus[:TP])  # vLLM's auto-bind wants a NUMA node per rank
    _ensure_importable_by_worker()
    import vllm.envs
    from vllm import LLM

    vllm.envs.disable_envs_cache()  # an engine started earlier in this process froze the variables it read

    llm = LLM(model=str(tiny_models.lm), dtype="float32", tensor_parallel_size=TP, max_model_len=128,
              enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=2048,
              worker_extension_cls=EXTENSION_CLS)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    if saved is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def _greedy_vllm(llm, max_tokens: int = 8) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in PROMPT_IDS],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def _greedy_hf(model, max_tokens: int = 8) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               do_sample=False, pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
                for ids in PROMPT_IDS]


def test_every_tensor_parallel_rank_joins_and_loads_its_shard(tp_engine, tiny_models, free_port):
    from transformers import AutoModelForCausalLM

    worker = EngineHolder(tp_engine)
    sizes = [worker.weight_group_size()]
    assert sizes == [TP]
    world, firsts = sync_world_size(sizes), worker_first_ranks(sizes)
    assert (world, firsts) == (3, [1])

    model = AutoModelForCausalLM.from_pretrained(tiny_models.lm, dtype=torch.float32).eval()
    before = _greedy_vllm(tp_engine)
    assert before == _greedy_hf(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    want = _greedy_hf(model)
    assert want != before  # the perturbation changes the answer, so a stale shard would show

    sender, port, errors = Sender(model), free_port(), []

    def run_sender(fn) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced below
                errors.append(exc)
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    thread = run_sender(lambda: sender.init_weight_group("127.0.0.1", port, world))
    worker.join_weight_group("127.0.0.1", port, firsts[0], world)
    thread.join()
    meta = sender.weight_bucket_meta(bucket_mb=0.05)
    thread = run_sender(lambda: sender.broadcast_weights(1, bucket_mb=0.05))
    assert worker.receive_weights(1, meta) == 1
    thread.join()
    assert not errors, errors
    assert len(meta) > 2  # several buckets, each reloaded on both ranks
    sums = tp_engine.collective_rpc("r3rl_weights_checksum")
    assert len(sums) == TP
    assert sums == pytest.approx([sender.weights_checksum()] * TP, rel=1e-10)
    assert _greedy_vllm(tp_engine) == want
