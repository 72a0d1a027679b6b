"""Placement planning (pure, no Ray cluster): bundles per role, what is placed where."""

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.eval import compare_sums
from cluster.placement import PLACED_ROLES, RolePlacement, RolePlan, format_plan, plan_placement

CPU = str(Path(__file__).resolve().parents[2] / "configs/cpu_tiny.yaml")


def test_one_bundle_per_actor_with_the_roles_resources():
    cfg = load_config(CPU, ["cluster.text_workers.count=3", "cluster.text_workers.num_gpus=1",
                            "cluster.text_workers.tensor_parallel_size=2", "cluster.diffusion_learners.count=2"])
    plans = {p.role: p for p in plan_placement(cfg)}
    assert plans["text_workers"].bundles == [{"CPU": 0.5, "GPU": 2.0}] * 3  # GPUs x tensor parallel size
    assert plans["diffusion_learners"].bundles == [{"CPU": 0.5}] * 2  # no GPU: no zero entry (Ray refuses them)
    assert plans["text_learners"].bundles == [{"CPU": 0.5}]
    assert RolePlan("text_workers", 2, 0.0, 0.0).bundle == {}  # nothing to reserve: refused at creation


def test_judge_replicas_are_left_to_serve():
    assert "judge_replicas" not in PLACED_ROLES
    assert set(PLACED_ROLES) == {"text_workers", "diffusion_workers", "text_learners", "diffusion_learners"}
    text = format_plan(plan_placement(load_config(CPU)), "PACK")
    assert "judge_replicas" in text and "placed by Ray Serve" in text


def test_gpu_tensor_parallel_text_workers_are_left_to_vllm_with_a_warning(caplog):
    from cluster.placement import create_placement_groups

    cfg = load_config(CPU, ["cluster.text_workers.num_gpus=1", "cluster.text_workers.tensor_parallel_size=2"])
    plans = {p.role: p for p in plan_placement(cfg)}
    assert "vLLM places its 2 tensor-parallel workers" in plans["text_workers"].unplaced_reason
    assert plans["text_learners"].unplaced_reason is None
    assert "tensor-parallel" in format_plan(list(plans.values()), "PACK")
    with caplog.at_level("WARNING", logger="cluster.placement"):
        assert create_placement_groups(list(plans.values()), "PACK", 1.0, roles=("text_workers",)) == {}
    assert "text_workers" in caplog.text and "plain resources" in caplog.text
    single = load_config(CPU, ["cluster.text_workers.num_gpus=1"])
    assert {p.role: p for p in plan_placement(single)}["text_workers"].unplaced_reason is None


def test_empty_bundle_is_refused_before_ray_is_asked():
    from cluster.placement import create_placement_groups

    cfg = load_config(CPU, ["cluster.text_learners.num_cpus=0"])
    with pytest.raises(ValueError, match="cluster.text_learners"):
        create_placement_groups(plan_placement(cfg), "PACK", 1.0)


def test_actor_i_gets_bundle_i_of_the_role_group():
    group = object()  # stands for a PlacementGroup; only passed through to the strategy
    placement = RolePlacement(RolePlan("diffusion_workers", 2, 0.5, 0.0), group, timeout_s=1.0)
    strategies = [placement.scheduling_strategy(i) for i in range(2)]
    assert [s.placement_group_bundle_index for s in strategies] == [0, 1]
    assert all(s.placement_group is group for s in strategies)
    assert placement.groups() == [group]
    with pytest.raises(ValueError, match="index -1"):
        placement.scheduling_strategy(-1)


def test_compare_sums_names_the_differing_tensors():
    files = {"a": [1.0, 2.0], "b": [3.0, 4.0]}
    assert compare_sums({"a": [1.0, 2.0], "fused": [0.5, 0.5]}, files) == {
        "compared": 1, "engine_only": 1, "differing": [], "match": True}
    assert compare_sums({"a": [1.0, 2.0], "b": [3.001, 4.0]}, files)["differing"] == ["b"]
    assert not compare_sums({"other": [1.0, 1.0]}, files)["match"]  # nothing compared is no match


def test_resize_shortfall_counts_only_workers_beyond_the_reserved_bundles():
    from cluster.placement import ResizeRequest, resize_shortfall

    cpu = {"CPU": 0.5}
    # 2 reserved bundles: growing 1 -> 2 needs nothing new; 2 -> 4 needs 2 x 0.5 CPU
    assert resize_shortfall([ResizeRequest("text_workers", cpu, 2, 1, 2)], {}) is None
    assert resize_shortfall([ResizeRequest("text_workers", cpu, 2, 2, 4)], {"CPU": 1.0}) is None
    msg = resize_shortfall([ResizeRequest("text_workers", cpu, 2, 2, 5)], {"CPU": 1.0, "GPU": 0.0})
    assert msg.startswith("cannot place text_workers: 5 (now 2, {'CPU': 0.5} each)")
    assert "CPU 1.5 more but 1 free" in msg and "ask for fewer workers" in msg
    # a pool shrinking below its extra groups gives their resources to the other one
    text_down, diff_up = ResizeRequest("text_workers", cpu, 1, 3, 1), ResizeRequest("diffusion_workers", cpu, 1, 1, 3)
    assert resize_shortfall([text_down, diff_up], {"CPU": 0.0}) is None
    assert "CPU 1 more but 0 free" in resize_shortfall([diff_up], {"CPU": 0.0})
    # GPUs are checked like CPUs; a pool without a placement group reserves nothing
    gpu = ResizeRequest("text_workers", {"CPU": 1.0, "GPU": 2.0}, 0, 1, 2)
    assert "GPU 2 more but 1 free" in resize_shortfall([gpu], {"CPU": 8.0, "GPU": 1.0})


def test_resize_requests_read_the_pools_and_the_config():
    from types import SimpleNamespace

    from cluster.placement import ResizeRequest, resize_requests

    cfg = load_config(CPU, ["cluster.text_workers.count=2", "cluster.diffusion_workers.num_cpus=1.5"])
    class Pool(SimpleNamespace):
        def __len__(self):
            return self.n

    pools = {"text_workers": Pool(placement=SimpleNamespace(bundle_count=2), n=2),
             "diffusion_workers": Pool(placement=None, n=1)}
    assert resize_requests(cfg, pools, {"text_workers": 3, "diffusion_workers": 2}) == [
        ResizeRequest("text_workers", {"CPU": 0.5}, 2, 2, 3), ResizeRequest("diffusion_workers", {"CPU": 1.5}, 0, 1, 2)]


# ---- fit against the declared cluster, judge replicas with GPUs --------------------------------------


def _hardware(nodes, gpus, cpus=None):
    return [f"cluster.hardware={{nodes: {nodes}, gpus_per_node: {gpus}, gpu_memory_gb: 80"
            + (f", cpus_per_node: {cpus}" if cpus else "") + "}"]


def test_fit_check_places_whole_bundles_on_nodes():
    from cluster.fit_check import placement_misfit

    gpu_roles = [f"cluster.{r}.num_gpus=1" for r in ("text_workers", "diffusion_workers", "text_learners",
                                                     "diffusion_learners")]
    judge = ["cluster.judge_replicas.num_gpus=2", "cluster.judge_replicas.min_replicas=1",
             "cluster.judge_replicas.max_replicas=2"]
    assert placement_misfit(load_config(CPU, gpu_roles)) is None  # no hardware declared: nothing to check
    # 4 one-GPU actors + 2 judge replicas x 2 GPUs = 8 GPUs on 2 nodes of 4
    assert placement_misfit(load_config(CPU, gpu_roles + judge + _hardware(2, 4))) is None
    # the same 8 GPUs on 4 nodes of 2 fit too; on 8 nodes of 1 a 2-GPU replica has no node
    assert placement_misfit(load_config(CPU, gpu_roles + judge + _hardware(4, 2))) is None
    msg = placement_misfit(load_config(CPU, gpu_roles + judge + _hardware(8, 1)))
    assert msg.startswith("cluster.judge_replicas does not fit") and "(2 GPUs, 0.5 CPUs)" in msg
    # the judge counts at max_replicas: a third replica needs 2 GPUs more than the 8
    msg = placement_misfit(load_config(CPU, gpu_roles + judge + ["cluster.judge_replicas.max_replicas=3"]
                                       + _hardware(2, 4)))
    assert "3 actors at max_replicas" in msg and "asks for 10 GPUs" in msg and "has 8 GPUs" in msg


def test_fit_check_counts_cpus_when_declared():
    from cluster.fit_check import placement_misfit

    many = ["cluster.text_workers.count=3", "cluster.text_workers.num_cpus=2"]
    # 3 text workers x 2 CPUs + the 4 other roles' actors x 0.5 CPUs = 8 CPUs
    msg = placement_misfit(load_config(CPU, many + _hardware(1, 0, cpus=7)))
    assert msg is not None and "asks for" in msg and "8 CPUs in all" in msg and "7 CPUs" in msg
    assert placement_misfit(load_config(CPU, many + _hardware(1, 0, cpus=8))) is None
    assert placement_misfit(load_config(CPU, many + _hardware(1, 0))) is None  # CPUs not declared: not checked


def test_judge_tensor_parallel_needs_as_many_gpus_per_replica():
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match="set cluster.judge_replicas.num_gpus=4"):
        load_config(CPU, ["judge.tensor_parallel_size=4", "cluster.judge_replicas.num_gpus=1"])
    load_config(CPU, ["judge.tensor_parallel_size=4", "cluster.judge_replicas.num_gpus=4"])


def test_vlm_judge_gets_its_own_engine_settings_and_tensor_parallel_executor():
    from cluster.roles import ModelPaths, judge_spec

    paths = ModelPaths("r", "g", "/judge")
    cfg = load_config(CPU, ["judge.kind=vlm", "judge.dtype=bfloat16", "judge.max_model_len=8192",
                            "models.reasoner.max_model_len=512"])
    spec = judge_spec(cfg, paths)
    assert (spec["model_path"], spec["dtype"], spec["max_model_len"]) == ("/judge", "bfloat16", 8192)
    assert "engine_kwargs" not in spec
    tp = judge_spec(load_config(CPU, ["judge.kind=vlm", "judge.tensor_parallel_size=4",
                                      "cluster.judge_replicas.num_gpus=4"]), paths)
    assert tp["engine_kwargs"] == {"tensor_parallel_size": 4, "distributed_executor_backend": "mp"}


def test_judge_replica_gpus_reach_the_serve_actor_options():
    from reward.service import deployment_options

    common = dict(name="judge", max_batch_size=8, batch_wait_timeout_s=0.05, max_ongoing_requests=None,
                  num_cpus=16, runtime_env=None)
    gpu = deployment_options(num_replicas=None, autoscaling={"min_replicas": 1, "max_replicas": 2}, num_gpus=4,
                             **common)
    assert gpu["ray_actor_options"] == {"num_cpus": 16, "num_gpus": 4}
    assert gpu["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2} and gpu["max_ongoing_requests"] == 16
    assert deployment_options(num_replicas=1, autoscaling=None, num_gpus=0, **common)["ray_actor_options"] == {
        "num_cpus": 16}  # no zero GPU entry
    with pytest.raises(ValueError, match="num_gpus -1"):
        deployment_options(num_replicas=1, autoscaling=None, num_gpus=-1, **common)
