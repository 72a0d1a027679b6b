"""The benchmark table's verdicts and its doc block, from hand-made result files (no engines)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def table(tmp_path, monkeypatch):
    module = _module("table")
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def _status(rows, prefix: str) -> tuple[str, str, str]:
    (row,) = [r for r in rows if r[0].startswith(prefix)]
    return row[1], row[2], row[3]


def test_targets_are_judged_from_the_results_and_missing_files_say_so(table, tmp_path):
    (tmp_path / "trl_peer.json").write_text(json.dumps({
        "steps_per_s_ratio": 1.5, "tokens_per_s_ratio": 1.4, "r3rl": {"steps_per_s": 3.0, "tokens_per_s": 90.0},
        "trl": {"steps_per_s": 2.0, "tokens_per_s": 64.0}}))
    (tmp_path / "async_step.json").write_text(json.dumps({"async_over_sync": 0.6,
                                                          "best_async_over_sync_on_this_machine": 0.55}))
    rows = table.rows()
    assert _status(rows, "GRPO text step vs TRL") == ("1.50x (3.00 vs 2.00 steps/s)", ">= 2x", "missed")
    assert _status(rows, "one-step-off step") == ("0.60 (bound on this machine 0.55)", "<= 0.65", "met")
    assert _status(rows, "orchestration overhead") == ("no result", "<= 1.05", "no result")
    assert _status(rows, "image-side learning per second")[0] == "no result"


def test_learning_per_second_rows_read_the_curves(table, tmp_path):
    arm = {"curve": [{"step": 4, "image_s": 10.0, "gain": 0.002, "gain_se": 0.0004}], "seconds_to_gain": None}
    null = {"curve": [{"step": 4, "image_s": 11.0, "gain": -0.001, "gain_se": 0.0002}], "seconds_to_gain": None}
    (tmp_path / "image_learning.json").write_text(json.dumps({
        "gain": 0.003, "steps": 4, "probe_draws": 72, "warm_start_score": 0.0415, "arms": {
            "flow_grpo_sde": {**arm, "seconds_to_gain": 12.5, "speed_vs_sde": 1.0},
            "flow_grpo_cps": {**arm, "seconds_to_gain": 6.25, "speed_vs_sde": 2.0},
            "diffusion_nft": {**arm, "speed_vs_sde": None}, "null": null}}))
    rows = table.rows()
    assert _status(rows, "  FlowGRPO, SDE: image-side seconds")[0] == "12.5 s; final +0.0020 ± 0.0004 after 4 steps (10.0 s)"
    assert _status(rows, "  null arm")[0] == "-0.0010 ± 0.0002 after 4 steps (11.0 s)"
    assert _status(rows, "  DiffusionNFT: image-side seconds")[0].startswith("not reached; final +0.0020")
    assert _status(rows, "  learning per second vs FlowGRPO SDE")[0] == (
        "flow_grpo_cps: 2.00x, diffusion_nft: gain not reached")


def test_seconds_to_gain_interpolates_between_probes():
    with mock.patch.dict(os.environ):  # bench/common sets the benchmarks' environment on import: keep it out
        learning = _module("image_learning")
    curve = [{"image_s": 10.0, "gain": 0.001}, {"image_s": 20.0, "gain": 0.003}, {"image_s": 30.0, "gain": 0.005}]
    assert learning.seconds_to_gain(curve, 0.002) == pytest.approx(15.0)  # halfway between the first two probes
    assert learning.seconds_to_gain(curve, 0.0005) == pytest.approx(5.0)  # from the warm start (0 s, gain 0)
    assert learning.seconds_to_gain(curve, 0.005) == pytest.approx(30.0)
    assert learning.seconds_to_gain(curve, 0.006) is None
    dip = [{"image_s": 10.0, "gain": 0.004}, {"image_s": 20.0, "gain": 0.001}, {"image_s": 30.0, "gain": 0.004}]
    assert learning.seconds_to_gain(dip, 0.004) == pytest.approx(10.0)  # the first crossing counts


def test_write_doc_replaces_only_the_marked_block(table, tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"intro\n{table.BEGIN}\nold table\n{table.END}\noutro\n")
    monkeypatch.setattr(table, "DOC", doc)
    monkeypatch.setattr(table, "ROOT", tmp_path)
    table.main(["--write-doc"])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| figure | measured | target | status |" in text


def test_linear_fit_recovers_a_line_and_flags_a_curve():
    with mock.patch.dict(os.environ):  # bench/common sets the benchmarks' environment on import: keep it out
        common = _module("common")
    line = common.linear_fit([4, 8, 16], [1.0 + 0.5 * g for g in (4, 8, 16)])
    assert line["slope_s"] == pytest.approx(0.5) and line["intercept_s"] == pytest.approx(1.0)
    assert line["r2"] == pytest.approx(1.0)
    curve = common.linear_fit([1, 2, 3, 4], [1.0, 4.0, 9.0, 16.0])
    assert curve["r2"] < 1.0 and curve["max_rel_residual"] > 0.1
