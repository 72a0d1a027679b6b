"""Ray Serve judge service on a local cluster: batching across 2 replicas (from the judge's own
call log), a timeout giving the defined result, HTTP POST /score with the OCR judge, failure
counts, and the tiny VLM judge behind Serve."""

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from reward.service import ServeJudgeClient, deploy_judge, start_serve
from reward.simple_judges import read_call_log
from rollout.interfaces import Judge, JudgeItem

pytestmark = pytest.mark.integration

IMG = np.zeros((32, 32, 3), np.uint8)


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    from ray import serve

    port = start_serve()
    yield port
    serve.shutdown()


def test_concurrent_requests_are_batched_across_two_replicas(serve_port, tmp_path):
    from ray import serve

    log = tmp_path / "calls.jsonl"
    spec = {"kind": "constant", "score": 1.0, "delay_s": 0.3, "call_log": str(log)}
    deploy_judge(
        spec, name="batching", num_replicas=2, max_batch_size=8, batch_wait_timeout_s=0.2, num_cpus=0.25
    )
    client = ServeJudgeClient("batching", timeout_s=60, items_per_request=1)  # N requests
    assert isinstance(client, Judge)
    n = 24
    results = client.score([JudgeItem(IMG, f"p{i}") for i in range(n)])
    assert [r.score for r in results] == [1.0] * n and all(r.error is None for r in results)
    calls = read_call_log(log)
    assert sum(c["n"] for c in calls) == n
    assert len(calls) < n
    assert max(c["n"] for c in calls) > 1
    # max_ongoing_requests = 2 x 8 per replica < 24 requests: both replicas had to take some.
    assert len({c["pid"] for c in calls}) == 2
    serve.delete("batching")


def test_timeout_yields_defined_result_and_caller_goes_on(serve_port):
    from ray import serve

    deploy_judge({"kind": "constant", "delay_s": 3.0}, name="slow", max_batch_size=4, num_cpus=0.25)
    client = ServeJudgeClient("slow", timeout_s=0.5, max_retries=1)
    (r,) = client.score([JudgeItem(IMG, "p")])
    assert (r.score, r.correct) == (0.0, False)
    assert r.error == "serve timeout after 0.5s (2 attempts)"
    assert client.failures == {"timeout": 1}
    patient = ServeJudgeClient("slow", timeout_s=30)
    (r,) = patient.score([JudgeItem(IMG, "p")])
    assert (r.score, r.error) == (1.0, None)
    serve.delete("slow")


def _png_b64(text: str | None) -> str:
    img = Image.new("RGB", (256, 256), "white")
    if text:
        ImageDraw.Draw(img).text((20, 100), text, fill="black", font=ImageFont.load_default(size=40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(port: int, path: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_score_with_ocr_judge_and_failure_counts(serve_port):
    from ray import serve

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4}
    handle = deploy_judge(
        {"kind": "ocr", "num_threads": 1},
        name="ocr",
        num_replicas=None,
        autoscaling=autoscaling,
        max_batch_size=4,
        num_cpus=0.25,
    )
    items = [
        {"image_png_b64": _png_b64("HELLO"), "prompt": 'a sign "HELLO"'},
        {"image_png_b64": "data:image/png;base64," + _png_b64(None), "prompt": 'a sign "HELLO"'},
        {"image_png_b64": _png_b64("HELLO"), "prompt": "no quoted text", "metadata": {}},
    ]
    status, out = _post(serve_port, "/ocr/score", {"items": items})
    assert status == 200
    ok, blank, bad = out["results"]
    assert (ok["score"], ok["correct"], ok["error"]) == (1.0, True, None)
    assert (blank["score"], blank["error"]) == (0.0, None)
    assert bad["score"] == 0.0 and "no quoted target text" in bad["error"]
    assert handle.stats.remote().result()["failures"] == {"input": 1}  # one replica (min_replicas)
    status, out = _post(serve_port, "/ocr/score", b"not json")
    assert status == 400 and "bad request" in out["error"]
    status, out = _post(serve_port, "/ocr/score", {"items": [{"image_png_b64": "!!", "prompt": "x"}]})
    assert status == 400 and "not a base64 PNG" in out["error"]
    status, _ = _post(serve_port, "/ocr/nothing", {"items": []})
    assert status == 404
    serve.delete("ocr")


def test_vlm_judge_behind_serve(serve_port, tiny_models, tmp_path):
    from ray import serve

    vlm = str(tiny_models.vlm)
    log = tmp_path / "vlm_calls.jsonl"
    spec = {"kind": "vlm", "model_path": vlm, "mode": "vqascore", "call_log": str(log)}
    deploy_judge(spec, name="vlm", max_batch_size=8, batch_wait_timeout_s=0.2, num_cpus=0.5)
    client = ServeJudgeClient("vlm", timeout_s=120)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    items = [JudgeItem(images[i % 2], "a photo of a cat") for i in range(8)]
    with ThreadPoolExecutor(2) as pool:  # two callers at once, as two rollout workers would
        a, b = pool.map(client.score, [items[:4], items[4:]])
    results = a + b
    assert all(r.error is None and 0.0 <= r.score <= 1.0 for r in results), results
    # same image -> same score; the two images differ (the image reaches the model)
    assert results[0].score == pytest.approx(results[2].score, abs=1e-6)
    assert results[0].score != pytest.approx(results[1].score, abs=1e-9)
    calls = read_call_log(log)
    assert sum(c["n"] for c in calls) == 8 and len(calls) < 8
    serve.delete("vlm")
