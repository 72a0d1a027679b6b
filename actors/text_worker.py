"""The reasoner's rollout engine: one `vllm.LLM` behind the `rollout.interfaces.Reasoner` protocol.

`TextWorker.generate` batches every request of a call into ONE engine call and returns, per
sample, the prompt ids, the answer ids and the log-prob of each sampled token under the
distribution it was sampled from. The engine runs with `logprobs_mode="processed_logprobs"`:
vLLM then reports log-softmax of the logits *after* temperature and top-p, i.e. exactly the
tempered (and truncated) sampling distribution that GRPO's importance ratio needs
(docs/design.md#behaviour-log-probs). With temperature 0 (greedy) the log-probs are those of the
untempered distribution.

Weights are updated in place (docs/design.md#vllm-worker-extension, docs/design.md#cpu-stack):
`load_weights` reloads a safetensors folder inside vLLM's worker; the `TextWeightReceiver` mixin
adds the broadcast path. Every update is followed by `reset_caches()` (prefix, multimodal and
encoder caches), else a request with an image seen before the update hits a stale encoder cache
and kills the engine.

The class is plain (usable in-process); `remote_text_worker` wraps it as a named Ray actor.
On CPU, vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with a 1 GiB KV cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from actors.text_requests import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    chat_dict,
    check_text_request,
    new_counters,
    record_generation,
)
from actors.weight_receiver import EXTENSION_CLS, TextWeightReceiver
from rollout.interfaces import TextRequest
from rollout.trajectory import TextSample

__all__ = ["TextWorker", "remote_text_worker", "CPU_ENGINE_ENV", "MIN_IMAGE_SIDE", "MAX_IMAGE_SIDE"]

logger = logging.getLogger(__name__)

# Environment a CPU engine needs before vLLM is imported (in a Ray actor: via runtime_env).
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class TextWorker(TextWeightReceiver):
    """Hosts one vLLM engine for a text LM or a VLM (images through `ChatMessage.images`).

    Lifecycle: construct (engine starts, version 0) -> `generate` / `load_weights` (bumps the
    version) -> `shutdown`. Invariant: every returned sample carries the version it was drawn with.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_model_len: int = 1024,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        seed: int = 0,
        gpu_memory_utilization: float = 0.8,
        enable_sleep_mode: bool = False,
        worker_extension_cls: str | None = EXTENSION_CLS,
        name: str = "text-worker-0",
        max_images_per_prompt: int = 1,
    ) -> None:
        """Start the engine.

        Args:
            model_path: HF folder (config, safetensors, tokenizer; processor for a VLM).
            max_model_len: context length (prompt incl. image tokens + answer).
            tensor_parallel_size: GPUs per engine (1 on CPU).
            dtype: engine dtype; "float32" on CPU.
            seed: engine seed (requests without their own seed draw from it).
            gpu_memory_utilization: share of GPU memory vLLM may take (ignored on CPU).
            enable_sleep_mode: allow `sleep()`/`wake()` (GPU only).
            worker_extension_cls: class mixed into vLLM's worker for weight sync, or None.
            name: actor name, reported by `health()`.
            max_images_per_prompt: vLLM's `limit_mm_per_prompt["image"]` for a VLM.
        """
        _check_positive(max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                        max_images_per_prompt=max_images_per_prompt)
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}; allowed: (0, 1]")
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model_path={model_path!r} has no config.json; pass an HF model folder")
        import torch

        if not torch.cuda.is_available():  # must precede the vLLM import; GPUs keep vLLM defaults
            for key, value in CPU_ENGINE_ENV.items():
                os.environ.setdefault(key, value)
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:  # before the engine starts: its warm-up requests warn too
            _quiet_thread_binding_warning()
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(f"enable_sleep_mode=True is not supported on {current_platform.device_name}; "
                             "set it to False (sleep mode needs a CUDA/ROCm GPU)")
        if on_cpu and tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} on CPU; allowed: 1")
        self.name = name
        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.is_vlm = "vision_config" in json.loads(config_file.read_text())
        self.enable_sleep_mode = enable_sleep_mode
        self.max_images_per_prompt = max_images_per_prompt
        self._version = 0
        self._sleeping = False
        self._counters = new_counters()
        engine_kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=on_cpu,
            logprobs_mode="processed_logprobs",
        )
        if on_cpu:
            # A chunked (partial) prefill makes vLLM rewind the request's seeded generator, which a
            # CPU generator cannot do ("CPU Generator does not use offset"): schedule whole prompts.
            engine_kwargs["enable_chunked_prefill"] = False
            engine_kwargs["max_num_batched_tokens"] = max(max_model_len, 2048)
        if worker_extension_cls:
            engine_kwargs["worker_extension_cls"] = worker_extension_cls
            _ensure_importable_by_worker()
        if self.is_vlm:
            engine_kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt}
        start = time.perf_counter()
        self.llm = LLM(**engine_kwargs)
        self.engine_start_s = time.perf_counter() - start
        self._renderer = _load_renderer(self.model_path, self.is_vlm)
        self._logit_bias = None
        if self.is_vlm:  # never sample image placeholders (the learner applies the same bias)
            from rollout.special_tokens import BANNED_LOGIT_BIAS, image_placeholder_ids

            ids = image_placeholder_ids(getattr(self._renderer, "tokenizer", self._renderer))
            self._logit_bias = {i: BANNED_LOGIT_BIAS for i in ids} or None
        logger.info("%s: engine for %s ready in %.1f s (vlm=%s)", name, model_path,
                    self.engine_start_s, self.is_vlm)

    # ------------------------------------------------------------------------------ serving

    def generate(self, requests: list[TextRequest]) -> list[list[TextSample]]:
        """One list of `request.n` samples per request, in request order; one engine call.

        Raises:
            ValueError: empty batch, n < 1, bad sampling values, images for a text-only model,
                too many images, an image not (H, W, 3) uint8 / RGB, a prompt that does not fit
                the context (`max_model_len`).
        """
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError

        self._check_awake()
        if not requests:
            raise ValueError("generate got an empty request list; pass at least one TextRequest")
        prompts, params = [], []
        for index, request in enumerate(requests):
            prompts.append(self._engine_prompt(index, request))
            params.append(SamplingParams(
                n=request.n, temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, stop=list(request.stop) or None,
                seed=request.seed, logprobs=0, logit_bias=self._logit_bias,
            ))
        version = self._version
        start = time.perf_counter()
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except VLLMValidationError as err:  # vLLM aborted the batch; the engine stays usable
            raise ValueError(f"request rejected by the engine (max_model_len={self.max_model_len}): "
                             f"{err}") from err
        elapsed = time.perf_counter() - start
        results = [_to_samples(out, version) for out in outputs]
        self._record(requests, results, elapsed)
        return results

    def version(self) -> int:
        """Weight version currently held (0 = the weights the engine started with)."""
        return self._version

    def set_version(self, version: int) -> None:
        """Set the version label (after weights arrived by a path that does not set it)."""
        self._version = int(version)

    # ------------------------------------------------------------------------------ weights

    def load_weights(self, version: int, weights_path: str) -> int:
        """Reload every weight in place from an HF safetensors folder; returns the new version.

        Raises:
            ValueError: `weights_path` is not a folder holding `*.safetensors` files.
        """
        self._check_awake()
        folder = Path(weights_path)
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ValueError(f"weights_path={weights_path!r} is not a folder with *.safetensors files")
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_path": str(folder), "is_checkpoint_format": True})
        self.reset_caches()
        self._version = int(version)
        logger.info("%s: loaded version %d from %s in %.2f s", self.name, version, folder,
                    time.perf_counter() - start)
        return self._version

    def reset_caches(self) -> None:
        """Drop state derived from old weights: prefix cache, and for a VLM mm + encoder caches."""
        self.llm.reset_prefix_cache()
        if self.is_vlm:
            self.llm.reset_mm_cache()
            self.llm.llm_engine.reset_encoder_cache()

    # ------------------------------------------------------------------------------ lifecycle

    def health(self) -> dict[str, Any]:
        """Cheap liveness report for the driver."""
        return {"name": self.name, "alive": self.llm is not None, "version": self._version,
                "model": self.model_path, "is_vlm": self.is_vlm, "sleeping": self._sleeping,
                "pid": os.getpid()}

    def stats(self) -> dict[str, Any]:
        """Engine start seconds and throughput counters since start."""
        c = dict(self._counters)
        c["engine_start_s"] = self.engine_start_s
        c["tokens_per_s"] = c["generated_tokens"] / c["generate_s"] if c["generate_s"] else 0.0
        return c

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory between rollouts (GPU, `enable_sleep_mode=True` only)."""
        self._check_sleep_mode()
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake(self) -> None:
        self._check_sleep_mode()
        self.llm.wake_up()
        self._sleeping = False

    def shutdown(self) -> None:
        """Stop the engine and free its memory; the worker is unusable afterwards."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        import gc

        gc.collect()
        logger.info("%s: engine shut down", self.name)

    # ------------------------------------------------------------------------------ helpers

    def _engine_prompt(self, index: int, request: TextRequest) -> dict[str, Any]:
        """Validate one request and render its chat into vLLM's prompt dict."""
        images = check_text_request(index, request, self.is_vlm, self.max_images_per_prompt, self.model_path)
        text = self._renderer.apply_chat_template(
            [chat_dict(msg, self.is_vlm) for msg in request.messages],
            tokenize=False, add_generation_prompt=True)
        tokenizer = getattr(self._renderer, "tokenizer", self._renderer)
        n_text_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_text_tokens >= self.max_model_len:
            raise ValueError(f"request {index}: prompt has {n_text_tokens} tokens (before image "
                             f"tokens); allowed: < max_model_len={self.max_model_len}")
        prompt: dict[str, Any] = {"prompt": text}
        if images:
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return prompt

    def _record(self, requests: list[TextRequest], results: list[list[TextSample]],
                elapsed: float) -> None:
        record_generation(self._counters, requests, results, elapsed)

    def _check_awake(self) -> None:
        if self.llm is None:
            raise ValueError(f"{self.name} was shut down; start a new TextWorker")
        if self._sleeping:
            raise ValueError(f"{self.name} is asleep; call wake() first")

    def _check_sleep_mode(self) -> None:
        if not self.enable_sleep_mode:
            raise ValueError(f"{self.name} was started with enable_sleep_mode=False; "
                             "restart it with enable_sleep_mode=True (GPU only) to use sleep/wake")


def remote_text_worker(index: int, num_cpus: float, num_gpus: float, *, scheduling_strategy: Any = None,
                       worker_cls: type | None = None, **kwargs: Any) -> Any:
    """Start `worker_cls` (default `TextWorker`; `actors.hf_text_worker.HFTextWorker` for the
    transformers backend) as the named Ray actor `text-worker-{index}`; returns its handle.

    `kwargs` go to `TextWorker` (model_path, max_model_len, ...). With `num_gpus == 0` the actor
    gets the CPU engine environment (in-process engine, 1 GiB KV cache) before vLLM is imported.
    `scheduling_strategy` (e.g. a `PlacementGroupSchedulingStrategy` for the actor's bundle) goes to
    Ray as is; None: plain resource request.
    """
    import ray

    if index < 0:
        raise ValueError(f"index={index}; allowed: >= 0")
    if num_cpus < 0 or num_gpus < 0:
        raise ValueError(f"num_cpus={num_cpus}, num_gpus={num_gpus}; allowed: >= 0")
    name = f"text-worker-{index}"
    env_vars = {"PYTHONPATH": _pythonpath_with_root(os.environ.get("PYTHONPATH", ""))}
    if num_gpus == 0:
        env_vars.update(CPU_ENGINE_ENV)
    actor_cls = ray.remote(worker_cls or TextWorker)
    options: dict[str, Any] = {"name": name, "num_cpus": num_cpus, "num_gpus": num_gpus,
                               "runtime_env": {"env_vars": env_vars}}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return actor_cls.options(**options).remote(name=name, **kwargs)


# ---------------------------------------------------------------------------------- private


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key}={value}; allowed: >= 1")


def _pythonpath_with_root(current: str) -> str:
    parts = [p for p in current.split(os.pathsep) if p]
    return os.pathsep.join([_PROJECT_ROOT] + [p for p in parts if p != _PROJECT_ROOT])


def _ensure_importable_by_worker() -> None:
    """A multiprocess engine imports the worker extension in a child: it needs PYTHONPATH."""
    os.environ["PYTHONPATH"] = _pythonpath_with_root(os.environ.get("PYTHONPATH", ""))


def _load_renderer(model_path: str, is_vlm: bool) -> Any:
    """The processor (VLM) or tokenizer (LM) whose chat template renders prompts."""
    if is_vlm:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _to_samples(output: Any, version: int) -> list[TextSample]:
    """vLLM RequestOutput -> TextSample per completion (log-prob of each sampled token)."""
    prompt_ids = list(output.prompt_token_ids)
    samples = []
    for completion in output.outputs:
        token_ids = list(completion.token_ids)
        if completion.logprobs is None:
            raise RuntimeError("vLLM returned no log-probs although logprobs=0 was requested")
        logprobs = [float(step[token].logprob)
                    for step, token in zip(completion.logprobs, token_ids, strict=True)]
        samples.append(TextSample(
            prompt_ids=prompt_ids, answer_ids=token_ids, logprobs=logprobs, text=completion.text,
            finish_reason=str(completion.finish_reason), weight_version=version,
        ))
    return samples


THREAD_BINDING_WARNING = "doesn't allow to use `torch.set_num_threads` after the thread binding"


class _DropThreadBindingWarning(logging.Filter):
    """Drops one vLLM CPU-worker warning and nothing else. That worker replaces
    `torch.set_num_threads` with a function that only warns (its threads are bound to cores), and
    vLLM's own multimodal renderer calls it around every request with images: one warning line per
    generate call, hundreds per run, about a skip that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return THREAD_BINDING_WARNING not in record.getMessage()


def _quiet_thread_binding_warning() -> None:
    cpu_logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _DropThreadBindingWarning) for f in cpu_logger.filters):
        cpu_logger.addFilter(_DropThreadBindingWarning())
