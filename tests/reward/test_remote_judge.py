"""Remote OpenAI-compatible judge against a small local HTTP server standing in for the remote
service: canned and malformed replies, retries, timeouts, the concurrency limit, data-URL images."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from reward.judge_modes import JudgePrompts
from reward.remote_judge import RemoteJudge, png_data_url
from rollout.interfaces import JudgeItem

IMG = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)


class FakeChatServer:
    """The request text up to "||" is a command: `ok <content>`, `status <code> <n>` (fail n
    times, then answer `{"correct": 1}`), `sleep <s>`, `garbage`, `logprobs <p_yes>`."""

    def __init__(self):
        self.requests, self.failures, self.inflight, self.max_inflight = [], {}, 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                self.counted_out = False
                try:
                    server.reply(self, body)
                finally:
                    with server.lock:
                        if not self.counted_out:
                            server.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, h, body):
        text = body["messages"][0]["content"][1]["text"]
        command = text.split("||")[0]
        cmd, _, arg = command.partition(" ")
        if cmd == "status":
            code, n = arg.split()
            with self.lock:
                seen = self.failures[command] = self.failures.get(command, 0) + 1
            if seen <= int(n):
                return self.send(h, int(code), b"busy")
            return self.chat(h, '{"correct": 1}')
        if cmd == "sleep":
            time.sleep(float(arg))
            return self.chat(h, '{"correct": 1}')
        if cmd == "garbage":
            return self.send(h, 200, b"<html>not json</html>")
        if cmd == "logprobs":
            p = float(arg)
            top = [
                {"token": "Yes", "logprob": float(np.log(p))},
                {"token": "No", "logprob": float(np.log(1 - p))},
            ]
            return self.chat(h, "Yes", {"content": [{"token": "Yes", "logprob": 0.0, "top_logprobs": top}]})
        return self.chat(h, arg)

    def chat(self, h, content, logprobs=None):
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs}
        self.send(h, 200, json.dumps({"choices": [choice]}).encode())

    def send(self, h, code, payload):
        with self.lock:  # counted out before the client can read the answer and send its next request
            self.inflight -= 1
            h.counted_out = True
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)


@pytest.fixture()
def server():
    s = FakeChatServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def item(cmd):
    return JudgeItem(IMG, cmd, {"include": [{"class": "clock", "count": 1}]})


def make(server, **kw):
    kw.setdefault("prompts", JudgePrompts(checklist="{prompt}||{checklist}", vqascore="{prompt}"))
    return RemoteJudge(base_url=server.url, model="judge-72b", timeout_s=2.0, retry_backoff_s=0.01, **kw)


def test_canned_and_malformed_replies(server):
    judge = make(server)
    items = [
        item('ok {"correct": 1}'),
        item('ok ```json\n{"correct": 0}\n```'),
        item("ok I think so."),
        item("garbage"),
    ]
    r = judge.score(items)
    assert [(x.score, x.correct) for x in r] == [(1.0, True), (0.0, False), (0.0, False), (0.0, False)]
    assert r[0].error is None and r[1].error is None
    assert "no JSON object" in r[2].error and r[2].raw == "I think so."
    assert r[3].error.startswith("bad response")
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-72b"
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url == png_data_url(IMG)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, IMG)
    assert "Authorization" not in headers


def test_retries_are_bounded(server):
    judge = make(server, max_retries=2)
    ok, dead, client_err = judge.score([item("status 503 2"), item("status 500 9"), item("status 400 9")])
    assert (ok.score, ok.error) == (1.0, None)
    assert dead.score == 0.0 and "http 500" in dead.error and "after 3 attempts" in dead.error
    assert client_err.error.startswith("http 400")
    assert server.failures == {"status 503 2": 3, "status 500 9": 3, "status 400 9": 1}


def test_timeout_gives_error_result_and_next_items_still_score(server):
    judge = make(server, max_retries=0)
    judge._timeout_s = 0.3
    slow, fast = judge.score([item("sleep 1.5"), item('ok {"correct": 1}')])
    assert slow.score == 0.0 and not slow.correct and "timeout after 0.3s" in slow.error
    assert (fast.score, fast.error) == (1.0, None)


def test_concurrency_limit(server):
    judge = make(server, max_concurrency=2)
    out = judge.score([item("sleep 0.2")] * 6)
    assert all(r.score == 1.0 for r in out)
    assert server.max_inflight == 2


def test_vqascore_and_questions_and_auth(server, monkeypatch):
    monkeypatch.setenv("R3RL_TEST_JUDGE_KEY", "sekrit")
    judge = make(server, mode="vqascore", api_key_env="R3RL_TEST_JUDGE_KEY")
    (r,) = judge.score([item("logprobs 0.75")])
    assert r.score == pytest.approx(0.75) and r.correct and r.error is None
    _, headers, body = server.requests[-1]
    assert headers["Authorization"] == "Bearer sekrit"
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    md = {"yn_question_list": ["ok Yes", "ok no", "ok maybe"], "yn_answer_list": ["yes", "yes", "no"]}
    q = make(server, mode="questions", prompts=JudgePrompts(question="{question}"))
    (r,) = q.score([JudgeItem(IMG, "p", md)])
    assert r.score == pytest.approx(1 / 3) and r.details["unparsed"] == [2]
    with pytest.raises(ValueError, match="unset environment variable"):
        make(server, api_key_env="R3RL_SURELY_UNSET_VAR")


@pytest.mark.filterwarnings("ignore:invalid value encountered in log:RuntimeWarning")
def test_vqascore_with_a_nan_log_prob_is_an_error_result(server):
    judge = make(server, mode="vqascore")
    (r,) = judge.score([item("logprobs 1.5")])  # the server sends log(1 - 1.5) = NaN for "No"
    assert (r.score, r.correct) == (0.0, False) and "non-finite log-prob" in r.error


def test_unreachable_endpoint_is_an_error_result():
    judge = RemoteJudge(
        base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, retry_backoff_s=0.01, timeout_s=1
    )
    (r,) = judge.score([item('ok {"correct": 1}')])
    assert r.score == 0.0 and "connection error" in r.error and "after 2 attempts" in r.error
