"""Checkpoint state without pickle: nested dicts/lists of tensors and plain values.

Tensors go to one safetensors file (keyed by their path in the tree), everything else to JSON with
placeholders, so optimizer states, RNG states and buffers round-trip exactly and loading a
checkpoint can never execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_tree", "load_tree", "rng_state", "set_rng_state"]

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def save_tree(tree: Any, directory: str | Path, name: str = "state") -> None:
    """Write `name.json` + `name.safetensors` under `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, "t", tensors)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(directory: str | Path, name: str = "state") -> Any:
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as a tree `save_tree` accepts."""
    import random

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    version, st, gauss = state["python"]
    random.setstate((version, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {_TENSOR: path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_NDARRAY: path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {_INTKEYS: [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
        raise TypeError(f"{path}: dict keys must be all str or all int, got {[type(k).__name__ for k in obj]}")
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{path}: cannot store {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _NDARRAY in obj:
            return tensors[obj[_NDARRAY]].numpy()
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _INTKEYS in obj:
            return {int(k): _decode(v, tensors) for k, v in obj[_INTKEYS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
