"""The reasoner's rollout engine on transformers: the `TextWorker` interface without vLLM.

For model families vLLM cannot serve where the run is (Qwen2.5-VL with images needs torchvision
inside vLLM), or to sample with exactly the learner's code path. `HFTextWorker.generate` batches
every sample of a call into one `model.generate` per sub-batch (rows with and without images are
separate sub-batches) and returns, per sample, the prompt ids (image tokens expanded), the answer
ids and the log-prob of each sampled token under the distribution it was drawn from.

Sampling is done by `_RowSampler`, a logits processor that replaces transformers' own sampling: per
row it adds the image-placeholder logit bias, builds the tempered top-p distribution with
`learners.logprobs.sampling_logprobs` (the rule the learner replays in `token_logprobs`), draws the
token with the row's own generator (a request's `seed` makes its n samples reproducible) and forces
it; `generate` then runs greedy over the forced scores. Temperature 0 is greedy, with the
untempered log-probs (as the vLLM worker reports them). A clean `GenerationConfig` is used, so no
processor of the checkpoint's generation config (repetition penalty, top-k) changes the distribution.

Weights: `load_weights` from an HF folder, and the weight sync through `TorchWeightReceiver` (the
module is `transformer`, the model itself; names are the learner module's parameter names).
`sleep`/`wake` move the model to the CPU and back on a GPU; on the CPU they only set the flag.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from actors.text_requests import chat_dict, check_text_request, new_counters, record_generation
from actors.weight_receiver import TorchWeightReceiver
from rollout.interfaces import TextRequest
from rollout.trajectory import TextSample

__all__ = ["HFTextWorker"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTextWorker(TorchWeightReceiver):
    """Hosts one transformers model (text LM or VLM) behind the `rollout.interfaces.Reasoner` protocol.

    Lifecycle: construct (model loaded, version 0) -> `generate` / `load_weights` / `receive_weights`
    (bump the version) -> `shutdown`. Every returned sample carries the version it was drawn with.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_model_len: int = 1024,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        seed: int = 0,
        enable_sleep_mode: bool = False,
        name: str = "text-worker-0",
        max_images_per_prompt: int = 1,
        device: str | None = None,
    ) -> None:
        """Load the model.

        Args: as `actors.text_worker.TextWorker`; tensor_parallel_size must be 1 (one device per
        worker); device: "cuda" when a GPU is visible, else "cpu", unless given.
        """
        from rollout.model_inputs import load_model_inputs, model_type_of

        if max_model_len < 1 or max_images_per_prompt < 1:
            raise ValueError(f"max_model_len={max_model_len}, max_images_per_prompt={max_images_per_prompt}; "
                             "allowed: >= 1")
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} with models.reasoner.backend=hf; "
                             "allowed: 1 (use backend vllm for tensor parallel engines)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: {sorted(_DTYPES)}")
        _, self.is_vlm = model_type_of(model_path)
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.name = name
        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.max_images_per_prompt = max_images_per_prompt
        self.enable_sleep_mode = enable_sleep_mode
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._version = 0
        self._sleeping = False
        self._counters = new_counters()
        self._generator = torch.Generator().manual_seed(int(seed))  # seeds of requests without one
        start = time.perf_counter()
        cls = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        self.model = cls.from_pretrained(self.model_path, dtype=_DTYPES[dtype]).to(self.device).eval()
        self.model.requires_grad_(False)
        self.inputs = load_model_inputs(self.model_path)
        self.engine_start_s = time.perf_counter() - start
        self._eos_ids = _eos_ids(self.model, self.inputs.tokenizer)
        tokenizer = self.inputs.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos_ids[0]
        self._bias = torch.zeros(self.model.get_output_embeddings().weight.shape[0])
        if self.is_vlm:  # never sample image placeholders (the learner applies the same bias)
            from rollout.special_tokens import BANNED_LOGIT_BIAS, image_placeholder_ids

            self._bias[image_placeholder_ids(tokenizer)] = BANNED_LOGIT_BIAS
        logger.info("%s: transformers model %s ready in %.1f s on %s (vlm=%s)", name, model_path,
                    self.engine_start_s, self.device, self.is_vlm)

    @property
    def transformer(self) -> torch.nn.Module:
        """The module `TorchWeightReceiver` fills in place: the whole model."""
        return self.model

    # ------------------------------------------------------------------------------ serving

    def generate(self, requests: list[TextRequest]) -> list[list[TextSample]]:
        """One list of `request.n` samples per request, in request order.

        Raises:
            ValueError: as `TextWorker.generate` (empty batch, bad sampling values, images for a
                text-only model, too many images, bad images, a prompt that does not fit).
        """
        self._check_awake()
        if not requests:
            raise ValueError("generate got an empty request list; pass at least one TextRequest")
        rows: list[_Row] = []
        for index, request in enumerate(requests):
            images = check_text_request(index, request, self.is_vlm, self.max_images_per_prompt, self.model_path)
            text = self.inputs.render([chat_dict(m, self.is_vlm) for m in request.messages])
            prompt_ids = self.inputs.encode_prompt(text, images)
            if len(prompt_ids) >= self.max_model_len:
                raise ValueError(f"request {index}: prompt has {len(prompt_ids)} tokens (image tokens "
                                 f"included); allowed: < max_model_len={self.max_model_len}")
            for j in range(request.n):
                seed = None if request.seed is None else request.seed * 1_000_003 + j
                rows.append(_Row(index, request, prompt_ids, images, seed))
        version = self._version
        start = time.perf_counter()
        for has_images in (False, True):  # processors like Idefics3's take no mixed batches
            group = [r for r in rows if bool(r.images) == has_images]
            if group:
                self._generate_rows(group)
        elapsed = time.perf_counter() - start
        results: list[list[TextSample]] = [[] for _ in requests]
        for row in rows:
            results[row.index].append(self._to_sample(row, version))
        record_generation(self._counters, requests, results, elapsed)
        return results

    def version(self) -> int:
        """Weight version currently held (0 = the weights the model was loaded with)."""
        return self._version

    def set_version(self, version: int) -> None:
        self._version = int(version)

    # ------------------------------------------------------------------------------ weights

    def load_weights(self, version: int, weights_path: str) -> int:
        """Reload every weight in place from an HF folder (as saved by the learner); returns the version.

        The folder is read with the model class's own `from_pretrained`, so checkpoint names map to
        module names exactly as when the worker started.
        """
        self._check_awake()
        folder = Path(weights_path)
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ValueError(f"weights_path={weights_path!r} is not a folder with *.safetensors files")
        loaded = type(self.model).from_pretrained(str(folder), dtype=torch.float32)
        self._check_complete(self._copy_named(loaded.named_parameters()))
        del loaded
        self._version = int(version)
        logger.info("%s: loaded version %d from %s", self.name, version, folder)
        return self._version

    def reset_caches(self) -> None:
        """Nothing outlives a `generate` call here (the KV cache is per call)."""

    # ------------------------------------------------------------------------------ lifecycle

    def health(self) -> dict[str, Any]:
        return {"name": self.name, "alive": self.model is not None, "version": self._version,
                "model": self.model_path, "is_vlm": self.is_vlm, "sleeping": self._sleeping,
                "pid": os.getpid(), "backend": "hf"}

    def stats(self) -> dict[str, Any]:
        c = dict(self._counters)
        c["engine_start_s"] = self.engine_start_s
        c["tokens_per_s"] = c["generated_tokens"] / c["generate_s"] if c["generate_s"] else 0.0
        return c

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory between rollouts: the model goes to the CPU (nothing to free on a CPU)."""
        self._check_sleep_mode()
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._sleeping = True

    def wake(self) -> None:
        self._check_sleep_mode()
        self.model.to(self.device)
        self._sleeping = False

    def shutdown(self) -> None:
        if self.model is None:
            return
        self.model = None
        import gc

        gc.collect()

    # ------------------------------------------------------------------------------ internals

    def _generate_rows(self, rows: list[_Row]) -> None:
        """One left-padded `model.generate` over `rows`; fills each row's answer and log-probs."""
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at the end
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention[i, width - len(r.prompt_ids):] = 1
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}
        if rows[0].images:
            kwargs.update(self.inputs.image_kwargs(input_ids, [r.images for r in rows], self.device,
                                                   self.model.dtype))
        max_new = max(min(r.request.max_tokens, self.max_model_len - len(r.prompt_ids)) for r in rows)
        sampler = _RowSampler(rows, self._bias.to(self.device), self._generator)
        config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=self._eos_ids,
                                  pad_token_id=self.pad_id, num_beams=1)
        with torch.no_grad():
            self.model.generate(**kwargs, generation_config=config,
                                logits_processor=LogitsProcessorList([sampler]))

    def _to_sample(self, row: _Row, version: int) -> TextSample:
        """Cut the row's drawn tokens at eos, a stop string or its own token limit (vLLM's rules)."""
        limit = min(row.request.max_tokens, self.max_model_len - len(row.prompt_ids))
        tokenizer = self.inputs.tokenizer
        ids: list[int] = []
        finish = "length"
        for token in row.tokens[:limit]:
            ids.append(token)
            if token in self._eos_ids:
                finish = "stop"
                break
            if row.request.stop and _stop_at(tokenizer.decode(ids, skip_special_tokens=True),
                                             row.request.stop) is not None:
                finish = "stop"
                break
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = _stop_at(text, row.request.stop)
        if cut is not None:
            text = text[:cut]
        return TextSample(prompt_ids=list(row.prompt_ids), answer_ids=ids, logprobs=row.logprobs[:len(ids)],
                          text=text, finish_reason=finish, weight_version=version)

    def _check_awake(self) -> None:
        if self.model is None:
            raise ValueError(f"{self.name} was shut down; start a new HFTextWorker")
        if self._sleeping:
            raise ValueError(f"{self.name} is asleep; call wake() first")

    def _check_sleep_mode(self) -> None:
        if not self.enable_sleep_mode:
            raise ValueError(f"{self.name} was started with enable_sleep_mode=False; "
                             "restart it with enable_sleep_mode=True to use sleep/wake")


class _Row:
    """One sample being drawn: its request, prompt, images, generator, and what was drawn so far."""

    def __init__(self, index: int, request: TextRequest, prompt_ids: list[int], images: list[Any],
                 seed: int | None) -> None:
        self.index, self.request, self.prompt_ids, self.images, self.seed = index, request, prompt_ids, images, seed
        self.tokens: list[int] = []
        self.logprobs: list[float] = []


class _RowSampler:
    """A transformers logits processor that draws each row's next token itself (module docstring).

    Returns scores that are 0 at the drawn token and -inf elsewhere, so greedy decoding emits it.
    """

    def __init__(self, rows: list[_Row], bias: torch.Tensor, fallback: torch.Generator) -> None:
        self.rows, self.bias = rows, bias
        self.generators = []
        for row in rows:
            seed = row.seed if row.seed is not None else int(torch.randint(0, 2**62, (1,), generator=fallback))
            self.generators.append(torch.Generator().manual_seed(seed))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from learners.logprobs import sampling_logprobs

        logits = scores.float() + self.bias[: scores.shape[-1]]  # (B, V), bias as vLLM: before T and top-p
        forced = torch.full_like(scores, float("-inf"))
        for i, (row, gen) in enumerate(zip(self.rows, self.generators, strict=True)):
            t, p = row.request.temperature, row.request.top_p
            if t == 0:  # greedy, untempered log-probs
                logp = sampling_logprobs(logits[i])
                token = int(torch.argmax(logp))
            else:
                logp = sampling_logprobs(logits[i], t, p)
                token = int(torch.multinomial(logp.exp().cpu(), 1, generator=gen))
            row.tokens.append(token)
            row.logprobs.append(float(logp[token]))
            forced[i, token] = 0.0
        return forced


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: the generation config's eos ids (else the tokenizer's eos)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no eos token (generation_config.json or tokenizer); set one")
    return [int(i) for i in ids]


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the first stop string in `text`, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
