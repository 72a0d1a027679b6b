"""Config sections of the models and of the Ray cluster: which models, how many actors of each role
and what each holds (`cluster.config` assembles them)."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.config_base import _Section

__all__ = [
    "ReasonerModel",
    "GeneratorModel",
    "ModelsConfig",
    "RoleSpec",
    "JudgeReplicas",
    "HardwareSpec",
    "ClusterConfig",
]

# ---------------------------------------------------------------------------------------- models


class ReasonerModel(_Section):
    path: str = Field("tiny:vlm", description="HF folder of the reasoner, or tiny:lm / tiny:vlm")
    max_model_len: int = Field(1024, gt=0, description="vLLM context length")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="engine dtype")
    trust_remote_code: bool = Field(False, description="never needed for supported architectures")
    gpu_memory_utilization: float = Field(
        0.8, gt=0, le=1, description="share of each GPU's memory one text worker's vLLM engine takes (weights + KV "
        "cache); lower it when other roles share the GPU (vLLM refuses to start if that much is not free)"
    )
    backend: Literal["vllm", "hf"] = Field(
        "vllm", description="rollout engine of the text workers: vllm (actors.text_worker) or hf = transformers "
        "(actors.hf_text_worker: one device per worker, no tensor parallelism; serves families vLLM cannot serve "
        "here, e.g. Qwen2.5-VL with images on the CPU, tiny:qwen25vl)"
    )
    config: str | None = Field(
        None, description="folder with this model's config files (no weights), read by --dry-run's memory plan when "
        "`path` is not on this machine; a relative path is taken from the current directory, else from the "
        "repository (configs/models/ ships the production models' configs)"
    )


class GeneratorModel(_Section):
    path: str = Field("tiny:flux", description="diffusers FluxKontextPipeline folder, or tiny:flux")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="pipeline dtype")
    height: int = Field(64, gt=0, multiple_of=16, description="image height in pixels")
    width: int = Field(64, gt=0, multiple_of=16, description="image width in pixels")
    max_sequence_length: int = Field(128, ge=1, le=512, description="T5 tokens per prompt (FLUX: 512)")
    config: str | None = Field(
        None, description="folder with this model's config files (no weights), read by --dry-run's memory plan when "
        "`path` is not on this machine; a relative path is taken from the current directory, else from the "
        "repository (configs/models/ ships the production models' configs)"
    )


class ModelsConfig(_Section):
    reasoner: ReasonerModel = Field(
        default_factory=ReasonerModel, description="the reasoner, which writes plans and reflections (vLLM, GRPO)"
    )
    generator: GeneratorModel = Field(
        default_factory=GeneratorModel, description="the generator, which draws and edits images (diffusers, FlowGRPO)"
    )


# --------------------------------------------------------------------------------------- cluster


class RoleSpec(_Section):
    count: int = Field(1, ge=1, description="number of actors of this role")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size (text roles)")


class JudgeReplicas(_Section):
    count: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    min_replicas: int | None = Field(None, ge=1, description="autoscaling lower bound")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica")

    @model_validator(mode="after")
    def _bounds(self) -> JudgeReplicas:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas for autoscaling, or neither")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


def _role_from_int(value: Any) -> Any:
    """`cluster.text_workers=4` is shorthand for `cluster.text_workers.count=4`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a count or a mapping, got {value!r}")
    if isinstance(value, int):
        return {"count": value}
    return value


class HardwareSpec(_Section):
    """The machines a config is meant for: placement and memory are checked against them before launch."""

    nodes: int = Field(..., ge=1, description="number of machines")
    gpus_per_node: int = Field(..., ge=0, description="GPUs on each machine")
    gpu_memory_gb: float = Field(..., gt=0, description="memory of one GPU in GB (1e9 bytes), e.g. 80 for an H100")
    cpus_per_node: int | None = Field(None, ge=1, description="CPUs on each machine (None: CPUs are not checked)")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address; default: $RAY_ADDRESS or a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a locally started cluster")
    text_workers: RoleSpec = Field(
        default_factory=RoleSpec, description="vLLM workers of the reasoner (a number: shorthand for .count)"
    )
    diffusion_workers: RoleSpec = Field(
        default_factory=RoleSpec, description="diffusers workers of the generator (a number: shorthand for .count)"
    )
    judge_replicas: JudgeReplicas = Field(
        default_factory=JudgeReplicas, description="Ray Serve replicas of the judge (a number: shorthand for .count)"
    )
    text_learners: RoleSpec = Field(
        default_factory=RoleSpec, description="GRPO learner ranks of the reasoner (a number: shorthand for .count)"
    )
    diffusion_learners: RoleSpec = Field(
        default_factory=RoleSpec, description="FlowGRPO learner ranks of the generator (a number: shorthand for .count)"
    )
    hardware: HardwareSpec | None = Field(
        None, description="the cluster this config is for (None: not declared). When declared, every role must fit "
        "on it (judge at max_replicas) and in its GPU memory (the --dry-run memory plan), else the run is refused "
        "with exit 2 before any actor starts"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy per role"
    )
    colocate: bool = Field(False, description="GPU only: learners and workers share GPUs (sleep/wake)")
    dashboard: bool = Field(False, description="start the dashboard with a local cluster (costs ~1.6 GB RAM)")
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535, description="Prometheus port of a locally started cluster (default: Ray's choice)"
    )
    dashboard_host: str = Field(
        "127.0.0.1", description="bind address of a locally started dashboard (a loopback address unless "
        "cluster.allow_remote_dashboard)"
    )
    allow_remote_dashboard: bool = Field(
        False, description="let cluster.dashboard_host be a non-loopback address: the dashboard has no login and "
        "lets anyone who reaches it submit jobs that run code on the cluster"
    )

    _coerce = field_validator(
        "text_workers", "diffusion_workers", "judge_replicas", "text_learners", "diffusion_learners", mode="before"
    )(_role_from_int)

    @model_validator(mode="after")
    def _loopback_dashboard(self) -> ClusterConfig:
        if not self.allow_remote_dashboard and not _is_loopback(self.dashboard_host):
            raise ValueError(
                f"cluster.dashboard_host={self.dashboard_host!r} is not a loopback address: the Ray dashboard has no "
                "login, and anyone who can reach it can submit jobs that run code on the cluster. Keep 127.0.0.1 and "
                "reach it through an SSH tunnel, or set cluster.allow_remote_dashboard=true behind a firewall"
            )
        return self




def _is_loopback(host: str) -> bool:
    """`localhost` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:  # a host name other than localhost, or not an address at all
        return False

