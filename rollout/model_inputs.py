"""Prompt and image inputs per model family, so the learner and the transformers rollout worker
build exactly the inputs the model expects from one place.

A family is picked by the `model_type` of the folder's config.json (`load_model_inputs`):
- a text-only model (no `vision_config`): the tokenizer and its chat template;
- Qwen2-VL / Qwen2.5-VL (`rollout.qwen_vl_inputs`): image-pad expansion, `image_grid_thw` and the
  token types the model derives its multimodal RoPE positions from;
- any other VLM (Idefics3 and the like): the folder's `AutoProcessor`, `pixel_values` (+ mask).

Every family exposes `tokenizer`, `render(messages) -> str` (chat template, generation prompt
appended), `encode_prompt(text, images) -> list[int]` (image tokens expanded) and
`image_kwargs(input_ids, images, device, dtype) -> dict` (forward kwargs for a padded batch,
images[i] the PIL images of row i).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rollout.qwen_vl_inputs import QWEN_VL_MODEL_TYPES, QwenVLInputs

__all__ = ["ModelInputs", "load_model_inputs", "model_type_of", "TextInputs", "ProcessorInputs"]


class ModelInputs(Protocol):
    tokenizer: Any

    def render(self, messages: list[dict[str, Any]]) -> str: ...

    def encode_prompt(self, text: str, images: list[Any]) -> list[int]: ...

    def image_kwargs(self, input_ids: torch.Tensor, images: list[list[Any]], device: Any,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]: ...


class TextInputs:
    """A text-only model: the tokenizer renders and encodes; images are refused."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, text: str, images: list[Any]) -> list[int]:
        if images:
            raise ValueError(f"{self.model_path} is a text-only model; it takes no images")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def image_kwargs(self, input_ids: torch.Tensor, images: list[list[Any]], device: Any,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if any(images):
            raise ValueError(f"{self.model_path} is a text-only model; it takes no images")
        return {}


class ProcessorInputs:
    """A VLM whose `AutoProcessor` needs nothing missing here (Idefics3): it expands the image tokens."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, text: str, images: list[Any]) -> list[int]:
        out = self.processor(text=[text], images=[images] if images else None, add_special_tokens=False)
        return list(out["input_ids"][0])

    def image_kwargs(self, input_ids: torch.Tensor, images: list[list[Any]], device: Any,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """pixel_values (B, N, C, H, W) (+ pixel_attention_mask): every row must have images."""
        if not all(images):
            raise ValueError("a batch for this VLM's processor mixes rows with and without images; "
                             "split it into sub-batches")
        pix = self.image_processor(images=images, return_tensors="pt")
        kwargs = {"pixel_values": pix["pixel_values"].to(device, dtype)}
        if "pixel_attention_mask" in pix:
            kwargs["pixel_attention_mask"] = pix["pixel_attention_mask"].to(device)
        return kwargs


_FAMILIES: dict[str, Callable[[str], ModelInputs]] = {t: QwenVLInputs for t in QWEN_VL_MODEL_TYPES}


def model_type_of(model_path: str) -> tuple[str, bool]:
    """(config.json's `model_type`, whether it has a vision tower) of an HF folder."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model_path={model_path!r} has no config.json; pass an HF model folder")
    config = json.loads(config_file.read_text())
    return str(config.get("model_type", "")), "vision_config" in config


def load_model_inputs(model_path: str) -> ModelInputs:
    """The input builder of the model in `model_path`, by its family (module docstring)."""
    model_type, is_vlm = model_type_of(model_path)
    if not is_vlm:
        return TextInputs(model_path)
    return _FAMILIES.get(model_type, ProcessorInputs)(model_path)
