"""Dense pretraining of the ShapesWorld reasoner's vision tower, before it learns to answer.

Trained only through its answers, the small VLM learned to copy the prompt and ignored the image
(reflect stop accuracy 0.55-0.58, chance 0.5; its image descriptions named the prompt's shapes
whatever the image showed). Here every 8-px patch token of the vision tower learns, through a
linear head that is thrown away afterwards, the colour and the shape of the object that covers
the patch (or background), from the renderer's exact scenes: dense, cheap supervision (no
language model in the loop) that gives the later answer training features worth reading.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from examples.shapesworld.recipe import degrade_images, image_pixels, warmup_cosine
from examples.shapesworld.render import shape_mask
from examples.shapesworld.tasks import COLORS, SHAPES

if TYPE_CHECKING:
    from examples.shapesworld.layout import Scene
    from examples.shapesworld.recipe import RenderedPool

__all__ = ["scene_patch_labels", "pretrain_vision"]

logger = logging.getLogger(__name__)

_MIN_COVER = 0.25  # an object labels a patch when it covers at least this share of its pixels


def scene_patch_labels(scene: Scene, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(G, G) int colour and shape classes per `patch`-px patch (G = size / patch): 1 + the index
    in COLORS / SHAPES of the object covering most of the patch when it covers at least a quarter
    of it (objects drawn later cover earlier ones, as in `draw_scene`), else 0 (background)."""
    s = scene.size
    if s % patch:
        raise ValueError(f"patch={patch} does not divide the image size {s}")
    owner = np.full((s, s), -1)
    for k, o in enumerate(scene.objects):
        owner[shape_mask(o.shape, o.cx, o.cy, o.size, o.size, s, s)] = k
    g = s // patch
    colour, shape = np.zeros((g, g), dtype=np.int64), np.zeros((g, g), dtype=np.int64)
    if not scene.objects:
        return colour, shape
    cover = np.stack([(owner == k).reshape(g, patch, g, patch).sum((1, 3)) for k in range(len(scene.objects))])
    best, share = cover.argmax(0), cover.max(0) / patch**2  # (G, G)
    for k, o in enumerate(scene.objects):
        here = (best == k) & (share >= _MIN_COVER)
        colour[here], shape[here] = 1 + COLORS.index(o.color), 1 + SHAPES.index(o.shape)
    return colour, shape


def pretrain_vision(
    model, processor, pool: RenderedPool, steps: int, batch: int, lr: float, patch: int, rng, gen
) -> list[float]:
    """Train `model.model.vision_model` for `steps` on the pool's correct and wrong images (a
    share degraded like generator output, see `degrade_images`) to predict every patch's colour
    and shape class; background patches weigh 0.2 (they are ~80 % of patches)."""
    import torch

    vision = model.model.vision_model
    hidden = vision.config.hidden_size
    head = torch.nn.Linear(hidden, len(COLORS) + 1 + len(SHAPES) + 1)
    images = np.concatenate([pool.correct, pool.wrong])
    labels = [scene_patch_labels(sc, patch) for sc in (*pool.correct_scenes, *pool.wrong_scenes)]
    colour = torch.from_numpy(np.stack([c for c, _ in labels])).flatten(1)  # (N, G*G)
    shape = torch.from_numpy(np.stack([s for _, s in labels])).flatten(1)
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    w_colour = torch.ones(len(COLORS) + 1)
    w_shape = torch.ones(len(SHAPES) + 1)
    w_colour[0] = w_shape[0] = 0.2
    vision.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen).numpy()
        pixels, _ = image_pixels(processor, list(degrade_images(images[idx], rng, 0.5)))  # one full tile each
        feats = vision(pixel_values=pixels[:, 0]).last_hidden_state  # (B, G*G, hidden)
        logits = head(feats)  # (B, G*G, classes)
        n_col = len(COLORS) + 1
        loss = torch.nn.functional.cross_entropy(
            logits[..., :n_col].flatten(0, 1), colour[idx].flatten(), weight=w_colour
        ) + torch.nn.functional.cross_entropy(logits[..., n_col:].flatten(0, 1), shape[idx].flatten(), weight=w_shape)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            with torch.no_grad():
                obj = colour[idx] > 0
                acc_c = (logits[..., :n_col].argmax(-1) == colour[idx])[obj].float().mean()
                acc_s = (logits[..., n_col:].argmax(-1) == shape[idx])[obj].float().mean()
            logger.info(
                "vision step %d/%d loss %.4f object-patch colour acc %.2f shape acc %.2f",
                step + 1, steps, float(np.mean(losses[-10:])), float(acc_c), float(acc_s),
            )  # fmt: skip
    return losses
