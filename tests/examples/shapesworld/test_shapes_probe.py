"""The paired generator probe's pure parts: fixed prompt sets and the comparison table."""

from __future__ import annotations

import pytest

from examples.shapesworld.probe import probe_prompts, to_markdown


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


class _Editor:
    """A stand-in for the diffusion worker's edit calls: draws request `seed`'s task correctly
    when `fixes` says so, else returns the source unchanged; records every request."""

    def __init__(self, metas, fixes_on_round):
        self.metas, self.fixes_on_round, self.calls = metas, fixes_on_round, []

    def sample(self, reqs, settings):
        from types import SimpleNamespace

        import numpy as np

        from examples.shapesworld.render import render_correct

        self.calls.append(list(reqs))
        fix = len(self.calls) in self.fixes_on_round
        return [
            SimpleNamespace(
                image=render_correct(self.metas[r.seed], np.random.default_rng(0)).image
                if fix
                else r.source_image
            )
            for r in reqs
        ]


def test_oracle_edits_only_what_the_judge_finds_wrong_with_its_fix():
    import numpy as np

    from examples.shapesworld.fixes import fixing_instruction
    from examples.shapesworld.judge import ShapesJudge
    from examples.shapesworld.probe import _oracle_r3
    from examples.shapesworld.render import render_correct, render_wrong

    metas = probe_prompts(8)["test"]
    rng = np.random.default_rng(0)
    images = [(render_correct if k < 2 else render_wrong)(m, rng).image for k, m in enumerate(metas)]
    editor = _Editor(metas, fixes_on_round={2})
    out = _oracle_r3(editor, None, images, metas, rounds=3)
    assert out["accuracy_by_round"] == [
        0.25,
        0.25,
        1.0,
        1.0,
    ]  # round 1's edit changed nothing; round 2's fixed all
    assert [len(c) for c in editor.calls] == [
        6,
        6,
    ]  # the 2 correct images are never edited; none left after round 2
    first = editor.calls[0]
    assert [r.seed for r in first] == list(range(2, 8))
    judge = ShapesJudge()
    assert [r.prompt for r in first] == [
        fixing_instruction(metas[r.seed], judge.detect(images[r.seed])) for r in first
    ]
    assert {r.noise_seed for r in editor.calls[0]}.isdisjoint(r.noise_seed for r in editor.calls[1])
    assert out["accuracy"] == 1.0 and out["n"] == 8
