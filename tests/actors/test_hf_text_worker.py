"""The transformers text worker (`actors.hf_text_worker.HFTextWorker`) on the tiny Qwen2.5-VL, Qwen2-VL,
Qwen2 LM and Idefics3 VLM, in-process.

Shows: every returned log-prob equals the one a fresh model (loaded separately, one sample, no
padding) gives the sampled token under the same tempered top-p distribution, with images of two
sizes, text-only prompts and different prompt lengths in one call (left padding); temperature 0 is
greedy with untempered log-probs; a request's seed reproduces its samples; token limits and stop
strings end answers as vLLM does; bad requests are refused with the shared messages; weights reload
in place from a folder and from safetensors bytes.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def qwen_path():
    from actors.models import tiny_qwen25vl

    return tiny_qwen25vl()


@pytest.fixture(scope="module")
def qwen_worker(qwen_path):
    from actors.hf_text_worker import HFTextWorker

    worker = HFTextWorker(str(qwen_path), max_model_len=256, seed=0, name="test-hf-qwen", enable_sleep_mode=True)
    yield worker
    worker.shutdown()


def fresh_logprobs(model_path, request, sample) -> list[float]:
    """Log-probs of `sample`'s answer from a separately loaded model, one unpadded forward."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from learners.logprobs import token_logprobs
    from rollout.model_inputs import load_model_inputs, model_type_of
    from rollout.special_tokens import BANNED_LOGIT_BIAS, image_placeholder_ids

    is_vlm = model_type_of(str(model_path))[1]
    cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_path), dtype=torch.float32).eval()
    inputs = load_model_inputs(str(model_path))
    ids = torch.tensor([list(sample.prompt_ids) + list(sample.answer_ids)])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    images = [Image.fromarray(im) for m in request.messages for im in m.images]
    if images:
        kwargs.update(inputs.image_kwargs(ids, [images], "cpu", torch.float32))
    with torch.no_grad():
        logits = model(**kwargs).logits[0].float()
    if is_vlm:
        logits[:, image_placeholder_ids(inputs.tokenizer)] += BANNED_LOGIT_BIAS
    p, a = len(sample.prompt_ids), len(sample.answer_ids)
    greedy = request.temperature == 0
    lp = token_logprobs(logits[p - 1 : p - 1 + a].unsqueeze(0), torch.tensor([sample.answer_ids]),
                        1.0 if greedy else request.temperature, 1.0 if greedy else request.top_p)
    return lp[0].tolist()


def assert_logprobs_match(model_path, requests, groups, tol: float = 1e-4) -> None:
    for request, group in zip(requests, groups, strict=True):
        assert len(group) == request.n
        for sample in group:
            assert 0 < len(sample.answer_ids) == len(sample.logprobs) <= request.max_tokens
            fresh = fresh_logprobs(model_path, request, sample)
            assert max(abs(x - y) for x, y in zip(fresh, sample.logprobs, strict=True)) < tol
            assert all(math.isfinite(x) for x in sample.logprobs)


def test_qwen_logprobs_equal_a_fresh_forward(qwen_worker, qwen_path, make_image):
    from rollout.interfaces import ChatMessage, TextRequest

    requests = [
        TextRequest((ChatMessage("user", "plan a red circle", (make_image(0, 64, 64),)),), n=2, temperature=0.8,
                    top_p=0.9, max_tokens=10, seed=1),
        TextRequest((ChatMessage("user", "what is left of the blue star in this picture?", (make_image(1, 48, 96),)),),
                    n=1, temperature=1.0, max_tokens=6),
        TextRequest((ChatMessage("user", "no image"),), n=2, temperature=0.6, top_p=0.5, max_tokens=8),
        TextRequest((ChatMessage("user", "greedy", (make_image(2, 64, 64),)),), n=1, temperature=0.0, max_tokens=5),
    ]
    groups = qwen_worker.generate(requests)
    assert_logprobs_match(qwen_path, requests, groups)
    assert [s.weight_version for g in groups for s in g] == [0] * 6
    pads = qwen_worker.inputs.image_pad_id
    assert groups[0][0].prompt_ids.count(pads) == 4 and groups[1][0].prompt_ids.count(pads) == 6  # 56x84
    assert groups[2][0].prompt_ids.count(pads) == 0
    # a seeded request draws the same answers again; greedy is the argmax path
    again = qwen_worker.generate([requests[0], requests[3]])
    assert [s.answer_ids for s in again[0]] == [s.answer_ids for s in groups[0]]
    assert again[1][0].answer_ids == groups[3][0].answer_ids
    assert groups[0][0].answer_ids != groups[0][1].answer_ids  # the n samples of a request differ
    assert all(s.finish_reason in ("stop", "length") for g in groups for s in g)
    assert qwen_worker.stats()["samples"] >= 6


def test_stop_strings_and_token_limits_end_answers(qwen_worker, make_image):
    from rollout.interfaces import ChatMessage, TextRequest

    request = TextRequest((ChatMessage("user", "describe", (make_image(3, 64, 64),)),), n=1, temperature=1.0,
                          max_tokens=12, seed=5)
    full = qwen_worker.generate([request])[0][0]
    assert full.finish_reason == "length" and len(full.answer_ids) == 12
    stop = full.text[3:5]  # a piece of the answer that the same seed draws again
    cut = qwen_worker.generate([TextRequest(request.messages, n=1, temperature=1.0, max_tokens=12, seed=5,
                                            stop=(stop,))])[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text and len(cut.answer_ids) < 12
    assert cut.answer_ids == full.answer_ids[: len(cut.answer_ids)]
    assert len(cut.logprobs) == len(cut.answer_ids)


def test_bad_requests_are_refused(qwen_worker, qwen_path, make_image):
    from actors.hf_text_worker import HFTextWorker
    from rollout.interfaces import ChatMessage, TextRequest

    with pytest.raises(ValueError, match="empty request list"):
        qwen_worker.generate([])
    with pytest.raises(ValueError, match="top_p=0"):
        qwen_worker.generate([TextRequest((ChatMessage("user", "x"),), top_p=0.0)])
    with pytest.raises(ValueError, match="2 images; allowed: at most 1"):
        qwen_worker.generate([TextRequest((ChatMessage("user", "x", (make_image(0, 64, 64),) * 2),))])
    with pytest.raises(ValueError, match="allowed: < max_model_len=256"):
        qwen_worker.generate([TextRequest((ChatMessage("user", "red " * 300),))])
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        HFTextWorker(str(qwen_path), tensor_parallel_size=2)


def test_weights_reload_in_place(qwen_worker, qwen_path, tmp_path, perturb_weights):
    from safetensors.torch import save

    original = qwen_worker.weights_checksum()
    noisy = perturb_weights(qwen_path, tmp_path / "noisy")
    assert qwen_worker.load_weights(3, str(noisy)) == 3 and qwen_worker.version() == 3
    assert abs(qwen_worker.weights_checksum() - original) > 1e-3
    state = {k: v.detach().clone() for k, v in qwen_worker.model.named_parameters()}
    assert qwen_worker.load_weights(0, str(qwen_path)) == 0
    assert qwen_worker.weights_checksum() == pytest.approx(original, rel=1e-12)
    assert qwen_worker.load_weights_bytes(4, save(state)) == 4  # the object-store path, module names
    assert abs(qwen_worker.weights_checksum() - original) > 1e-3
    qwen_worker.load_weights(0, str(qwen_path))
    qwen_worker.sleep()
    with pytest.raises(ValueError, match="asleep"):
        qwen_worker.generate([])
    qwen_worker.wake()
    with pytest.raises(ValueError, match="not a folder with"):
        qwen_worker.load_weights(1, str(tmp_path / "missing"))


@pytest.mark.parametrize("which", ["lm", "vlm", "qwen2vl"])
def test_other_families_on_the_hf_backend(tiny_models, make_image, which):
    """The text LM (tokenizer only), the Idefics3 VLM (its processor) and Qwen2-VL (the Qwen-VL inputs)
    sample and replay the same way."""
    from actors.hf_text_worker import HFTextWorker
    from actors.models import tiny_qwen2vl
    from rollout.interfaces import ChatMessage, TextRequest

    path = tiny_qwen2vl() if which == "qwen2vl" else getattr(tiny_models, which)
    worker = HFTextWorker(str(path), max_model_len=512, seed=0)
    images = (make_image(4, 64, 64),) if which != "lm" else ()
    requests = [TextRequest((ChatMessage("user", "plan a red circle", images),), n=2, temperature=0.9, top_p=0.9,
                            max_tokens=6, seed=0),
                TextRequest((ChatMessage("user", "a longer prompt about a cat", images),), n=1, max_tokens=4)]
    try:
        assert_logprobs_match(path, requests, worker.generate(requests))
        if which == "lm":
            with pytest.raises(ValueError, match="text-only model"):
                worker.generate([TextRequest((ChatMessage("user", "x", (make_image(0, 64, 64),)),))])
    finally:
        worker.shutdown()
