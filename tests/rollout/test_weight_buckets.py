"""Flat weight buckets: layer grouping, bucket planning, pack/unpack round trip, gloo transfer."""

import threading

import pytest
import torch

from rollout.weight_buckets import (
    BucketMeta,
    layer_key,
    pack_bucket,
    plan_buckets,
    receive_buckets,
    standalone_group,
    tensor_sum64,
    tensors_checksum,
    unpack_bucket,
)


def test_layer_key_groups_fused_parts_of_one_layer():
    assert layer_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_key("model.layers.12.input_layernorm.weight") == "model.layers.12"
    assert layer_key("single_transformer_blocks.0.attn.to_q.weight") == "single_transformer_blocks.0"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("lm_head.weight") == "lm_head"
    assert layer_key("scale") == "scale"


def test_plan_keeps_layers_whole_and_respects_size():
    sizes = [("embed.weight", 100), ("layers.0.q.weight", 30), ("layers.0.k.weight", 30),
             ("layers.1.q.weight", 30), ("layers.1.k.weight", 30), ("head.weight", 100)]
    # 4-byte elements, 320-byte buckets: embed (400 B) alone (oversized), layer 0 + layer 1 (480 B)
    # do not fit together, so each layer alone, then head alone.
    plan = plan_buckets(sizes, bucket_bytes=320)
    assert plan == [["embed.weight"], ["layers.0.q.weight", "layers.0.k.weight"],
                    ["layers.1.q.weight", "layers.1.k.weight"], ["head.weight"]]
    big = plan_buckets(sizes, bucket_bytes=10_000)
    assert big == [[n for n, _ in sizes]]
    assert [n for b in plan for n in b] == [n for n, _ in sizes]  # order kept, nothing lost


def test_plan_rejects_nonpositive_size():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([("a.w", 1)], bucket_bytes=0)


def test_pack_unpack_round_trip_with_dtypes():
    g = torch.Generator().manual_seed(0)
    named = [("a.0.w", torch.randn(3, 4, generator=g)), ("a.0.b", torch.randn(4, generator=g)),
             ("c.half", torch.randn(2, 2, generator=g).to(torch.bfloat16))]
    flat, meta = pack_bucket(named)
    assert flat.dtype == torch.float32 and flat.numel() == 12 + 4 + 4 == meta.numel
    assert [t.offset for t in meta.tensors] == [0, 12, 16]
    wire = meta.to_wire()
    assert BucketMeta.from_wire(wire) == meta
    back = unpack_bucket(flat, wire)
    for (n0, t0), (n1, t1) in zip(named, back, strict=True):
        assert n0 == n1 and t1.dtype == t0.dtype and t1.shape == t0.shape
        assert torch.equal(t1, t0)
    with pytest.raises(ValueError, match="elements"):
        unpack_bucket(flat[:-1], meta)


def test_checksum_sees_a_single_changed_element():
    a = [torch.ones(3), torch.arange(4.0)]
    b = [torch.ones(3), torch.arange(4.0)]
    assert tensors_checksum(a) == tensors_checksum(b)
    b[1][2] += 1e-3
    assert tensors_checksum(a) != tensors_checksum(b)


@pytest.mark.parametrize("per_param", [False, True])
def test_gloo_standalone_group_moves_buckets(per_param, free_port):
    """Sender thread = rank 0, receiver thread = rank 1, over a real gloo group."""
    g = torch.Generator().manual_seed(1)
    named = [(f"layers.{i}.w", torch.randn(5, 3, generator=g)) for i in range(4)]
    buckets = [named[:2], named[2:]]
    metas = [pack_bucket(b)[1].to_wire() for b in buckets]
    port, received, errors = free_port(), [], []

    def send():
        try:
            pg = standalone_group("127.0.0.1", port, 0, 2)
            for b in buckets:
                if per_param:
                    for _, t in b:
                        pg.broadcast(t.clone(), 0).wait()
                else:
                    pg.broadcast(pack_bucket(b)[0], 0).wait()
        except Exception as e:  # surfaced below
            errors.append(e)

    def recv():
        try:
            pg = standalone_group("127.0.0.1", port, 1, 2)
            for bucket in receive_buckets(pg, metas, per_param=per_param):
                received.extend((n, t.clone()) for n, t in bucket)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=send), threading.Thread(target=recv)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [n for n, _ in received] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, received, strict=True):
        assert torch.equal(want, got)


def test_unknown_backend_is_refused(free_port):
    with pytest.raises(ValueError, match="backend"):
        standalone_group("127.0.0.1", free_port(), 0, 1, backend="mpi")


def test_float64_sums_in_chunks_match_the_whole_sum(monkeypatch):
    import rollout.weight_buckets as wb

    t = torch.arange(10, dtype=torch.bfloat16).reshape(2, 5) / 4  # 0, 0.25, ..., 2.25: exact in bf16
    monkeypatch.setattr(wb, "_SUM64_CHUNK_ELEMENTS", 3)  # chunks of 3, 3, 3, 1
    s = tensor_sum64(t)
    assert s.dtype == torch.float64 and s.ndim == 0 and float(s) == 11.25  # 45 / 4
    assert tensors_checksum([t, torch.ones(3)]) == 14.25
    assert tensors_checksum([]) == 0.0
