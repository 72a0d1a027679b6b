"""A rollout worker that dies outside a rollout (before or inside a weight sync, before a version query,
during an evaluation, while an elastic resize brings it up) is replaced, given the current weights, and the run
goes on; replacements that keep dying stop the run with `WorkerFailure` (exit 6) after a checkpoint of
the last completed step.

Real workers, learners and weight sync on tiny models; the exact ShapesWorld judge behind Ray Serve.
"""

import time

import pytest

from cluster.config import load_config
from cluster.driver import Trainer, make_run_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cfg(run_root, name):
    return load_config("configs/cpu_tiny.yaml", [
        f"train.run_dir={run_root}", f"train.run_name={name}", "plugins=[examples.shapesworld]", "judge.kind=shapes",
        "data.train=shapes-train", "data.test=shapes-test", "data.eval_limit=2", "train.eval_rounds=1",
        "cluster.text_workers=2", "r3.group_size=4", "r3.prompts_per_step=2", "train.steps=8", "train.retries=1",
        "logging.progress=false", "logging.tensorboard=false",
        # a broadcast that lost a member frees the learner after this (then the sync is redone)
        "sync.group_timeout_s=30",
    ])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    import ray

    from cluster.session import connect_ray

    root = tmp_path_factory.mktemp("death")
    cfg = _cfg(root, "a")
    assert connect_ray(cfg)
    t = Trainer(cfg, make_run_dir(cfg))
    t.step()
    yield t
    t.close()
    ray.shutdown()


def _kill_and_wait(actor):
    """Kill a worker and wait until Ray reports it dead (ray.kill returns before the process is gone)."""
    import ray

    ray.kill(actor, no_restart=True)
    for _ in range(600):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=1)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.1)
    raise AssertionError("the killed worker still answers")


def _versions(pool):
    import ray

    return ray.get([a.version.remote() for a in pool.actors])


def test_worker_killed_just_before_the_weight_sync_is_replaced_and_synced(trainer):
    t = trainer
    victim = t.roles.text_pool.actors[1]
    learn = t._learn_timed

    def learn_then_kill(*args):
        out = learn(*args)
        _kill_and_wait(victim)
        return out

    t._learn_timed = learn_then_kill
    try:
        before = t.roles.text_pool.replacements
        row = t.step()
    finally:
        t._learn_timed = learn
    assert t.roles.text_pool.replacements == before + 1
    assert t.roles.text_pool.actors[1] is not victim
    assert row["version/text_workers_min"] == row["version/policy"] == t.roles.version == 2
    assert _versions(t.roles.text_pool) == [2, 2]


def test_worker_that_dies_inside_the_weight_sync_is_replaced_and_the_sync_redone(trainer):
    """The worker passes the liveness check, then dies once the sync has begun: the broadcast fails, the
    dead worker is replaced and the sync is redone over a new group."""
    t = trainer
    sync = t.roles.text_sync.sync
    victim = t.roles.text_pool.actors[0]
    calls = []

    def sync_with_a_death(learners, workers, version):
        calls.append(version)
        if len(calls) == 1:
            _kill_and_wait(victim)
        return sync(learners, workers, version)

    t.roles.text_sync.sync = sync_with_a_death
    try:
        before = t.roles.text_pool.replacements
        row = t.step()
    finally:
        t.roles.text_sync.sync = sync
    assert len(calls) == 2 and calls[0] == calls[1] == row["version/policy"]  # redone once, same version
    assert t.roles.text_pool.replacements == before + 1 and t.roles.text_pool.actors[0] is not victim
    assert row["version/text_workers_min"] == row["version/policy"]
    assert _versions(t.roles.text_pool) == [t.roles.version] * 2


def test_worker_killed_before_a_version_query_is_replaced_with_the_current_weights(trainer):
    t = trainer
    victim = t.roles.diffusion_pool.actors[0]
    _kill_and_wait(victim)
    before = t.roles.diffusion_pool.replacements
    versions = t._worker_versions()
    assert t.roles.diffusion_pool.replacements == before + 1
    assert versions["diffusion_workers"] == [t.roles.version]


def test_worker_killed_during_evaluation_is_replaced_and_the_evaluation_completes(trainer):
    import threading

    t = trainer
    pool = t.roles.text_pool
    victim = pool.actors[0]
    original = pool.map_shards
    fired = []

    def map_then_kill(method, items, *args):
        if method == "generate" and not fired:
            fired.append(threading.Timer(0.05, lambda: _kill_and_wait(victim)))
            fired[0].start()
        return original(method, items, *args)

    pool.map_shards = map_then_kill
    try:
        before = pool.replacements
        report = t.evaluate(tag="killed")
    finally:
        pool.map_shards = original
    fired[0].join()
    assert report.num_prompts == 2 and (t.run_dir / "eval-killed" / "eval.json").is_file()
    assert pool.replacements == before + 1
    assert _versions(pool) == [t.roles.version] * 2


def test_a_worker_added_by_a_resize_that_dies_while_being_synced_is_started_again(trainer):
    import ray

    t = trainer
    pool = t.roles.diffusion_pool
    factory, spawned = pool.factory, []

    def first_dead_on_arrival(index, strategy):
        actor = factory(index, strategy)
        spawned.append(actor)
        if len(spawned) == 1:
            ray.kill(actor, no_restart=True)
        return actor

    (t.run_dir / "control.yaml").write_text("diffusion_workers: 2\n")
    pool.factory = first_dead_on_arrival
    try:
        new = t.apply_control_file()
    finally:
        pool.factory = factory
    assert new == {"diffusion_workers": [1]} and len(spawned) == 2
    assert pool.actors[1] is spawned[1]
    assert _versions(pool) == [t.roles.version] * 2
    (t.run_dir / "control.yaml").write_text("diffusion_workers: 1\n")
    t.apply_control_file()
    assert len(pool) == 1


def test_replacements_that_keep_dying_stop_the_run_with_a_checkpoint(trainer):
    import ray

    from cluster.failures import WORKER_FAILURE_EXIT_CODE, WorkerFailure

    t = trainer
    pool = t.roles.text_pool
    factory = pool.factory

    def dead_on_arrival(index, strategy):
        actor = factory(index, strategy)
        ray.kill(actor, no_restart=True)
        return actor

    learn = t._learn_timed

    def learn_then_kill(*args):
        out = learn(*args)
        _kill_and_wait(pool.actors[1])
        pool.factory = dead_on_arrival
        return out

    t._learn_timed = learn_then_kill
    step = t.step_index
    with pytest.raises(WorkerFailure) as info:
        t.step()
    e = info.value
    assert e.exit_code == WORKER_FAILURE_EXIT_CODE == 6
    assert "text_workers [1]" in str(e) and "train.retries=1" in str(e) and f"during step {step}" in str(e)
    # the learners had updated: that update completes the step, and the checkpoint holds it
    assert e.checkpoint is not None and e.checkpoint.name == f"step-{step + 1:06d}"
    assert "--resume auto` (picks that checkpoint)" in str(e) or f"--resume {e.checkpoint}" in str(e)
    import json

    assert json.loads((e.checkpoint / "meta.json").read_text())["version"] == t.roles.version
