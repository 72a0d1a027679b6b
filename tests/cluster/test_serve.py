"""The inference app (`cluster.serve`): POST /v1/r3 on the tiny models, streaming, batching, bad input, timeouts.

Integration tests share one app per module (real vLLM workers, diffusers worker and VLM judge
behind Serve). The unit tests check the request contract and the batching arithmetic alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster.serve_api import R3Request, RequestRejected, check_limits, validation_errors
from cluster.serve_batching import split_by_counts
from tests.cluster.serve_app import decode_png, read_events, running_app

PAGE = Path(__file__).resolve().parents[2] / "cluster" / "web" / "index.html"


# ------------------------------------------------------------------------------------------ unit


def test_request_defaults_and_strict_types():
    req = R3Request.model_validate({"prompt": "  a red cube  "})
    assert (req.prompt, req.max_rounds, req.seed, req.temperature, req.stream) == ("a red cube", 3, 0, None, False)
    with pytest.raises(ValueError, match="max_rounds"):
        R3Request.model_validate({"prompt": "a", "max_rounds": "3"})


def test_limits_name_the_field():
    with pytest.raises(RequestRejected) as e:
        check_limits(R3Request(prompt="x" * 11), max_prompt_chars=10, max_timeout_s=60)
    assert e.value.body.status == 422 and e.value.body.fields[0].field == "prompt"
    assert "serve.max_prompt_chars" in e.value.body.fields[0].message
    with pytest.raises(RequestRejected) as e:
        check_limits(R3Request(prompt="x", timeout_s=61), max_prompt_chars=10, max_timeout_s=60)
    assert e.value.body.fields[0].field == "timeout_s"
    check_limits(R3Request(prompt="x" * 10, timeout_s=60), max_prompt_chars=10, max_timeout_s=60)


def test_validation_errors_map_to_400_and_422():
    bad_json = validation_errors([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}])
    assert bad_json.body.status == 400 and bad_json.body.fields[0].field == "body"
    extra = validation_errors([{"type": "extra_forbidden", "loc": ("body", "colour"), "msg": "Extra inputs"}])
    assert extra.body.status == 422 and extra.body.fields[0].field == "colour"
    assert "prompt" in extra.body.fields[0].message  # lists the allowed fields


def test_split_by_counts():
    assert split_by_counts([1, 2, 3, 4], [1, 0, 3]) == [[1], [], [2, 3, 4]]
    with pytest.raises(ValueError, match="3 results"):
        split_by_counts([1, 2, 3], [2, 2])


@pytest.mark.parametrize("argv,message", [
    (["--config", "no/such.yaml"], "does not exist"),
    (["--config", "configs/cpu_tiny.yaml", "--port", "70000"], "--port 70000"),
    (["--config", "configs/cpu_tiny.yaml", "serve.max_batch_size=0"], "serve.max_batch_size"),
    (["--config", "configs/cpu_tiny.yaml", "--checkpoint", "no/such/checkpoint"], "no/such/checkpoint"),
])
def test_cli_refuses_bad_settings_with_exit_2_before_engines(argv, message, capsys):
    from cluster.serve import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_run_builder_refuses_unknown_arguments():
    from cluster.serve import app

    with pytest.raises(ValueError, match="unknown serve run arguments \\['port'\\]"):
        app({"config": "configs/cpu_tiny.yaml", "port": "9000"})


def test_page_sets_model_text_with_text_content_only():
    page = PAGE.read_text()
    assert "textContent" in page
    assert "innerHTML" not in page and "outerHTML" not in page and "insertAdjacentHTML" not in page


# ----------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def url():
    with running_app() as base:
        yield base


def _post(url: str, body: object, **kw):
    import requests

    return requests.post(f"{url}/v1/r3", json=body, timeout=600, **kw)


def _check_rounds(rounds: list[dict], max_rounds: int) -> None:
    assert 1 <= len(rounds) <= max_rounds
    assert [r["index"] for r in rounds] == list(range(len(rounds)))
    assert [r["kind"] for r in rounds] == ["plan"] + ["reflection"] * (len(rounds) - 1)
    assert not rounds[0]["stopped"] and all(not r["stopped"] for r in rounds[:-1])  # a stop ends the chain
    for r in rounds:
        assert 0.0 <= r["score"] <= 1.0
        if r["stopped"]:
            assert r["image_png_b64"] is None
        else:
            assert decode_png(r["image_png_b64"]).shape == (64, 64, 3)


@pytest.mark.integration
def test_r3_returns_rounds_in_order_with_pngs(url):
    resp = _post(url, {"prompt": "a red cube left of a blue sphere", "max_rounds": 3, "seed": 1})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["prompt"], body["seed"], body["max_rounds"], body["weight_version"]) == (
        "a red cube left of a blue sphere", 1, 3, 0)
    _check_rounds(body["rounds"], 3)
    assert body["stopped"] == body["rounds"][-1]["stopped"]
    assert all(r["judge_error"] is None for r in body["rounds"])  # the VLM judge scored every image


@pytest.mark.integration
def test_streaming_yields_the_same_rounds(url):
    request = {"prompt": "two green circles", "max_rounds": 3, "seed": 7}
    plain = _post(url, request).json()
    with _post(url, {**request, "stream": True}, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = read_events(resp)
    kinds = [e for e, _ in events]
    assert kinds == ["round"] * len(plain["rounds"]) + ["done"], kinds
    streamed = [data for e, data in events if e == "round"]
    assert streamed == plain["rounds"]  # same seed, same workers: the same texts, images and scores
    assert events[-1][1] == plain


@pytest.mark.integration
def test_eight_concurrent_requests_all_succeed_and_share_pool_calls(url):
    import requests

    bodies = [{"prompt": f"{n} blue squares", "max_rounds": 2, "seed": n} for n in range(8)]
    with ThreadPoolExecutor(8) as ex:
        responses = list(ex.map(lambda b: _post(url, b), bodies))
    assert [r.status_code for r in responses] == [200] * 8, [r.text[:200] for r in responses]
    for b, r in zip(bodies, responses, strict=True):
        assert r.json()["prompt"] == b["prompt"] and r.json()["seed"] == b["seed"]
        _check_rounds(r.json()["rounds"], 2)
    health = requests.get(f"{url}/v1/health", timeout=60).json()
    assert health["largest_batch"]["reasoner"] > 1  # calls of concurrent requests were merged


BAD_REQUESTS = [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "x" * 201}, 422, "prompt"),  # serve.max_prompt_chars=200
    ({}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "a cat", "max_rounds": 0}, 422, "max_rounds"),
    ({"prompt": "a cat", "max_rounds": 9}, 422, "max_rounds"),
    ({"prompt": "a cat", "max_rounds": "3"}, 422, "max_rounds"),
    ({"prompt": "a cat", "seed": -1}, 422, "seed"),
    ({"prompt": "a cat", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": "a cat", "stream": "yes"}, 422, "stream"),
    ({"prompt": "a cat", "colour": "red"}, 422, "colour"),
    ({"prompt": "a cat", "timeout_s": 10_000}, 422, "timeout_s"),  # above serve.request_timeout_s
    ([{"prompt": "a cat"}], 422, "body"),
    ("{not json", 400, "body"),
]


@pytest.mark.integration
@pytest.mark.parametrize("body,status,field", BAD_REQUESTS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_4xx_naming_the_field(url, body, status, field):
    import requests

    if isinstance(body, str):
        resp = requests.post(f"{url}/v1/r3", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        resp = _post(url, body)
    assert resp.status_code == status, resp.text
    error = resp.json()
    assert error["status"] == status
    assert field in [f["field"] for f in error["fields"]], error


@pytest.mark.integration
def test_timed_out_request_gets_504_and_the_next_succeeds(url):
    resp = _post(url, {"prompt": "a yellow star", "max_rounds": 8, "timeout_s": 0.001})
    assert resp.status_code == 504, resp.text
    assert resp.json()["status"] == 504 and "timeout" in resp.json()["error"]
    with _post(url, {"prompt": "a yellow star", "max_rounds": 8, "timeout_s": 0.001, "stream": True},
               stream=True) as streamed:
        events = read_events(streamed)
    assert events[-1][0] == "error" and events[-1][1]["status"] == 504
    after = _post(url, {"prompt": "a yellow star", "max_rounds": 1})
    assert after.status_code == 200, after.text
    _check_rounds(after.json()["rounds"], 1)


@pytest.mark.integration
def test_openapi_schema_and_page(url):
    import requests

    schema = requests.get(f"{url}/openapi.json", timeout=60).json()
    assert "/v1/r3" in schema["paths"]
    fields = schema["components"]["schemas"]["R3Request"]["properties"]
    assert {"prompt", "max_rounds", "seed", "temperature", "stream"} <= set(fields)
    assert json.dumps(schema["paths"]["/v1/r3"]["post"]["responses"]).count("ErrorBody") >= 3
    page = requests.get(f"{url}/", timeout=60)
    assert page.status_code == 200 and 'id="prompt"' in page.text
