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
"""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def head(tmp_path_factory, free_port):
    env = _head_env()
    port, dash, agent, client = (free_port() for _ in range(4))
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=8", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        assert _wait_agent_port(proc, temp) == agent
        _wait_job_api(proc, address, env)
        yield address, env
    finally:
        proc.terminate()  # --block: ending this process stops exactly this head
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_job_submit_runs_and_writes_run_dir(head, tmp_path):
    address, env = head
    cmd = [
        str(RAY), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
        "python", "-m", "cluster.train", "--config", "configs/cpu_tiny.yaml", "train.steps=1",
        f"train.run_dir={tmp_path}", "train.run_name=job", "data.eval_limit=2", "train.eval_rounds=2",
        "logging.progress=false",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    run = tmp_path / "job"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["version/policy"] == 1
    assert (run / "config.yaml").is_file() and (run / "eval-final" / "eval.json").is_file()
    # the GPU smoke test's verdicts read these files: every role passes on a real (CPU) run folder
    from cluster.gpu_smoke import format_verdicts, role_verdicts

    verdicts = role_verdicts(run, steps=1, require_gpu=False)
    assert all(v.passed for v in verdicts), format_verdicts(verdicts)
