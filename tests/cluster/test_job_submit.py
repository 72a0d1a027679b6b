"""`ray job submit` against a real head on loopback runs the CPU config and writes its run directory.

The test starts its own head (`ray start --head --block` as a child process) and stops only that
process: never a bare `ray stop`, which would end every Ray cluster of the user on this machine.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=8", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    for _ in range(90):  # bounded readiness poll (attempts, not a speed check)
        out = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True, text=True)
        if out.returncode == 0:
            break
        assert proc.poll() is None, "ray head exited during start"
        time.sleep(2)
    else:
        proc.terminate()
        pytest.fail("ray head did not serve the job API after 90 polls")
    yield address, env
    proc.terminate()  # --block: ending this process stops exactly this head
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_job_submit_runs_and_writes_run_dir(head, tmp_path):
    address, env = head
    runtime_env = {"env_vars": {"R3RL_DATA": str(ROOT.parent / "shared" / "data")}}
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "cluster.train", "--config", "configs/cpu_tiny.yaml", "train.steps=1",
        f"train.run_dir={tmp_path}", "train.run_name=job", "data.eval_limit=2", "train.eval_rounds=2",
        "logging.progress=false",
    ]
    for _ in range(12):  # the head's job agent can come up a little after the job API answers
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in out.stdout + out.stderr:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    run = tmp_path / "job"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["version/policy"] == 1
    assert (run / "config.yaml").is_file() and (run / "eval-final" / "eval.json").is_file()
