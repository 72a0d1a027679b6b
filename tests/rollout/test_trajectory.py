"""Parquet round-trip of trajectory records is lossless."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from rollout.trajectory import (
    TRAJECTORY_SCHEMA,
    ImageSample,
    Round,
    TextSample,
    Trajectory,
    png_bytes,
    read_trajectories,
    write_trajectories,
)


def _traj(rng: np.random.Generator, gid: int) -> Trajectory:
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    text = TextSample([1, 2, 3], [4, 5], [-0.25, -1.5], "<think>x</think>a red cube", "length", 3)
    image = ImageSample(
        image=img, prompt="a red cube", seed=7, noise_level=0.7,
        latents=rng.standard_normal((2, 4, 8)).astype(np.float32),
        next_latents=rng.standard_normal((2, 4, 8)).astype(np.float32),
        sigmas=np.array([1.0, 0.5], np.float32), sigmas_next=np.array([0.5, 0.25], np.float32),
        log_probs=np.array([-1.25, 2.5], np.float32), step_indices=np.array([0, 3], np.float32),
        source_image=img[::-1].copy(), source_latents=rng.standard_normal((4, 8)).astype(np.float32),
        prompt_embeds=rng.standard_normal((5, 3)).astype(np.float32),
        pooled_embeds=rng.standard_normal((3,)).astype(np.float32), guidance=3.5, weight_version=3,
    )
    r0 = Round(0, "generate", text=text, image=image, score=0.5, correct=False, well_formed=True,
               text_reward=1.5, image_reward=0.5, text_advantage=-0.25, judge_details={"n": [1, 2]})
    r1 = Round(1, "refine", text=text, image=None, stopped=True, instruction="no further edit needed")
    return Trajectory("a red cube", {"tag": "colors", "include": [{"class": "cube", "count": 1}]}, gid, [r0, r1])


def test_parquet_round_trip_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    trajs = [_traj(rng, g) for g in range(3)]
    path = tmp_path / "t.parquet"
    write_trajectories(path, trajs)
    assert pq.read_schema(path).equals(TRAJECTORY_SCHEMA)
    back = read_trajectories(path)
    assert len(back) == 3
    for a, b in zip(trajs, back, strict=True):
        assert (a.prompt, a.metadata, a.group_id) == (b.prompt, b.metadata, b.group_id)
        for ra, rb in zip(a.rounds, b.rounds, strict=True):
            assert ra.text == rb.text
            assert (ra.score, ra.stopped, ra.instruction, ra.judge_details) == (rb.score, rb.stopped, rb.instruction, rb.judge_details)
            if ra.image is None:
                assert rb.image is None
                continue
            for name in ("image", "source_image", "latents", "next_latents", "sigmas", "log_probs", "source_latents",
                         "prompt_embeds", "pooled_embeds", "step_indices", "sigmas_next"):
                np.testing.assert_array_equal(getattr(ra.image, name), getattr(rb.image, name), err_msg=name)
            assert rb.image.image.dtype == np.uint8 and rb.image.weight_version == 3


def test_png_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 3), np.float32))
