"""deploy_judge / ServeJudgeClient argument checks (no cluster needed: they fail before Serve)."""

import pytest

from reward.service import ServeJudgeClient, deploy_judge


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 2}}, "exactly one of"),
        ({"num_replicas": None, "autoscaling": None}, "exactly one of"),
        ({"num_replicas": 0}, "num_replicas 0"),
        ({"num_replicas": None, "autoscaling": {"max_replicas": 2}}, "needs min_replicas and max_replicas"),
        ({"max_batch_size": 0}, "max_batch_size 0"),
    ],
)
def test_deploy_judge_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deploy_judge({"kind": "constant"}, **kwargs)


def test_client_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s > 0"):
        ServeJudgeClient("judge", timeout_s=0)
    with pytest.raises(ValueError, match="items_per_request >= 1"):
        ServeJudgeClient("judge", items_per_request=0)


@pytest.mark.parametrize(("route_prefix", "expected"), [("/{name}", "/scorer"), ("/judge", "/judge"), (None, None)])
def test_deploy_judge_route_is_the_name_a_fixed_path_or_none(monkeypatch, route_prefix, expected):
    """None deploys without an HTTP route (no proxy runs, so Serve must not announce one)."""
    from reward import service

    routes = []
    monkeypatch.setattr(service.serve, "run", lambda app, name, route_prefix: routes.append((name, route_prefix)))
    deploy_judge({"kind": "constant"}, name="scorer", route_prefix=route_prefix)
    assert routes == [("scorer", expected)]
