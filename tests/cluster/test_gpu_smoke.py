"""The GPU smoke test's parts that need no GPU: its config, its verdicts per role, its refusal without CUDA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from cluster.gpu_smoke import CPU_ONLY_ENV, ROLES, format_verdicts, main, role_verdicts, smoke_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "gpu_smoke.yaml"
GPU_ROLES = ("text_workers", "diffusion_workers", "judge_replicas", "text_learners", "diffusion_learners")


def test_the_smoke_config_validates_and_shares_one_gpu():
    cfg = load_config(CONFIG)
    shares = [getattr(cfg.cluster, r).num_gpus for r in GPU_ROLES]
    assert all(0 < s < 1 for s in shares) and sum(shares) <= 1, shares
    assert [getattr(cfg.cluster, r).count for r in GPU_ROLES] == [1] * 5
    assert (cfg.train.steps, cfg.train.eval_every, cfg.sync.method) == (2, 0, "broadcast")
    assert cfg.models.reasoner.dtype == cfg.models.generator.dtype == "bfloat16"
    # two vLLM engines share the GPU: together they may not ask for more than it has
    assert cfg.models.reasoner.gpu_memory_utilization + cfg.judge.gpu_memory_utilization <= 0.5


def test_the_smoke_config_passes_the_dry_run(capsys):
    from cluster.train import main as train_main

    assert train_main(["--config", str(CONFIG), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total at most: CPU 5, GPU 1" in out and "dry run: no engines started" in out
    # on a declared 80 GB GPU the memory plan uses the config's vLLM memory shares and everything fits
    assert train_main(["--config", str(CONFIG), "--dry-run",
                       "cluster.hardware={nodes: 1, gpus_per_node: 1, gpu_memory_gb: 80}"]) == 0
    out = capsys.readouterr().out
    assert out.count("KV cache budget 0.2 x ") == 2 and out.count(" GB: fits") == 5


# ---- verdicts on a fake run folder -------------------------------------------------------------------


def _row(step: int) -> dict:
    v = step + 1
    return {"step": step, "samples/text": 8, "format_rate": 0.5, "samples/image": 8, "score_mean": 0.4,
            "judge/errors": 0.0, "text_learner/num_tokens": 120.0, "text_learner/loss": 0.1,
            "text_learner/grad_norm": 0.3, "text_learner/skipped_nonfinite": 0.0, "diffusion_learner/num_images": 8.0,
            "diffusion_learner/loss": -0.02, "diffusion_learner/grad_norm": 0.01,
            "diffusion_learner/skipped_nonfinite": 0.0, "version/policy": v, "version/text_workers_min": v,
            "version/diffusion_workers_min": v, "sync/text_bytes": 2.3e6, "sync/image_bytes": 3.9e5}


@pytest.fixture
def run_folder(tmp_path):
    """A run folder as a good two-step GPU run leaves it; `write(rows=..., config=..., eval=...)` rewrites parts."""

    def write(rows=None, config=None, report=None):
        rows = [_row(0), _row(1)] if rows is None else rows
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = config or yaml.safe_load(CONFIG.read_text())
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        (tmp_path / "eval-final").mkdir(exist_ok=True)
        report = report or {"num_prompts": 4, "overall": [{"round": 0, "accuracy": 0.25, "errors": 0},
                                                          {"round": 1, "accuracy": 0.5, "errors": 0}]}
        (tmp_path / "eval-final" / "eval.json").write_text(json.dumps(report))
        return tmp_path

    return write


def _by_role(verdicts):
    return {v.role: v for v in verdicts}


def test_a_good_run_passes_every_role_with_its_evidence(run_folder):
    verdicts = role_verdicts(run_folder(), steps=2)
    assert [v.role for v in verdicts] == list(ROLES)
    assert all(v.passed for v in verdicts), format_verdicts(verdicts)
    got = _by_role(verdicts)
    assert got["text worker"].evidence == "answers per step [8, 8], format rate [0.5, 0.5] on 0.2 GPU"
    assert got["text learner"].evidence == "tokens [120, 120], loss [0.1, 0.1], grad norm [0.3, 0.3] on 0.2 GPU"
    assert "(broadcast over gloo / gloo)" in got["sync"].evidence  # fractions of one GPU: NCCL cannot be used
    assert got["eval"].evidence == "4 prompts, accuracy per round [0.250, 0.500]"
    assert format_verdicts(verdicts).splitlines()[-1] == "gpu smoke: PASS"


@pytest.mark.parametrize(
    ("change", "role", "message"),
    [
        ({"text_learner/loss": float("nan")}, "text learner", "step 1: text_learner/loss=nan"),
        ({"diffusion_learner/skipped_nonfinite": 1.0}, "diffusion learner", "diffusion_learner/skipped_nonfinite=1.0"),
        ({"judge/errors": 3.0}, "judge", "judge/errors=3.0 (want 0)"),
        ({"samples/text": 0}, "text worker", "samples/text=0 (want > 0)"),
        ({"samples/image": 0}, "diffusion worker", "samples/image=0 (want > 0)"),
        ({"version/diffusion_workers_min": 1}, "sync", "version/diffusion_workers_min=1 (want 2)"),
        ({"sync/text_bytes": 0}, "sync", "sync/text_bytes=0 (want > 0)"),
    ],
)
def test_a_bad_number_fails_its_role_only_and_names_it(run_folder, change, role, message):
    verdicts = _by_role(role_verdicts(run_folder(rows=[_row(0), {**_row(1), **change}]), steps=2))
    assert not verdicts[role].passed and message in verdicts[role].evidence
    assert all(v.passed for r, v in verdicts.items() if r != role)


def test_a_role_that_ran_on_the_cpu_fails_unless_allowed(run_folder):
    config = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    config["cluster"]["diffusion_learners"]["num_gpus"] = 0.0
    folder = run_folder(config=config)
    got = _by_role(role_verdicts(folder, steps=2))
    assert not got["diffusion learner"].passed
    assert "cluster.diffusion_learners.num_gpus=0.0: ran on the CPU" in got["diffusion learner"].evidence
    assert _by_role(role_verdicts(folder, steps=2, require_gpu=False))["diffusion learner"].passed


def test_missing_steps_or_files_fail_with_what_is_missing(run_folder):
    folder = run_folder(rows=[_row(0)])
    verdicts = role_verdicts(folder, steps=2)
    assert [v.passed for v in verdicts] == [False] * 6 + [True]
    assert verdicts[0].evidence == "metrics.jsonl has 1 step rows, expected 2"
    (folder / "metrics.jsonl").unlink()
    (folder / "eval-final" / "eval.json").unlink()
    verdicts = role_verdicts(folder, steps=2)
    assert not any(v.passed for v in verdicts)
    assert "no metrics.jsonl in the run folder" in verdicts[0].evidence
    assert "no eval-final/eval.json" in verdicts[-1].evidence
    assert "FAIL (7 of 7 roles" in format_verdicts(verdicts)


def test_an_evaluation_with_errors_or_missing_rounds_fails(run_folder):
    one_round = {"num_prompts": 4, "overall": [{"round": 0, "accuracy": 0.25, "errors": 2}]}
    got = _by_role(role_verdicts(run_folder(report=one_round), steps=2))["eval"]
    assert not got.passed
    assert "1 rounds reported, train.eval_rounds=2" in got.evidence and "2 judge errors" in got.evidence


def test_verdict_only_mode_reads_the_steps_from_the_run_config(run_folder, capsys):
    folder = run_folder()
    assert main(["--verdict-only", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "gpu smoke: PASS"
    (folder / "metrics.jsonl").write_text(json.dumps(_row(0)) + "\n")
    assert main(["--verdict-only", str(folder)]) == 1


# ---- the runner without a GPU ------------------------------------------------------------------------


def test_without_cuda_it_says_why_and_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here: the smoke test would run")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu smoke: not run: torch ") and "make gpu-setup" in err


def test_the_run_never_inherits_cpu_only_settings():
    env = smoke_env({"DS_ACCELERATOR": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "PATH": "/bin", "PYTHONPATH": "/x"})
    assert not set(CPU_ONLY_ENV) & set(env)
    assert env["PATH"] == "/bin" and env["PYTHONPATH"] == f"{ROOT}:/x" and env["HF_HUB_OFFLINE"] == "1"


# ---- the runner around a stand-in for cluster.train ------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path, run_folder):
    """`main` as on a GPU machine, with `sys.executable` replaced by `fake_gpu(script_body)`: a Python
    script that receives cluster.train's arguments (sys.argv) instead of a real run."""
    import sys

    import torch

    import actors.models
    import cluster.gpu_smoke as smoke

    monkeypatch.setattr(smoke, "cuda_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Stand-in GPU")
    monkeypatch.setattr(actors.models, "build_tiny_models", lambda: None)
    good = run_folder()  # a good run's files, to copy into the folder the runner names

    def make(body: str) -> Path:
        script = tmp_path / "python"
        script.write_text(f"#!{sys.executable}\nimport shutil, sys, time\nGOOD = {str(good)!r}\n{body}\n")
        script.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(script))
        return script

    return make


def test_the_runner_passes_a_good_run_and_reports_its_folder(fake_gpu, tmp_path, capsys):
    fake_gpu("args = dict(a.split('=', 1) for a in sys.argv if '=' in a)\n"
             "shutil.copytree(GOOD, args['train.run_dir'] + '/' + args['train.run_name'])")
    assert main(["--run-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpu smoke on Stand-in GPU") and "gpu smoke: PASS" in out
    assert "training run: exit status 0" in out and str(tmp_path / "runs" / "gpu-smoke-") in out


def test_a_run_past_the_timeout_is_stopped_and_fails(fake_gpu, tmp_path, capsys):
    fake_gpu("time.sleep(600)")
    assert main(["--run-dir", str(tmp_path / "runs"), "--timeout-s", "2"]) == 1
    out = capsys.readouterr().out
    assert "training run: timed out" in out and "no metrics.jsonl in the run folder" in out
    assert "(no engine.log)" in out


def test_a_failed_run_prints_its_last_error_lines(fake_gpu, tmp_path, capsys):
    fake_gpu("args = dict(a.split('=', 1) for a in sys.argv if '=' in a)\n"
             "run = args['train.run_dir'] + '/' + args['train.run_name']\n"
             "shutil.copytree(GOOD, run)\n"
             "open(run + '/engine.log', 'w').write('ok\\nValueError: NCCL error: duplicate GPU\\n')\n"
             "sys.exit(3)")
    assert main(["--run-dir", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert "training run: exit status 3" in out and out.rstrip().endswith("ValueError: NCCL error: duplicate GPU")
