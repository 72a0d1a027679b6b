"""`python -m examples.shapesworld.warm_room` on the shipped warm start: the classes of the samples an
arms run would probe, consistent with the accuracy it prints (integration: real generator, real judge)."""

from __future__ import annotations

import json

import pytest

CONFIG = "examples/shapesworld/configs/shapes_cpu.yaml"


@pytest.mark.integration
def test_warm_room_splits_the_arms_training_samples_by_class(tmp_path, capsys):
    from cluster.config import load_config
    from examples.shapesworld.arms import fixed_prompt_sets
    from examples.shapesworld.warm_room import main

    assert main(["--config", CONFIG, "--train-prompts", "9", "--per-tag", "2", "--out", str(tmp_path / "room.json")]) == 0
    room = json.loads((tmp_path / "room.json").read_text())
    cfg = load_config(CONFIG, ["data.limit=9", "data.eval_limit=null", "data.eval_per_category=2"])
    prompts = fixed_prompt_sets(cfg, 2)
    assert room["samples"] == {"train": len(prompts["train"]), "test": len(prompts["test"])} == {"train": 18, "test": 18}
    classes = room["classes"]
    assert [c["name"] for c in classes] == ["never", "sometimes", "always"]
    assert sum(c["prompts"] for c in classes) == len({m["prompt"] for m in prompts["train"]})
    assert sum(c["share"] for c in classes) == pytest.approx(1.0)
    right = sum(c["share"] * c["right"] for c in classes if c["prompts"])
    assert right == pytest.approx(room["accuracy"]["train"])  # the classes partition the samples
    never = next(c for c in classes if c["name"] == "never")
    assert never["prompts"] == 0 or never["right"] == 0.0
    out = capsys.readouterr().out
    assert "| warm start draws it right | prompts | share of samples | right % |" in out
    assert f"{100 * room['accuracy']['train']:.1f} % right on 18 samples of the training prompts" in out


def test_warm_room_refuses_bad_arguments_naming_them(capsys):
    from examples.shapesworld.warm_room import main

    assert main(["--config", CONFIG, "--per-tag", "0"]) == 2
    assert "--per-tag 0" in capsys.readouterr().err
    assert main(["--config", CONFIG, "models.generator.path=/no/such/folder"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
