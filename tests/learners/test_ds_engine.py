"""Pure helpers of the learners' DeepSpeed setup (no engine is started here)."""

import pytest
import torch

from learners.ds_engine import build_ds_config, checkpoint_in_eval, resolve_dtype, warmup_lambda
from learners.learner_base import split_even


def test_warmup_is_linear_then_flat():
    f = warmup_lambda(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0  # no warm-up: the first update uses the full lr
    with pytest.raises(ValueError):
        warmup_lambda(-1)


def test_cosine_decay_after_warmup_to_the_floor():
    f = warmup_lambda(2, decay_steps=6, min_ratio=0.2)
    # warm-up 0.5, 1; then cos over updates 2..6: (1 + cos(pi * k / 4)) / 2 = 1, 0.8536, 0.5, 0.1464, 0
    expected = [0.5, 1.0, 1.0, 0.2 + 0.8 * 0.853553, 0.6, 0.2 + 0.8 * 0.146447, 0.2, 0.2]
    assert [f(s) for s in range(8)] == pytest.approx(expected, abs=1e-6)
    assert warmup_lambda(0, decay_steps=4)(4) == 0.0
    for bad in (dict(decay_steps=2), dict(decay_steps=-1), dict(decay_steps=5, min_ratio=1.5)):
        with pytest.raises(ValueError):
            warmup_lambda(2, **bad)


def test_ds_config_from_arguments():
    cfg = build_ds_config(zero_stage=3, lr=5e-6, betas=(0.9, 0.95), weight_decay=0.1, adam_eps=1e-8,
                          grad_clip=1.0, micro_batch_size=2, world_size=4, dtype=torch.float32)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95] and cfg["optimizer"]["params"]["lr"] == 5e-6
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="zero_stage"):
        build_ds_config(zero_stage=4, lr=1.0, betas=(0.9, 0.9), weight_decay=0, adam_eps=1e-8, grad_clip=0,
                        micro_batch_size=1, world_size=1, dtype=torch.float32)


def test_resolve_dtype_takes_the_configured_name_only():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    for bad in ("fp8", "auto"):  # the config names the dtype: no guess from the hardware
        with pytest.raises(ValueError, match="known"):
            resolve_dtype(bad)


def test_split_even():
    assert split_even(5, 2) == [slice(0, 3), slice(3, 5)]
    assert split_even(4, 4) == [slice(i, i + 1) for i in range(4)]
    assert sum(s.stop - s.start for s in split_even(17, 5)) == 17


def test_gradient_checkpointing_recomputes_in_eval_mode_with_the_same_gradients(tiny_models):
    """The learner runs in eval mode (no dropout), where transformers would skip checkpointing:
    `checkpoint_in_eval` makes each decoder layer run twice (forward, then its recompute in the
    backward pass), leaves dropout off, and the gradients do not change."""
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(str(tiny_models.lm), dtype=torch.float32)

    def grads_and_calls(model) -> tuple[dict[str, torch.Tensor], int]:
        calls = []
        hook = model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        ids = torch.tensor([[5, 9, 14, 3, 27, 8]])
        model(input_ids=ids).logits.square().mean().backward()
        hook.remove()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain = load().eval()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        checkpoint_in_eval(plain)
    checkpointed = load()
    checkpointed.gradient_checkpointing_enable()
    checkpointed.eval()
    assert checkpoint_in_eval(checkpointed) == checkpointed.config.num_hidden_layers
    assert not any(m.training for layer in checkpointed.model.layers for m in layer.children())
    want, plain_calls = grads_and_calls(plain)
    got, checkpointed_calls = grads_and_calls(checkpointed)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
