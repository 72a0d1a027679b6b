"""Trajectory records: what rollout produces and learners consume, with an explicit Arrow schema.

Everything a learner needs to recompute a log-probability is stored here, together with the weight
version the sample was drawn with (so one-step-off training knows how stale a sample is).
Images are stored as PNG bytes in parquet; tensors as flat float32 lists plus their shape.
Pure: imports numpy, pyarrow and PIL only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "TextSample",
    "ImageSample",
    "Round",
    "Trajectory",
    "TRAJECTORY_SCHEMA",
    "trajectories_to_table",
    "table_to_trajectories",
    "write_trajectories",
    "read_trajectories",
    "png_bytes",
    "image_from_png",
]


@dataclass
class TextSample:
    """One sampled answer of the reasoner.

    `logprobs[i]` is the log-probability of `answer_ids[i]` under the distribution it was
    sampled from (temperature applied), as returned by the engine.
    """

    prompt_ids: list[int]
    answer_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"
    weight_version: int = 0


@dataclass
class ImageSample:
    """One generated or edited image plus what the learner needs to recompute its SDE log-probs.

    Shapes (S = number of stochastic steps stored, L = latent tokens, C = packed channels):
      latents       (S, L, C)  the latent before each stochastic step
      next_latents  (S, L, C)  the latent after it
      sigmas, sigmas_next, log_probs, step_indices: (S,)
      source_latents (Ls, C) packed latents of the source image when editing, else None
      prompt_embeds (T, D) / pooled_embeds (P,): the text conditioning used by the sampler
      final_latents (L, C)  the clean packed latent the image was decoded from (DiffusionNFT trains on it)
    """

    image: np.ndarray  # (H, W, 3) uint8
    prompt: str
    seed: int
    noise_level: float
    latents: np.ndarray | None = None
    next_latents: np.ndarray | None = None
    sigmas: np.ndarray | None = None
    sigmas_next: np.ndarray | None = None
    log_probs: np.ndarray | None = None
    step_indices: np.ndarray | None = None
    source_image: np.ndarray | None = None
    source_latents: np.ndarray | None = None
    prompt_embeds: np.ndarray | None = None
    pooled_embeds: np.ndarray | None = None
    final_latents: np.ndarray | None = None
    guidance: float = 1.0
    weight_version: int = 0


@dataclass
class Round:
    """One round of R3: round 0 plans and generates; later rounds reflect and edit (or stop)."""

    index: int
    stage: str  # "generate" | "refine" | "eval"
    text: TextSample | None = None
    image: ImageSample | None = None
    score: float = 0.0
    correct: bool = False
    stopped: bool = False
    well_formed: bool = False
    instruction: str = ""
    text_reward: float = 0.0
    image_reward: float = 0.0
    text_advantage: float = 0.0
    image_advantage: float = 0.0
    judge_details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    prompt: str
    metadata: dict[str, Any]
    group_id: int = 0
    rounds: list[Round] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- schema

_TENSOR = pa.struct([("shape", pa.list_(pa.int64())), ("data", pa.list_(pa.float32()))])
_TEXT = pa.struct(
    [
        ("prompt_ids", pa.list_(pa.int64())),
        ("answer_ids", pa.list_(pa.int64())),
        ("logprobs", pa.list_(pa.float64())),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("weight_version", pa.int64()),
    ]
)
_IMAGE_TENSORS = (
    "latents",
    "next_latents",
    "sigmas",
    "sigmas_next",
    "log_probs",
    "step_indices",
    "source_latents",
    "prompt_embeds",
    "pooled_embeds",
    "final_latents",
)
_IMAGE = pa.struct(
    [
        ("png", pa.binary()),
        ("source_png", pa.binary()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("noise_level", pa.float64()),
        ("guidance", pa.float64()),
        ("weight_version", pa.int64()),
    ]
    + [(name, _TENSOR) for name in _IMAGE_TENSORS]
)
_ROUND = pa.struct(
    [
        ("index", pa.int64()),
        ("stage", pa.string()),
        ("text", _TEXT),
        ("image", _IMAGE),
        ("score", pa.float64()),
        ("correct", pa.bool_()),
        ("stopped", pa.bool_()),
        ("well_formed", pa.bool_()),
        ("instruction", pa.string()),
        ("text_reward", pa.float64()),
        ("image_reward", pa.float64()),
        ("text_advantage", pa.float64()),
        ("image_advantage", pa.float64()),
        ("judge_details_json", pa.string()),
    ]
)
TRAJECTORY_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("metadata_json", pa.string()),
        ("group_id", pa.int64()),
        ("rounds", pa.list_(_ROUND)),
    ]
)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of an (H, W, 3) uint8 array."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_from_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()


def trajectories_to_table(trajectories: list[Trajectory]) -> pa.Table:
    rows = [
        {
            "prompt": t.prompt,
            "metadata_json": _dumps(t.metadata),
            "group_id": t.group_id,
            "rounds": [_round_to_row(r) for r in t.rounds],
        }
        for t in trajectories
    ]
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


def table_to_trajectories(table: pa.Table) -> list[Trajectory]:
    import json

    out = []
    for row in table.to_pylist():
        out.append(
            Trajectory(
                prompt=row["prompt"],
                metadata=json.loads(row["metadata_json"]),
                group_id=row["group_id"],
                rounds=[_round_from_row(r) for r in row["rounds"]],
            )
        )
    return out


def write_trajectories(path: str | Path, trajectories: list[Trajectory]) -> None:
    pq.write_table(trajectories_to_table(trajectories), str(path))


def read_trajectories(path: str | Path) -> list[Trajectory]:
    return table_to_trajectories(pq.read_table(str(path)))


# ------------------------------------------------------------------------------------ helpers


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def _tensor_to_row(arr: np.ndarray | None) -> dict | None:
    if arr is None:
        return None
    arr = np.asarray(arr)
    return {"shape": list(arr.shape), "data": arr.astype(np.float32).ravel().tolist()}


def _tensor_from_row(row: dict | None) -> np.ndarray | None:
    if row is None:
        return None
    return np.asarray(row["data"], dtype=np.float32).reshape(row["shape"])


def _round_to_row(r: Round) -> dict:
    text = None
    if r.text is not None:
        t = r.text
        text = {
            "prompt_ids": list(t.prompt_ids),
            "answer_ids": list(t.answer_ids),
            "logprobs": [float(x) for x in t.logprobs],
            "text": t.text,
            "finish_reason": t.finish_reason,
            "weight_version": t.weight_version,
        }
    image = None
    if r.image is not None:
        s = r.image
        image = {
            "png": png_bytes(s.image),
            "source_png": png_bytes(s.source_image) if s.source_image is not None else None,
            "prompt": s.prompt,
            "seed": s.seed,
            "noise_level": s.noise_level,
            "guidance": s.guidance,
            "weight_version": s.weight_version,
        }
        for name in _IMAGE_TENSORS:
            image[name] = _tensor_to_row(getattr(s, name))
    return {
        "index": r.index,
        "stage": r.stage,
        "text": text,
        "image": image,
        "score": r.score,
        "correct": r.correct,
        "stopped": r.stopped,
        "well_formed": r.well_formed,
        "instruction": r.instruction,
        "text_reward": r.text_reward,
        "image_reward": r.image_reward,
        "text_advantage": r.text_advantage,
        "image_advantage": r.image_advantage,
        "judge_details_json": _dumps(r.judge_details),
    }


def _round_from_row(row: dict) -> Round:
    import json

    text = None
    if row["text"] is not None:
        text = TextSample(**row["text"])
    image = None
    if row["image"] is not None:
        im = row["image"]
        image = ImageSample(
            image=image_from_png(im["png"]),
            source_image=image_from_png(im["source_png"]) if im["source_png"] else None,
            prompt=im["prompt"],
            seed=im["seed"],
            noise_level=im["noise_level"],
            guidance=im["guidance"],
            weight_version=im["weight_version"],
            **{name: _tensor_from_row(im.get(name)) for name in _IMAGE_TENSORS},  # files before final_latents lack it
        )
    fields = {k: row[k] for k in row if k not in ("text", "image", "judge_details_json")}
    return Round(text=text, image=image, judge_details=json.loads(row["judge_details_json"]), **fields)
