"""The one typed config of an R3RL run: YAML file + dotted command-line overrides, validated.

User mistakes never produce a traceback: `load_config` raises `ConfigError`, whose message names
the field path, the value given and what is allowed (with a "did you mean" hint for unknown
keys); the CLI turns it into exit status 2. Names that plugins register (judge kinds, prompt
sources, `tiny:<name>` models) are valid once `load_config` has imported the modules listed
under `plugins` (`rollout.plugins`).

The sections live beside this file, one group per module: `cluster.config_roles` (models and
cluster), `cluster.config_algorithms` (r3, grpo, flow_grpo), `cluster.config_run` (judge, data,
train, sync, logging, checkpoint, serve), all on `cluster.config_base`'s strict base section.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.config_algorithms import (
    FlowGRPOConfig,
    GRPOConfig,
    R3Settings,
    _LrSchedule,
)
from cluster.config_base import TINY_PREFIX, ConfigError, _Section
from cluster.config_roles import ClusterConfig, ModelsConfig
from cluster.config_run import (
    CheckpointConfig,
    DataConfig,
    JudgeConfig,
    LoggingConfig,
    ServeConfig,
    SyncConfig,
    TrainConfig,
)

__all__ = ["ConfigError", "R3Config", "load_config", "apply_overrides", "check_model_paths", "TINY_PREFIX"]


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
