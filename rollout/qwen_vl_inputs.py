"""Prompt and image inputs of the Qwen2-VL / Qwen2.5-VL family, built without torchvision.

transformers' `Qwen2_5_VLProcessor` needs a video processor (torchvision). This builds the same
inputs from the pieces that need none: the tokenizer (its chat template renders an image part as
`<|vision_start|><|image_pad|><|vision_end|>`), the PIL/numpy `Qwen2VLImageProcessorPil`, and the
image-pad expansion the processor does: an image of patch grid (t, h, w) becomes
`t*h*w / merge_size**2` `<|image_pad|>` tokens, one per merged patch feature.

The model needs, besides `input_ids`/`attention_mask`: `pixel_values` (all images' patches
concatenated, (sum t*h*w, C*T*P*P)), `image_grid_thw` ((N_images, 3), in the order the image pads
appear, row by row) and `mm_token_type_ids` ((B, L), 1 on image pads) from which the model derives
its multimodal RoPE positions (padding, left or right, is skipped through the attention mask).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["QwenVLInputs", "QWEN_VL_CHAT_TEMPLATE", "QWEN_VL_SPECIAL_TOKENS", "IMAGE_PAD", "QWEN_VL_MODEL_TYPES"]

IMAGE_PAD = "<|image_pad|>"
QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
QWEN_VL_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", IMAGE_PAD, "<|vision_end|>",
                          "<|video_pad|>"]

# ChatML with Qwen's image markers; content is a string or a list of image / text parts.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class QwenVLInputs:
    """Tokenizer + PIL image processor of a Qwen2(.5)-VL folder; see the module docstring."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        folder = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path)
        self.chat_template = self.tokenizer.chat_template or _folder_chat_template(folder)
        if not self.chat_template:
            raise ValueError(f"{model_path} has no chat template (tokenizer_config.json, chat_template.json "
                             "or chat_template.jinja); save one with the tokenizer")
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_pad_id is None or self.image_pad_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer of {model_path} has no {IMAGE_PAD!r} token")
        self.merge_size = int(self.image_processor.merge_size)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The chat as prompt text, generation prompt appended (one `<|image_pad|>` per image)."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def encode_prompt(self, text: str, images: list[Any]) -> list[int]:
        """Prompt ids with each image's pad expanded to its feature count; images are PIL RGB, in order."""
        grids = self._pixels(images)["image_grid_thw"] if images else torch.zeros((0, 3), dtype=torch.long)
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(images):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_PAD} markers but {len(images)} images")
        expanded = parts[0]
        for grid, tail in zip(grids, parts[1:], strict=True):
            expanded += IMAGE_PAD * (int(grid.prod()) // self.merge_size**2) + tail
        return list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])

    def image_kwargs(self, input_ids: torch.Tensor, images: list[list[Any]], device: Any,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Forward kwargs for the images of a padded batch: input_ids (B, L); images[i] the PIL
        images of row i in prompt order (rows without images: [])."""
        flat = [im for row in images for im in row]
        kwargs = {"mm_token_type_ids": (input_ids == self.image_pad_id).long().to(device)}
        if flat:
            pix = self._pixels(flat)
            kwargs["pixel_values"] = pix["pixel_values"].to(device, dtype)
            kwargs["image_grid_thw"] = pix["image_grid_thw"].to(device)
        return kwargs

    def _pixels(self, images: list[Any]) -> dict[str, torch.Tensor]:
        return self.image_processor(images=images, return_tensors="pt")


def _folder_chat_template(folder: Path) -> str | None:
    """A processor's chat template saved beside the model (newer Qwen checkpoints keep it there)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None
