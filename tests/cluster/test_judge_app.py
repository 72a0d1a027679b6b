"""A judge app whose driver was SIGKILLed is deleted by the next run; live drivers' apps are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]

RAY_NUM_CPUS = 3

# A second driver on the same cluster deploys `judge-<its job id>` and SIGKILLs itself: no cleanup runs.
_DRIVER = """
import os, signal, sys
import ray
from ray import serve
ray.init(address=sys.argv[1])
serve.start(proxy_location="Disabled")

@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Judge:
    def __call__(self, x):
        return x

name = "judge-" + ray.get_runtime_context().get_job_id()
serve.run(Judge.bind(), name=name, route_prefix=None)
print(name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _deploy_trivial(name: str) -> None:
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Trivial:
        def __call__(self, x: object) -> object:
            return x

    serve.run(Trivial.bind(), name=name, route_prefix=None)


def test_orphaned_judge_app_of_a_killed_driver_is_deleted_and_live_apps_are_kept() -> None:
    import ray
    from ray import serve

    from cluster.roles import delete_orphaned_judge_apps, judge_app_name

    gcs = ray.get_runtime_context().gcs_address
    driver = subprocess.run([sys.executable, "-c", _DRIVER, gcs], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})  # fmt: skip
    assert driver.returncode == -signal.SIGKILL, driver.stderr[-3000:]
    orphan = driver.stdout.strip().splitlines()[-1]
    assert orphan.startswith("judge-") and orphan != judge_app_name()
    try:
        _deploy_trivial(judge_app_name())  # this driver's judge: its job is alive
        _deploy_trivial("judge-ffffff00")  # a judge-like name of no known job
        _deploy_trivial("scorer")  # not a judge
        assert orphan in serve.status().applications
        assert delete_orphaned_judge_apps() == [orphan]
        apps = serve.status().applications
        assert orphan not in apps
        assert {judge_app_name(), "judge-ffffff00", "scorer"} <= set(apps)
        assert delete_orphaned_judge_apps() == []
    finally:
        serve.shutdown()
