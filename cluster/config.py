"""The one typed config of an R3RL run: YAML file + dotted command-line overrides, validated.

User mistakes never produce a traceback: `load_config` raises `ConfigError`, whose message names
the field path, the value given and what is allowed (with a "did you mean" hint for unknown
keys); the CLI turns it into exit status 2. Names that plugins register (judge kinds, prompt
sources, `tiny:<name>` models) are valid once `load_config` has imported the modules listed
under `plugins` (`rollout.plugins`).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ConfigError", "R3Config", "load_config", "apply_overrides", "check_model_paths", "TINY_PREFIX"]

TINY_PREFIX = "tiny:"  # model paths like "tiny:vlm" name a registered model (actors.named_models)


class ConfigError(ValueError):
    """A user mistake in the config or its overrides; the message says what and where."""


class _Section(BaseModel):
    # allow_inf_nan=False: no float field takes NaN or ±inf (e.g. `grpo.lr=.inf` would train NaN weights)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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


# ------------------------------------------------------------------------------------ algorithms


class R3Settings(_Section):
    mode: Literal["tree", "chain"] = Field("tree", description="tree: paper's alternating stages; chain: whole trajectories")
    group_size: int = Field(4, ge=2, description="samples per prompt (paper: 16)")
    prompts_per_step: int = Field(2, ge=1, description="prompts per step (paper: 2)")
    max_rounds: int = Field(4, ge=1, le=16, description="1 generation + (max_rounds-1) refinements")
    p_perfect: float = Field(0.15, ge=0, le=1, description="refine: probability to start from a perfect image")
    format_weight: float = Field(1.0, ge=0, description="w_f, weight of the format reward")
    wrong_stop_penalty: float = Field(
        0.0, ge=0, description="refine Δ of a stop on an imperfect image is minus this (paper: 0, stopping is free)"
    )
    instruction_reward_weight: float = Field(
        0.0, ge=0, description="reflect answers also earn this times how well their edit instruction matches the fix "
        "the judge names for the image, in kind, object and attribute (reward.instruction_match; 0 = the paper's "
        "score-change reward alone; judges that name no fix add nothing)"
    )
    discount: float = Field(1.0, ge=0, le=1, description="chain mode: discount of per-round returns")
    buffer_size: int = Field(256, ge=1, description="rollout buffer capacity")
    stop_phrase: str = Field("no further edit needed", min_length=1, description="the stop phrase the reflect prompt asks for")
    stop_match: str = Field("no further edit", min_length=1, description="case-insensitive substring that makes a stop")
    tree_schedule: Literal["alternate", "both"] = Field(
        "alternate", description="tree mode: alternate generate/refine steps (paper) or run both every step"
    )
    templates: dict[str, str] = Field(
        default_factory=dict, description="overrides of rollout.templates.Templates fields (system, plan, reflect, ...)"
    )
    adv_std: Literal["none", "group", "global"] = Field(
        "none", description="advantage std normalisation: none (paper), the group's std, or the std of the whole step"
    )
    adv_eps: float = Field(1e-6, gt=0, description="added to the std that advantages are divided by (adv_std != none)")
    drop_zero_variance: bool = Field(
        False, description="leave groups whose rewards are all equal (advantage 0) out of that side's learner batch"
    )
    buffer_refined: bool = Field(
        False, description="tree mode: refined images that did not stop also enter the rollout buffer (default: "
        "only generate-stage images)"
    )

    @model_validator(mode="after")
    def _instruction_reward_in_tree_mode(self) -> R3Settings:
        if self.instruction_reward_weight > 0 and self.mode != "tree":
            raise ValueError(f"instruction_reward_weight={self.instruction_reward_weight} acts on tree mode's refine "
                             "stage; with mode=chain it would change nothing: set r3.mode=tree or the weight to 0")
        return self


class _LrSchedule(_Section):
    """The learning-rate schedule of a learner (`learners.ds_engine.warmup_lambda`): warm-up, then
    constant or a cosine over train.steps (`R3Config.lr_decay_steps`)."""

    warmup_steps: int = Field(10, ge=0, description="updates of linear warm-up, from lr / warmup_steps to lr")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine to min_lr_ratio * lr at the last update "
        "(train.steps x updates per step)"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of the cosine schedule, as a share of lr")

    def updates_per_step(self) -> int:
        """Optimizer updates per RL step, the unit the schedule counts in (1; FlowGRPO's `updates_per_batch`)."""
        return 1


REASONER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # attention of Qwen / Llama-style decoders
FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class LoraConfig(_Section):
    """LoRA adapters on a learner's model (`learners.lora`, docs/design.md#lora): rank 0 trains every weight."""

    rank: int = Field(0, ge=0, description="LoRA rank r; 0 = off (every weight is trained)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the adapters' product B·A is scaled by alpha / rank")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the adapters' input in the policy's training forward (scoring "
        "forwards never drop, so the first update's ratio is still 1; with > 0 later ratios see the noise)"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(REASONER_LORA_TARGETS), min_length=1,
        description="linear layers to adapt: a module name or its dotted suffix (peft's rule), e.g. q_proj, "
        "attn.to_out.0; an entry that matches no module of the model is refused before engines start",
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not _MODULE_NAME.match(t)]
        if bad:
            raise ValueError(f"target_modules entries {bad} are not module names (dotted names such as "
                             "'q_proj' or 'attn.to_out.0'; no regular expressions or spaces)")
        if len(set(v)) != len(v):
            raise ValueError(f"target_modules {v} names a module twice")
        return v


class ReasonerLora(LoraConfig):
    """`LoraConfig` whose target_modules default to a decoder's attention projections."""


class GeneratorLora(LoraConfig):
    """`LoraConfig` whose target_modules default to the Flux transformer's attention projections."""

    target_modules: list[str] = Field(
        default_factory=lambda: list(FLUX_LORA_TARGETS), min_length=1,
        description="linear layers to adapt: a module name or its dotted suffix (peft's rule), e.g. to_q, "
        "attn.to_out.0; an entry that matches no module of the model is refused before engines start",
    )


class GRPOConfig(_LrSchedule):
    clip_low: float = Field(0.2, gt=0, lt=1, description="PPO clip epsilon below 1")
    clip_high: float = Field(0.2, gt=0, description="PPO clip epsilon above 1 (clip-higher)")
    kl_coef: float = Field(0.001, ge=0, description="beta of the KL to the reference")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean",
        description="loss aggregation: every answer token weighs the same, the mean of per-answer token means "
        "(GRPO), or per-answer token sums over the longest answer (Dr. GRPO)",
    )
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="clip of the global gradient norm")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="learner dtype: bfloat16 = bf16 weights, activations and gradients with fp32 master "
        "weights in the optimizer (DeepSpeed bf16 mode)"
    )
    micro_batch_size: int = Field(4, ge=1, description="answers per forward/backward on each learner rank")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more compute"
    )
    lora: ReasonerLora = Field(
        default_factory=ReasonerLora, description="LoRA adapters on the reasoner (rank 0: full fine-tuning)"
    )
    temperature: float = Field(0.9, gt=0, description="sampling temperature (also applied by the learner)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling top-p (also applied by the learner; 1: off)")
    max_tokens: int = Field(64, ge=1, description="max answer tokens")
    eval_temperature: float = Field(0.1, gt=0, description="sampling temperature of the reasoner in evaluation")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {v}")
        return v


class FlowGRPOConfig(_LrSchedule):
    noise_level: float = Field(0.7, ge=0, description="SDE noise level a for generation")
    edit_noise_level: float = Field(1.0, ge=0, description="SDE noise level a for edits")
    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO clip of the image ratio")
    adv_clip: float = Field(5.0, gt=0, description="advantages clipped to +-adv_clip")
    num_steps: int = Field(8, ge=2, description="denoising steps in training")
    eval_num_steps: int = Field(8, ge=2, description="denoising steps in evaluation")
    edit_num_steps: int = Field(8, ge=2, description="denoising steps of an edit")
    stochastic: Literal["all", "one"] = Field("one", description="which steps are SDE")
    window: tuple[int, int] = Field((0, 4), description="[lo, hi) window of the stochastic step when one")
    edit_window: tuple[int, int] = Field((0, 2), description="[lo, hi) window for edits when one")
    kl_coef: float = Field(0.001, ge=0, description="beta of the KL to the reference (see kl_mode)")
    image_loss_weight: float = Field(2.0, ge=0, description="weight of the image loss (policy + KL) in the backward")
    guidance: float = Field(3.5, ge=0, description="distilled guidance of the Flux transformer")
    train_cfg_scale: float = Field(
        1.0, ge=1.0,
        description="true CFG scale (1 = off) of the workers' sampling (training and evaluation) and of the "
        "learner's rescoring, where the unconditional branch is detached",
    )
    kl_mode: Literal["mean", "velocity"] = Field(
        "mean", description="KL on the SDE step mean, or on the velocity (no-CFG variant for unified models)"
    )
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0, description="clip of the global gradient norm")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="learner dtype: bfloat16 = bf16 weights, activations and gradients with fp32 master "
        "weights in the optimizer (DeepSpeed bf16 mode)"
    )
    micro_batch_size: int = Field(
        4, ge=1, description="(image, stored denoising step) items per forward/backward on each learner rank"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the transformer's activations in the backward pass: less memory, more compute"
    )
    lora: GeneratorLora = Field(
        default_factory=GeneratorLora, description="LoRA adapters on the generator's transformer (rank 0: full fine-tuning)"
    )
    sde: Literal["flow_grpo", "cps"] = Field(
        "flow_grpo", description="the stochastic step of the workers and of the learner's rescoring: flow_grpo (Flow-GRPO's "
        "SDE, noise levels a >= 0) or cps (coefficients-preserving sampling, arXiv 2509.05952: the step keeps the "
        "marginal's coefficients (1 - sigma', sigma') for any level; noise_level and edit_noise_level are then eta in "
        "[0, 1], 1 = fresh noise, and the stochastic window must leave out the last step, which cps makes deterministic)"
    )
    share_group_noise: bool = Field(
        True, description="generate stage and chain round 0: the G images of a group start from one initial noise, so "
        "they differ only by the SDE noise and their prompts; false: each image draws its own (as Flow-GRPO's GenEval "
        "recipe), which gives groups more reward spread"
    )
    adv_std: Literal["none", "group", "global"] | None = Field(
        None, description="image advantages' std normalisation: none, the group's (per-prompt) std, or the std of all "
        "the stage's image rewards (batch); null: as r3.adv_std"
    )
    zero_variance_groups: Literal["keep", "drop"] | None = Field(
        None, description="image groups whose rewards are all equal (advantage 0): keep them in the image batch (they "
        "add KL and dilute the mean loss) or drop them; null: as r3.drop_zero_variance"
    )

    algorithm: Literal["flow_grpo", "nft"] = Field(
        "flow_grpo", description="the generator's RL objective: flow_grpo (clipped ratio of the stored SDE steps' "
        "log-probs) or nft (DiffusionNFT, arXiv 2509.16117: flow matching on the rollouts' final clean latents with "
        "reward-weighted implicit positive and negative velocities; the workers sample with the ODE, no per-step "
        "log-probs and no CFG in training; uses adv_clip as the reward scale Z of r = 1/2 + 1/2 clip(A/Z, -1, 1), "
        "kl_coef on the velocity to the reference)"
    )
    nft_beta: float = Field(
        1.0, gt=0, description="algorithm=nft: beta of the implicit policies v+ = (1-beta) v_old + beta v and "
        "v- = (1+beta) v_old - beta v (the official recipes use 0.1 to 1)"
    )
    nft_weighting: Literal["adaptive", "velocity"] = Field(
        "adaptive", description="algorithm=nft: adaptive = the official code's x0-space loss divided by its own "
        "(detached) mean absolute error; velocity = the paper's plain squared velocity error"
    )
    nft_timesteps: int = Field(
        2, ge=1, description="algorithm=nft: noise levels t ~ U(0, 1) (each with its own noise) drawn per image per "
        "update; each is one learner item of the micro-batch"
    )
    updates_per_batch: int = Field(
        1, ge=1, description="optimizer updates over each rollout batch (1: a single update per batch). From the second on, "
        "flow_grpo's ratio differs from 1 and the clip acts; the lr schedule advances once per update (warmup_steps "
        "counts updates, the cosine spans all train.steps x updates_per_batch of them)"
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="EMA of the generator's trained weights, updated after every optimizer update "
        "(ema = d ema + (1-d) weights; 0 = off). Evaluations (during training and cluster.eval from a checkpoint) use "
        "it; rollouts keep the live weights. Kept whole on every learner rank: not with zero_stage 3"
    )
    ema_warmup: bool = Field(
        True, description="warm the EMA's decay up: after n updates it is min(ema_decay, (1+n)/(10+n)), 0.1 at the "
        "first, so early evaluations follow the trained weights instead of the starting ones (diffusers' EMAModel, "
        "Flow-GRPO); false: ema_decay from the first update"
    )

    def updates_per_step(self) -> int:
        return self.updates_per_batch

    @model_validator(mode="after")
    def _whole_copies(self) -> FlowGRPOConfig:
        if self.zero_stage == 3 and (self.ema_decay > 0 or (self.algorithm == "nft" and self.updates_per_batch > 1)):
            raise ValueError("ema_decay > 0 and algorithm=nft with updates_per_batch > 1 keep whole copies of the "
                             "generator's weights, which zero_stage 3 partitions: use zero_stage 0, 1 or 2")
        if self.algorithm == "nft" and self.share_group_noise:
            raise ValueError("algorithm=nft samples with the ODE, so with share_group_noise=true the images of a group "
                             "would be identical (equal rewards, zero advantages, no update): set "
                             "flow_grpo.share_group_noise=false")
        return self

    @model_validator(mode="after")
    def _windows(self) -> FlowGRPOConfig:
        for name, (lo, hi), steps in (
            ("window", self.window, self.num_steps),
            ("edit_window", self.edit_window, self.edit_num_steps),
        ):
            if not 0 <= lo < hi <= steps:
                raise ValueError(f"{name}={[lo, hi]} must satisfy 0 <= lo < hi <= steps ({steps})")
        return self

    @model_validator(mode="after")
    def _cps_limits(self) -> FlowGRPOConfig:
        if self.sde != "cps":
            return self
        for name, level in (("noise_level", self.noise_level), ("edit_noise_level", self.edit_noise_level)):
            if level > 1:
                raise ValueError(f"{name}={level} is above 1: with sde=cps it is eta in [0, 1]; set it <= 1")
        if self.stochastic == "one":
            for name, (lo, hi), steps in (
                ("window", self.window, self.num_steps),
                ("edit_window", self.edit_window, self.edit_num_steps),
            ):
                if hi >= steps:
                    raise ValueError(
                        f"{name}={[lo, hi]} includes the last step, which sde=cps makes deterministic (no "
                        f"log-prob); set its end <= {steps - 1}"
                    )
        return self


class JudgeConfig(_Section):
    kind: str = Field(
        "vlm", description="which judge scores images: a registered kind (vlm, remote, ocr, constant, or one "
        "that a plugin registers)"
    )
    mode: Literal["checklist", "questions", "vqascore"] = Field("vqascore", description="VLM judge mode")
    path: str = Field("tiny:vlm", description="judge VLM folder (kind=vlm)")
    url: str | None = Field(None, description="OpenAI-compatible base URL (kind=remote)")
    remote_model: str | None = Field(None, description="model name sent to the remote endpoint")
    max_batch_size: int = Field(8, ge=1, description="Serve dynamic batching: max batch")
    batch_wait_s: float = Field(0.05, ge=0, description="Serve dynamic batching: max wait")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout")
    retries: int = Field(2, ge=0, description="bounded retries per request")
    http_port: int | None = Field(None, ge=1, le=65535, description="serve POST /score on 127.0.0.1 when set")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="kind=vlm: engine dtype")
    tensor_parallel_size: int = Field(
        1, ge=1, description="kind=vlm: GPUs one replica's vLLM engine spreads the judge over (its multiprocessing "
        "executor, inside the replica); with GPUs, cluster.judge_replicas.num_gpus must equal it"
    )
    max_model_len: int = Field(1024, gt=0, description="kind=vlm: the judge engine's context length")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="kind=vlm on GPUs: share of each GPU's memory the judge's vLLM engine takes "
        "(None: vLLM's default, 0.9); lower it when other roles share the GPU"
    )
    config: str | None = Field(
        None, description="kind=vlm: folder with the judge's config.json for --dry-run's memory plan when `path` is "
        "not on this machine (as models.reasoner.config)"
    )
    api_key_env: str | None = Field(
        None, description="kind=remote: name of the environment variable holding the endpoint's API key (sent as a "
        "bearer token; the key itself never goes into the config, config.yaml or logs). The run is refused at start "
        "if the variable is unset or empty"
    )
    max_error_fraction: float = Field(
        0.5, ge=0, le=1, description="stop the run (exit 5) before the update of a step whose judge failed on more "
        "than this fraction of the step's items (error results: timeouts, unparsable or non-finite answers); 1: never"
    )

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        from reward.registry import known_judges  # the built-ins and the kinds of the plugins loaded so far

        if kind not in known_judges():
            raise ValueError(
                f"unknown judge kind; known: {known_judges()} (a plugin may register more: config key plugins)"
            )
        return kind

    @model_validator(mode="after")
    def _remote(self) -> JudgeConfig:
        if self.kind == "remote" and not (self.url and self.remote_model):
            raise ValueError("judge.kind=remote needs judge.url and judge.remote_model")
        return self


class DataConfig(_Section):
    train: str = Field(
        "geneval",
        description="training prompts: a registered name ('geneval': the 553 GenEval prompts shipped in "
        "data/geneval; a plugin may register more: config key plugins), 'data:<file>' (under $R3RL_DATA, default "
        "the repository's data/), or a path to a GenEval- or TIIF-format .jsonl / .jsonl.gz file",
    )
    test: str = Field("geneval", description="evaluation prompts, in the same forms as data.train")
    exclude_test_overlap: bool = Field(True, description="drop train prompts that appear in the test set")
    limit: int | None = Field(None, ge=1, description="use only the first N train prompts")
    balance_categories: bool = Field(
        False, description="draw train prompts category-balanced (small categories repeated; after limit)"
    )
    eval_limit: int | None = Field(8, ge=1, description="evaluate on the first N test prompts")
    eval_per_category: int | None = Field(
        None,
        ge=1,
        description="then evaluate exactly N samples per category: its prompts cycled or cut to N (repeats "
        "draw their own noise and seeds), for a tag-balanced evaluation of a split whose small tags have few prompts",
    )
    shuffle: bool = Field(True, description="visit train prompts in a new seeded order each epoch (false: file order)")


class TrainConfig(_Section):
    steps: int = Field(4, ge=1, description="training steps")
    seed: int = Field(
        0, ge=0, description="seed of the prompt order, rollouts, rollout buffer, workers (seed + index) and learners"
    )
    run_dir: str = Field("runs", description="parent folder of run directories")
    run_name: str | None = Field(None, description="default: timestamp")
    async_one_step_off: bool = Field(False, description="rollouts of step t+1 overlap learning of step t")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_before: bool = Field(False, description="also evaluate before the first step (eval-before/)")
    null_advantages: bool = Field(
        False, description="the null arm of a learning claim: shuffle each learner batch's advantages among its items "
        "(seeded by train.seed, step and side), so the updates keep their sizes but carry no signal; compare a run "
        "with its null run on the same seeds"
    )
    eval_rounds: int = Field(4, ge=1, le=16, description="evaluation rounds: 1 generation + (eval_rounds-1) refinements")
    remote_timeout_s: float = Field(
        600.0, gt=0, description="timeout of every remote wait; a judge call's worst case, judge.timeout_s x "
        "(judge.retries + 1), must fit in it"
    )
    retries: int = Field(
        2, ge=0, description="bounded retries of a failed rollout request, and replacements of a dead rollout worker "
        "per call (weight sync, version query, resize, evaluation) before the run stops"
    )
    stop_grace_s: float = Field(
        60.0, ge=0, description="on SIGTERM/SIGINT, how long a step still in its rollout may run on before it is "
        "abandoned (a step whose learners have begun their update always finishes); then a checkpoint of the last "
        "completed step is written and the run exits 143/130"
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="stop the run (exit 4) after this many steps in a row whose update was skipped for "
        "non-finite advantages, losses or gradients"
    )


class SyncConfig(_Section):
    method: Literal["broadcast", "object_store"] = Field(
        "broadcast",
        description="learner -> worker weights: bucketed broadcast over a torch.distributed group, or one "
        "safetensors blob through the Ray object store",
    )
    bucket_mb: float = Field(64.0, gt=0, description="flat bucket size in MB")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="broadcast group transport. auto: nccl when each model's learners and workers hold whole "
        "GPUs (num_gpus >= 1), else gloo (NCCL refuses two ranks on one GPU, which fractional GPUs may share; "
        "gloo moves CUDA tensors through host memory)"
    )
    group_timeout_s: float = Field(
        300.0, gt=0, description="how long a member of the broadcast group waits for the others (rendezvous or one "
        "broadcast); after a worker dies mid-sync the learner is free again after this, and the sync is redone with "
        "the replacement"
    )


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="write TensorBoard events to <run dir>/tensorboard")
    wandb: bool = Field(False, description="also log to Weights & Biases, into logging.wandb_project")
    wandb_project: str | None = Field(None, description="Weights & Biases project (used when logging.wandb)")
    progress: bool = Field(True, description="show a progress bar on the console")
    gallery: bool = Field(True, description="write gallery.html of the evaluation trajectories")
    trajectories_per_step: int = Field(8, ge=0, description="trajectories written to parquet per step")

    @model_validator(mode="after")
    def _wandb_needs_project(self) -> LoggingConfig:
        if self.wandb and not self.wandb_project:
            raise ValueError("logging.wandb is true but logging.wandb_project is not set; name the project "
                             "(logging.wandb_project=my-project) or set logging.wandb=false")
        return self


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="save every N steps (0: only at the end)")
    keep: int = Field(2, ge=1, description="keep the last N checkpoints")
    resume: str | None = Field(
        None, description="'auto' (the newest complete checkpoint of train.run_name's own run if it has one, else of "
        "any run under train.run_dir) or a checkpoint path"
    )
    allow_config_changes: bool = Field(
        False, description="let a resume change what breaks exactness (r3.mode, data.*, train.seed) from the "
        "checkpoint's run config; learner counts can never change. Every change is logged and recorded in "
        "<run>/resume-changes.json"
    )


class ServeConfig(_Section):
    """The inference app (`python -m cluster.serve`, `serve run cluster.serve:app`): limits and batching."""

    max_prompt_chars: int = Field(500, ge=1, description="longest prompt POST /v1/r3 accepts (longer: 422 naming prompt)")
    request_timeout_s: float = Field(
        300.0, gt=0, description="a request still running after this long gets 504 (its chain stops at the next "
        "round); a request may ask for less with timeout_s"
    )
    max_concurrent_requests: int = Field(
        16, ge=1, description="requests one replica runs at once (more wait in Serve's queue)"
    )
    max_batch_size: int = Field(
        8, ge=1, description="most concurrent requests' reasoner (or generator) calls merged into one pool call"
    )
    batch_wait_s: float = Field(0.05, ge=0, description="how long a partial batch of role calls waits for more")


class R3Config(_Section):
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules to import before the rest of the config is validated (rollout.plugins): "
        "each registers names the config may then use (judge kinds, prompt sources, tiny:<name> models)",
    )
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="the reasoner and generator models")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="the Ray cluster and the actors of each role")
    r3: R3Settings = Field(default_factory=R3Settings, description="the R3 algorithm: stages, groups, rewards, advantages")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="the reasoner's sampling and GRPO learner")
    flow_grpo: FlowGRPOConfig = Field(
        default_factory=FlowGRPOConfig, description="the generator's SDE sampling and FlowGRPO learner"
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="the judge that scores images")
    data: DataConfig = Field(default_factory=DataConfig, description="train and evaluation prompts")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop, evaluation and remote calls")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="weight sync from learners to rollout workers")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="metrics, progress bar, galleries")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints and resume")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the inference app: request limits and batching")

    @model_validator(mode="after")
    def _cosine_needs_room(self) -> R3Config:
        for name, section in (("grpo", self.grpo), ("flow_grpo", self.flow_grpo)):
            if section.lr_schedule == "cosine" and self.lr_decay_steps(section) <= section.warmup_steps:
                raise ValueError(
                    f"{name}.lr_schedule=cosine decays over the run's {self.lr_decay_steps(section)} updates (train.steps "
                    f"{self.train.steps} x {section.updates_per_step()} per step), which must exceed "
                    f"{name}.warmup_steps ({section.warmup_steps})"
                )
        return self

    @model_validator(mode="after")
    def _hf_reasoner_on_one_device(self) -> R3Config:
        tp = self.cluster.text_workers.tensor_parallel_size
        if self.models.reasoner.backend == "hf" and tp != 1:
            raise ValueError(
                f"models.reasoner.backend=hf runs each text worker on one device, but "
                f"cluster.text_workers.tensor_parallel_size={tp}; set it to 1 or use models.reasoner.backend=vllm"
            )
        return self

    @model_validator(mode="after")
    def _judge_gpus_match_tensor_parallel(self) -> R3Config:
        tp, gpus = self.judge.tensor_parallel_size, self.cluster.judge_replicas.num_gpus
        if tp > 1 and gpus != tp:
            raise ValueError(
                f"judge.tensor_parallel_size={tp} spreads each judge replica over {tp} GPUs, but "
                f"cluster.judge_replicas.num_gpus={gpus:g}; set cluster.judge_replicas.num_gpus={tp}"
            )
        return self

    @model_validator(mode="after")
    def _nft_one_step_off_below_zero3(self) -> R3Config:
        f = self.flow_grpo
        if f.algorithm == "nft" and self.train.async_one_step_off and f.zero_stage == 3:
            raise ValueError(
                "flow_grpo.algorithm=nft with train.async_one_step_off keeps whole copies of the rollout weights, "
                "which flow_grpo.zero_stage=3 does not hold; use flow_grpo.zero_stage <= 2 or synchronous steps"
            )
        return self

    @model_validator(mode="after")
    def _judge_fits_remote_timeout(self) -> R3Config:
        worst = self.judge.timeout_s * (self.judge.retries + 1)
        if self.judge.kind == "remote" and worst > self.train.remote_timeout_s:
            raise ValueError(
                f"judge.timeout_s={self.judge.timeout_s:g} x (judge.retries={self.judge.retries} + 1) = {worst:g} s "
                f"exceeds train.remote_timeout_s={self.train.remote_timeout_s:g}: a hanging remote judge could "
                "outlast every remote wait; lower judge.timeout_s or judge.retries, or raise train.remote_timeout_s"
            )
        return self

    def lr_decay_steps(self, section: _LrSchedule) -> int:
        """Updates over which `section`'s cosine reaches its floor: all of the run's, train.steps x its updates
        per step (0: constant after warm-up)."""
        return self.train.steps * section.updates_per_step() if section.lr_schedule == "cosine" else 0


# ---------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = (), check_paths: bool = False) -> R3Config:
    """Read YAML (or defaults), apply `a.b=c` overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    _load_plugins(raw)
    try:
        cfg = R3Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, raw)) from None
    if check_paths:
        check_model_paths(cfg)
        from cluster.lora_check import check_lora_targets  # reads the models' config files (no weights)

        try:
            check_lora_targets(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict; unknown paths raise."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value_text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key segment")
        _check_override_path(parts)
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
        except yaml.YAMLError:
            value = value_text
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if isinstance(nxt, int) and not isinstance(nxt, bool):  # role shorthand given as a count
                nxt = {"count": nxt}
            if not isinstance(nxt, dict):
                nxt = {}
            node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def check_model_paths(cfg: R3Config, dry_run: bool = False) -> None:
    """Model paths must be tiny:<name> or an existing local folder (no hub downloads at run time).

    `dry_run`: a folder that is not on this machine is accepted when the model's `config` key names
    where its config files are (the memory plan reads them and checks that folder).
    """
    checks = [("models.reasoner", cfg.models.reasoner), ("models.generator", cfg.models.generator)]
    if cfg.judge.kind == "vlm":
        checks.append(("judge", cfg.judge))
    from actors.named_models import known_named_models  # the tiny test models and those of loaded plugins

    named = known_named_models()
    for section, model in checks:
        field, value = f"{section}.path", model.path
        if value.startswith(TINY_PREFIX):
            if value[len(TINY_PREFIX):] not in named:
                raise ConfigError(
                    f"{field}: {value!r} is not a named model; allowed: {[TINY_PREFIX + n for n in named]} "
                    "(a plugin may register more: config key plugins)"
                )
        elif not Path(os.path.expanduser(value)).is_dir() and not (dry_run and model.config):
            hint = f"; for a dry run elsewhere, set {section}.config to a folder with its config files" if dry_run else ""
            raise ConfigError(
                f"{field}: model folder {value!r} does not exist (give a local folder or tiny:<name>){hint}")


# ------------------------------------------------------------------------------------ helpers


def _load_plugins(raw: dict[str, Any]) -> None:
    """Import the modules under `plugins` (before validation, which checks the names they register).
    A value that is not a list of strings is left to validation to report."""
    from rollout.plugins import load_plugins

    plugins = raw.get("plugins", [])
    if isinstance(plugins, list) and all(isinstance(m, str) for m in plugins):
        try:
            load_plugins(plugins)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _is_loopback(host: str) -> bool:
    """`localhost` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:  # a host name other than localhost, or not an address at all
        return False


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _fields_at(parts: list[str]) -> tuple[type[BaseModel] | type[dict] | None, str]:
    """The model class holding the last segment of `parts`, after walking the earlier ones."""
    model: type[BaseModel] = R3Config
    walked = []
    for part in parts[:-1]:
        info = model.model_fields.get(part)
        if info is None:
            return None, ".".join(walked)
        ann = info.annotation
        if getattr(ann, "__origin__", None) is dict:  # free-form mapping: any sub-key is allowed
            return dict, ".".join(walked + [part])
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None, ".".join(walked + [part])
        model = ann
        walked.append(part)
    return model, ".".join(walked)


def _unknown_key_message(path: list[str], model: type[BaseModel]) -> str:
    known = sorted(model.model_fields)
    hint = difflib.get_close_matches(path[-1], known, n=1)
    suffix = f"; did you mean {'.'.join(path[:-1] + [hint[0]])!r}?" if hint else ""
    return f"{'.'.join(path)}: unknown key; allowed here: {known}{suffix}"


def _check_override_path(parts: list[str]) -> None:
    model, walked = _fields_at(parts)
    if model is dict:
        return
    if model is None:
        depth = len(walked.split(".")) if walked else 0
        parent, _ = _fields_at(parts[: depth + 1])  # the section that should hold parts[depth]
        if isinstance(parent, type) and issubclass(parent, BaseModel) and parts[depth] not in parent.model_fields:
            raise ConfigError(_unknown_key_message(parts[: depth + 1], parent))
        raise ConfigError(f"{'.'.join(parts)}: {walked!r} has no sub-keys")
    if parts[-1] not in model.model_fields:
        raise ConfigError(_unknown_key_message(parts, model))


def _lookup(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif part == "count" and isinstance(node, int):  # role shorthand
            return node
        elif isinstance(node, list | tuple) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return "<missing>"
    return node


def _format_errors(err: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            model, _ = _fields_at(loc)
            known = model is not None and model is not dict
            lines.append(_unknown_key_message(loc, model) if known else f"{field}: unknown key")
            continue
        value = _lookup(raw, tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            msg = f"allowed: {e['ctx']['expected']}"
        elif e["type"] == "finite_number" or (e["type"] == "float_parsing" and _names_nonfinite(value)):
            msg = "must be a finite number (NaN and ±inf are refused)"
        if isinstance(value, dict):  # a cross-field rule of a section: the message names the fields
            lines.append(f"{field}: {msg}")
        else:
            lines.append(f"{field}: got {value!r}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _names_nonfinite(value: Any) -> bool:
    """A string that Python would parse as NaN or ±inf ("inf", "-Infinity", "nan")."""
    try:
        return isinstance(value, str) and not math.isfinite(float(value))
    except ValueError:
        return False
