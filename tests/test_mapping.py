"""The rule language: patterns, ops and their inverses, planning with coverage and gathered experts."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mindformers_conv import dtypes
from mindformers_conv.errors import BadInput, UnmappedTensor
from mindformers_conv.mapping import (STACK, SWAP_LAST, TRANSPOSE, ModelSpec, Pattern, compose, equal_parts,
                                      invert, qkv_grouped, rename, split, stack_experts, transform)
from mindformers_conv.plan import build_plan
from mindformers_conv.tensor_ref import TensorRef, raw_bytes

FLOATS = ["F32", "F16", "BF16"]


def random_tensor(shape, code, seed=0):
    """Random bit patterns of a dtype (NaN payloads and infinities included)."""
    gen = torch.Generator().manual_seed(seed)
    itemsize = dtypes.BY_CODE[code].itemsize
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * itemsize,), dtype=torch.uint8, generator=gen)
    return raw[: torch.Size(shape).numel() * itemsize].view(dtypes.BY_CODE[code].torch).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and raw_bytes(a).equal(raw_bytes(b))


def test_pattern_captures_layer_index_and_name_part():
    p = Pattern("model.layers.{i}.mlp.{p}")
    assert p.match("model.layers.12.mlp.weight") == {"i": "12", "p": "weight"}
    assert p.match("model.layers.x.mlp.weight") is None
    assert p.match("model.layers.1.mlp.up.weight") is None
    assert p.format({"i": "3", "p": "bias"}) == "model.layers.3.mlp.bias"


def test_pattern_star_capture_spans_dots():
    assert Pattern("adam_m.{rest*}").match("adam_m.model.layers.0.w") == {"rest": "model.layers.0.w"}


dims = st.integers(min_value=1, max_value=5)


@settings(max_examples=40, deadline=None)
@given(code=st.sampled_from(FLOATS), rows=dims, cols=dims, seed=st.integers(0, 1000))
def test_transpose_then_inverse_is_identity(code, rows, cols, seed):
    x = random_tensor((rows, cols), code, seed)
    (y,) = TRANSPOSE.forward([x], {})
    (back,) = TRANSPOSE.backward([y.contiguous()], {})
    assert same(back.contiguous(), x)


@settings(max_examples=40, deadline=None)
@given(code=st.sampled_from(FLOATS), parts=st.integers(1, 4), rows=dims, cols=dims, seed=st.integers(0, 1000))
def test_split_then_concat_is_identity(code, parts, rows, cols, seed):
    x = random_tensor((parts * rows, cols), code, seed)
    op = split(equal_parts(parts))
    outs = op.forward([x], {})
    assert len(outs) == parts
    assert same(invert(op).forward(outs, {})[0], x)


@settings(max_examples=60, deadline=None)
@given(code=st.sampled_from(FLOATS), nkv=st.integers(1, 3), g=st.integers(1, 3), hd=st.integers(1, 4),
       cols=st.sampled_from([None, 1, 3]), seed=st.integers(0, 1000))
def test_qkv_grouped_then_inverse_is_identity(code, nkv, g, hd, cols, seed):
    nh = nkv * g
    shape = (nkv * (g + 2) * hd,) if cols is None else (nkv * (g + 2) * hd, cols)
    x = random_tensor(shape, code, seed)
    op = qkv_grouped(lambda cfg: (nh, nkv, hd))
    q, k, v = op.forward([x], {})
    assert q.shape[0] == nh * hd and k.shape[0] == v.shape[0] == nkv * hd
    assert same(op.backward([q.contiguous(), k.contiguous(), v.contiguous()], {})[0], x)


def test_qkv_grouped_layout_is_g_query_heads_then_k_then_v_per_group():
    nh, nkv, hd = 4, 2, 1
    fused = torch.arange(8.0)  # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    q, k, v = qkv_grouped(lambda cfg: (nh, nkv, hd)).forward([fused], {})
    assert q.tolist() == [0, 1, 4, 5] and k.tolist() == [2, 6] and v.tolist() == [3, 7]


@settings(max_examples=30, deadline=None)
@given(code=st.sampled_from(FLOATS), experts=st.integers(1, 4), rows=dims, cols=dims, seed=st.integers(0, 1000))
def test_stack_then_unstack_is_identity_also_in_gmm_layout(code, experts, rows, cols, seed):
    xs = [random_tensor((rows, cols), code, seed + e) for e in range(experts)]
    for op in (STACK, compose(STACK, SWAP_LAST)):
        (stacked,) = op.forward(xs, {})
        back = op.backward([stacked.contiguous()], {})
        assert all(same(b.contiguous(), x) for b, x in zip(back, xs))


def _refs(tensors: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    return {n: TensorRef(n, dtypes.from_torch(t.dtype), tuple(t.shape), loader=lambda t=t: t)
            for n, t in tensors.items()}


MOE = ModelSpec(key="toy-moe", description="toy", rules=(
    rename("embed.weight", "emb.weight"),
    stack_experts("layers.{i}.experts.{e}.w1.weight", "layers.{i}.ffn.w1.weight"),
    stack_experts("layers.{i}.experts.{e}.w2.weight", "layers.{i}.ffn.w2.weight", compose(STACK, SWAP_LAST)),
    transform("layers.{i}.qkv.weight", ("layers.{i}.wq.weight", "layers.{i}.wk.weight", "layers.{i}.wv.weight"),
              split(equal_parts(3))),
))


def _moe_state(experts=3):
    state = {"embed.weight": random_tensor((4, 2), "BF16", 1), "layers.0.qkv.weight": random_tensor((6, 2), "BF16", 2)}
    for e in range(experts):
        state[f"layers.0.experts.{e}.w1.weight"] = random_tensor((3, 2), "BF16", 10 + e)
        state[f"layers.0.experts.{e}.w2.weight"] = random_tensor((2, 3), "BF16", 20 + e)
    return state


def _run(plan):
    out = {}
    for t in plan.tensors:
        out[t.name] = t.group.compute()[t.index]
    return out


def test_plan_stacks_experts_in_index_order_and_unstacks_on_reverse():
    state = _moe_state()
    forward = build_plan(MOE, _refs(state), reverse=False, dtype=None, cfg={})
    ms = _run(forward)
    assert ms["layers.0.ffn.w1.weight"].shape == (3, 3, 2)
    assert ms["layers.0.ffn.w2.weight"].shape == (3, 3, 2)  # gmm: [E, in, out]
    assert same(ms["layers.0.ffn.w1.weight"][2], state["layers.0.experts.2.w1.weight"])
    back = _run(build_plan(MOE, _refs(ms), reverse=True, dtype=None, cfg={}))
    assert back.keys() == state.keys()
    assert all(same(back[n].contiguous(), state[n]) for n in state)


def test_missing_expert_is_named():
    state = _moe_state()
    del state["layers.0.experts.1.w2.weight"]
    with pytest.raises(UnmappedTensor, match=r"layers\.0\.experts\.1\.w2\.weight"):
        build_plan(MOE, _refs(state), reverse=False, dtype=None, cfg={})


def test_expert_count_from_config_finds_a_missing_last_expert():
    state = _moe_state(experts=3)
    with pytest.raises(UnmappedTensor, match=r"experts\.3\.w1\.weight"):
        build_plan(MOE, _refs(state), reverse=False, dtype=None, cfg={"num_experts": 4})


def test_unknown_tensor_stops_the_plan_and_allow_unmapped_lists_it():
    state = {**_moe_state(), "layers.0.mystery.weight": random_tensor((2,), "F32")}
    with pytest.raises(UnmappedTensor, match="layers.0.mystery.weight"):
        build_plan(MOE, _refs(state), reverse=False, dtype=None, cfg={})
    plan = build_plan(MOE, _refs(state), reverse=False, dtype=None, cfg={}, allow_unmapped=True)
    assert plan.unmapped == ["layers.0.mystery.weight"]


def test_more_experts_than_config_says_is_an_error():
    with pytest.raises(BadInput, match="config.json says 2 experts"):
        build_plan(MOE, _refs(_moe_state(experts=3)), reverse=False, dtype=None, cfg={"num_experts": 2})
