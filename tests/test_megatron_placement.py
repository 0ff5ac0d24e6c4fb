"""Megatron placement math: PP/VPP stages (spec §4.3–4.5), TP splits and their merges (§3), vocab padding."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mindformers_conv.errors import UsageError
from mindformers_conv.megatron.pipeline import PipelineLayers, parse_pp_layers, stage_of_flat
from mindformers_conv.megatron.tensor_parallel import (COL, GLU, REPLICATED, ROW, VOCAB, merge, padded_vocab, qkv,
                                                       shard)

# Qwen2-VL-7B from the MindSpeed-MM VPP documentation example (spec §4.5).
DOC_VIT = parse_pp_layers("[[10,10,10,2],[0,0,0,0],[0,0,0,0]]")
DOC_LLM = parse_pp_layers("[[0,0,0,1],[4,4,4,4],[4,3,2,2]]")


def test_parse_pp_layers_flat_and_vpp_forms():
    assert parse_pp_layers("1,3").chunks == ((1, 3),)
    assert parse_pp_layers("[[1,2],[2,1]]").chunks == ((1, 2), (2, 1))
    assert parse_pp_layers("[4, 0]").chunks == ((4, 0),)
    with pytest.raises(UsageError):
        parse_pp_layers("[[1,2],[3]]")
    with pytest.raises(UsageError):
        parse_pp_layers("1,-2")
    with pytest.raises(UsageError):
        parse_pp_layers("one")


def test_flat_stage_is_chunk_major_over_pp_ranks():
    assert DOC_LLM.flat == (0, 0, 0, 1, 4, 4, 4, 4, 4, 3, 2, 2)
    assert [stage_of_flat(f, 4) for f in (0, 3, 4, 11)] == [(0, 0), (0, 3), (1, 0), (2, 3)]


def test_doc_example_placement_matches_the_correct_rule_table():
    # Spec §4.5 table: the embedding on f=3 (D3V0), not f=6 as MindSpeed-MM HEAD puts it.
    assert DOC_LLM.first_stage == 3 and DOC_LLM.last_stage == 11
    assert DOC_VIT.first_stage == 0 and DOC_VIT.last_stage == 3
    assert DOC_LLM.stage_of(0) == (3, 0)
    expected = {4: range(1, 5), 5: range(5, 9), 6: range(9, 13), 7: range(13, 17),
                8: range(17, 21), 9: range(21, 24), 10: range(24, 26), 11: range(26, 28)}
    for f, layers in expected.items():
        assert [DOC_LLM.stage_of(n) for n in layers] == [(f, i) for i in range(len(layers))]
    assert [DOC_VIT.stage_of(n)[0] for n in (0, 9, 10, 19, 20, 29, 30, 31)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_modality_starting_after_stage_zero_keeps_every_layer():
    # llm [[0,3,3]]: MindSpeed-MM HEAD loses layers 3-5 and the last-stage weights (spec §4.5).
    lines = parse_pp_layers("0,3,3")
    assert lines.first_stage == 1 and lines.last_stage == 2
    assert [lines.stage_of(n) for n in range(6)] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert [lines.global_layer(*lines.stage_of(n)) for n in range(6)] == list(range(6))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=3, max_size=3), min_size=1, max_size=3))
def test_every_layer_lands_on_exactly_one_stage_and_comes_back(chunks):
    lines = PipelineLayers(tuple(tuple(c) for c in chunks))
    seen = [lines.stage_of(n) for n in range(lines.total)]
    assert len(set(seen)) == lines.total
    assert [lines.global_layer(f, i) for f, i in seen] == list(range(lines.total))
    for f, count in enumerate(lines.flat):
        assert sorted(i for g, i in seen if g == f) == list(range(count))
    if lines.total:
        assert lines.flat[lines.first_stage] and lines.flat[lines.last_stage]
        assert not any(lines.flat[:lines.first_stage]) and not any(lines.flat[lines.last_stage + 1:])


def heads_of(nh, nkv, hd):
    return lambda cfg: (nh, nkv, hd)


def split_roundtrip(split, full, tp, divisible_by=1):
    per_rank = split.pieces(tuple(full.shape), tp, {}, divisible_by)
    shards = [shard(full, split.dim, p) for p in per_rank]
    real = full.shape[split.dim] if full.dim() else 0
    return shards, merge(shards, split.dim, per_rank, real)


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(["row", "col", "glu", "vocab", "replicated"]), tp=st.sampled_from([1, 2, 4]),
       rows=st.integers(1, 5), cols=st.integers(1, 4), seed=st.integers(0, 99), div=st.sampled_from([1, 3]))
def test_split_then_merge_is_identity(kind, tp, rows, cols, seed, div):
    split = {"row": ROW, "col": COL, "glu": GLU, "vocab": VOCAB, "replicated": REPLICATED}[kind]
    n = rows if kind == "vocab" else rows * tp * 2
    shape = (cols * tp, n) if kind == "col" else (n, cols)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    shards, back = split_roundtrip(split, full, tp, div)
    assert back.equal(full)
    if kind == "vocab":
        assert sum(s.shape[0] for s in shards) == padded_vocab(n, tp, div)
        assert len({s.shape for s in shards}) == 1


@settings(max_examples=80, deadline=None)
@given(nkv=st.sampled_from([1, 2, 4]), g=st.sampled_from([1, 2, 4]), hd=st.integers(1, 3),
       tp=st.sampled_from([1, 2, 4]), bias=st.booleans(), seed=st.integers(0, 99))
def test_qkv_split_then_merge_is_identity_including_fewer_kv_heads_than_ranks(nkv, g, hd, tp, bias, seed):
    nh = nkv * g
    if nh % tp or (nkv < tp and tp % nkv) or (nkv >= tp and nkv % tp):
        return
    rows = nkv * (g + 2) * hd
    full = torch.randn((rows,) if bias else (rows, 3), generator=torch.Generator().manual_seed(seed))
    shards, back = split_roundtrip(qkv(heads_of(nh, nkv, hd)), full, tp)
    assert back.equal(full)
    assert all(s.shape[0] == (nh // tp + 2 * max(1, nkv // tp)) * hd for s in shards)


def test_qkv_with_fewer_kv_heads_than_ranks_replicates_k_and_v():
    nh, nkv, hd, tp = 4, 2, 1, 4  # each group [q0 q1 k v]; ranks 0,1 share group 0
    full = torch.arange(nkv * (nh // nkv + 2) * hd)
    shards, _ = split_roundtrip(qkv(heads_of(nh, nkv, hd)), full, tp)
    assert [s.tolist() for s in shards] == [[0, 2, 3], [1, 2, 3], [4, 6, 7], [5, 6, 7]]


def test_glu_rank_holds_its_gate_slice_then_its_up_slice():
    full = torch.arange(8)  # gate 0..3, up 4..7
    shards, _ = split_roundtrip(GLU, full, 2)
    assert [s.tolist() for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_vocab_rows_padded_with_zeros_to_a_tp_multiple():
    full = torch.ones(5, 2)
    shards, back = split_roundtrip(VOCAB, full, 2)
    assert [s.shape[0] for s in shards] == [3, 3] and shards[1][2].eq(0).all()
    assert padded_vocab(5, 2, 4) == 8 and padded_vocab(160, 4, 128) == 512


@pytest.mark.parametrize("nh,nkv,tp,message", [
    (6, 3, 2, "num_key_value_heads 3 does not divide over --tp 2"),
    (12, 3, 4, "--tp 4 is not a multiple of num_key_value_heads 3"),
    (6, 6, 4, "num_attention_heads 6 is not divisible by --tp 4"),
])
def test_qkv_split_errors_name_the_numbers(nh, nkv, tp, message):
    rows = nkv * (nh // nkv + 2)
    with pytest.raises(UsageError, match=message.replace("-", "\\-")):
        qkv(heads_of(nh, nkv, 1)).pieces((rows, 2), tp, {})


def test_ffn_not_divisible_by_tp_is_an_error():
    with pytest.raises(UsageError, match="gate/up rows"):
        GLU.pieces((6, 4), 2, {})
    with pytest.raises(UsageError, match="columns do not divide over --tp 4"):
        COL.pieces((4, 6), 4, {})
