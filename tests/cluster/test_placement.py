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
