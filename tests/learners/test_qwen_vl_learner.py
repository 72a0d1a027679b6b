"""The reasoner learner on the Qwen2.5-VL family (tiny random Qwen2.5-VL, real DeepSpeed on the CPU).

Shows: the family's inputs give the model (Qwen2.5-VL and Qwen2-VL) its multimodal RoPE (the image tokens' positions change
the logits) and the same logits with the prompt padded on the left or on the right; log-probs the
learner recomputes for answers sampled by the transformers worker with images (two image sizes)
and without equal the sampler's within 1e-4 (ratio 1 before the update, top-p replayed); one GRPO
step under DeepSpeed ZeRO-2 moves them.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.integration

TEMPERATURE, TOP_P = 0.8, 0.9


@pytest.fixture(scope="module")
def qwen_path():
    from actors.models import tiny_qwen25vl

    return tiny_qwen25vl()


@pytest.fixture(scope="module")
def sampled(qwen_path, make_image):
    """(samples, images per sample): 2 answers for a 64x64 image, 1 text-only, 1 for a 48x80 image."""
    from actors.hf_text_worker import HFTextWorker
    from rollout.interfaces import ChatMessage, TextRequest

    worker = HFTextWorker(str(qwen_path), max_model_len=512, seed=0)
    square, wide = make_image(0, 64, 64), make_image(1, 48, 80)
    prompts = [("plan a red circle", square, 2), ("what is shown?", None, 1), ("move the star left", wide, 1)]
    requests = [TextRequest(messages=(ChatMessage("user", text, images=() if im is None else (im,)),), n=n,
                            temperature=TEMPERATURE, top_p=TOP_P, max_tokens=8, seed=i)
                for i, (text, im, n) in enumerate(prompts)]
    groups = worker.generate(requests)
    samples = [s for g in groups for s in g]
    images = [im for (_, im, n) in prompts for _ in range(n)]
    worker.shutdown()
    return samples, images


@pytest.mark.parametrize("family", ["qwen25vl", "qwen2vl"])
def test_mrope_positions_and_padding_side(make_image, family):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from actors import models
    from rollout.model_inputs import load_model_inputs

    qwen_path = getattr(models, f"tiny_{family}")()
    model = AutoModelForImageTextToText.from_pretrained(str(qwen_path), dtype=torch.float32).eval()
    inputs = load_model_inputs(str(qwen_path))
    image = Image.fromarray(make_image(2, 64, 64))
    text = inputs.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat"}]}])
    ids = inputs.encode_prompt(text, [image])
    assert ids.count(inputs.image_pad_id) == 4  # 56x56 after resizing: 4x4 patches, merged 2x2
    pad, n = 3, len(ids)

    def logits(input_ids: torch.Tensor, mask: torch.Tensor, drop_types: bool = False) -> torch.Tensor:
        kwargs = inputs.image_kwargs(input_ids, [[image]], "cpu", torch.float32)
        if drop_types:  # without the token types the model falls back to 1-D positions
            kwargs.pop("mm_token_type_ids")
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=mask, **kwargs).logits[0]

    plain = torch.tensor([ids])
    ref = logits(plain, torch.ones_like(plain))
    right = logits(torch.tensor([ids + [0] * pad]), torch.tensor([[1] * n + [0] * pad]))[:n]
    left = logits(torch.tensor([[0] * pad + ids]), torch.tensor([[0] * pad + [1] * n]))[pad:]
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, ref, atol=1e-5, rtol=0)
    if family == "qwen2vl":  # refuses images without the token types
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            logits(plain, torch.ones_like(plain), drop_types=True)
    else:  # falls back to 1-D positions: other logits
        assert (logits(plain, torch.ones_like(plain), drop_types=True) - ref).abs().max() > 1e-3


def test_learner_replays_the_hf_sampler_and_a_grpo_step_moves_it(ray_cluster, qwen_path, sampled):
    from learners.group import LearnerGroup

    samples, images = sampled
    assert sum(im is not None for im in images) == 3 and len({len(s.prompt_ids) for s in samples}) == 3
    group = LearnerGroup("text", 1, num_cpus_per=1, name_prefix="test-qwen-vl", model_path=str(qwen_path),
                         zero_stage=2, micro_batch_size=2, lr=1e-2, temperature=TEMPERATURE, top_p=TOP_P,
                         dtype="float32")
    try:
        before = group.call_rank0("compute_logprobs", samples, images)
        for sample, lps in zip(samples, before, strict=True):
            assert len(lps) == len(sample.answer_ids) == len(sample.logprobs) > 0
            for old, new in zip(sample.logprobs, lps, strict=True):
                assert abs(math.exp(new - old) - 1.0) < 1e-4
        metrics = group.train_step(samples, [1.0, -1.0, 0.5, -0.5], images=images)
        assert metrics["ratio_min"] == pytest.approx(1.0, abs=1e-4)
        assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-4)
        after = group.call_rank0("compute_logprobs", samples, images)
        moved = max(abs(a - b) for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True))
        assert moved > 1e-3
    finally:
        group.shutdown()
