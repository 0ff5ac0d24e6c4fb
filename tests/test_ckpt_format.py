"""Every MindSpore file we write is judged by MindSpore 2.10 itself (DESIGN §3, spec §3).

`.ckpt` outputs load with `mindspore.load_checkpoint` and hold exactly our tensors (names, shapes,
dtypes, bytes; bf16 compared as raw bytes through `Tensor.get_bytes()`, never through numpy); an
unsplit `.ckpt` is byte-identical to what `mindspore.save_checkpoint` writes for the same tensors.
Large tensors are split into consecutive same-tag Values (`Options.ckpt_slice_bytes`), which both
MindSpore and our reader join again. MindSpore safetensors outputs (a `.safetensors` file or a
folder) carry `{"format": "ms"}` and load with `load_checkpoint(..., format="safetensors")`.
"""

from __future__ import annotations

import filecmp
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import GQA, MHA, tensors_of
from mindformers_conv import dtypes, registry
from mindformers_conv.convert import Options, convert
from mindformers_conv.synthetic import LlamaShape

ms = pytest.importorskip("mindspore")
TIED = LlamaShape(tie_word_embeddings=True)


def ms_tensors(path: Path, fmt: str = "ckpt") -> dict:
    """name → (dtype code, shape, raw bytes) as MindSpore loads the file (bytes via get_bytes, no numpy)."""
    params = ms.load_checkpoint(str(path), format=fmt)
    out = {}
    for name, p in params.items():
        data = bytearray(p.get_bytes())
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        out[name] = (dtypes.from_ms(str(p.dtype)).code, tuple(p.shape), raw)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert torch.equal(a[name][2], b[name][2]), name


def forward(hf: Path, out: Path, dtype: str | None, slice_bytes: int | None = None):
    options = Options(dtype=dtypes.parse_user_dtype(dtype), progress=False)
    if slice_bytes is not None:
        options.ckpt_slice_bytes = slice_bytes
    return convert(registry.get("llama"), str(hf), str(out), reverse=False, options=options)


def ckpt_values(path: Path) -> list[tuple[str, tuple, str, int]]:
    """Every Value of a .ckpt in file order as (tag, dims, tensor_type, content length), parsed by
    MindSpore's own protobuf classes (independent of our reader)."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    message = Checkpoint()
    message.ParseFromString(path.read_bytes())
    return [(v.tag, tuple(v.tensor.dims), v.tensor.tensor_type, len(v.tensor.tensor_content)) for v in message.value]


# (source dtype, --dtype, shape): every ckpt flavour the forward writes for llama-style keys.
CKPT_KINDS = {
    "default-f32-from-bf16": ("BF16", None, GQA),
    "bf16-from-bf16": ("BF16", "bf16", GQA),
    "bf16-from-f32-rounded": ("F32", "bf16", GQA),
    "fp16-from-f32": ("F32", "fp16", MHA),
    "fp32-from-fp16": ("F16", "fp32", GQA),
    "tied-bf16": ("BF16", "bf16", TIED),
}


@pytest.mark.parametrize("kind", list(CKPT_KINDS))
def test_ckpt_loads_in_mindspore_with_our_values(tiny_llama, tmp_path, kind):
    source, flag, shape = CKPT_KINDS[kind]
    out = tmp_path / "ms.ckpt"
    forward(tiny_llama(shape, dtype=source), out, flag)
    ours, theirs = tensors_of(out), ms_tensors(out)
    assert_same(theirs, ours)
    expected = dtypes.parse_user_dtype(flag).code if flag else "F32"
    assert {code for code, _, _ in ours.values()} == {expected}
    assert len(ours) == len(shape.tensors()) + shape.tie_word_embeddings  # a tied head is written (state_dict())


@pytest.mark.parametrize("kind", ["default-f32-from-bf16", "bf16-from-bf16", "fp16-from-f32", "tied-bf16"])
def test_unsplit_ckpt_is_byte_identical_to_mindspore_save_checkpoint(tiny_llama, tmp_path, kind):
    """Same tensors, same order → the very bytes `mindspore.save_checkpoint(list, path)` writes."""
    source, flag, shape = CKPT_KINDS[kind]
    ours = tmp_path / "ours.ckpt"
    forward(tiny_llama(shape, dtype=source), ours, flag)
    params = ms.load_checkpoint(str(ours))
    theirs = tmp_path / "theirs.ckpt"
    ms.save_checkpoint([{"name": n, "data": p} for n, p in params.items()], str(theirs))
    assert filecmp.cmp(ours, theirs, shallow=False)


def test_output_path_without_suffix_gets_ckpt_appended_like_save_checkpoint(tiny_llama, tmp_path):
    forward(tiny_llama(), tmp_path / "llama_ms", "bf16")
    assert not (tmp_path / "llama_ms").exists()
    written = tmp_path / "llama_ms.ckpt"
    assert_same(ms_tensors(written), tensors_of(written))


# Slice sizes: a few pieces per big tensor, and pieces smaller than a row.
@pytest.mark.parametrize("slice_bytes", [4096, 100])
@pytest.mark.parametrize("flag", ["bf16", "fp32"])
def test_tensor_over_slice_size_is_several_same_tag_values_and_loads_identically(tiny_llama, tmp_path,
                                                                                   slice_bytes, flag):
    hf = tiny_llama()
    whole, split = tmp_path / "whole.ckpt", tmp_path / "split.ckpt"
    forward(hf, whole, flag)
    forward(hf, split, flag, slice_bytes=slice_bytes)

    values = ckpt_values(split)
    runs: dict[str, list] = {}
    order = []
    for tag, dims, tensor_type, length in values:
        if not order or order[-1] != tag:
            assert tag not in runs, f"{tag} appears in two separate runs"
            order.append(tag)
            runs[tag] = []
        runs[tag].append((dims, tensor_type, length))
    ours = tensors_of(whole)
    assert order == list(ours)
    split_some = 0
    for name, (code, shape, raw) in ours.items():
        pieces = runs[name]
        nbytes = raw.numel()
        assert all(dims == shape and t == dtypes.BY_CODE[code].ms for dims, t, _ in pieces), name
        assert sum(length for _, _, length in pieces) == nbytes, name
        if nbytes > slice_bytes:
            assert len(pieces) == math.ceil(nbytes / slice_bytes), name  # as MindSpore's slice_count
            split_some += 1
        else:
            assert len(pieces) == 1, name
    assert split_some >= 2 * GQA.num_hidden_layers

    assert_same(ms_tensors(split), ms_tensors(whole))  # MindSpore joins the pieces
    assert_same(tensors_of(split), ours)  # and so does our reader
    assert_same(ms_tensors(split), ours)


@pytest.mark.parametrize("flag", ["bf16", "fp32"])
def test_split_file_is_byte_identical_to_mindspores_own(tiny_llama, tmp_path, monkeypatch, flag):
    """The threshold is MindSpore's SLICE_SIZE; with both lowered to 1 KiB, MindSpore 2.10's save_checkpoint
    and our writer produce the same bytes (fixed-size byte chunks, the last one shorter)."""
    from mindspore.train import serialization
    from mindformers_conv.formats.ms_ckpt import SLICE_BYTES

    assert SLICE_BYTES == serialization.SLICE_SIZE * 1024
    ours = tmp_path / "ours.ckpt"
    forward(tiny_llama(), ours, flag, slice_bytes=1024)
    params = ms.load_checkpoint(str(ours))
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KiB
    theirs = tmp_path / "theirs.ckpt"
    ms.save_checkpoint([{"name": n, "data": p} for n, p in params.items()], str(theirs))
    assert len(ckpt_values(theirs)) > 2 * len(params)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("crc", [False, True], ids=["plain", "crc_check"])
@pytest.mark.parametrize("flag", ["bf16", "fp32"])
def test_our_reader_joins_the_split_values_mindspore_itself_writes(tiny_llama, tmp_path, monkeypatch, flag, crc):
    """MindSpore 2.10 splits a Tensor into fixed SLICE_SIZE-KiB byte chunks (not row-aligned); we read those
    back (also with save_checkpoint's crc_check trailer), and convert them MS → HF, unchanged."""
    from mindspore.train import serialization

    ours = tmp_path / "ours.ckpt"
    forward(tiny_llama(), ours, flag)
    params = ms.load_checkpoint(str(ours))
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KiB
    theirs = tmp_path / "theirs.ckpt"
    ms.save_checkpoint([{"name": n, "data": p} for n, p in params.items()], str(theirs), crc_check=crc)
    if crc:
        assert theirs.read_bytes()[-17:-10] == b"crc_num"
    else:
        assert len(ckpt_values(theirs)) > 2 * len(params)
    assert_same(tensors_of(theirs), tensors_of(ours))
    back_ours, back_theirs = tmp_path / "a.bin", tmp_path / "b.bin"
    for src, dst in ((ours, back_ours), (theirs, back_theirs)):
        convert(registry.get("llama"), str(src), str(dst), reverse=True, options=Options(progress=False))
    assert_same(tensors_of(back_theirs), tensors_of(back_ours))


def test_ms_safetensors_file_loads_in_mindspore(tiny_llama, tmp_path):
    from safetensors import safe_open

    hf = tiny_llama()
    out, ckpt = tmp_path / "ms.safetensors", tmp_path / "ms.ckpt"
    forward(hf, out, "bf16")
    forward(hf, ckpt, "bf16")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "ms"}
    theirs = ms_tensors(out, "safetensors")
    assert_same(theirs, tensors_of(out))
    assert_same(theirs, ms_tensors(ckpt))


@pytest.mark.parametrize("flag", ["bf16", "fp16", None])
def test_ms_safetensors_folder_loads_in_mindspore_and_matches_the_ckpt(tiny_llama, tmp_path, flag):
    """A folder output: MindSpore safetensors file(s) + param_name_map.json; same tensors as the .ckpt."""
    from safetensors import safe_open

    hf = tiny_llama()
    folder, ckpt = tmp_path / "ms_out", tmp_path / "ms.ckpt"
    forward(hf, str(folder) + "/", flag)
    forward(hf, ckpt, flag)
    name_map = json.loads((folder / "param_name_map.json").read_text())
    files = sorted(p for p in folder.glob("*.safetensors"))
    assert files and set(name_map.values()) == {p.name for p in files}
    loaded = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == {"format": "ms"}
        got = ms_tensors(file, "safetensors")
        assert all(name_map[n] == file.name for n in got)
        loaded.update(got)
    assert set(name_map) == set(loaded)
    assert_same(loaded, ms_tensors(ckpt))
    assert (folder / "config.json").read_bytes() == (hf / "config.json").read_bytes()
