"""Config sections of how a run operates: the judge, the prompts, the training loop, weight sync,
logging, checkpoints and the inference app (`cluster.config` assembles them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config_base import _Section

__all__ = [
    "JudgeConfig",
    "DataConfig",
    "TrainConfig",
    "SyncConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "ServeConfig",
]


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
