"""Operations on a real local cluster: exact resume, worker death, elastic workers, one-step-off.

The ShapesWorld judge (exact, pure numpy, batch-independent) sits behind Ray Serve here, so that two
runs with the same seeds are bitwise comparable; everything else is the real stack on tiny models.
"""

import re
import threading

import pytest

from cluster.config import load_config
from cluster.driver import Trainer, make_run_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOLATILE = re.compile(r"(^time/|seconds|_per_s$|_s$|^sync/)")


def _cfg(run_root, name, *extra):
    return load_config("configs/cpu_tiny.yaml", [
        f"train.run_dir={run_root}", f"train.run_name={name}", "plugins=[examples.shapesworld]", "judge.kind=shapes",
        "data.train=shapes-train",
        "data.test=shapes-test", "data.eval_limit=2", "cluster.text_workers=2", "r3.group_size=4",
        "r3.prompts_per_step=2", "train.steps=6", "logging.progress=false", "logging.tensorboard=false", *extra,
    ])


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    import ray

    from cluster.session import connect_ray

    root = tmp_path_factory.mktemp("ops")
    assert connect_ray(_cfg(root, "x"))
    yield root
    ray.shutdown()


def _hashes(trainer):
    import ray

    from learners.checkpointing import parameters_sha256

    return [ray.get(g.actors[0].__ray_call__.remote(parameters_sha256))
            for g in (trainer.roles.text_learners, trainer.roles.diffusion_learners)]


def _stable(row):
    return {k: v for k, v in row.items() if not VOLATILE.search(k)}


@pytest.fixture(scope="module")
def first_run(run_root):
    """4 steps with a checkpoint after step 2 and the learners' hashes after step 3 (what a resumed
    trainer must reach in one step); then the same trainer serves the failure tests (their step 4
    is a generate step)."""
    t = Trainer(_cfg(run_root, "a"), make_run_dir(_cfg(run_root, "a")))
    rows = [t.step(), t.step()]
    ckpt = t.save_checkpoint()
    rows.append(t.step())
    hashes = _hashes(t)
    rows.append(t.step())
    yield t, rows, ckpt, hashes
    t.close()


def _kill_when_called(pool, method, victim_fn, delay_s=0.05):
    """Kill a victim `delay_s` after the pool dispatches its next `method` call (requests in flight)."""
    original = pool.map_shards
    fired = []

    def wrapped(name, items, *args):
        if name == method and not fired:
            fired.append(threading.Timer(delay_s, victim_fn))
            fired[0].start()
        return original(name, items, *args)

    pool.map_shards = wrapped
    return fired


def test_worker_and_judge_replica_killed_mid_step_are_replaced_and_work_redone(first_run):
    import ray

    t, *_ = first_run
    victim = ray.get_actor("text-worker-1")
    _kill_when_called(t.roles.text_pool, "generate", lambda: ray.kill(victim, no_restart=True))

    def kill_judge_replica():
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::judge" in a["name"]]
        assert names, "no judge replica found"
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=False)

    _kill_when_called(t.roles.diffusion_pool, "sample", kill_judge_replica, delay_s=0.0)
    row = t.step()
    assert row["workers/text_replacements"] == 1
    assert row["stages"] == "generate"
    assert row["samples/trajectories"] == row["samples/text"] == 2 * 4  # no sample lost
    assert row["version/text_workers_min"] == row["version/policy"]  # the replacement was re-synced
    assert sum(t.roles.judge.client.failures.values()) == 0  # lost judge requests were retried, none failed


def test_elastic_workers_get_current_weights_before_serving(first_run):
    import ray

    t, *_ = first_run
    (t.run_dir / "control.yaml").write_text("text_workers: 3\ndiffusion_workers: 2\n")
    new = t.apply_control_file()
    assert new == {"text_workers": [2], "diffusion_workers": [1]}
    assert (t.run_dir / f"control.applied-step-{t.step_index:06d}.yaml").is_file()
    versions = ray.get([a.version.remote() for a in t.roles.text_pool.actors + t.roles.diffusion_pool.actors])
    assert versions == [t.roles.version] * 5
    before = list(t.roles.text_pool.calls_per_worker)
    row = t.step()
    assert all(after > b for after, b in zip(t.roles.text_pool.calls_per_worker, before, strict=True))
    assert row["version/text_workers_min"] == row["version/policy"]
    (t.run_dir / "control.yaml").write_text("text_workers: 0\n")
    assert t.apply_control_file() == {}
    assert len(t.roles.text_pool) == 3
    (t.run_dir / "control.yaml").write_text("text_workers: 64\n")  # far beyond the local cluster's CPUs
    assert t.apply_control_file() == {}
    assert not (t.run_dir / "control.yaml").exists()
    assert (t.run_dir / f"control.rejected-step-{t.step_index:06d}.yaml").read_text() == "text_workers: 64\n"
    assert len(t.roles.text_pool) == 3


def _files(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_learner_killed_mid_step_stops_with_a_clear_message(first_run, run_root):
    """The last test that uses the first trainer's roles (test_resume_is_exact only closes it)."""
    import ray

    from cluster.checkpoint import resolve_resume
    from cluster.failures import LearnerFailure

    t, _, ckpt, _ = first_run
    before, step = _files(ckpt), t.step_index
    group, victim = t.roles.text_learners, t.roles.text_learners.actors[0]
    original = group.train_step

    def killed_as_training_starts(*args, **kwargs):
        ray.kill(victim, no_restart=True)
        return original(*args, **kwargs)

    group.train_step = killed_as_training_starts
    with pytest.raises(LearnerFailure) as info:
        t.step()
    e, msg = info.value, str(info.value)
    assert (e.actors, e.step, e.phase, e.checkpoint) == (["text-learner-0"], step, "learners training", ckpt)
    assert f"text-learner-0 died during step {step}" in msg and "ActorDiedError" in msg
    assert f"last complete checkpoint is {ckpt}" in msg and "--resume auto` (picks that checkpoint)" in msg
    assert t.step_index == step  # the failed step does not count
    assert _files(ckpt) == before  # the last checkpoint is untouched ...
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # ... and no partial one was started
    assert resolve_resume("auto", run_root) == ckpt  # what the message tells the user to resume from


def test_resume_is_exact(first_run, run_root):
    t, rows, ckpt, hashes = first_run
    t.close()  # free the actor names; a new trainer (new engines) continues from the checkpoint
    cfg = _cfg(run_root, "b")
    t2 = Trainer(cfg, make_run_dir(cfg))
    try:
        t2.load_checkpoint(ckpt)
        assert t2.step_index == 2
        resumed = [t2.step()]
        assert [_stable(r) for r in resumed] == [_stable(r) for r in rows[2:3]]
        assert _hashes(t2) == hashes  # bitwise-equal learner parameters
    finally:
        t2.close()


def test_one_step_off_overlaps_is_at_most_one_version_stale_and_resumes_exactly(run_root):
    """3 of 4 async steps with a checkpoint after step 2 (it holds the rollout made ahead for step 3); a
    new trainer resumed from it makes the same third step and ends with bitwise-equal learner parameters."""
    cfg = _cfg(run_root, "async", "train.async_one_step_off=true", "train.steps=4", "cluster.text_workers=1")
    t = Trainer(cfg, make_run_dir(cfg))
    try:
        rows = [t.step(), t.step()]
        ckpt = t.save_checkpoint()
        rows += [t.step()]  # its learn overlaps the rollout made ahead for step 3
        hashes = _hashes(t)
    finally:
        t.close()
    assert [r["version/max_staleness"] for r in rows] == [0, 1, 1]
    phases = {(p["step"], p["phase"]): p for p in t.phase_log}
    for step in (0, 1, 2):
        learn, ahead = phases[(step, "learn")], phases[(step + 1, "rollout")]
        assert ahead["start"] < learn["end"] and learn["start"] < ahead["end"], (learn, ahead)
    assert (ckpt / "pending" / "rollout.safetensors").is_file()
    cfg2 = _cfg(run_root, "async-resumed", "train.async_one_step_off=true", "train.steps=4", "cluster.text_workers=1")
    t2 = Trainer(cfg2, make_run_dir(cfg2))
    try:
        t2.load_checkpoint(ckpt)
        resumed = [t2.step()]
        assert not any(p["step"] == 2 and p["phase"] == "rollout" for p in t2.phase_log)  # step 2's rollout was restored
        assert [_stable(r) for r in resumed] == [_stable(r) for r in rows[2:]]
        assert _hashes(t2) == hashes  # bitwise-equal learner parameters
    finally:
        t2.close()
