"""`ray job submit` against a real head on loopback runs the CPU config and writes its run directory.

The test starts its own head (`ray start --head --block` as a child process) and stops only that
process: never a bare `ray stop`, which would end every Ray cluster of the user on this machine.

The head is isolated from whatever else runs on the machine (Ray 2.60):
  * auth: `ray start` turns token auth on by itself when `~/.ray/auth_token` exists (any local
    `ray.init()` writes one), while the `ray job` CLI does not, so the CLI got 401s. Head and CLI
    get the same explicit `RAY_AUTH_MODE=token` and a token of this test's own (`RAY_AUTH_TOKEN`);
  * ports: the dashboard agent's HTTP port defaults to 52365 for every cluster on the host; when
    another cluster holds it our agent stays up without HTTP, never registers, and every submit
    answers "No available agent to submit job". It gets a free port, and so does the Ray client
    server (10001 by default);
  * readiness: the agent writes the port it bound (or −1) to `dashboard_agent_listen_port_<node>`
    in the session dir just before registering with the GCS; the test waits for that file, then
    for the job API, then submits once. Every wait is bounded and reports what it last saw.

The test submits a run that is stopped with `ray job stop` (SIGTERM from the job supervisor), resumes it
from the checkpoint its stop line names, and compares it with the same run submitted to the end without a
stop (which also checks what a submitted run writes to its run directory). That uninterrupted run goes
beside the stopped one, so two jobs share the cluster, each with its own judge application.
"""

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

# alone: `ray start --head` beside another test's engines on 2 cores can time out in its client server's start
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.alone]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
START_BOUND_S = 300  # upper bound on each readiness wait (a loaded 2-core CPU machine can take minutes)


def _head_env() -> dict[str, str]:
    """Environment of the head and of every CLI call: one explicit auth setting, no outside cluster."""
    env = {**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    return env


def _wait_agent_port(proc: subprocess.Popen, temp: Path) -> int:
    """The dashboard agent's HTTP port once it has bound it; fails at once if it could not."""
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray head exited during start (rc {proc.returncode})"
        for f in temp.glob("session_*/dashboard_agent_listen_port_*"):
            text = f.read_text().strip()
            if text.lstrip("-").isdigit():  # a half-written file reads as empty: look again
                port = int(text)
                if port < 0:
                    logs = sorted(temp.glob("session_*/logs/dashboard_agent.log"))
                    tail = logs[0].read_text()[-3000:] if logs else "(no dashboard_agent.log)"
                    pytest.fail(f"the head's dashboard agent could not start its HTTP server:\n{tail}")
                return port
        time.sleep(1)
    pytest.fail(f"the head's dashboard agent reported no port within {START_BOUND_S} s")


def _wait_job_api(proc: subprocess.Popen, address: str, env: dict[str, str]) -> None:
    deadline = time.monotonic() + START_BOUND_S
    out = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray head exited during start (rc {proc.returncode})"
        out = subprocess.run([str(RAY), "job", "list", "--address", address], env=env, capture_output=True,
                             text=True, timeout=120)
        if out.returncode == 0:
            return
        time.sleep(2)
    last = "" if out is None else (out.stdout + out.stderr)[-3000:]
    pytest.fail(f"the job API at {address} did not answer within {START_BOUND_S} s; last answer:\n{last}")


def _stop_head(proc: subprocess.Popen) -> None:
    proc.terminate()  # --block: ending this process stops exactly this head
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def head(tmp_path_factory, free_port):
    """A Ray head of its own (`ray start --head --block` on free ports); its output goes to `head.log`, whose
    tail a failed start reports."""
    env = _head_env()
    port, dash, agent, client = (free_port() for _ in range(4))
    temp = tmp_path_factory.mktemp("ray")
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=8", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        try:
            assert _wait_agent_port(proc, temp) == agent
            _wait_job_api(proc, address, env)
        except AssertionError as e:
            pytest.fail(f"{e}; the head's output ends:\n{(temp / 'head.log').read_text(errors='replace')[-3000:]}")
        yield address, env, temp
    finally:
        _stop_head(proc)
        log.close()


# ------------------------------------------------------------------------------- ray job stop, then resume

STOP_WAIT_S = 120  # RAY_JOB_STOP_WAIT_TIME_S: the supervisor's SIGKILL comes this long after its SIGTERM
STEPS = 3


def _ray(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _train_args(root: Path, name: str) -> list[str]:
    """A tiny exact run: the ShapesWorld judge (pure numpy, batch-independent) behind Ray Serve, a fixed seed,
    no periodic checkpoint; `train.stop_grace_s=0` abandons a step's rollout as soon as the signal comes. The
    stop lands in a step's rollout or between steps, by timing; both must resume exactly (the abandonment
    itself is pinned down in tests/cluster/test_signals.py and test_reliability.py)."""
    return ["python", "-m", "cluster.train", "--config", "configs/cpu_tiny.yaml", f"train.run_dir={root}",
            f"train.run_name={name}", f"train.steps={STEPS}", "train.seed=0", "checkpoint.every=0",
            "train.stop_grace_s=0",
            "plugins=[examples.shapesworld]", "judge.kind=shapes", "data.train=shapes-train",
            "data.test=shapes-test", "data.eval_limit=2", "train.eval_rounds=1", "logging.progress=false",
            "logging.tensorboard=false"]


def _submit(address: str, env: dict[str, str], entrypoint: list[str], *options: str,
            timeout: float = 900) -> subprocess.CompletedProcess:
    return _ray(env, "job", "submit", "--address", address, "--working-dir", str(ROOT), *options, "--", *entrypoint,
                timeout=timeout)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_first_row(address: str, env: dict[str, str], job: str, run_dir: Path) -> None:
    """Until step 0's metrics row is written; fails at once (with the driver's log) if the job ended first."""
    deadline = time.monotonic() + START_BOUND_S + 600
    next_status = time.monotonic()
    while not _rows(run_dir):
        assert time.monotonic() < deadline, f"no metrics row in {run_dir} within {START_BOUND_S + 600} s"
        if time.monotonic() >= next_status:  # the CLI costs seconds of CPU: ask now and then
            status = _ray(env, "job", "status", "--address", address, job).stdout
            if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                logs = _ray(env, "job", "logs", "--address", address, job).stdout
                pytest.fail(f"the job ended before its first step:\n{status}\n{logs[-4000:]}")
            next_status = time.monotonic() + 10
        time.sleep(0.2)


def _final_weights(run_dir: Path) -> dict[str, object]:
    """Every tensor of both learners' weights in the run's final checkpoint, by file and tensor name."""
    from safetensors.torch import load_file

    final = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    tensors = {}
    for kind in ("text_learner", "diffusion_learner"):
        files = sorted((final / kind / "weights").rglob("*.safetensors"))
        assert files, f"no weights under {final / kind / 'weights'}"
        for f in files:
            tensors.update({f"{f.relative_to(final)}:{k}": t for k, t in load_file(f).items()})
    return tensors


def test_ray_job_stop_checkpoints_and_the_resume_ends_with_the_weights_of_an_uninterrupted_run(head, tmp_path):
    import torch

    from cluster.checkpoint import resolve_resume
    from tests.cluster.test_operations import _stable

    address, env, temp = head
    run_dir, job = tmp_path / "stopped", f"r3rl-stop-{secrets.token_hex(4)}"
    # the same run, never stopped, goes beside it on the same cluster (each driver deploys a judge of its own)
    whole_job = f"r3rl-whole-{secrets.token_hex(4)}"
    whole = _submit(address, env, _train_args(tmp_path, "whole"), "--submission-id", whole_job, "--no-wait",
                    timeout=300)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    # the supervisor reads RAY_JOB_STOP_WAIT_TIME_S from its own environment, which the job's runtime env sets
    wait = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}})
    submitted = _submit(address, env, _train_args(tmp_path, "stopped"), "--submission-id", job, "--no-wait",
                        "--runtime-env-json", wait, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    _wait_first_row(address, env, job, run_dir)

    stop = _ray(env, "job", "stop", "--address", address, job, timeout=STOP_WAIT_S + 300)  # waits for the end
    assert stop.returncode == 0, stop.stdout[-3000:] + stop.stderr[-3000:]
    status = _ray(env, "job", "status", "--address", address, job)
    assert f"Job '{job}' was stopped" in status.stdout + status.stderr, status.stdout + status.stderr  # STOPPED
    supervisor = "\n".join(f.read_text() for f in temp.glob(f"session_*/logs/jobs/supervisor-{job}.log"))
    assert f"Job {job} has been terminated gracefully with SIGTERM" in supervisor, supervisor[-3000:]  # no SIGKILL
    logs = _ray(env, "job", "logs", "--address", address, job).stdout
    assert "SIGTERM received: stopping cleanly" in logs, logs[-4000:]
    lines = [ln for ln in logs.splitlines() if ln.startswith("stopped by SIGTERM after ")]
    assert len(lines) == 1, logs[-4000:]
    stopped = re.fullmatch(r"stopped by SIGTERM after (\d+) completed steps.*; checkpoint (\S+); "
                           r"resume with: (python -m cluster\.train .*)", lines[0])
    assert stopped, lines[0]
    steps_done, checkpoint, resume = int(stopped[1]), Path(stopped[2]), shlex.split(stopped[3])
    # the signal lands in step 1 (its rollout abandoned, or its update finished) or later: a checkpoint of
    # the last completed step, which `--resume auto` would pick too, and one metrics row per completed step
    assert 1 <= steps_done <= STEPS and checkpoint == run_dir / "checkpoints" / f"step-{steps_done:06d}"
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == steps_done
    assert resolve_resume("auto", tmp_path, "stopped") == checkpoint
    assert [r["step"] for r in _rows(run_dir)] == list(range(steps_done))
    assert resume == _train_args(tmp_path, "stopped") + ["--resume", str(checkpoint)]

    resumed = _submit(address, env, resume)  # the command the stop line prints, to the end
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    whole_logs = _ray(env, "job", "logs", "--address", address, "--follow", whole_job, timeout=900)  # to its end
    whole_status = _ray(env, "job", "status", "--address", address, whole_job)
    assert "succeeded" in (whole_status.stdout + whole_status.stderr).lower(), whole_logs.stdout[-4000:]
    assert (tmp_path / "whole" / "config.yaml").is_file() and (tmp_path / "whole" / "eval-final" / "eval.json").is_file()
    # the GPU smoke test's verdicts read these files: every role passes on a real (CPU) run folder
    from cluster.gpu_smoke import format_verdicts, role_verdicts

    verdicts = role_verdicts(tmp_path / "whole", steps=STEPS, require_gpu=False)
    assert all(v.passed for v in verdicts), format_verdicts(verdicts)

    rows, expected = _rows(run_dir), _rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == list(range(STEPS))  # each step once
    assert [_stable(r) for r in rows] == [_stable(r) for r in expected]
    weights, expected_weights = _final_weights(run_dir), _final_weights(tmp_path / "whole")
    assert weights.keys() == expected_weights.keys()
    differ = [k for k, t in weights.items() if not torch.equal(t, expected_weights[k])]
    assert not differ, f"{len(differ)} of {len(weights)} tensors differ from the uninterrupted run's: {differ[:5]}"
