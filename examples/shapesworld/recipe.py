"""The warm start's settings and rendered training data, shared by its stages.

`PretrainSettings` (every knob of `python -m examples.shapesworld.pretrain`), the `RenderedPool`
of (prompt, correct, wrong, fixed, instruction) renders that the generator, the reasoner and the
reasoner's vision tower all train on, and the helpers these stages share: the flow loss's σ
samplers, `degrade_images` (renders made to look like the small generator's output) and the
`warmup_cosine` schedule. The stage modules (`pretrain`, `reasoner`, `vision`, `probe`) import
this one and it imports none of them, so they do not import each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from examples.shapesworld.layout import LAYOUTS, Scene
from examples.shapesworld.render import render_correct, render_wrong
from examples.shapesworld.tasks import sample_tasks

__all__ = [
    "PretrainSettings",
    "RenderedPool",
    "make_pool",
    "SIGMA_SAMPLERS",
    "sample_sigmas",
    "degrade_images",
    "image_pixels",
    "warmup_cosine",
]


# σ samplers of the flow loss, by name. "logit_normal" (SD3's σ = sigmoid(N(0, 1))) rarely visits
# σ > 0.9, where the sampler's first steps decide what the image shows from the text alone; on
# canonical renders (one image per prompt) "uniform" trains that regime as well.
_SIGMA_SAMPLERS = {
    "uniform": lambda torch, n, gen: torch.rand(n, generator=gen),
    "logit_normal": lambda torch, n, gen: torch.sigmoid(torch.randn(n, generator=gen)),
}
SIGMA_SAMPLERS = tuple(_SIGMA_SAMPLERS)


def sample_sigmas(kind: str, n: int, gen):
    """(n,) flow-matching noise levels drawn by the sampler named `kind` (one of `SIGMA_SAMPLERS`)."""
    import torch

    if kind not in _SIGMA_SAMPLERS:
        raise ValueError(f"flow_sigma={kind!r}; allowed: {list(SIGMA_SAMPLERS)}")
    return _SIGMA_SAMPLERS[kind](torch, n, gen)


STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class PretrainSettings:
    """Every knob of the warm start; `scale` multiplies all step counts (tests use ~0.02)."""

    seed: int = 0
    size: int = 64
    pool: int = 1500  # rendered (prompt, correct, wrong, fixed, instruction) tuples
    layout: str = "canonical"  # of the generator's pool and evaluation renders (examples.shapesworld.render.LAYOUTS)
    vae_steps: int = 700  # beside the reasoner on 1 thread; held-out recon. judge accuracy 100 % (no margin: 79 %)
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 3e-3
    vae_foreground_weight: float = 10.0  # objects are ~10 % of pixels; plain MSE draws none
    vae_foreground_margin: int = 2  # px around objects weighted too (`foreground_weight`); 0 bloats shapes
    flow_steps: int = 2400  # at batch 16: 2600 x 16 drew 11.1 % / edited 18.9 % vs 1500 x 32 7.8 % / 15.6 % in less time
    # Then a second flow stage from those weights (a warm restart: fresh AdamW, warm-up + cosine at
    # `flow_continue_lr`; the first stage ends at lr 0). From v8's 2400 steps, 2400 more: held-out
    # text-to-image 11.1 -> 26.7 %, edits 18.9 -> 27.8 % (90 prompts), flow loss 0.128 -> 0.101; as built
    # by this recipe (v9): 25.6 % and 24.4 %, 1306 s for the whole warm start on a 2-core CPU machine
    # (measured: docs/reports/shapesworld.md#v9-twice-the-flow-updates). 0: skip.
    flow_continue_steps: int = 2400
    flow_continue_lr: float = 1e-3
    flow_sigma: str = "uniform"  # σ sampling of the flow loss: "uniform" or "logit_normal" (SD3's)
    flow_lr: float = 2e-3  # with adaLN-Zero: held-out flow loss at 500 steps 0.213 vs 0.266 at 1e-3 (σ = 0.6)
    flow_adaln_zero: bool = True  # DiT's adaLN-Zero init of the from-scratch transformer (examples.shapesworld.models)
    edit_fraction: float = 0.35  # share of flow steps that train editing
    uncond_fraction: float = 0.1  # share of texts replaced by "" so sampling can use true CFG
    degraded_source_fraction: float = 0.5  # edit sources blurred/noised like generated images (RL edits those)
    batch: int = 16  # of the flow stage; the from-scratch generator is update-limited, not data-limited
    max_sequence_length: int = 20  # T5 tokens (whole-word BPE: prompts and instructions have <= 12); = models.generator.max_sequence_length
    eval_prompts: int = 90  # held-out prompts for the measurements in the manifest
    num_steps: int = 8  # sampler steps at evaluation
    guidance: float = 3.5
    cfg_scale: float = 4.0  # true CFG at evaluation = flow_grpo.train_cfg_scale in examples/shapesworld/configs/shapes_cpu.yaml
    # The reasoner stage is independent of the generator's: on >= 2 threads it runs in a child
    # process on half of them, beside the VAE and the first `flow_steps_beside_reasoner` flow
    # steps, which use the other half; then the flow stage takes every thread. The switch is at a
    # fixed step, not "when the child is done", so the arithmetic (and the result) is the same
    # every run. Two 1-thread jobs do ~1.4x the work of one 2-thread job on a 2-core CPU machine
    # (measured; the warm start's timeline: docs/reports/shapesworld.md#the-generator).
    parallel_reasoner: bool = True
    flow_steps_beside_reasoner: int = 600
    # Weights are trained in float32 and stored in this dtype, so the shipped warm start fits in
    # 10 MB (float32: 14 MB); every loader upcasts to the configured float32. The manifest's
    # held-out accuracies are measured on the stored weights.
    storage_dtype: str = "float16"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; allowed: {list(LAYOUTS)}")
        if self.flow_sigma not in SIGMA_SAMPLERS:
            raise ValueError(f"flow_sigma={self.flow_sigma!r}; allowed: {list(SIGMA_SAMPLERS)}")
        if self.flow_continue_steps < 0:
            raise ValueError(f"flow_continue_steps={self.flow_continue_steps}; allowed: >= 0 (0 skips the second stage)")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={self.storage_dtype!r}; allowed: {list(STORAGE_DTYPES)}")
        if self.vae_foreground_margin < 0:
            raise ValueError(f"vae_foreground_margin={self.vae_foreground_margin}; allowed: >= 0 pixels")

    def steps(self, name: str) -> int:
        return max(1, int(round(getattr(self, name) * self.scale)))


@dataclass
class RenderedPool:
    """Training data: `correct[i]` shows `prompts[i]`; `wrong[i]` + `instructions[i]` -> `fixed[i]`."""

    prompts: list[str]
    metas: list[dict[str, Any]]
    correct: np.ndarray  # (N, H, W, 3) uint8
    wrong: np.ndarray
    fixed: np.ndarray
    instructions: list[str]
    kinds: list[str]
    correct_scenes: list[Scene]  # what each image shows (the reasoner describes it)
    wrong_scenes: list[Scene]


def make_pool(
    tasks: list[dict[str, Any]], n: int, seed: int, size: int = 64, layout: str = "random"
) -> RenderedPool:
    """`n` tasks drawn from `tasks` (`sample_tasks`: tag-balanced), each rendered correct and wrong
    (with the fixed image and the fixing instruction) at `size` px in `layout`. One numpy generator
    seeded with `seed` draws all of it, in this order, so the pool is a function of the arguments."""
    rng = np.random.default_rng(seed)
    metas = sample_tasks(tasks, n, rng)
    good = [render_correct(m, rng, size=size, layout=layout) for m in metas]
    bad = [render_wrong(m, rng, size=size, layout=layout) for m in metas]
    return RenderedPool(
        prompts=[m["prompt"] for m in metas],
        metas=metas,
        correct=np.stack([g.image for g in good]),
        wrong=np.stack([b.image for b in bad]),
        fixed=np.stack([b.fixed_image for b in bad]),
        instructions=[b.instruction for b in bad],
        kinds=[b.kind for b in bad],
        correct_scenes=[g.scene for g in good],
        wrong_scenes=[b.scene for b in bad],
    )


def degrade_images(images: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """A copy of `images` (N, H, W, 3) uint8 in which a `fraction` of them is degraded like the
    tiny generator's output: Gaussian blur (σ 0.4-1.2 px), colour and brightness jitter, pixel
    noise (σ up to 8/255)."""
    out = images.astype(np.float32)
    for k in np.flatnonzero(rng.random(len(images)) < fraction):
        x = _blur(out[k], rng.uniform(0.4, 1.2))
        x = x * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-12, 12)
        out[k] = x + rng.normal(0.0, rng.uniform(0.0, 8.0), size=x.shape)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def warmup_cosine(steps: int):
    """LR multiplier: linear warm-up over 5 % of `steps`, then cosine to 0 (the learners' schedule)."""
    from learners.ds_engine import warmup_lambda

    warm = max(1, steps // 20)
    return warmup_lambda(warm, max(steps, warm + 1))


def image_pixels(processor, images: list[np.ndarray]):
    """(N, tiles, 3, S, S) pixel values and their mask, as the reasoner's processor makes them, for one
    image per example."""
    from PIL import Image

    enc = processor.image_processor([[Image.fromarray(im)] for im in images], return_tensors="pt")
    return enc["pixel_values"], enc["pixel_attention_mask"]


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) float image, edges replicated."""
    r = 3
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = image.shape[:2]
    x = np.pad(image, ((r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * x[i : i + h] for i in range(2 * r + 1))
    x = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * x[:, i : i + w] for i in range(2 * r + 1))
