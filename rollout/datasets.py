"""Prompt data: GenEval-format and TIIF-format JSONL loaders, the test-overlap filter, and a
seeded, checkpointable prompt iterator (docs/design.md#prompt-data).

GenEval line: {"tag": str, "include": [{"class": str, "count": int, "color"?: str,
"position"?: [relation, index], ...}], "exclude"?: [...], "prompt": str}; extra fields (e.g.
GenEval++'s "size" / "region") are kept. TIIF line: {"type", "short_description",
"long_description", "yn_question_list", "yn_answer_list", ...}. Malformed lines raise a
`ValueError` naming the file and the line number. Files are read where they lie (never copied); `.jsonl.gz` files are read
gzipped.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

from rollout.plugins import add_to_registry

__all__ = [
    "PromptRecord",
    "load_geneval",
    "load_tiif",
    "load_prompts",
    "normalize_prompt",
    "balance_categories",
    "cycle_categories",
    "spread_over_categories",
    "remove_overlap",
    "PromptIterator",
    "PromptSource",
    "register_prompt_source",
    "known_prompt_sources",
    "load_prompt_source",
    "data_dir",
]

# The repository's own data folder: prompt files that ship with R3RL (see data/README.md).
_REPO_DATA = Path(__file__).resolve().parents[1] / "data"
DATA_PREFIX = "data:"

PromptSource = Callable[[], list["PromptRecord"]]
_SOURCES: dict[str, PromptSource] = {}


def register_prompt_source(name: str) -> Callable[[PromptSource], PromptSource]:
    """Register a named prompt set (`data.train: NAME` / `data.test: NAME` in a config).

    A task's plugin module registers its own sets this way; a second registration of one name raises.
    """

    return add_to_registry(_SOURCES, "prompt source", name)


def known_prompt_sources() -> list[str]:
    return sorted(_SOURCES)


def data_dir() -> Path:
    """Root of `data:<file>` specs: `$R3RL_DATA` when set (users' own data), else the repository's `data/`."""
    import os

    return Path(os.environ.get("R3RL_DATA") or _REPO_DATA)


def load_prompt_source(spec: str) -> list[PromptRecord]:
    """Prompts named by a config string.

    `spec` is a registered name (`geneval`, or one a plugin registered), `data:<file>` (a file under
    `data_dir()`), or a path to a `.jsonl` / `.jsonl.gz` file in GenEval or TIIF format.

    Raises:
        ValueError: the name is not registered and no such file exists (the message lists the names);
            a `data:` spec that is absolute or has a `..` part (it must stay under `data_dir()`).
    """
    if spec in _SOURCES:
        return _SOURCES[spec]()
    path = _data_file(spec) if spec.startswith(DATA_PREFIX) else Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(
            f"prompt source {spec!r}: no such registered name and no file {str(path)!r}; registered names: "
            f"{known_prompt_sources()} (a plugin may register more: config key plugins); 'data:<file>' reads "
            f"under {data_dir()} (set $R3RL_DATA to change it)"
        )
    return load_prompts(path)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with the metadata the judge needs; `category` groups evaluation reports."""

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    category: str = ""
    source: str = ""  # "file:line" it came from


def load_geneval(path: str | Path) -> list[PromptRecord]:
    """GenEval-format JSONL -> records (metadata = the whole line, category = tag)."""
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _check_geneval(obj, where)
        out.append(PromptRecord(obj["prompt"], obj, obj["tag"], where))
    return out


def load_tiif(path: str | Path, description: Literal["short", "long"] = "short") -> list[PromptRecord]:
    """TIIF-format JSONL -> records; the prompt is the short or long description, category = type."""
    if description not in ("short", "long"):
        raise ValueError(f"description={description!r}; allowed: 'short', 'long'")
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("type", "short_description", "long_description"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {obj.get(key)!r}")
        qs, ans = obj.get("yn_question_list"), obj.get("yn_answer_list")
        if not isinstance(qs, list) or not isinstance(ans, list) or len(qs) != len(ans) or not qs:
            raise ValueError(
                f"{where}: yn_question_list and yn_answer_list must be non-empty lists of equal length"
            )
        if not all(isinstance(a, str) and a.strip().lower() in ("yes", "no") for a in ans):
            raise ValueError(f"{where}: yn_answer_list entries must be 'yes' or 'no', got {ans!r}")
        if not all(isinstance(q, str) and q.strip() for q in qs):
            raise ValueError(f"{where}: yn_question_list entries must be non-empty strings")
        out.append(PromptRecord(obj[f"{description}_description"], obj, obj["type"], where))
    return out


def load_prompts(path: str | Path, fmt: Literal["auto", "geneval", "tiif"] = "auto") -> list[PromptRecord]:
    """Load either format; "auto" decides from the first non-empty line's keys."""
    if fmt == "geneval":
        return load_geneval(path)
    if fmt == "tiif":
        return load_tiif(path)
    if fmt != "auto":
        raise ValueError(f"fmt={fmt!r}; allowed: 'auto', 'geneval', 'tiif'")
    for lineno, obj in _read_jsonl(path):
        if "tag" in obj or "include" in obj:
            return load_geneval(path)
        if "yn_question_list" in obj:
            return load_tiif(path)
        raise ValueError(f"{path}:{lineno}: neither GenEval (tag/include) nor TIIF (yn_question_list) format")
    raise ValueError(f"{path}: no prompts in the file")


def normalize_prompt(prompt: str) -> str:
    """The key of the overlap filter: lower case, single spaces, no trailing period."""
    return " ".join(prompt.lower().split()).rstrip(".")


def remove_overlap(records: Iterable[PromptRecord], test: Iterable[PromptRecord | str]) -> list[PromptRecord]:
    """Drop the records whose prompt appears in the test set (R3's GenEval train set holds 370 of
    GenEval's 553 test prompts verbatim: remove them before reporting GenEval scores)."""
    banned = {normalize_prompt(t if isinstance(t, str) else t.prompt) for t in test}
    return [r for r in records if normalize_prompt(r.prompt) not in banned]


def balance_categories(records: Sequence[PromptRecord]) -> list[PromptRecord]:
    """Each category's records cycled up to the size of the largest category, interleaved, so a
    uniform draw from the result picks the category uniformly. A small synthetic task's train split
    is 74 % colour+position prompts and has 4 single-object ones; its evaluation is tag-balanced
    (`spread_over_categories`, `cycle_categories`), and RL trained on the raw split hardly sees the
    tags the evaluation weighs equally."""
    if not records:
        return []
    return cycle_categories(records, max(Counter(r.category for r in records).values()))


def cycle_categories(records: Sequence[PromptRecord], per_category: int) -> list[PromptRecord]:
    """Exactly `per_category` records of each category (its records in order, cycled when it has
    fewer), interleaved. A tag-balanced evaluation of a split whose small tags have 2 prompts: the
    repeats are separate samples, since the evaluation draws every request's noise and seed anew."""
    if per_category < 1:
        raise ValueError(f"per_category={per_category}; allowed: >= 1")
    groups = _by_category(records)
    return [rs[k % len(rs)] for k in range(per_category) for rs in groups]


def spread_over_categories(records: Sequence[PromptRecord], n: int) -> list[PromptRecord]:
    """The first `n` records taken round-robin over categories (file order within each), so a short
    evaluation still covers every GenEval tag."""
    queues = _by_category(records)
    out: list[PromptRecord] = []
    while len(out) < min(n, len(records)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _by_category(records: Sequence[PromptRecord]) -> list[list[PromptRecord]]:
    """The records of each category, in order of first appearance (file order within each)."""
    by_cat: dict[str, list[PromptRecord]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)
    return list(by_cat.values())


class PromptIterator:
    """Endless seeded shuffled epochs over a prompt list with an exact-resume cursor.

    Epoch e visits the records in the order `random.Random(seed + e).shuffle(range(n))`, so the
    state is just (epoch, position): `state_dict()` is JSON-able and `load_state_dict` resumes at
    exactly the next prompt.
    """

    def __init__(self, records: Sequence[PromptRecord], seed: int = 0, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("PromptIterator needs at least one prompt record")
        self._records = list(records)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._pos = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self, n: int) -> list[PromptRecord]:
        """The next `n` prompts (crossing into the next epoch when needed)."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        out = []
        while len(out) < n:
            if self._pos == len(self._order):
                self._epoch += 1
                self._pos = 0
                self._order = self._epoch_order(self._epoch)
            out.append(self._records[self._order[self._pos]])
            self._pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "position": self._pos,
            "num_records": len(self._records),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; refuses a state saved over a different prompt list size, seed or shuffle flag."""
        for key, mine in (
            ("num_records", len(self._records)),
            ("seed", self._seed),
            ("shuffle", self._shuffle),
        ):
            if state.get(key) != mine:
                raise ValueError(f"iterator state has {key}={state.get(key)!r}, this iterator has {mine!r}")
        pos = int(state["position"])
        if not 0 <= pos <= len(self._records):
            raise ValueError(f"iterator state position={pos} outside [0, {len(self._records)}]")
        self._epoch = int(state["epoch"])
        self._pos = pos
        self._order = self._epoch_order(self._epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        if self._shuffle:
            random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        return order


# ------------------------------------------------------------------------------------ helpers


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-empty line of a `.jsonl` or gzipped `.jsonl.gz` file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _check_geneval(obj: dict[str, Any], where: str) -> None:
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {obj.get('prompt')!r}")
    if not isinstance(obj.get("tag"), str) or not obj["tag"]:
        raise ValueError(f"{where}: field 'tag' must be a non-empty string, got {obj.get('tag')!r}")
    if not isinstance(obj.get("include"), list) or not obj["include"]:
        raise ValueError(f"{where}: field 'include' must be a non-empty list, got {obj.get('include')!r}")
    if not isinstance(obj.get("exclude", []), list):
        raise ValueError(f"{where}: field 'exclude' must be a list, got {obj['exclude']!r}")
    for key in ("include", "exclude"):
        for i, item in enumerate(obj.get(key, [])):
            _check_object(item, f"{where}: {key}[{i}]")
    n = len(obj["include"])
    for i, item in enumerate(obj["include"]):
        ref = item["position"][1] if item.get("position") is not None else None
        if ref is not None and (not 0 <= ref < n or ref == i):
            raise ValueError(f"{where}: include[{i}].position index {ref} must name another include entry")


def _check_object(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object, got {item!r}")
    if not isinstance(item.get("class"), str) or not item["class"]:
        raise ValueError(f"{where}.class must be a non-empty string, got {item.get('class')!r}")
    count = item.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{where}.count must be an integer >= 0, got {count!r}")
    if "color" in item and not isinstance(item["color"], str):
        raise ValueError(f"{where}.color must be a string, got {item['color']!r}")
    pos = item.get("position")
    if pos is not None and not (
        isinstance(pos, list) and len(pos) == 2 and isinstance(pos[0], str) and isinstance(pos[1], int)
    ):
        raise ValueError(f"{where}.position must be [relation, index], got {pos!r}")


@register_prompt_source("geneval")
def _geneval() -> list[PromptRecord]:
    """The 553 GenEval evaluation prompts shipped in `data/geneval/` (MIT; see its README)."""
    return load_geneval(_REPO_DATA / "geneval" / "evaluation_metadata.jsonl")


def _data_file(spec: str) -> Path:
    """The file a `data:<file>` spec names: a relative path that stays under `data_dir()`."""
    rel = PurePath(spec.removeprefix(DATA_PREFIX))
    if rel.is_absolute() or rel.anchor or ".." in rel.parts:
        raise ValueError(
            f"prompt source {spec!r}: a 'data:<file>' spec must be a relative path under {data_dir()} without "
            "'..' parts; give other files as a plain path (data.train=/path/to/file.jsonl)"
        )
    return data_dir() / rel
