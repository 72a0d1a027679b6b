"""Flat weight buckets: plan, pack and unpack named tensors for a bucketed weight broadcast.

Why buckets: one collective per tensor costs a round trip per tensor (hundreds for a real model);
one collective for the whole model needs the whole model gathered at once (ZeRO-3) and a
receiver buffer of the same size. A bucket is a flat buffer of whole layers up to a configured
size. vLLM reloads weights bucket by bucket, so all parts of one layer (q/k/v, gate/up, ...) must
travel in the same bucket: fused vLLM layers are only written when all their parts arrive.

Everything here is pure torch. Metadata goes over the wire as plain dicts/lists (`to_wire`) so it
passes through Ray and vLLM's `collective_rpc` without custom serialization. The standalone
process-group helper is here too because both the sender (learners) and the receivers (actors)
need the same one and `rollout/` is the package both may import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

__all__ = [
    "TensorSpec",
    "BucketMeta",
    "layer_key",
    "plan_buckets",
    "pack_bucket",
    "unpack_bucket",
    "dtype_from_name",
    "WeightGroup",
    "standalone_group",
    "receive_buckets",
    "tensor_sum64",
    "tensors_checksum",
]

_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor inside a flat bucket: elements [offset, offset + numel)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class BucketMeta:
    """Layout of one flat bucket: its element count, buffer dtype and the tensors in it."""

    numel: int
    buffer_dtype: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=dtype_from_name(self.buffer_dtype)).element_size()

    def to_wire(self) -> dict[str, Any]:
        """Plain dict (str/int/list only) for Ray and vLLM `collective_rpc`."""
        return {
            "numel": self.numel,
            "buffer_dtype": self.buffer_dtype,
            "names": [t.name for t in self.tensors],
            "shapes": [list(t.shape) for t in self.tensors],
            "dtypes": [t.dtype for t in self.tensors],
            "offsets": [t.offset for t in self.tensors],
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any] | BucketMeta) -> BucketMeta:
        if isinstance(wire, BucketMeta):
            return wire
        specs = tuple(
            TensorSpec(name=n, shape=tuple(int(s) for s in shp), dtype=d, offset=int(o))
            for n, shp, d, o in zip(wire["names"], wire["shapes"], wire["dtypes"], wire["offsets"], strict=True)
        )
        return cls(numel=int(wire["numel"]), buffer_dtype=str(wire["buffer_dtype"]), tensors=specs)


def dtype_from_name(name: str) -> torch.dtype:
    """'float32' / 'torch.float32' -> torch.float32; ValueError for anything that is not a dtype."""
    short = name.removeprefix("torch.")
    dtype = getattr(torch, short, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}; expected e.g. 'float32', 'bfloat16'")
    return dtype


def layer_key(name: str) -> str:
    """The unit that must not be split across buckets.

    `model.layers.3.self_attn.q_proj.weight` -> `model.layers.3` (everything up to the first
    numeric path component); names without one (`model.embed_tokens.weight`, `lm_head.weight`)
    group by their parent module.
    """
    match = _LAYER_RE.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def plan_buckets(
    named_sizes: Sequence[tuple[str, int]], bucket_bytes: int, element_size: int = 4
) -> list[list[str]]:
    """Greedy plan of whole layers into buckets of at most `bucket_bytes` (in parameter order).

    Args:
        named_sizes: (name, numel) in a fixed order that every rank computes identically.
        bucket_bytes: target bucket size; a single layer larger than it gets a bucket of its own.
        element_size: bytes per element in the flat buffer (4 for fp32).
    Returns:
        A list of buckets, each a list of names.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    groups: list[tuple[str, list[str], int]] = []
    for name, numel in named_sizes:
        key = layer_key(name)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(name)
            groups[-1] = (key, groups[-1][1], groups[-1][2] + numel * element_size)
        else:
            groups.append((key, [name], numel * element_size))
    buckets: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for _, names, nbytes in groups:
        if current and current_bytes + nbytes > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.extend(names)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


def bucket_meta_for(
    specs: Sequence[tuple[str, Sequence[int], torch.dtype]], buffer_dtype: torch.dtype = torch.float32
) -> BucketMeta:
    """Layout of a bucket from (name, full shape, dtype) without touching tensor data."""
    tensors: list[TensorSpec] = []
    offset = 0
    for name, shape, dtype in specs:
        spec = TensorSpec(name=name, shape=tuple(int(s) for s in shape), dtype=str(dtype).removeprefix("torch."),
                          offset=offset)
        tensors.append(spec)
        offset += spec.numel
    return BucketMeta(numel=offset, buffer_dtype=str(buffer_dtype).removeprefix("torch."), tensors=tuple(tensors))


def pack_bucket(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    buffer_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BucketMeta]:
    """Copy named tensors into one flat 1-D buffer of `buffer_dtype`.

    Returns:
        (flat buffer of shape [numel], its BucketMeta).
    """
    items = list(named_tensors)
    meta = bucket_meta_for([(n, t.shape, t.dtype) for n, t in items], buffer_dtype)
    if out is None:
        out = torch.empty(meta.numel, dtype=buffer_dtype)
    elif out.numel() < meta.numel or out.dtype != buffer_dtype:
        raise ValueError(f"out buffer {tuple(out.shape)} {out.dtype} cannot hold {meta.numel} x {buffer_dtype}")
    flat = out[: meta.numel]
    for (_, tensor), spec in zip(items, meta.tensors, strict=True):
        flat[spec.offset : spec.offset + spec.numel].copy_(tensor.detach().reshape(-1))
    return flat, meta


def unpack_bucket(
    flat: torch.Tensor, meta: BucketMeta | dict[str, Any], cast: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """Named tensors back from a flat buffer: views into `flat` (copies when `cast` changes dtype)."""
    meta = BucketMeta.from_wire(meta)
    if flat.numel() != meta.numel:
        raise ValueError(f"flat buffer has {flat.numel()} elements, metadata expects {meta.numel}")
    out: list[tuple[str, torch.Tensor]] = []
    for spec in meta.tensors:
        view = flat[spec.offset : spec.offset + spec.numel].view(spec.shape)
        if cast and spec.dtype != meta.buffer_dtype:
            view = view.to(dtype_from_name(spec.dtype))
        out.append((spec.name, view))
    return out


@dataclass
class WeightGroup:
    """A standalone process group plus its store (kept alive together)."""

    pg: Any
    store: Any
    rank: int
    world_size: int

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Any:
        """Async in-place broadcast from `root`; returns a Work to `wait()` on."""
        return self.pg.broadcast(tensor, root)


def standalone_group(
    master_addr: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0
) -> WeightGroup:
    """A process group outside the default one (vLLM and DeepSpeed already own theirs).

    Rank 0 hosts the TCPStore. Every member must call this concurrently: construction is a
    rendezvous. The group's `broadcast(tensor, root)` returns a Work.
    """
    import torch.distributed as dist

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, int(port), world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    else:
        raise ValueError(f"unknown weight-sync backend {backend!r}; known: ['gloo', 'nccl']")
    return WeightGroup(pg=pg, store=store, rank=rank, world_size=world_size)


def receive_buckets(
    group: Any,
    metas: Sequence[BucketMeta | dict[str, Any]],
    device: str | torch.device = "cpu",
    per_param: bool = False,
    pool: list[torch.Tensor] | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive a broadcast from rank 0 bucket by bucket; yields each bucket's named tensors.

    Bucketed mode posts the next bucket's receive before yielding the current one, so the
    transfer of bucket i+1 overlaps the caller's loading of bucket i. `per_param` receives one
    collective per tensor (the slow baseline the benchmark compares with) and must match the
    sender's mode. `pool`: a list the caller keeps between syncs; two flat receive buffers
    are allocated into it once and reused (the yielded tensors are views into them, valid until
    the next-but-one bucket arrives: load or copy them before asking for more).
    """
    parsed = [BucketMeta.from_wire(m) for m in metas]
    if per_param:
        for meta in parsed:
            named = []
            for spec in meta.tensors:
                t = torch.empty(spec.shape, dtype=dtype_from_name(meta.buffer_dtype), device=device)
                group.broadcast(t, 0).wait()
                named.append((spec.name, t.to(dtype_from_name(spec.dtype))))
            yield named
        return

    pool = _ensure_pool(pool if pool is not None else [], parsed, device)

    def post(i: int) -> tuple[torch.Tensor, Any]:
        flat = pool[i % 2][: parsed[i].numel]
        return flat, group.broadcast(flat, 0)

    pending = post(0) if parsed else None
    for i, meta in enumerate(parsed):
        flat, work = pending
        work.wait()
        pending = post(i + 1) if i + 1 < len(parsed) else None
        yield unpack_bucket(flat, meta)


def _ensure_pool(pool: list[torch.Tensor], metas: Sequence[BucketMeta], device: str | torch.device
                 ) -> list[torch.Tensor]:
    """Two reusable flat buffers big enough for the largest bucket (re-made if too small)."""
    if not metas:
        return pool
    dtype = dtype_from_name(metas[0].buffer_dtype)
    largest = max(m.numel for m in metas)
    if len(pool) != 2 or pool[0].numel() < largest or pool[0].dtype != dtype or pool[0].device != torch.device(device):
        pool[:] = [torch.empty(largest, dtype=dtype, device=device) for _ in range(2)]
    return pool


# Elements cast to float64 at a time by `tensor_sum64`: bounds the temporary copy to 128 MB, where a
# whole 152k x 3584 embedding would take 4.4 GB of accelerator memory beside the engine's.
_SUM64_CHUNK_ELEMENTS = 1 << 24


def tensor_sum64(tensor: torch.Tensor) -> torch.Tensor:
    """The float64 sum of `tensor`'s elements as a 0-dim tensor on its device (no host sync), cast in
    chunks of `_SUM64_CHUNK_ELEMENTS`."""
    flat = tensor.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(_SUM64_CHUNK_ELEMENTS):
        total += chunk.to(torch.float64).sum()
    return total


def tensors_checksum(tensors: Iterable[torch.Tensor]) -> float:
    """Order-independent fingerprint: sum of float64 sums (`tensor_sum64`). Equal weights give equal
    values up to float64 rounding of the summation order; any real weight change moves it by far more."""
    return float(sum((float(tensor_sum64(t)) for t in tensors), 0.0))
