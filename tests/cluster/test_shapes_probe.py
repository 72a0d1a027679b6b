"""The paired generator probe's pure parts: fixed prompt sets and the comparison table."""

from __future__ import annotations

import pytest

from cluster.shapes_probe import probe_prompts, to_markdown


def test_probe_prompts_are_fixed_balanced_and_split_apart():
    a, b = probe_prompts(90), probe_prompts(90)
    assert [m["prompt"] for m in a["train"]] == [m["prompt"] for m in b["train"]]  # same seed, same prompts
    assert len(a["train"]) == len(a["test"]) == 90
    assert not {m["prompt"] for m in a["train"]} & {m["prompt"] for m in a["test"]}
    tags = [m["tag"] for m in a["test"]]
    assert len(set(tags)) == 9 and max(tags.count(t) for t in set(tags)) < 20  # balanced, not 74 % one tag
    assert [m["prompt"] for m in probe_prompts(90, seed=1)["test"]] != [m["prompt"] for m in a["test"]]
    with pytest.raises(ValueError, match="prompts=0"):
        probe_prompts(0)


def test_table_shows_each_variant_and_its_change_from_the_first():
    split = {"accuracy": 0.2, "score": 0.4, "accuracy_by_tag": {}, "n": 10}
    results = {
        "warm start": {"train": split, "test": {**split, "accuracy": 0.1}},
        "run/step-000100": {"train": {**split, "accuracy": 0.25, "score": 0.35}, "test": split},
    }
    table = to_markdown(results)
    assert "| warm start | 20.0 | 0.400 | 10.0 | 0.400 |" in table
    assert "| run/step-000100 | 25.0 (+5.0) | 0.350 (-0.050) | 20.0 (+10.0) | 0.400 (+0.000) |" in table
