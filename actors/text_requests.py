"""What every text worker backend shares: request checks, chat rendering input, throughput counters.

`actors.text_worker.TextWorker` (vLLM) and `actors.hf_text_worker.HFTextWorker` (transformers) take
the same `TextRequest`s and refuse the same bad ones with the same messages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rollout.interfaces import ChatMessage, TextRequest
from rollout.trajectory import TextSample

__all__ = ["MIN_IMAGE_SIDE", "MAX_IMAGE_SIDE", "check_text_request", "chat_dict", "new_counters",
           "record_generation"]

MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 4096


def check_text_request(index: int, request: TextRequest, is_vlm: bool, max_images_per_prompt: int,
                       model_path: str) -> list[Any]:
    """Refuse a request no text worker serves (any backend); returns its images as RGB PIL, in order."""
    if not isinstance(request, TextRequest):
        raise ValueError(f"request {index} is a {type(request).__name__}; expected TextRequest")
    if request.n < 1:
        raise ValueError(f"request {index}: n={request.n}; allowed: n >= 1")
    if request.max_tokens < 1:
        raise ValueError(f"request {index}: max_tokens={request.max_tokens}; allowed: >= 1")
    if request.temperature < 0:
        raise ValueError(f"request {index}: temperature={request.temperature}; allowed: >= 0")
    if not 0.0 < request.top_p <= 1.0:
        raise ValueError(f"request {index}: top_p={request.top_p}; allowed: (0, 1]")
    if not request.messages:
        raise ValueError(f"request {index} has no messages")
    images = [_to_pil(index, image) for msg in request.messages for image in msg.images]
    if images and not is_vlm:
        raise ValueError(f"request {index} has {len(images)} image(s) but {model_path} is "
                         "a text-only model; serve a VLM or drop the images")
    if len(images) > max_images_per_prompt:
        raise ValueError(f"request {index} has {len(images)} images; allowed: at most "
                         f"{max_images_per_prompt} (max_images_per_prompt)")
    return images


def new_counters() -> dict[str, Any]:
    """The throughput counters every text worker reports in `stats()`."""
    return {"calls": 0, "requests": 0, "samples": 0, "prompt_tokens": 0, "generated_tokens": 0,
            "generate_s": 0.0, "last_tokens_per_s": 0.0}


def record_generation(counters: dict[str, Any], requests: list[TextRequest], results: list[list[TextSample]],
                      elapsed: float) -> None:
    """Add one `generate` call to `counters` (`new_counters`)."""
    generated = sum(len(s.answer_ids) for samples in results for s in samples)
    c = counters
    c["calls"] += 1
    c["requests"] += len(requests)
    c["samples"] += sum(len(samples) for samples in results)
    c["prompt_tokens"] += sum(len(samples[0].prompt_ids) for samples in results if samples)
    c["generated_tokens"] += generated
    c["generate_s"] += elapsed
    c["last_tokens_per_s"] = generated / elapsed if elapsed > 0 else 0.0


def chat_dict(message: ChatMessage, is_vlm: bool) -> dict[str, Any]:
    """Images first, then the text (ChatMessage's contract); plain content for a text LM."""
    if not is_vlm:
        return {"role": message.role, "content": message.text}
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in message.images]
    parts.append({"type": "text", "text": message.text})
    return {"role": message.role, "content": parts}


def _to_pil(index: int, image: Any) -> Any:
    """(H, W, 3) uint8 array or RGB PIL image -> RGB PIL image; anything else is a ValueError."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"request {index}: PIL image mode {image.mode!r}; allowed: 'RGB'")
        width, height = image.size
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"request {index}: image dtype {image.dtype}; allowed: uint8")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"request {index}: image shape {image.shape}; allowed: (H, W, 3)")
        height, width = image.shape[:2]
    else:
        raise ValueError(f"request {index}: image of type {type(image).__name__}; "
                         "allowed: (H, W, 3) uint8 numpy array or RGB PIL image")
    if not (MIN_IMAGE_SIDE <= height <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE):
        raise ValueError(f"request {index}: image size {height}x{width}; allowed sides: "
                         f"{MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} px")
    return image if isinstance(image, Image.Image) else Image.fromarray(image)
