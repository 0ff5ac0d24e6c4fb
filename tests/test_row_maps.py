"""Row maps: an op that only moves whole rows declares them, and the planner and executor then cut byte
windows of the source files instead of running torch. Each row map gives the torch op's exact bytes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from test_mapping import FLOATS, random_tensor, same

from mindformers_conv import dtypes
from mindformers_conv.cli import main
from mindformers_conv.mapping import ModelSpec, config_heads, equal_parts, invert, qkv_grouped, split, transform
from mindformers_conv.plan import build_plan
from mindformers_conv.tensor_ref import FileRanges, TensorRef

ROOT = Path(__file__).resolve().parent.parent


def by_rows(op, xs, cfg, reverse):
    """The op's outputs assembled from its row map alone."""
    blocks = op.rows([x.shape[0] for x in xs], cfg, reverse)
    return [torch.cat([xs[i].narrow(0, first, count) for i, first, count in out]) for out in blocks]


def assert_rows_match_torch(op, xs, cfg):
    """Forward from `xs`, then backward from the forward's outputs: the row map and torch agree both ways."""
    for reverse, inputs in ((False, xs), (True, op.run(xs, cfg, False))):
        expected = op.run(inputs, cfg, reverse)
        got = by_rows(op, inputs, cfg, reverse)
        assert len(got) == len(expected)
        assert all(same(a, b.contiguous()) for a, b in zip(got, expected))


heads = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))  # kv heads, queries per group, head_dim


@settings(max_examples=40, deadline=None)
@given(code=st.sampled_from(FLOATS), h=heads, cols=st.integers(0, 3), seed=st.integers(0, 1000))
def test_qkv_grouped_row_map_is_the_torch_op_for_gqa_weights_and_biases(code, h, cols, seed):
    nkv, g, hd = h
    cfg = {"num_attention_heads": nkv * g, "num_key_value_heads": nkv, "hidden_size": 8, "head_dim": hd}
    rest = (cols,) if cols else ()  # 0: a bias
    fused = random_tensor((nkv * (g + 2) * hd, *rest), code, seed)
    for op in (qkv_grouped(config_heads), invert(qkv_grouped(config_heads))):
        xs = [fused] if op.name == "qkv_grouped" else qkv_grouped(config_heads).run([fused], cfg, False)
        assert_rows_match_torch(op, xs, cfg)


@settings(max_examples=40, deadline=None)
@given(code=st.sampled_from(FLOATS), sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4),
       cols=st.integers(0, 3), seed=st.integers(0, 1000))
def test_split_and_concat_row_maps_are_the_torch_ops(code, sizes, cols, seed):
    x = random_tensor((sum(sizes), *((cols,) if cols else ())), code, seed)
    op = split(lambda cfg, total: sizes)
    assert_rows_match_torch(op, [x], {})
    assert_rows_match_torch(invert(op), op.run([x], {}, False), {})
    assert_rows_match_torch(invert(split(equal_parts(2))), [x, x], {})


def test_column_split_and_row_changing_ops_have_no_row_map():
    assert split(equal_parts(2), dim=1).rows is None
    assert invert(split(equal_parts(2), dim=1)).rows is None


def test_row_map_checks_the_config_like_the_torch_op():
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 8}
    with pytest.raises(ValueError, match="fused qkv has 10 rows"):
        qkv_grouped(lambda c: (4, 2, 2)).rows([10], cfg, False)
    with pytest.raises(ValueError, match="q/k/v have 8/2/4 rows"):
        qkv_grouped(lambda c: (4, 2, 2)).rows([8, 2, 4], cfg, True)
    with pytest.raises(ValueError, match="the split needs 4"):
        split(lambda c, n: [2, 2]).rows([5], cfg, False)
    for reverse, counts in ((False, [18]), (True, [10, 4, 4])):  # 5 heads over 2 kv heads: refused both ways
        with pytest.raises(ValueError, match="5 heads cannot be grouped over 2 kv heads"):
            qkv_grouped(lambda c: (5, 2, 2)).rows(counts, cfg, reverse)
        with pytest.raises(ValueError, match="5 heads cannot be grouped over 2 kv heads"):
            qkv_grouped(lambda c: (5, 2, 2)).run([torch.zeros(n, 3) for n in counts], cfg, reverse)


def test_planned_row_blocks_are_byte_windows_of_the_source_files(tmp_path):
    """q/k/v of a file → the fused tensor as file ranges whose bytes are the torch op's output."""
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 6, "head_dim": 3}
    q, k, v = (random_tensor(shape, "BF16", seed) for seed, shape in enumerate([(12, 5), (6, 5), (6, 5)]))
    path = tmp_path / "raw.bin"
    refs, offset = {}, 0
    with open(path, "wb") as f:
        for name, t in zip("qkv", (q, k, v)):
            data = t.contiguous().view(torch.uint8).numpy().tobytes()
            f.write(data)
            refs[name] = TensorRef(name, dtypes.BY_CODE["BF16"], tuple(t.shape),
                                   ((str(path), offset, len(data)),))
            offset += len(data)
    spec = ModelSpec("t", "t", (transform(["q", "k", "v"], "qkv", invert(qkv_grouped(config_heads))),), extra_rules=())
    plan = build_plan(spec, refs, reverse=False, dtype=None, cfg=cfg)
    (planned,) = plan.tensors
    assert planned.group.in_files and planned.group.work_bytes == 0 and planned.shape == (24, 5)
    data = b"".join(FileRanges(planned.group.ranges(0)).pieces())
    expected = invert(qkv_grouped(config_heads)).run([q, k, v], cfg, False)[0]
    assert data == expected.contiguous().view(torch.uint8).numpy().tobytes()


def test_llama_to_megatron_back_and_reshard_never_import_torch(tiny_llama, tmp_path):
    """Row blocks, column pieces, the zip writer and reader: the three Megatron steps run without torch."""
    hf, mg = tiny_llama(), tmp_path / "mg"
    runs = [[*("--input_path", hf, "--output_path", mg), "--target", "megatron", "--tp", "2", "--llm_pp_layers", "1,1"],
            ["--reversed", "--input_path", mg, "--output_path", f"{tmp_path}/back/", "--config_path", hf],
            [*("--input_path", mg, "--output_path", tmp_path / "flat"), "--target", "megatron", "--tp", "1",
             "--llm_pp_layers", "2", "--config_path", hf]]
    runs = [[str(a) for a in argv] for argv in runs]
    code = ("import json, sys; from mindformers_conv.cli import main; "
            f"codes = [main(['--model', 'llama', '--no-progress', *argv]) for argv in {runs!r}]; "
            "print(json.dumps([codes, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [[0, 0, 0], False]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_cast_to_megatron_is_the_uncast_layout_cast_and_never_imports_torch(tiny_llama, tmp_path, dtype):
    """A cast from bf16: row blocks and TP column pieces are cast on the way, in files (no torch); every
    rank file holds the bf16 conversion's tensors cast."""
    from megatron_helpers import assert_same_rank_files, rank_files

    hf = tiny_llama()
    argv = ["--model", "llama", "--no-progress", "--input_path", str(hf), "--target", "megatron", "--tp", "2",
            "--llm_pp_layers", "1,1"]
    code = ("import json, sys; from mindformers_conv.cli import main; "
            f"code = main({argv!r} + ['--output_path', {str(tmp_path / dtype)!r}, '--dtype', {dtype!r}]); "
            "print(json.dumps([code, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [0, False]
    assert main(argv + ["--output_path", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    cast = rank_files(tmp_path / "bf16")
    for state in cast.values():
        for key, tensors in state.items():
            if key.startswith("model"):
                state[key] = {name: dtypes.cast(t, dtypes.parse_user_dtype(dtype)) for name, t in tensors.items()}
    assert_same_rank_files(rank_files(tmp_path / dtype), cast)
