"""GPU smoke test: `python -m cluster.gpu_smoke` (`make gpu-smoke`) on one CUDA GPU.

Runs `cluster.train` with `configs/gpu_smoke.yaml` (tiny models; every role holds a fraction of the one
GPU: vLLM reasoner, diffusers generator, vLLM judge on Serve, DeepSpeed learners, bucketed weight
sync; two steps and a final evaluation), then reads the run folder and prints PASS or FAIL per role
with the numbers that decided it. Exit status: 0 every role passed; 1 a role failed (or the run
did, or it ran past --timeout-s); 2 no usable CUDA GPU here (the message says why).

`role_verdicts` is the pure part: run folder files -> one verdict per role (docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rollout.sync_ranks import sync_backend

__all__ = ["ROLES", "Verdict", "role_verdicts", "format_verdicts", "main"]

ROLES = ("text worker", "diffusion worker", "judge", "text learner", "diffusion learner", "sync", "eval")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "gpu_smoke.yaml"
# CPU-only settings (the Makefile exports them for the CPU stack): on a GPU they would put the learners on
# the CPU (DS_ACCELERATOR) or change how vLLM runs, so the smoke run never inherits them
CPU_ONLY_ENV = ("DS_ACCELERATOR", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")
STOP_GRACE_S = 30.0  # after --timeout-s: how long the run may take to stop cleanly before it is killed
_GPU_ROLES = {"text worker": "text_workers", "diffusion worker": "diffusion_workers", "judge": "judge_replicas",
              "text learner": "text_learners", "diffusion learner": "diffusion_learners"}


@dataclass(frozen=True)
class Verdict:
    """One role's result: `passed`, and `evidence`, the numbers (or the missing file) that decided it."""

    role: str
    passed: bool
    evidence: str


def role_verdicts(run_dir: Path, steps: int, require_gpu: bool = True) -> list[Verdict]:
    """One verdict per role in `ROLES`, from `metrics.jsonl`, `eval-final/eval.json` and `config.yaml`.

    A role passes when every one of the `steps` rows shows its work, finite: text worker = answers
    sampled (`samples/text` > 0) with a finite format rate; diffusion worker = images in the learner
    batch (`samples/image` > 0); judge = a finite `score_mean` and no error results (`judge/errors` 0);
    each learner = tokens / images trained on, finite loss and gradient norm, no skipped update; sync = every worker holds version step + 1 and both
    models' bytes moved; eval = `eval-final/eval.json` with one finite accuracy per round. With
    `require_gpu`, a role whose `cluster.<role>.num_gpus` is 0 in the run's config fails (it ran on the CPU).
    """
    run_dir = Path(run_dir)
    rows, problem = _read_rows(run_dir / "metrics.jsonl", steps)
    cfg = _read_yaml(run_dir / "config.yaml")
    out = []
    checks = {
        "text worker": lambda r: _positive(r, "samples/text") + _finite(r, "format_rate"),
        "diffusion worker": lambda r: _positive(r, "samples/image"),
        "judge": lambda r: _finite(r, "score_mean") + _equals(r, "judge/errors", 0.0),
        "text learner": lambda r: _learner_problems(r, "text_learner", "num_tokens"),
        "diffusion learner": lambda r: _learner_problems(r, "diffusion_learner", "num_images"),
        "sync": _sync_problems,
    }
    for role, check in checks.items():
        if problem:
            out.append(Verdict(role, False, problem))
            continue
        failures = [f"step {r.get('step', i)}: {p}" for i, r in enumerate(rows) for p in check(r)]
        failures += _gpu_problems(cfg, role) if require_gpu else []
        out.append(Verdict(role, not failures, "; ".join(failures) if failures else _evidence(role, rows, cfg)))
    out.append(_eval_verdict(run_dir / "eval-final" / "eval.json", cfg))
    return out


def format_verdicts(verdicts: list[Verdict]) -> str:
    """`PASS  text worker  <evidence>` lines, then `gpu smoke: PASS` or `gpu smoke: FAIL (n roles)`."""
    width = max(len(v.role) for v in verdicts)
    lines = [f"{'PASS' if v.passed else 'FAIL'}  {v.role:<{width}}  {v.evidence}" for v in verdicts]
    bad = [v.role for v in verdicts if not v.passed]
    lines.append("gpu smoke: PASS" if not bad else f"gpu smoke: FAIL ({len(bad)} of {len(verdicts)} roles: "
                 f"{', '.join(bad)})")
    return "\n".join(lines)


# ---- the checks (pure) ----------------------------------------------------------------------------------


def _read_rows(path: Path, steps: int) -> tuple[list[dict[str, Any]], str | None]:
    if not path.is_file():
        return [], f"no {path.name} in the run folder (the run stopped before its first step finished)"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) != steps:
        return rows, f"{path.name} has {len(rows)} step rows, expected {steps}"
    return rows, None


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _finite(row: dict[str, Any], key: str) -> list[str]:
    value = _number(row, key)
    if value is None:
        return [f"{key} missing"]
    return [] if math.isfinite(value) else [f"{key}={value}"]


def _positive(row: dict[str, Any], key: str) -> list[str]:
    value = _number(row, key)
    return [] if value is not None and value > 0 else [f"{key}={row.get(key, 'missing')} (want > 0)"]


def _equals(row: dict[str, Any], key: str, want: float) -> list[str]:
    value = _number(row, key)
    return [] if value == want else [f"{key}={row.get(key, 'missing')} (want {want:g})"]


def _learner_problems(row: dict[str, Any], prefix: str, amount: str) -> list[str]:
    return (_positive(row, f"{prefix}/{amount}") + _finite(row, f"{prefix}/loss") + _finite(row, f"{prefix}/grad_norm")
            + _equals(row, f"{prefix}/skipped_nonfinite", 0.0))


def _sync_problems(row: dict[str, Any]) -> list[str]:
    want = float(row.get("step", -1)) + 1
    out = []
    for key in ("version/policy", "version/text_workers_min", "version/diffusion_workers_min"):
        out += _equals(row, key, want)
    return out + _positive(row, "sync/text_bytes") + _positive(row, "sync/image_bytes")


def _gpu_problems(cfg: dict[str, Any], role: str) -> list[str]:
    section = _GPU_ROLES.get(role)
    if section is None:  # sync and eval run on the roles above
        return []
    gpus = (cfg.get("cluster") or {}).get(section, {}).get("num_gpus", 0)
    return [] if gpus and gpus > 0 else [f"cluster.{section}.num_gpus={gpus}: ran on the CPU"]


def _evidence(role: str, rows: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    def series(key: str, fmt: str = "{:.4g}") -> str:
        return "[" + ", ".join(fmt.format(r[key]) for r in rows) + "]"

    gpu = _GPU_ROLES.get(role)
    gpus = (cfg.get("cluster") or {}).get(gpu, {}).get("num_gpus", 0) if gpu else 0
    where = "" if not gpu else f" on {gpus:g} GPU" if gpus else " on the CPU"
    if role == "text worker":
        return f"answers per step {series('samples/text', '{:g}')}, format rate {series('format_rate')}{where}"
    if role == "diffusion worker":
        return f"images per step {series('samples/image', '{:g}')}{where}"
    if role == "judge":
        return f"score mean per step {series('score_mean')}, judge errors 0{where}"
    if role in ("text learner", "diffusion learner"):
        key = role.replace(" ", "_")
        amount = "num_tokens" if role == "text learner" else "num_images"
        return (f"{amount.replace('num_', '')} {series(key + '/' + amount, '{:g}')}, loss {series(key + '/loss')}, "
                f"grad norm {series(key + '/grad_norm')}{where}")
    sync, c = cfg.get("sync") or {}, cfg.get("cluster") or {}

    def backend(model: str) -> str:
        return sync_backend(sync.get("backend", "auto"), c.get(f"{model}_learners", {}).get("num_gpus", 0),
                            c.get(f"{model}_workers", {}).get("num_gpus", 0))

    return (f"versions {series('version/policy', '{:g}')} on every worker, bytes per step text "
            f"{series('sync/text_bytes', '{:g}')} image {series('sync/image_bytes', '{:g}')} "
            f"({sync.get('method', '?')} over {backend('text')} / {backend('diffusion')})")


def _eval_verdict(path: Path, cfg: dict[str, Any]) -> Verdict:
    if not path.is_file():
        return Verdict("eval", False, f"no {path.parent.name}/{path.name} (the final evaluation did not finish)")
    report = json.loads(path.read_text())
    accuracies = [r.get("accuracy") for r in report.get("overall", [])]
    rounds = (cfg.get("train") or {}).get("eval_rounds")
    problems = []
    if not report.get("num_prompts"):
        problems.append(f"num_prompts={report.get('num_prompts')}")
    if rounds is not None and len(accuracies) != rounds:
        problems.append(f"{len(accuracies)} rounds reported, train.eval_rounds={rounds}")
    if not all(isinstance(a, int | float) and math.isfinite(a) for a in accuracies):
        problems.append(f"accuracy per round {accuracies}")
    errors = sum(int(r.get("errors") or 0) for r in report.get("overall", []))
    if errors:
        problems.append(f"{errors} judge errors over the rounds")
    if problems:
        return Verdict("eval", False, "; ".join(problems))
    return Verdict("eval", True, f"{report['num_prompts']} prompts, accuracy per round "
                                 f"[{', '.join(f'{a:.3f}' for a in accuracies)}]")


# ---- the runner ----------------------------------------------------------------------------------------


def error_lines(log: Path, limit: int = 20) -> list[str]:
    """The last `limit` lines of an engine log that mention an error (what to read first after a FAIL)."""
    if not log.is_file():
        return [f"(no {log.name})"]
    hits = [line for line in log.read_text(errors="replace").splitlines()
            if any(word in line for word in ("Error", "ERROR", "error:", "Traceback"))]
    return [f"last error lines of {log}:"] + hits[-limit:] if hits else [f"(no error lines in {log.name})"]


def cuda_problem() -> str | None:
    """Why this Python cannot run the smoke test on a GPU, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e}); run `make gpu-setup`"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; run `make gpu-setup` (a venv with the CUDA "
                "builds of torch and vLLM) or set GPU_PY to a Python that has them")
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}, check nvidia-smi")
    return None


def smoke_env(base: dict[str, str]) -> dict[str, str]:
    """The environment of the training run: `base` without the CPU-only settings, offline, the repo importable."""
    env = {k: v for k, v in base.items() if k not in CPU_ONLY_ENV}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), base.get("PYTHONPATH", "")) if p)
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.gpu_smoke", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the smoke config (default: %(default)s)")
    ap.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs", help="parent of the run folder")
    ap.add_argument("--timeout-s", type=float, default=450.0,
                    help=f"stop the run after this many seconds, model builds included (SIGTERM, then SIGKILL "
                    f"{STOP_GRACE_S:g} s later; default: %(default)s)")
    ap.add_argument("--verdict-only", type=Path, default=None, metavar="RUN_FOLDER",
                    help="print the verdicts of an existing run folder and exit (no GPU needed)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="with --verdict-only: roles that ran on the CPU may pass (a CPU run of the same checks)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, passed to cluster.train")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verdict_only is not None:
        cfg = _read_yaml(args.verdict_only / "config.yaml")
        verdicts = role_verdicts(args.verdict_only, int((cfg.get("train") or {}).get("steps", 0)),
                                 require_gpu=not args.allow_cpu)
        print(format_verdicts(verdicts))
        return 0 if all(v.passed for v in verdicts) else 1
    problem = cuda_problem()
    if problem:
        print(f"gpu smoke: not run: {problem}", file=sys.stderr)
        return 2
    import torch

    from cluster.config import ConfigError, load_config

    print(f"gpu smoke on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    run_name = f"gpu-smoke-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"train.run_dir={args.run_dir}", f"train.run_name={run_name}", *args.overrides]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from actors.models import build_tiny_models

    start = time.perf_counter()
    build_tiny_models()
    run_dir = Path(cfg.train.run_dir) / run_name
    cmd = [sys.executable, "-m", "cluster.train", "--config", str(args.config), *overrides]
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=smoke_env(dict(os.environ)), cwd=REPO_ROOT)
    try:
        code = proc.wait(timeout=max(1.0, args.timeout_s - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:  # SIGTERM first: the run stops its actors and its local Ray cluster
        code = None
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - start
    verdicts = role_verdicts(run_dir, cfg.train.steps)
    print(format_verdicts(verdicts))
    status = "timed out" if code is None else f"exit status {code}"
    print(f"training run: {status} after {seconds:.0f} s; run folder {run_dir} (engine logs: engine.log)")
    if code != 0 or not all(v.passed for v in verdicts):
        print("\n".join(error_lines(run_dir / "engine.log")))
    return 0 if code == 0 and all(v.passed for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
