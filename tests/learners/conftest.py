"""Fixtures of the learner tests: tiny models, a module-scoped Ray cluster, seeded text batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from actors.models import TinyModels, build_tiny_models


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    """The tiny LM, VLM and FLUX.1-Kontext-style generator, built once into $R3RL_CACHE."""
    return build_tiny_models()


@pytest.fixture(scope="module")
def learner_ray() -> Iterator[None]:
    """A local Ray cluster for one test module (never `ray stop`: other clusters share the box)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def make_text_batch():
    """`make_text_batch(model_path, temperature, n=4, seed=0)` -> TextSamples with behaviour log-probs."""
    return _behaviour_text_samples


def _behaviour_text_samples(model_path, temperature: float, n: int = 4, seed: int = 0) -> list:
    """Seeded prompts/answers of different lengths with log-probs from a plain transformers forward.

    Sampled from the model itself (multinomial at `temperature`) so the answers look like
    rollouts; `logprobs` are log softmax(logits / T) of the sampled tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from learners.algos import token_logprobs
    from rollout.trajectory import TextSample

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        prompt = torch.randint(5, vocab - 1, (3 + i,), generator=gen).tolist()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(2 + 2 * i):  # answers of 2, 4, 6, ... tokens
                logits = model(torch.tensor([ids])).logits[0, -1] / temperature
                ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            answer = ids[len(prompt):]
            logits = model(torch.tensor([ids])).logits[:, len(prompt) - 1 : len(ids) - 1]
            lp = token_logprobs(logits, torch.tensor([answer]), temperature)[0].tolist()
        samples.append(TextSample(prompt_ids=prompt, answer_ids=answer, logprobs=lp, text=""))
    return samples
