"""Faults and bad inputs driven through the real entry points, each ending with its documented exit status
and a message that names the bad value.

Config-level mistakes go through `cluster.train.main` in this process (the same code as
`python -m cluster.train`; they are refused with exit 2 before Ray or any engine starts), plus one real
subprocess to show the CLI's status and stderr. A hanging or refusing remote judge is driven against a
real local HTTP server. Runtime faults that need the whole stack (signals, dead workers) are in
test_signals.py and test_worker_death.py.
"""

import json
import os
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cluster import train

BASE = ["--config", "configs/cpu_tiny.yaml"]
GOOD_LINE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}


def _jsonl(path: Path, *lines: object) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _safetensors(path: Path, data_bytes: int, declared_end: int) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [declared_end // 4], "data_offsets": [0, declared_end]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * data_bytes)


def _model_folder(root: Path, name: str, config: bool = True, weights: str | None = None,
                  config_name: str = "config.json") -> str:
    folder = root / name
    folder.mkdir()
    if config:
        (folder / config_name).write_text("{}")
    if weights == "whole":
        _safetensors(folder / "model.safetensors", 64, 64)
    elif weights == "truncated":
        _safetensors(folder / "model.safetensors", 10, 64)
    return str(folder)


def _cases(tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(id, arguments after the base config, substrings the error must contain)."""
    bad_json = _jsonl(tmp / "bad_json.jsonl", GOOD_LINE, "{not json")
    no_tag = _jsonl(tmp / "no_tag.jsonl", {k: v for k, v in GOOD_LINE.items() if k != "tag"})
    not_object = _jsonl(tmp / "not_object.jsonl", GOOD_LINE, [1, 2])
    empty = _jsonl(tmp / "empty.jsonl")
    long_prompt = _jsonl(tmp / "long.jsonl", GOOD_LINE, {**GOOD_LINE, "prompt": "a photo of a bench " * 400})
    neither = _jsonl(tmp / "neither.jsonl", {"text": "a bench"})
    bad_count = _jsonl(tmp / "bad_count.jsonl", {**GOOD_LINE, "include": [{"class": "bench", "count": -1}]})
    yaml_bad = tmp / "bad.yaml"
    yaml_bad.write_text("train: [unclosed\n")
    yaml_list = tmp / "list.yaml"
    yaml_list.write_text("- 1\n- 2\n")
    remote = ["judge.kind=remote", "judge.url=http://127.0.0.1:9/v1", "judge.remote_model=judge-72b"]
    return [
        ("unknown key", ["grpo.lrr=1e-5"], ["grpo.lrr", "did you mean 'grpo.lr'"]),
        ("unknown section", ["optimizer.lr=1"], ["optimizer: unknown key", "grpo"]),
        ("NaN float", ["grpo.lr=.nan"], ["grpo.lr", "finite"]),
        ("inf float", ["flow_grpo.lr=.inf"], ["flow_grpo.lr", "finite"]),
        ("zero steps", ["train.steps=0"], ["train.steps", "0"]),
        ("text for a number", ["train.steps=many"], ["train.steps", "'many'"]),
        ("bad literal", ["judge.mode=vibes"], ["judge.mode", "'vibes'"]),
        ("unknown judge kind", ["judge.kind=oracle"], ["judge.kind", "'oracle'"]),
        ("override without =", ["grpo.lr"], ["'grpo.lr'", "key.path=value"]),
        ("error fraction above 1", ["judge.max_error_fraction=2"], ["judge.max_error_fraction", "2"]),
        ("negative stop grace", ["train.stop_grace_s=-1"], ["train.stop_grace_s", "-1"]),
        ("zero data limit", ["data.limit=0"], ["data.limit", "0"]),
        ("boolean worker count", ["cluster.text_workers=true"], ["cluster.text_workers", "True"]),
        ("cosine shorter than warm-up", ["grpo.lr_schedule=cosine", "grpo.warmup_steps=5"],
         ["grpo.lr_schedule=cosine", "grpo.warmup_steps (5)"]),
        ("public dashboard host", ["cluster.dashboard_host=0.0.0.0"], ["0.0.0.0", "cluster.allow_remote_dashboard"]),
        ("missing config file", ["--config", str(tmp / "nope.yaml")], ["nope.yaml", "does not exist"]),
        ("invalid YAML", ["--config", str(yaml_bad)], [str(yaml_bad), "not valid YAML"]),
        ("YAML not a mapping", ["--config", str(yaml_list)], [str(yaml_list), "must hold a mapping"]),
        ("missing model folder", [f"models.reasoner.path={tmp / 'gone'}"], [str(tmp / "gone")]),
        ("unknown named model", ["models.generator.path=tiny:nope"], ["tiny:nope", "models.generator"]),
        ("empty model folder", [f"models.reasoner.path={_model_folder(tmp, 'empty', config=False)}"],
         [str(tmp / "empty"), "no config.json"]),
        ("model folder without weights", [f"models.reasoner.path={_model_folder(tmp, 'noweights')}"],
         [str(tmp / "noweights"), "no weight files"]),
        ("truncated weight file", [f"models.reasoner.path={_model_folder(tmp, 'cut', weights='truncated')}"],
         [str(tmp / "cut" / "model.safetensors"), "cut short"]),
        ("generator path holds a single model",
         [f"models.generator.path={_model_folder(tmp, 'lm', weights='whole')}"],
         ["models.generator.path", str(tmp / "lm"), "diffusers pipeline (model_index.json)"]),
        ("reasoner path holds a pipeline",
         [f"models.reasoner.path={_model_folder(tmp, 'pipe', weights='whole', config_name='model_index.json')}"],
         ["models.reasoner.path", str(tmp / "pipe"), "transformers model (config.json)"]),
        ("prompt file: invalid JSON", [f"data.train={bad_json}"], [f"{bad_json}:2", "invalid JSON"]),
        ("prompt file: missing field", [f"data.train={no_tag}"], [f"{no_tag}:1", "'tag'"]),
        ("prompt file: not an object", [f"data.train={not_object}"], [f"{not_object}:2", "JSON object"]),
        ("prompt file: empty", [f"data.test={empty}"], [empty, "no prompts"]),
        ("prompt file: unknown format", [f"data.train={neither}"], [f"{neither}:1", "neither GenEval"]),
        ("prompt file: bad count", [f"data.train={bad_count}"], [f"{bad_count}:1", "count"]),
        ("unknown prompt source", ["data.train=nosuch"], ["'nosuch'", "registered names"]),
        ("data: spec leaving its folder", ["data.train=data:../secrets.jsonl"], ["'data:../secrets.jsonl'", ".."]),
        ("prompt longer than the context", [f"data.train={long_prompt}"],
         [f"{long_prompt}:2", "models.reasoner.max_model_len"]),
        ("too many workers for the local cluster", ["cluster.text_workers=40"],
         ["cluster.num_cpus=8", "text_workers 40 x 0.5"]),
        ("remote judge without url", ["judge.kind=remote"], ["judge.url", "judge.remote_model"]),
        ("remote judge timeouts beyond the remote timeout", [*remote, "judge.timeout_s=300"],
         ["judge.timeout_s=300", "train.remote_timeout_s=600", "900"]),
        ("remote judge retries beyond the remote timeout", [*remote, "judge.retries=9", "train.remote_timeout_s=100"],
         ["judge.retries=9", "train.remote_timeout_s=100"]),
        ("API key variable unset", [*remote, "judge.api_key_env=R3RL_TEST_UNSET_KEY"], ["R3RL_TEST_UNSET_KEY", "unset"]),
        ("API key variable empty", [*remote, "judge.api_key_env=R3RL_TEST_EMPTY_KEY"], ["R3RL_TEST_EMPTY_KEY", "empty"]),
        ("API key for a local judge", ["judge.api_key_env=HOME"], ["judge.api_key_env='HOME'", "kind=remote"]),
        ("unknown template", ["r3.templates={plann: x}"], ["plann", "r3.templates"]),
    ]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {c[0]: c for c in _cases(tmp_path_factory.mktemp("faults"))}


CASE_IDS = [
    "unknown key", "unknown section", "NaN float", "inf float", "zero steps", "text for a number", "bad literal",
    "unknown judge kind", "override without =", "error fraction above 1", "negative stop grace", "zero data limit",
    "boolean worker count", "cosine shorter than warm-up", "public dashboard host", "missing config file",
    "invalid YAML", "YAML not a mapping", "missing model folder", "unknown named model", "empty model folder",
    "model folder without weights", "truncated weight file", "generator path holds a single model",
    "reasoner path holds a pipeline", "prompt file: invalid JSON", "prompt file: missing field",
    "prompt file: not an object", "prompt file: empty", "prompt file: unknown format", "prompt file: bad count",
    "unknown prompt source", "data: spec leaving its folder", "prompt longer than the context",
    "too many workers for the local cluster", "remote judge without url",
    "remote judge timeouts beyond the remote timeout", "remote judge retries beyond the remote timeout",
    "API key variable unset", "API key variable empty", "API key for a local judge", "unknown template",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_refused_with_exit_2_naming_the_value(case, cases, tiny_models, capsys, monkeypatch, tmp_path):
    """`tiny_models`: built before, so stderr holds the refusal alone (a first build prints its progress)."""
    import cluster.run_loop

    _, args, expected = cases[case]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("R3RL_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("R3RL_TEST_EMPTY_KEY", "")
    started = []
    monkeypatch.setattr(cluster.run_loop, "run_training", lambda *a, **k: started.append(1))  # must never be reached
    argv = [*BASE, *args] if args[0] != "--config" else [*args[:2], *BASE[2:], *args[2:]]
    rc = train.main([*argv, f"train.run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not started, "the run started instead of being refused"
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"


def test_every_case_is_run():
    assert sorted(CASE_IDS) == sorted(c[0] for c in _cases_for_names())


def _cases_for_names():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return _cases(Path(d))


def test_cli_subprocess_exits_2_with_one_message(tmp_path):
    """The real `python -m cluster.train`: status 2 and the message on stderr, nothing started."""
    env = {**os.environ, "R3RL_TEST_UNSET_KEY": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.train", *BASE, f"train.run_dir={tmp_path}", "judge.kind=remote",
         "judge.url=http://127.0.0.1:9/v1", "judge.remote_model=m", "judge.api_key_env=R3RL_TEST_UNSET_KEY"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "R3RL_TEST_UNSET_KEY" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "a refused run must not create its run folder"


# ------------------------------------------------------------------ remote judge faults (real HTTP server)


class _Server:
    """A local endpoint that hangs, refuses the key or answers, depending on the request's Authorization."""

    def __init__(self):
        self.seen = []
        release = self.release = threading.Event()
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization", "")
                seen.append(auth)
                if auth == "Bearer hang":
                    release.wait(30)
                    return
                if auth != "Bearer right-key":
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(b'{"error": "bad key"}')
                    return
                body = json.dumps({"choices": [{"message": {"content": '{"correct": 1}'}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _judge_item():
    from rollout.interfaces import JudgeItem

    return JudgeItem(np.zeros((8, 8, 3), np.uint8), "a clock", {"include": [{"class": "clock", "count": 1}]})


@pytest.mark.parametrize("key, expected, attempts", [
    ("hang", "(after 3 attempts)", 3),  # each request times out (0.2 s; the last gets what the budget has left)
    ("wrong-key", "http 401", 1),  # an auth error is not retried
])
def test_remote_judge_faults_become_error_results_within_the_budget(server, monkeypatch, key, expected, attempts):
    from reward.remote_judge import RemoteJudge

    monkeypatch.setenv("R3RL_TEST_JUDGE_KEY", key)
    judge = RemoteJudge(base_url=server.url, model="m", mode="checklist", api_key_env="R3RL_TEST_JUDGE_KEY",
                        timeout_s=0.2, max_retries=2, retry_backoff_s=0.01)
    (result,) = judge.score([_judge_item()])
    judge.shutdown()
    assert result.error is not None and expected in result.error
    assert key != "hang" or result.error.startswith("timeout after 0.")
    assert len(server.seen) == attempts
    assert key not in result.error  # the key is never part of a message


def test_remote_judge_sends_the_key_from_the_variable_and_config_never_holds_it(server, monkeypatch, tmp_path):
    from cluster.config import load_config
    from cluster.driver import make_run_dir
    from reward.remote_judge import RemoteJudge

    monkeypatch.setenv("R3RL_TEST_JUDGE_KEY", "right-key")
    judge = RemoteJudge(base_url=server.url, model="m", mode="checklist", api_key_env="R3RL_TEST_JUDGE_KEY")
    (result,) = judge.score([_judge_item()])
    judge.shutdown()
    assert (result.score, result.error) == (1.0, None) and server.seen == ["Bearer right-key"]
    cfg = load_config("configs/cpu_tiny.yaml", [f"train.run_dir={tmp_path}", "train.run_name=k", "judge.kind=remote",
                                                f"judge.url={server.url}", "judge.remote_model=m",
                                                "judge.api_key_env=R3RL_TEST_JUDGE_KEY"])
    written = (make_run_dir(cfg) / "config.yaml").read_text()
    assert "R3RL_TEST_JUDGE_KEY" in written and "right-key" not in written


def test_judge_app_name_refuses_to_start_a_cluster_of_its_own():
    """Outside a Ray cluster, naming the judge's Serve application fails instead of starting a local
    cluster with the machine's resources (which later callers would then join)."""
    import subprocess
    import sys

    code = ("import ray\nfrom cluster.roles import judge_app_name\n"
            "try:\n    judge_app_name()\nexcept RuntimeError as e:\n    print('refused:', e)\n"
            "print('initialized:', ray.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "refused: the judge is deployed on a Ray cluster" in out.stdout and "initialized: False" in out.stdout


def test_serve_client_budget_for_a_remote_judge_is_the_whole_retry_budget(monkeypatch):
    """The driver's Serve client waits timeout_s x (retries + 1) once for a remote judge (the replica
    retries over HTTP), which the config keeps within train.remote_timeout_s."""
    import cluster.roles as roles
    from cluster.config import load_config

    made = {}

    class Client:
        def __init__(self, name, timeout_s, max_retries):
            made.update(timeout_s=timeout_s, max_retries=max_retries)

    import reward.service as service

    monkeypatch.setattr(service, "ServeJudgeClient", Client)
    monkeypatch.setattr(service, "start_serve", lambda **k: None)
    monkeypatch.setattr(service, "deploy_judge", lambda spec, **k: made.update(spec=spec))
    monkeypatch.setattr(roles, "judge_app_name", lambda: "judge-01000000")  # no Ray cluster in a unit test
    cfg = load_config("configs/cpu_tiny.yaml", ["judge.kind=remote", "judge.url=http://h/v1", "judge.remote_model=m",
                                                "judge.timeout_s=50", "judge.retries=3", "train.remote_timeout_s=200"])
    roles.build_judge_client(cfg, roles.ModelPaths("r", "g", None))
    assert made["timeout_s"] == 200 and made["max_retries"] == 0
    assert made["spec"]["timeout_s"] == 50 and made["spec"]["max_retries"] == 3


# ------------------------------------------------------------------ metrics after a resume (pure file logic)


def test_metrics_rows_of_redone_steps_and_a_torn_line_are_dropped_on_resume(tmp_path):
    from cluster.metrics import MetricsLogger

    m = MetricsLogger(tmp_path, tensorboard=False, ray_gauges=False)
    for step in range(4):
        m.log(step, {"x": float(step)})
    m._file.write('{"step": 4, "x": ')  # a run killed mid-write
    m._file.flush()
    assert m.drop_rows_from(2) == 3
    m.log(2, {"x": 2.5})
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.5)]


# ------------------------------------------------------------------ stop signals (real signals, no engines)


def test_a_stop_signal_abandons_waited_work_after_the_grace_and_not_before():
    import signal
    import threading

    from cluster.stopping import GracefulStop, StopRequested

    release = threading.Event()

    def work_that_gets_a_signal():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while this work is under way
        release.wait(60)
        return "done"

    stop = GracefulStop(0.0, notify=lambda line: None)
    assert stop.install()
    try:
        with pytest.raises(StopRequested) as info:
            stop.wait(work_that_gets_a_signal, "the rollout of step 3")
        assert info.value.signum == signal.SIGTERM and info.value.abandoned == "the rollout of step 3"
        assert str(info.value) == "SIGTERM received; abandoned the rollout of step 3"
        release.set()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is not stop._on_signal

    patient = GracefulStop(600.0, notify=lambda line: None)
    assert patient.install()
    try:  # within the grace the work finishes; the stop is then taken between steps
        assert patient.wait(lambda: (os.kill(os.getpid(), signal.SIGINT), "finished")[1], "an update") == "finished"
        with pytest.raises(StopRequested) as info:
            patient.check()
        assert info.value.signum == signal.SIGINT and info.value.abandoned is None
    finally:
        patient.restore()


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_second_signal_exits_at_once_with_128_plus_its_number(signame, code):
    script = (
        "import os, signal, time\n"
        "from cluster.stopping import GracefulStop\n"
        "stop = GracefulStop(600.0)\n"
        "stop.install()\n"
        f"os.kill(os.getpid(), signal.{signame})\n"
        "assert stop.requested\n"
        f"os.kill(os.getpid(), signal.{signame})\n"
        "time.sleep(30)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert f"{signame} received again: exiting now without a checkpoint" in proc.stderr
    assert "not reached" not in proc.stdout
