"""`python -m cluster.generate`: one prompt through the policy, each round's image and an HTML report.

The integration tests run the command on the tiny models (a local Ray cluster, the evaluation's
workers and judge), and on a checkpoint of perturbed tiny models, whose weights must draw round 0;
the unit tests check argument errors (exit 2 before any engine starts) and
the report's escaping on a hand-made trajectory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.generate import main, write_outputs
from rollout.trajectory import ImageSample, Round, TextSample, Trajectory, image_from_png

ROOT = Path(__file__).resolve().parents[2]
NASTY = 'a red <b>cube</b> & "sphere" <script>alert(1)</script>'


def _round(index: int, text: str, stopped: bool = False) -> Round:
    image = None if stopped else ImageSample(np.full((8, 8, 3), 40 * index, np.uint8), "p", seed=index,
                                             noise_level=0.0)
    return Round(index, "eval", text=TextSample([1], [2], [-0.1], text), image=image, score=0.25 * index,
                 correct=False, stopped=stopped, well_formed=True, instruction="draw it")


def test_outputs_escape_text_and_keep_every_round(tmp_path):
    trajectory = Trajectory(NASTY, {}, 0, [_round(0, "<img src=x onerror=alert(2)>"), _round(1, "<i>edit</i>"),
                                           _round(2, "done", stopped=True)])
    pngs = write_outputs(tmp_path, trajectory, seed=3, checkpoint=None, version=0)
    assert [p.name for p in pngs] == ["round_0.png", "round_1.png"]
    assert (image_from_png(pngs[1].read_bytes()) == 40).all()
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["index"] for r in rounds["rounds"]] == [0, 1, 2]
    assert [r["image"] for r in rounds["rounds"]] == ["round_0.png", "round_1.png", None]
    assert rounds["stopped"] and rounds["prompt"] == NASTY and rounds["rounds"][0]["text"].startswith("<img")
    report = (tmp_path / "report.html").read_text()
    for raw in ("<b>cube</b>", "<script>alert(1)", "<img src=x", "<i>edit"):
        assert raw not in report
    assert "&lt;b&gt;cube&lt;/b&gt;" in report and "&lt;img src=x onerror=alert(2)&gt;" in report


@pytest.mark.parametrize("args,message", [
    (["   "], "prompt is empty"),
    (["a cat", "--rounds", "9"], "--rounds 9"),
    (["a cat", "--rounds", "0"], "--rounds 0"),
    (["a cat", "--config", "no/such.yaml"], "does not exist"),
    (["a cat", "--config", "configs/cpu_tiny.yaml", "serve.max_prompt_chars=0"], "serve.max_prompt_chars"),
    (["a cat", "--config", "configs/cpu_tiny.yaml", "--checkpoint", "no/such/checkpoint"], "no/such/checkpoint"),
])
def test_bad_arguments_exit_2_before_engines(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def _generate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.generate", NASTY, "--config", "configs/cpu_tiny.yaml", "--seed", "5",
           "--out", str(out), "flow_grpo.eval_num_steps=2", "flow_grpo.edit_num_steps=2", "grpo.max_tokens=16",
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_the_policy_serves_the_generator_weights_evaluation_uses(tmp_path):
    """With flow_grpo.ema_decay > 0 the app and cluster.generate load the checkpoint's EMA, as cluster.eval does;
    a run without one loads the live weights, and a checkpoint that lacks the EMA it should have is refused."""
    from cluster.config import load_config
    from cluster.policy_session import PolicySession

    checkpoint = tmp_path / "step-000002"
    (checkpoint / "diffusion_learner" / "weights").mkdir(parents=True)
    live = PolicySession(load_config(None, []), checkpoint)
    assert live._generator_weights() == checkpoint / "diffusion_learner" / "weights"
    ema = PolicySession(load_config(None, ["flow_grpo.ema_decay=0.9"]), checkpoint)
    with pytest.raises(ValueError, match="no EMA weights"):
        ema._generator_weights()
    (checkpoint / "diffusion_learner" / "ema_weights").mkdir()
    assert ema._generator_weights() == checkpoint / "diffusion_learner" / "ema_weights"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Three rounds on the config's tiny models: (stdout, output folder)."""
    out = tmp_path_factory.mktemp("generate") / "out"
    return _generate(out, "--rounds", "3").stdout, out


@pytest.mark.integration
def test_generate_writes_rounds_and_report(base_run):
    stdout, out = base_run
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds["prompt"] == NASTY and rounds["seed"] == 5 and rounds["weight_version"] == 0
    got = rounds["rounds"]
    assert 1 <= len(got) <= 3 and [r["index"] for r in got] == list(range(len(got)))
    printed = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("round ")]
    assert printed == [f"round {r['index']}" for r in got]  # one line per round, as each finished
    for r in got:
        if r["stopped"]:
            assert r["image"] is None
        else:
            assert image_from_png((out / r["image"]).read_bytes()).shape == (64, 64, 3)
    report = (out / "report.html").read_text()
    assert "&lt;b&gt;cube&lt;/b&gt;" in report and "<script>alert(1)" not in report
    assert report.count('class="round-image"') == sum(not r["stopped"] for r in got)


@pytest.mark.integration
def test_checkpoint_weights_reach_the_workers(base_run, tiny_models, perturb_weights, tmp_path):
    """A checkpoint's weights (here: the tiny models plus noise, at version 3) draw round 0 instead of the config's."""
    from cluster.checkpoint import COMPLETE

    ck = tmp_path / "run" / "checkpoints" / "step-000003"
    perturb_weights(tiny_models.vlm, ck / "text_learner" / "weights", seed=3)
    perturb_weights(tiny_models.flux / "transformer", ck / "diffusion_learner" / "weights", seed=4)
    (ck / "meta.json").write_text(json.dumps({"step": 3, "version": 3}))
    (ck / COMPLETE).write_text("ok\n")
    out = tmp_path / "out"
    _generate(out, "--rounds", "1", "--checkpoint", str(ck))
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds["weight_version"] == 3 and rounds["checkpoint"] == str(ck.resolve())
    base = image_from_png((base_run[1] / "round_0.png").read_bytes())
    trained = image_from_png((out / "round_0.png").read_bytes())
    assert base.shape == trained.shape and not np.array_equal(base, trained)  # same seed, other weights
