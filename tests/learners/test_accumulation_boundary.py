"""The update of a learner step lands on its last micro-batch whatever the sizes of earlier steps
(DeepSpeed alone derives it from a running micro-step counter modulo the current count)."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import torch
    from learners import ds_engine
    from rollout.ports import free_port

    ds_engine.set_dist_env(0, 1, "127.0.0.1", free_port())
    ds_engine.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    cfg = ds_engine.build_ds_config(zero_stage=0, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, adam_eps=1e-8,
                                    grad_clip=0.0, micro_batch_size=1, world_size=1, dtype=torch.float32)
    engine = ds_engine.initialize_engine(model, cfg, warmup_steps=0)
    mark = {mark}
    for k, num_micro in enumerate([2, 1, 2, 3]):
        ds_engine.set_micro_batches(engine, num_micro)
        updated_at = []
        for j in range(num_micro):
            if mark:
                ds_engine.mark_accumulation_boundary(engine, j == num_micro - 1)
            before = [p.detach().clone() for p in engine.module.parameters()]
            engine.backward(engine(torch.ones(1, 3)).sum())
            engine.step()
            if any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters())):
                updated_at.append(j)
        print(k, updated_at, engine.global_steps)
    """
)


def _updates(mark: bool) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(mark=mark)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line[:1].isdigit()]


def test_each_step_updates_once_on_its_last_micro_batch():
    assert _updates(mark=True) == ["0 [1] 1", "1 [0] 2", "2 [1] 3", "3 [2] 4"]


def test_without_marking_deepspeed_would_update_on_the_wrong_micro_batch():
    """The failure the marking prevents (if DeepSpeed changes, the first test still says what we need)."""
    assert _updates(mark=False) != ["0 [1] 1", "1 [0] 2", "2 [1] 3", "3 [2] 4"]
