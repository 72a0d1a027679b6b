"""TextWorker on real vLLM engines with the tiny models (shared session engines, see conftest).

Log-probs are checked against a transformers forward pass of the same weights; weight reloads
against greedy outputs; bad inputs against clear ValueErrors with the engine still serving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rollout.interfaces import ChatMessage, Reasoner, TextRequest
from rollout.special_tokens import BANNED_LOGIT_BIAS, image_placeholder_ids

pytestmark = pytest.mark.integration

TOL = 1e-4


def _ask(text: str, *images: np.ndarray, **kwargs) -> TextRequest:
    return TextRequest(messages=(ChatMessage("user", text, tuple(images)),), **kwargs)


def _tempered_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log p of the distribution vLLM samples from: softmax(logits / T), cut to the top-p nucleus."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def _reference_logprobs(model, sample, temperature: float, top_p: float = 1.0, banned=(), **extra) -> np.ndarray:
    """transformers forward over prompt + answer; log-prob of each answer token.

    `banned`: token ids the worker biases away (a VLM never generates image placeholders)."""
    ids = torch.tensor([sample.prompt_ids + sample.answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0].float()
    logits[:, list(banned)] += BANNED_LOGIT_BIAS
    start = len(sample.prompt_ids) - 1
    steps = logits[start:start + len(sample.answer_ids)]  # (answer_len, vocab)
    logp = _tempered_logprobs(steps, temperature, top_p)
    return logp.gather(-1, torch.tensor(sample.answer_ids)[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def hf_lm(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models.lm, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_vlm(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_models.vlm)


# ------------------------------------------------------------------------------ log-probs


def test_text_logprobs_match_transformers_plain_and_tempered(text_worker_lm, hf_lm) -> None:
    settings = [(1.0, 1.0), (0.7, 1.0), (1.5, 1.0), (1.0, 0.9)]
    requests = [_ask(f"draw {i} red circles", n=2, temperature=t, top_p=p, max_tokens=12, seed=i)
                for i, (t, p) in enumerate(settings)]
    results = text_worker_lm.generate(requests)  # one engine call for the whole batch
    assert isinstance(text_worker_lm, Reasoner)
    assert [len(r) for r in results] == [2] * len(settings)
    for (temperature, top_p), samples in zip(settings, results, strict=True):
        for sample in samples:
            assert len(sample.answer_ids) == len(sample.logprobs) >= 1
            assert sample.weight_version == text_worker_lm.version()
            want = _reference_logprobs(hf_lm, sample, temperature, top_p)
            np.testing.assert_allclose(sample.logprobs, want, atol=TOL, rtol=0)
            if temperature != 1.0:  # the untempered log-probs must NOT match
                plain = _reference_logprobs(hf_lm, sample, 1.0)
                assert np.abs(np.array(sample.logprobs) - plain).max() > 10 * TOL


def test_image_logprobs_match_transformers(text_worker_vlm, hf_vlm, make_image) -> None:
    from PIL import Image

    model, proc = hf_vlm
    images = [make_image(10), make_image(11, 64, 96)]
    settings = [1.0, 0.6]
    requests = [_ask("Does this image show a red circle?", img, n=2, temperature=t, max_tokens=10, seed=3)
                for img, t in zip(images, settings, strict=True)]
    results = text_worker_vlm.generate(requests)
    banned = image_placeholder_ids(proc.tokenizer)
    assert len(banned) >= 3
    for img, temperature, samples in zip(images, settings, results, strict=True):
        text = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "Does this image show a red circle?"}]}],
            add_generation_prompt=True)
        enc = proc(text=[text], images=[[Image.fromarray(img)]], return_tensors="pt")
        for sample in samples:
            assert sample.prompt_ids == enc["input_ids"][0].tolist()
            assert not set(sample.answer_ids) & set(banned)  # placeholders are never generated
            want = _reference_logprobs(model, sample, temperature, banned=banned, pixel_values=enc["pixel_values"],
                                       pixel_attention_mask=enc["pixel_attention_mask"])
            np.testing.assert_allclose(sample.logprobs, want, atol=TOL, rtol=0)


def test_image_requests_log_no_thread_binding_warning(text_worker_vlm, make_image) -> None:
    """vLLM's CPU worker warns about `torch.set_num_threads` on every request with images; the worker
    drops that one message (and only it)."""
    import logging

    from actors.text_worker import THREAD_BINDING_WARNING

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    cpu_logger, keep = logging.getLogger("vllm.v1.worker.cpu_worker"), Keep()
    cpu_logger.addHandler(keep)
    try:
        text_worker_vlm.generate([_ask("Is this red?", make_image(3), n=1, max_tokens=2, seed=0)])
        cpu_logger.warning("another warning of the CPU worker")
    finally:
        cpu_logger.removeHandler(keep)
    assert not [m for m in seen if THREAD_BINDING_WARNING in m]
    assert "another warning of the CPU worker" in seen


# ------------------------------------------------------------------------------ weights


def _greedy(worker, requests: list[TextRequest]) -> list[list[int]]:
    return [r[0].answer_ids for r in worker.generate(requests)]


def test_load_weights_changes_outputs_and_restores_them(text_worker_lm, tiny_models, perturb_weights,
                                                         hf_lm, tmp_path: Path) -> None:
    requests = [_ask(p, temperature=0.0, max_tokens=8) for p in ("a photo of", "add a blue star")]
    before = _greedy(text_worker_lm, requests)
    noisy = perturb_weights(Path(tiny_models.lm), tmp_path / "noisy")
    try:
        assert text_worker_lm.load_weights(7, str(noisy)) == 7
        after = text_worker_lm.generate(requests)
        assert [r[0].answer_ids for r in after] != before
        assert all(r[0].weight_version == 7 for r in after)
        from transformers import AutoModelForCausalLM

        noisy_hf = AutoModelForCausalLM.from_pretrained(noisy, dtype=torch.float32).eval()
        for r in after:  # the engine now serves exactly the new weights
            np.testing.assert_allclose(r[0].logprobs, _reference_logprobs(noisy_hf, r[0], 1.0),
                                       atol=TOL, rtol=0)
    finally:
        text_worker_lm.load_weights(0, str(tiny_models.lm))
    assert text_worker_lm.version() == 0
    assert _greedy(text_worker_lm, requests) == before


def test_vlm_reload_then_seen_image_still_works(text_worker_vlm, tiny_models, perturb_weights,
                                                make_image, tmp_path: Path) -> None:
    image = make_image(20)
    requests = [_ask("Is it red?", image, temperature=0.0, max_tokens=6),
                _ask("Is it blue?", image, temperature=0.0, max_tokens=6)]
    before = _greedy(text_worker_vlm, requests)
    noisy = perturb_weights(Path(tiny_models.vlm), tmp_path / "noisy")
    try:
        text_worker_vlm.load_weights(1, str(noisy))
        changed = _greedy(text_worker_vlm, requests)  # same image again: encoder cache was reset
        assert changed != before
    finally:
        text_worker_vlm.load_weights(0, str(tiny_models.vlm))
    assert _greedy(text_worker_vlm, requests) == before
    assert text_worker_vlm.health()["alive"]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((32, 32, 3), dtype=np.float32), "dtype"),
        (np.zeros((32, 32), dtype=np.uint8), "shape"),
        (np.zeros((32, 32, 4), dtype=np.uint8), "shape"),
        (np.zeros((2, 32, 3), dtype=np.uint8), "size"),
        ("not an image", "type"),
    ],
)
def test_bad_images_raise_and_engine_survives(text_worker_vlm, image, match, make_image) -> None:
    with pytest.raises(ValueError, match=match):
        text_worker_vlm.generate([_ask("ok?", make_image(1)), _ask("bad", image)])
    assert len(text_worker_vlm.generate([_ask("ok?", make_image(1), max_tokens=2)])[0]) == 1


def test_bad_requests_raise_and_engines_survive(text_worker_lm, text_worker_vlm, make_image) -> None:
    from PIL import Image

    with pytest.raises(ValueError, match="empty"):
        text_worker_lm.generate([])
    with pytest.raises(ValueError, match="n=0"):
        text_worker_lm.generate([_ask("hi", n=0)])
    with pytest.raises(ValueError, match="top_p"):
        text_worker_lm.generate([_ask("hi", top_p=0.0)])
    with pytest.raises(ValueError, match="text-only"):
        text_worker_lm.generate([_ask("hi", make_image(0))])
    with pytest.raises(ValueError, match="prompt has .* tokens"):  # caught before the engine
        text_worker_lm.generate([_ask("hi"), _ask("red " * 600)])
    with pytest.raises(ValueError, match="mode"):
        text_worker_vlm.generate([_ask("hi", Image.new("RGBA", (32, 32)))])
    with pytest.raises(ValueError, match="at most 1"):
        text_worker_vlm.generate([_ask("hi", make_image(0), make_image(1))])
    # Text alone fits, but the image tokens push it over the context: the engine rejects it.
    long_text = _text_of_tokens(text_worker_vlm, text_worker_vlm.max_model_len - 4)
    with pytest.raises(ValueError, match="rejected by the engine.*longer than the maximum"):
        text_worker_vlm.generate([_ask("hi", make_image(0)), _ask(long_text, make_image(1))])
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        text_worker_lm.sleep()
    assert len(text_worker_lm.generate([_ask("hi", max_tokens=2)])[0][0].answer_ids) >= 1
    assert len(text_worker_vlm.generate([_ask("hi", make_image(0), max_tokens=2)])[0]) == 1


def test_bad_constructor_arguments_raise_before_an_engine_starts(tiny_models, tmp_path: Path) -> None:
    from actors.text_worker import TextWorker

    with pytest.raises(ValueError, match="config.json"):
        TextWorker(str(tmp_path))
    with pytest.raises(ValueError, match="max_model_len=0"):
        TextWorker(str(tiny_models.lm), max_model_len=0)
    with pytest.raises(ValueError, match="enable_sleep_mode"):  # no sleep mode on CPU
        TextWorker(str(tiny_models.lm), enable_sleep_mode=True)


def _text_of_tokens(worker, total: int) -> str:
    """A user text whose rendered prompt has `total` text tokens, give or take 2 (no image tokens)."""
    tokenizer = worker._renderer.tokenizer

    def count(text: str) -> int:
        rendered = worker._renderer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    base, one = count("red"), count("red red")
    text = "red" + " red" * ((total - base) // (one - base))
    assert abs(count(text) - total) <= 2
    return text


def test_seeded_requests_beyond_one_batch_budget(text_worker_lm) -> None:
    """40 seeded, sampled requests of a few hundred prompt tokens, together far over the 2,048-token
    batch budget: with chunked prefill vLLM would split a prompt and rewind its seeded CPU
    generator, which raises "CPU Generator does not use offset"; every request must come back."""
    long = " ".join(f"w{i}" for i in range(80))
    requests = [_ask(f"{i} {long}", max_tokens=3, temperature=1.0, seed=i) for i in range(40)]
    assert sum(len(r.messages[0].text) for r in requests) > 3 * 2048  # > 1 char per token
    first = text_worker_lm.generate(requests)
    again = text_worker_lm.generate(requests[::-1])[::-1]
    assert len(first) == 40 and all(len(s) == 1 and len(s[0].answer_ids) >= 1 for s in first)
    assert [s[0].answer_ids for s in first] == [s[0].answer_ids for s in again]


def test_stats_and_health(text_worker_lm) -> None:
    text_worker_lm.generate([_ask("count tokens", max_tokens=4, temperature=0.0)])
    stats = text_worker_lm.stats()
    assert stats["engine_start_s"] > 0 and stats["generated_tokens"] >= 1 and stats["tokens_per_s"] > 0
    health = text_worker_lm.health()
    assert health["alive"] and health["version"] == 0 and health["is_vlm"] is False


# ------------------------------------------------------------------------------ Ray actor


def test_text_worker_as_named_ray_actor(ray_cluster, tiny_models, make_image) -> None:
    import ray

    from actors.text_worker import remote_text_worker

    handle = remote_text_worker(5, num_cpus=1, num_gpus=0, model_path=str(tiny_models.vlm),
                                max_model_len=512)
    try:
        assert ray.get_actor("text-worker-5") is not None
        results = ray.get(handle.generate.remote(
            [_ask("Is it red?", make_image(3), n=3, max_tokens=5, seed=0), _ask("Plan a prompt.")]))
        assert [len(r) for r in results] == [3, 1]
        assert all(s.weight_version == 0 and len(s.logprobs) == len(s.answer_ids)
                   for r in results for s in r)
        health = ray.get(handle.health.remote())
        assert health["name"] == "text-worker-5" and health["is_vlm"]
        with pytest.raises(ValueError, match="n=0"):  # the error crosses the actor boundary as-is
            try:
                ray.get(handle.generate.remote([_ask("hi", n=0)]))
            except ray.exceptions.RayTaskError as err:
                raise err.as_instanceof_cause() from None
        assert ray.get(handle.version.remote()) == 0
        ray.get(handle.shutdown.remote())
    finally:
        ray.kill(handle)
