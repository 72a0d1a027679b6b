"""The ShapesWorld models: where the shipped warm start lives, and the untrained generator it starts from.

`python -m examples.shapesworld.pretrain` writes `WARM_START/{flux,vlm}` (diffusers
FluxKontextPipeline and HF Idefics3 folders) plus `manifest.json` with how it was built and what
it measured; the plugin (`examples.shapesworld`) registers them as the named models
`tiny:shapes-flux` and `tiny:shapes-vlm`. The generator is a larger sibling of
`actors.tiny_flux` (same classes and scheduler, a whole-word tokenizer; wider and deeper
transformer, text encoders and VAE) so it has room to learn ShapesWorld.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = [
    "WARM_START",
    "MODEL_FOLDERS",
    "SHAPES_VOCAB_SIZE",
    "warm_start_path",
    "shapes_corpus",
    "build_shapes_flux",
    "adaln_zero_",
]

logger = logging.getLogger(__name__)

# The warm start that ships with the repository (built by `python -m examples.shapesworld.pretrain`).
WARM_START = Path(__file__).resolve().parent / "warmstart"
MODEL_FOLDERS = ("flux", "vlm")  # the generator and the reasoner, each in a folder of the warm start
# BPE vocabulary of the ShapesWorld tokenizers: large enough that every word of `shapes_corpus`
# is one token (the 384-token project BPE cut "triangles" into 5 pieces and "yellow" into 5).
SHAPES_VOCAB_SIZE = 1024
# Instruction and answer words that prompts do not contain (examples.shapesworld.render, parsing).
_EXTRA_WORDS = "change the to add one more remove move so it is no further edit needed nothing as asked"


def warm_start_path(folder: str, root: Path = WARM_START) -> Path:
    """`root/<folder>` ("flux" or "vlm") of a finished warm start (one whose manifest exists).

    Raises:
        ValueError: unknown folder, or no finished warm start in `root` (the message says how to
            build one; it takes minutes, so it is never started implicitly).
    """
    if folder not in MODEL_FOLDERS:
        raise ValueError(f"unknown warm-start folder {folder!r}; known: {list(MODEL_FOLDERS)}")
    path = Path(root) / folder
    if not (path.is_dir() and (path.parent / "manifest.json").is_file()):
        raise ValueError(
            f"no ShapesWorld warm start in {path.parent} ({folder}/ and manifest.json): build it with "
            f"`python -m examples.shapesworld.pretrain --out {path.parent}` (about 15-20 minutes on 2 cores)"
        )
    return path


def shapes_corpus() -> list[str]:
    """Every ShapesWorld prompt plus the edit-instruction and answer words, for BPE merges."""
    from actors.tokenizer import TOKENIZER_CORPUS
    from examples.shapesworld.tasks import all_tasks

    return [t["prompt"] for t in all_tasks()] + ([_EXTRA_WORDS] + _EXTRA_WORDS.split()) * 50 + TOKENIZER_CORPUS


def build_shapes_flux(seed: int = 0):
    """Build an untrained FluxKontextPipeline for ShapesWorld and return it (not saved).

    Transformer: 2 double + 2 single blocks, 4 heads × 32 (vs 1 + 2 blocks, 2 × 16 in the test
    model); T5/CLIP width 64. VAE: widths (16, 32, 64), so it downsamples by 4, not FLUX's 8 (an 8×
    VAE of this size blurred 10-px shapes into blobs: 6 % judge accuracy on reconstructions), with 16
    latent channels and no mid-block attention; a 64-px image is 8 × 8 = 64 packed tokens.
    Scheduler and tokenizer builder come from `actors.tiny_flux`; the tokenizers' merges come
    from `shapes_corpus` (whole words).
    """
    import torch
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from actors.tiny_flux import CLIP_MAX_LENGTH, TINY_FLUX_T5_MAX_LENGTH, flux_scheduler, flux_tokenizer

    corpus = shapes_corpus()
    tok_clip, tok_t5 = (
        flux_tokenizer(n, vocab_size=SHAPES_VOCAB_SIZE, corpus=corpus) for n in (CLIP_MAX_LENGTH, TINY_FLUX_T5_MAX_LENGTH)
    )
    vocab = len(tok_clip)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=[8, 12, 12],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=64,
            max_position_embeddings=77,
            vocab_size=vocab,
            bos_token_id=tok_clip.bos_token_id,
            eos_token_id=tok_clip.eos_token_id,
            pad_token_id=tok_clip.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            vocab_size=vocab,
            pad_token_id=tok_t5.pad_token_id,
            eos_token_id=tok_t5.eos_token_id,
            decoder_start_token_id=tok_t5.pad_token_id,
        )
    )
    return FluxKontextPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tok_clip,
        text_encoder_2=t5,
        tokenizer_2=tok_t5,
        transformer=transformer,
    )


def adaln_zero_(transformer) -> None:
    """DiT's adaLN-Zero initialisation, in place: every block's modulation (shift, scale, gate)
    and the output projection start at zero, so each block starts as the identity and the model
    predicts v = 0. diffusers' Flux layers keep their random init (they expect pretrained
    weights); trained from scratch, random gates slow the early steps down."""
    import torch
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
    )

    zeroed = [m.linear for m in transformer.modules() if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous))]
    with torch.no_grad():
        for layer in [*zeroed, transformer.proj_out]:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
