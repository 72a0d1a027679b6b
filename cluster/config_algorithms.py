"""Config sections of the algorithms: the R3 loop (`r3`), the reasoner's GRPO (`grpo`), the generator's
FlowGRPO or DiffusionNFT (`flow_grpo`) and their LoRA adapters (`cluster.config` assembles them)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config_base import _Section

__all__ = [
    "R3Settings",
    "LoraConfig",
    "ReasonerLora",
    "GeneratorLora",
    "GRPOConfig",
    "FlowGRPOConfig",
    "REASONER_LORA_TARGETS",
    "FLUX_LORA_TARGETS",
]


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
