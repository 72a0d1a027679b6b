"""One-step-off checkpoints store the rollout made ahead for the next step, exactly and pickle-free.

The end-to-end half (2 async steps + checkpoint + resume + 2 steps == 4 async steps, bitwise) is
`test_one_step_off_overlaps_is_at_most_one_version_stale_and_resumes_exactly` in test_operations.py.
"""

import dataclasses

import numpy as np

from cluster.checkpoint import load_pending_rollout, save_pending_rollout
from cluster.r3_step import ImageItem, StepResult, TextItem
from rollout.trajectory import ImageSample, Round, TextSample, Trajectory


def _result() -> StepResult:
    rng = np.random.default_rng(0)
    trajs, texts, images = [], [], []
    for g in range(2):
        img0 = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        text = TextSample([5, 6, 7], [8, 9], [-0.123456789012345, -1e-12], f"plan {g}", "length", weight_version=3)
        sample = ImageSample(
            img0, f"prompt {g}", seed=11 + g, noise_level=0.7,
            latents=rng.standard_normal((2, 4, 16)).astype(np.float32),
            next_latents=rng.standard_normal((2, 4, 16)).astype(np.float32),
            sigmas=np.array([1.0, 0.5], np.float32), sigmas_next=np.array([0.5, 0.25], np.float32),
            log_probs=rng.standard_normal(2).astype(np.float32), step_indices=np.array([0, 1], np.int64),
            prompt_embeds=rng.standard_normal((3, 8)).astype(np.float32),
            pooled_embeds=rng.standard_normal(8).astype(np.float32), guidance=3.5, weight_version=3,
        )
        r0 = Round(0, "generate", text=text, image=sample, score=0.25 + g, correct=bool(g), well_formed=True,
                   text_reward=0.5, image_reward=0.25, text_advantage=-0.7071067811865476,
                   judge_details={"answer": "yes", "probs": [0.1, 0.9]})
        edit = dataclasses.replace(sample, source_image=img0, source_latents=np.ones((4, 16), np.float32))
        r1 = Round(1, "refine", text=dataclasses.replace(text, text="no further edit needed"), image=edit,
                   stopped=True, instruction="")
        trajs.append(Trajectory(f"prompt {g}", {"tag": "counting", "include": [{"class": "cat", "count": 2}]},
                                group_id=g, rounds=[r0, r1]))
        texts.append(TextItem(r1.text, 0.5, 1.0, images=(img0,), stage="refine", group=g))
        images.append(ImageItem(sample, -1.25, 0.25, stage="generate", group=g))
    return StepResult(5, ["refine"], trajs, texts, images, {"refine/score_mean": 0.75, "buffer/size": 4.0})


def _same(a, b, path="result"):
    """Deep equality that also checks array dtypes and Python types (a float must stay a float)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def test_pending_rollout_round_trips_exactly(tmp_path):
    result = _result()
    save_pending_rollout(tmp_path / "pending", result, rollout_seconds=12.5)
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == ["rollout.json", "rollout.safetensors"]
    loaded, seconds = load_pending_rollout(tmp_path / "pending")
    assert seconds == 12.5
    _same(result, loaded)
    assert loaded.text_batch[0].sample.weight_version == 3  # behaviour version survives (staleness check)
