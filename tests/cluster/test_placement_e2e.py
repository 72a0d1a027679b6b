"""Placement groups and the evaluation entry on a real local cluster.

One Trainer (1 text worker, 2 diffusion workers, ShapesWorld judge on Serve, one GRPO and one
FlowGRPO learner) is built, observed, runs one step, saves a checkpoint, grows and shrinks its
diffusion pool, replaces a worker and shuts down. Then `python -m cluster.eval`'s `main` evaluates
that checkpoint on the same cluster.
"""

import json
import math
import time

import pytest

from cluster.config import load_config
from cluster.driver import Trainer, make_run_dir
from cluster.placement import PLACED_ROLES, actor_placement

pytestmark = pytest.mark.integration

OVERRIDES = [
    "plugins=[examples.shapesworld]", "judge.kind=shapes", "data.train=shapes-train", "data.test=shapes-test",
    "data.eval_limit=2",
    "train.eval_rounds=2", "cluster.text_workers=1", "cluster.diffusion_workers=2", "r3.group_size=4",
    "r3.prompts_per_step=2", "train.steps=1", "logging.progress=false", "logging.tensorboard=false",
    "logging.trajectories_per_step=0",
]


def _locate(actors):
    import ray

    return ray.get([a.__ray_call__.remote(actor_placement) for a in actors], timeout=120)


def _groups():
    """name -> (placement group id, state, bundle count) of this run's groups."""
    from ray.util import placement_group_table

    return {v["name"]: (k, v["state"], len(v["bundles"])) for k, v in placement_group_table().items()
            if v["name"].startswith("r3rl-")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Everything observed during the trainer's life; the cluster stays up for the evaluation test."""
    import ray

    from cluster.session import connect_ray

    root = tmp_path_factory.mktemp("placement")
    cfg = load_config("configs/cpu_tiny.yaml", [f"train.run_dir={root}", "train.run_name=p", *OVERRIDES])
    assert connect_ray(cfg)
    t = Trainer(cfg, make_run_dir(cfg))
    try:
        r = t.roles
        seen = {"groups": _groups(), "cfg": cfg, "root": root}
        seen["actors"] = {role: _locate(actors) for role, actors in (
            ("text_workers", r.text_pool.actors), ("diffusion_workers", r.diffusion_pool.actors),
            ("text_learners", r.text_learners.actors), ("diffusion_learners", r.diffusion_learners.actors))}
        seen["row"] = t.step()
        seen["checkpoint"] = t.save_checkpoint()
        seen["new"] = t.resize_workers(diffusion_workers=3)  # beyond the role's 2 bundles
        seen["grown"] = (_locate(r.diffusion_pool.actors), _groups())
        r.diffusion_pool.replace(0)  # a replacement reuses its bundle
        seen["replaced"] = _locate(r.diffusion_pool.actors[:1])
        seen["versions"] = r.diffusion_pool.call_all("version")
        t.resize_workers(diffusion_workers=2)
        seen["shrunk"] = _groups()
        seen["learners_after"] = _locate([*r.text_learners.actors, *r.diffusion_learners.actors])
    finally:
        t.close()
    seen["closed"] = _groups()
    yield seen
    ray.shutdown()


def test_one_group_per_role_with_the_configured_bundles(run):
    groups, cfg = run["groups"], run["cfg"]
    assert set(groups) == {f"r3rl-{role}" for role in PLACED_ROLES}  # the judge is placed by Serve
    for role in PLACED_ROLES:
        _, state, bundles = groups[f"r3rl-{role}"]
        assert state == "CREATED" and bundles == getattr(cfg.cluster, role).count, role


def test_every_actor_runs_in_its_bundle_of_its_role_group(run):
    for role, located in run["actors"].items():
        pg_id = run["groups"][f"r3rl-{role}"][0]
        assert [where for where in located] == [(pg_id, [i]) for i in range(len(located))], role


def test_elastic_workers_keep_bundles_and_leave_learners_alone(run):
    groups = run["groups"]
    assert run["new"] == {"diffusion_workers": [2]}
    located, grown = run["grown"]
    extra = grown["r3rl-diffusion_workers-2"]
    assert extra[1:] == ("CREATED", 1)
    main = groups["r3rl-diffusion_workers"][0]
    assert located == [(main, [0]), (main, [1]), (extra[0], [0])]
    assert run["replaced"] == [(main, [0])]
    assert run["versions"] == [1, 1, 1]  # the new and the replacement workers got the current weights
    assert run["shrunk"]["r3rl-diffusion_workers-2"][1] == "REMOVED"
    assert run["learners_after"] == [*run["actors"]["text_learners"], *run["actors"]["diffusion_learners"]]


def test_shutdown_removes_every_group(run):
    assert {name: state for name, (_, state, _) in run["closed"].items()} == {
        name: "REMOVED" for name in run["closed"]}
    assert len(run["closed"]) == len(PLACED_ROLES) + 1  # + the extra diffusion group


def test_unplaceable_role_fails_naming_role_and_bundle_and_leaves_nothing_behind(run):
    from cluster.placement import RolePlan, create_placement_groups

    plans = [RolePlan("text_learners", 1, 0.5, 0.0), RolePlan("diffusion_workers", 2, 1000.0, 0.0)]
    with pytest.raises(RuntimeError, match=r"diffusion_workers: 2 x \{'CPU': 1000.0\}") as err:
        create_placement_groups(plans, "PACK", timeout_s=3.0)
    assert "text_learners" not in str(err.value)  # that one was placed
    from ray.util import placement_group_table

    states = [v["state"] for v in placement_group_table().values() if v["name"].startswith("r3rl-")]
    assert states and set(states) == {"REMOVED"}  # the ready group was removed with the failed one


def test_a_learner_that_fails_to_start_leaves_no_judge_app_and_no_group(run):
    """The learners load while the judge deploys; one that fails takes the judge's app and every group with it."""
    import ray
    from ray import serve
    from ray.util import placement_group_table

    from cluster.roles import build_roles, judge_app_name, resolve_paths

    # build_roles runs no preflight, so the text learner's own LoRA check is what refuses the module
    cfg = load_config("configs/cpu_tiny.yaml", [f"train.run_dir={run['root']}", "train.run_name=fails", *OVERRIDES,
                                                 "grpo.lora.rank=4", "grpo.lora.target_modules=[no_such_proj]"])
    with pytest.raises(Exception, match=r"no_such_proj.*match no module"):
        build_roles(cfg, resolve_paths(cfg))
    assert judge_app_name() not in serve.status().applications
    for name in ("text-worker-0", "diffusion-worker-0", "text-learner-0", "diffusion-learner-0"):
        with pytest.raises(ValueError):  # killed and gone: a retry can take the name again
            ray.get_actor(name)
    states = [v["state"] for v in placement_group_table().values() if v["name"].startswith("r3rl-")]
    assert states and set(states) == {"REMOVED"}


def test_eval_entry_loads_the_checkpoint_and_writes_per_round_tables(run, monkeypatch):
    import ray
    from ray.util import placement_group_table

    import rollout.evaluation
    from cluster.eval import files_tensor_sums, main
    from cluster.session import resolve_model_path

    real_evaluate = rollout.evaluation.evaluate

    def evaluate_after_a_worker_dies(prompts, reasoner, generator, *args):
        victim = generator.pool.actors[1]
        ray.kill(victim, no_restart=True)  # found dead by its first call: replaced, its work redone
        deadline = time.monotonic() + 60
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:  # the kill is asynchronous: a call may be served first
                ray.get(victim.__ray_ready__.remote(), timeout=60)
                time.sleep(0.2)
        return real_evaluate(prompts, reasoner, generator, *args)

    monkeypatch.setattr(rollout.evaluation, "evaluate", evaluate_after_a_worker_dies)
    ckpt, out = run["checkpoint"], run["root"] / "eval-out"
    assert main(["--config", "configs/cpu_tiny.yaml", "--checkpoint", str(ckpt), "--out", str(out),
                 f"train.run_dir={run['root']}", *OVERRIDES]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert [r["round"] for r in data["overall"]] == [0, 1]  # one row per round
    for r in data["overall"]:
        assert r["n"] == 2 and math.isfinite(r["accuracy"]) and math.isfinite(r["mean_score"])
    assert "| overall | 1 |" in (out / "eval.md").read_text()
    weights = data["weights"]
    assert weights["version"] == 1 and weights["replacements"] == {"text": 0, "diffusion": 1}
    # the replacement of the killed worker evaluated with the checkpoint's weights too, not the base model's
    assert weights["text"]["worker_versions"] == [1] and weights["diffusion"]["worker_versions"] == [1, 1]
    for kind in ("text", "diffusion"):
        assert all(w["match"] and w["compared"] > 0 for w in weights[kind]["workers"]), weights[kind]
    # the step changed the generator, so a worker that kept the base weights could not match
    base = files_tensor_sums(resolve_model_path("tiny:flux") + "/transformer")
    assert sum(v[0] for v in base.values()) != weights["diffusion"]["checkpoint_sum"]
    states = [v["state"] for v in placement_group_table().values() if v["name"].startswith("r3rl-")]
    assert set(states) == {"REMOVED"}  # eval gave its groups back
