"""Checks of a run's inputs before any engine starts: each mistake is a `ConfigError` (exit 2) naming the value.

`check_before_start(cfg)` runs in `python -m cluster.train` right after the config is loaded: the prompt
files parse and leave prompts (`cluster.settings.load_prompt_sets`), every prompt fits the reasoner's
context with room for its answer, model folders are complete (a config file, weight files, safetensors
files not cut short), a remote judge's API-key variable is set, and a local cluster has the CPUs its
roles reserve. Starting Ray, vLLM and DeepSpeed takes minutes; these take seconds.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster.config import TINY_PREFIX, ConfigError, R3Config

__all__ = ["check_before_start", "check_model_folder", "check_prompt_lengths", "check_local_cpus", "check_api_key_env"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_before_start(cfg: R3Config) -> None:
    """All checks below, in order of cost. Raises ConfigError."""
    check_api_key_env(cfg)
    check_local_cpus(cfg)
    for field, path in _model_folders(cfg):
        check_model_folder(Path(os.path.expanduser(path)), field)
    from cluster.settings import load_prompt_sets

    try:
        train, test = load_prompt_sets(cfg)
    except ValueError as e:  # a malformed line names file:line; an unknown source lists the known ones
        raise ConfigError(f"data: {e}") from None
    from cluster.session import resolve_model_path

    count = _token_counter(resolve_model_path(cfg.models.reasoner.path))
    check_prompt_lengths([*train, *test], count, _prompt_budget(cfg), _template_overhead(cfg, count))


def check_api_key_env(cfg: R3Config) -> None:
    """A remote judge's `judge.api_key_env` must name a set, non-empty variable (its value is never shown)."""
    name = cfg.judge.api_key_env
    if name is None:
        return
    if cfg.judge.kind != "remote":
        raise ConfigError(f"judge.api_key_env={name!r} is only used with judge.kind=remote (judge.kind={cfg.judge.kind!r})")
    if not os.environ.get(name):
        raise ConfigError(f"judge.api_key_env={name!r}: the environment variable {name} is unset or empty; export "
                          "the API key in it before starting (it is never written to config.yaml or the logs)")


def check_local_cpus(cfg: R3Config) -> None:
    """A cluster this run starts itself must have the CPUs every role reserves (judge at max_replicas)."""
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return  # a running cluster: the placement groups wait for room (train.remote_timeout_s)
    from cluster.placement import plan_placement

    available = cfg.cluster.num_cpus or os.cpu_count() or 1
    parts, total = [], 0.0
    for plan in plan_placement(cfg):
        count = plan.autoscaling[1] if plan.autoscaling else plan.count
        total += count * plan.num_cpus
        parts.append(f"{plan.role} {count} x {plan.num_cpus:g}")
    if total > available + 1e-9:
        raise ConfigError(f"the roles reserve {total:g} CPUs ({', '.join(parts)}) but the local cluster has "
                          f"cluster.num_cpus={available}: lower the counts or num_cpus of the roles, or raise "
                          "cluster.num_cpus")


# What each role loads: the reasoner and the judge a transformers model (config.json at the top), the
# generator a diffusers pipeline (model_index.json at the top, its transformer in a subfolder).
_KIND_FILE = {"models.reasoner.path": "config.json", "judge.path": "config.json",
              "models.generator.path": "model_index.json"}


def check_model_folder(folder: Path, field: str) -> None:
    """A model folder needs a config (config.json, or model_index.json for a diffusers pipeline) and
    weight files; each safetensors file must be as long as its header says (a cut-short download).
    For a known role (`field` in `_KIND_FILE`) the folder must also be the kind that role loads."""
    if not folder.is_dir():
        raise ConfigError(f"{field}: model folder {str(folder)!r} does not exist (give a local folder or tiny:<name>)")
    if not any((folder / name).is_file() for name in ("config.json", "model_index.json")):
        raise ConfigError(f"{field}: model folder {str(folder)!r} has no config.json (nor model_index.json): it is "
                          "empty or not a model; download it again or point to the folder that holds it")
    kind_file = _KIND_FILE.get(field)
    if kind_file and not (folder / kind_file).is_file():
        wanted, found = (("a transformers model (config.json)", "a diffusers pipeline (model_index.json)")
                         if kind_file == "config.json" else
                         ("a diffusers pipeline (model_index.json)", "a single model (config.json)"))
        raise ConfigError(f"{field}: model folder {str(folder)!r} is {found}, but this role loads {wanted}; "
                          "check that the reasoner, generator and judge paths are not swapped")
    weights = [p for p in _files_within(folder, depth=2) if p.name.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        raise ConfigError(f"{field}: model folder {str(folder)!r} holds no weight files "
                          f"({', '.join('*' + s for s in _WEIGHT_SUFFIXES)}); the download is incomplete")
    for path in weights:
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                raise ConfigError(f"{field}: weight file {str(path)!r} {problem}; download the model again")


def check_prompt_lengths(records: Sequence[Any], count_tokens: Callable[[str], int], budget: int,
                         overhead: int = 0) -> None:
    """Refuse the first prompt whose tokens plus the template's `overhead` exceed `budget` (the reasoner's
    context minus its answer budget), naming the prompt's file and line (`PromptRecord.source`)."""
    for record in records:
        n = count_tokens(record.prompt)
        if n + overhead > budget:
            where = record.source or "a prompt"
            raise ConfigError(
                f"{where}: the prompt has {n} tokens (+{overhead} of the planning template) but the reasoner's context "
                f"leaves {budget} for it (models.reasoner.max_model_len minus grpo.max_tokens): shorten or drop it, "
                f"or raise models.reasoner.max_model_len; prompt starts {record.prompt[:60]!r}"
            )


def _model_folders(cfg: R3Config) -> list[tuple[str, str]]:
    folders = [("models.reasoner.path", cfg.models.reasoner.path), ("models.generator.path", cfg.models.generator.path)]
    if cfg.judge.kind == "vlm":
        folders.append(("judge.path", cfg.judge.path))
    return [(f, p) for f, p in folders if not p.startswith(TINY_PREFIX)]  # named models are built and checked


def _files_within(folder: Path, depth: int) -> list[Path]:
    out, level = [], [folder]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            for p in d.iterdir():
                (nxt if p.is_dir() else out).append(p)
        level = nxt
    return out


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable (header and data extent), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"is {size} bytes long: cut short"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return f"is {size} bytes long but its header alone needs {8 + header_len}: cut short"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "has an unreadable header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)),
              default=0)
    if 8 + header_len + end > size:
        return f"is {size} bytes long but its tensors need {8 + header_len + end}: cut short"
    return None


def _prompt_budget(cfg: R3Config) -> int:
    return cfg.models.reasoner.max_model_len - cfg.grpo.max_tokens


def _template_overhead(cfg: R3Config, count_tokens: Callable[[str], int]) -> int:
    """Tokens the system message and planning template add around a prompt (text only)."""
    from cluster.settings import build_templates

    try:
        t = build_templates(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return count_tokens(t.system) + count_tokens(t.plan.format(prompt="", stop_phrase=t.stop_phrase))


def _token_counter(model_path: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the engines report the model's quirks later; keep refusals one message
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(model_path))
    finally:
        hf_logging.set_verbosity(level)
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
