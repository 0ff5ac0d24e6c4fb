"""How bytes move: in-kernel copies (with their fallbacks), streaming casts, each source byte read once."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from mindformers_conv import dtypes, outfile
from mindformers_conv import tensor_ref
from mindformers_conv.synthetic import LlamaShape
from mindformers_conv.tensor_ref import CastBytes, FileRanges, MemoryBytes, raw_bytes

WIDE = LlamaShape(vocab_size=1024, hidden_size=256, intermediate_size=640, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2)  # fused q/k/v ≈ 192 KiB a layer in bf16


def run_ok(cli, *argv):
    result = cli(*argv)
    assert result.code == 0, result.err
    return result


def files_of(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---- in-kernel copies and their fallbacks ------------------------------------------------------------------

OUTPUTS = [("ms.ckpt", []), ("ms/", ["--max_shard_size", "40000"]), ("ms.safetensors", [])]


@pytest.mark.parametrize("target, extra", OUTPUTS, ids=["ckpt", "ms-folder", "safetensors"])
def test_whole_tensors_are_copied_in_the_kernel(cli, tiny_llama, tmp_path, monkeypatch, target, extra):
    hf = tiny_llama()
    calls = []
    real = outfile.KERNEL_COPIES[0]
    monkeypatch.setattr(outfile, "KERNEL_COPIES", (lambda *a: calls.append(a[3]) or real(*a),))
    run_ok(cli, "--model", "llama", "--input_path", hf, "--output_path", f"{tmp_path}/{target}", "--dtype", "bf16",
           *extra)
    assert len(calls) == len(LlamaShape().tensors())  # one mapped write per tensor: no byte went through us
    assert sum(calls) == sum(numel * 2 for numel in (torch.Size(s).numel() for _, s in LlamaShape().tensors()))


@pytest.mark.parametrize("target, extra", OUTPUTS, ids=["ckpt", "ms-folder", "safetensors"])
@pytest.mark.parametrize("copies", ["copy_file_range", "sendfile", "read-write", "refused"])
def test_copy_fallbacks_write_the_same_bytes(cli, tiny_llama, tmp_path, monkeypatch, target, extra, copies):
    hf = tiny_llama()
    argv = ["--model", "llama", "--input_path", hf, "--dtype", "bf16", *extra]
    (tmp_path / "kernel").mkdir()
    (tmp_path / "fallback").mkdir()
    run_ok(cli, *argv, "--output_path", f"{tmp_path}/kernel/{target}")

    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")  # EXDEV, as copy_file_range across file systems

    monkeypatch.setattr(outfile, "KERNEL_COPIES", {"copy_file_range": (outfile._copy_file_range,),
                                                   "sendfile": (outfile._sendfile,), "read-write": (),
                                                   "refused": (refuse, refuse, refuse)}[copies])
    run_ok(cli, *argv, "--output_path", f"{tmp_path}/fallback/{target}")
    kernel, fallback = (tmp_path / name / target.rstrip("/") for name in ("kernel", "fallback"))
    assert files_of(fallback) == files_of(kernel)


def test_mapped_writes_cross_windows_at_any_page_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(outfile, "MAP_WINDOW", 3 * mmap.PAGESIZE)
    monkeypatch.setattr(outfile, "MAP_WRITE_PIECE", 1000)
    source = tmp_path / "in.bin"
    data = bytes(torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
    source.write_bytes(data)
    out = outfile.OutputFile(tmp_path / "out.bin")
    out.write(b"abc")  # the destination three bytes into a page, the source at another page offset
    out.copy_from(str(source), mmap.PAGESIZE + 5, 30_000)
    out.copy_from(str(source), 0, 7)
    out.commit()
    assert (tmp_path / "out.bin").read_bytes() == b"abc" + data[mmap.PAGESIZE + 5:mmap.PAGESIZE + 30_005] + data[:7]


def test_a_source_shorter_than_the_copy_is_a_clear_error(tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 100)
    out = outfile.OutputFile(tmp_path / "out.bin")
    with pytest.raises(outfile.OutputError, match=r"in\.bin: unexpected end of file at byte 100"):
        out.copy_from(str(source), 0, 200)
    out.abort()


@pytest.mark.parametrize("code, reason", [(28, "disk full"), (14, "a source file shrank while it was being read")])
def test_a_copy_error_that_is_not_unsupported_is_reported(tmp_path, monkeypatch, code, reason):
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 100)

    def failing(*args):
        raise OSError(code, os.strerror(code))  # ENOSPC; EFAULT: a mapped write past a file cut short meanwhile

    monkeypatch.setattr(outfile, "KERNEL_COPIES", (failing,))
    out = outfile.OutputFile(tmp_path / "out.bin")
    with pytest.raises(outfile.OutputError, match=rf"cannot write .*out\.bin: {reason}"):
        out.copy_from(str(source), 0, 100)
    out.abort()


# ---- streaming casts -------------------------------------------------------------------------------------

def special_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Random bits, including NaNs with payloads and signs, infinities, subnormals."""
    bits = torch.randint(-(1 << 15), 1 << 15, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    if dtype.itemsize == 2:
        return bits.to(torch.int16).view(dtype)
    wide = (bits.to(torch.int64) << 16 | torch.randint(0, 1 << 16, (n,), generator=torch.Generator().manual_seed(seed + 1)))
    return wide.to(torch.int32).view(dtype)


CASTS = [("BF16", "F32"), ("F32", "BF16"), ("F32", "F16"), ("F16", "F32"), ("F16", "BF16"), ("BF16", "F16")]


@pytest.fixture(params=["compiled", "portable", "without-extension"])
def cast_loops(request, monkeypatch) -> str:
    """Each way a chunk is cast: the C loops (fast, portable), and numpy's shift or torch without them."""
    if request.param == "portable":
        from mindformers_conv import _floatcast

        monkeypatch.setattr(tensor_ref, "_compiled_cast", lambda s, t: lambda raw, out: _floatcast.cast(
            raw, out, s.code, t.code, portable=True))
    elif request.param == "without-extension":
        monkeypatch.setattr(tensor_ref, "_compiled_cast", lambda s, t: None)  # as if it had not been built
    return request.param


@pytest.mark.parametrize("pair", CASTS, ids=["-".join(p) for p in CASTS])
def test_a_streamed_cast_is_the_whole_tensor_cast(tmp_path, monkeypatch, pair, cast_loops):
    """Every 16-bit pattern (random 32-bit ones), from a file at an odd offset and at an aligned one, and
    from memory; pieces, windows, and the threaded write_to all give `dtypes.cast`'s bytes."""
    monkeypatch.setattr(tensor_ref, "CAST_CHUNK", 4099)  # many chunks, windows across them
    source, target = (dtypes.BY_CODE[c] for c in pair)
    if source.itemsize == 2:
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(source.torch)
    else:
        x = special_values(source.torch, 20_000, seed=3)
        x[::97] = float("nan")
    expected = raw_bytes(dtypes.cast(x, target)).numpy().tobytes()
    streams = [MemoryBytes.of(x)]
    for pad in (3, 8):
        path = tmp_path / f"x{pad}.bin"
        path.write_bytes(b"p" * pad + raw_bytes(x).numpy().tobytes())
        streams.append(FileRanges(((str(path), pad, x.numel() * source.itemsize),)))
    for stream in streams:
        cast = CastBytes(stream, source, target)
        assert cast.nbytes == len(expected)
        assert b"".join(bytes(p) for p in cast.pieces()) == expected
        size = target.itemsize
        window = cast.window(13 * size, 5000 * size)
        assert b"".join(bytes(p) for p in window.pieces()) == expected[13 * size:5013 * size]
        out = outfile.OutputFile(tmp_path / "out.bin")
        cast.write_to(out)
        out.commit()
        assert (tmp_path / "out.bin").read_bytes() == expected


def test_a_window_that_splits_an_element_is_refused():
    cast = CastBytes(MemoryBytes.of(torch.zeros(4, dtype=torch.bfloat16)), dtypes.BY_CODE["BF16"],
                     dtypes.BY_CODE["F32"])
    with pytest.raises(ValueError, match="splits a F32 element"):
        cast.window(2, 4)


def test_torch_writes_bf16_nans_into_fp32_exactly_so_that_cast_skips_the_nan_pass():
    bf16, fp32 = dtypes.BY_CODE["BF16"], dtypes.BY_CODE["F32"]
    assert dtypes._torch_keeps_nans(bf16, fp32)
    assert not dtypes._torch_keeps_nans(fp32, bf16)  # narrowing: torch writes one canonical NaN
    x = torch.tensor([0x7F81, 0xFFC1, 0x7FA5], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    wide = dtypes.cast(x, fp32)
    assert wide.view(torch.int32).tolist() == [0x7F810000, -0x3F0000, 0x7FA50000]


def test_a_nan_past_the_first_million_elements_keeps_its_payload():
    x = torch.zeros((1 << 20) + 5, dtype=torch.float32)
    x.view(torch.int32)[-2] = 0x7FA5A5A5  # a NaN whose top payload bits bf16 keeps
    out = dtypes.cast(x, dtypes.BY_CODE["BF16"]).view(torch.int16)
    assert out[-2].item() == 0x7FA5 and out[:-2].eq(0).all()


@pytest.mark.parametrize("qkv", [[], ["--qkv_concat"]], ids=["renames", "fused"])
def test_casting_conversions_match_whole_tensor_casts(cli, tiny_llama, tmp_path, monkeypatch, qkv):
    """fp32 output of a bf16 model, chunks smaller than every tensor, against each source tensor cast whole."""
    monkeypatch.setattr(tensor_ref, "CAST_CHUNK", 100)
    hf = tiny_llama()
    run_ok(cli, "--model", "llama", "--input_path", hf, "--output_path", tmp_path / "ms.ckpt", *qkv)
    run_ok(cli, "--model", "llama", "--reversed", "--input_path", tmp_path / "ms.ckpt", "--output_path",
           tmp_path / "back.bin", "--dtype", "bf16", "--config_path", hf, *qkv)
    from conftest import tensors_of
    back, original = tensors_of(tmp_path / "back.bin"), tensors_of(hf)
    assert back.keys() == original.keys()
    for name, (code, shape, data) in original.items():
        assert back[name][0] == code and back[name][1] == shape and back[name][2].equal(data), name
    fp32 = tensors_of(tmp_path / "ms.ckpt")
    embedding = fp32["model.tok_embeddings.embedding_weight"]
    assert embedding[0] == "F32"
    hf_embedding = original["model.embed_tokens.weight"][2].view(torch.bfloat16)
    assert embedding[2].equal(raw_bytes(hf_embedding.float()))


# ---- each source byte is read once ---------------------------------------------------------------------

PROBE = """
import sys
from mindformers_conv import outfile
from mindformers_conv.cli import main

mapped = 0  # bytes read through mappings of the sources: rchar does not count them

def counting(*args):
    global mapped
    n = real(*args)
    mapped += n
    return n

real = outfile.KERNEL_COPIES[0]
assert real is outfile._mapped_write
outfile.KERNEL_COPIES = (counting,) + outfile.KERNEL_COPIES[1:]

def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1]) + mapped

argv = sys.argv[1:]
at = argv.index("--output_path") + 1
warm = argv[:at] + [argv[at].rstrip("/") + "-warm/"] + argv[at + 1:]
assert main(warm) == 0  # every lazy import happens here, not in the measured runs
start = rchar()
assert main(argv + ["--dry-run"]) == 0
headers = rchar()
assert main(argv) == 0
print(headers - start, rchar() - headers)
"""


def reads(*argv) -> tuple[int, int]:
    """Bytes read (rchar, plus what mapped writes moved) by a --dry-run (headers, config) and by the
    conversion itself, in one fresh process."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv), "--no-progress"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    dry, real = proc.stdout.split("\n")[-2].split()
    return int(dry), int(real)


def safetensors_data_bytes(folder: Path) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        total += file.stat().st_size - 8 - n
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/<pid>/io")
def test_each_source_byte_is_read_once(tiny_llama, tmp_path):
    hf = tiny_llama(WIDE, max_shard_bytes=1_000_000)
    data = safetensors_data_bytes(hf)
    assert len(list(hf.glob("*.safetensors"))) > 3
    config = (hf / "config.json").stat().st_size  # the output folder gets a copy: read once more
    fused = ["--qkv_concat"]
    runs = {
        "HF → MS folder, fused, cast to fp32": ("--model", "llama", "--input_path", hf, "--output_path",
                                                f"{tmp_path / 'ms'}/", "--max_shard_size", "900000", *fused),
        "HF → MS .ckpt, bf16 (kernel copies)": ("--model", "llama", "--input_path", hf, "--output_path",
                                                tmp_path / "ms.ckpt", "--dtype", "bf16", *fused),
    }
    for label, argv in runs.items():
        dry, real = reads(*argv)
        extra = config if label.startswith("HF → MS folder") else 0
        assert data + extra <= real - dry <= data + extra + 4096, (label, real - dry - data)
    # the reverse splits the fused tensors again; outputs of one split land in different shards
    dry, real = reads("--model", "llama", "--reversed", "--input_path", tmp_path / "ms.ckpt", "--output_path",
                      f"{tmp_path / 'hf_back'}/", "--config_path", hf, "--max_shard_size", "300000", *fused)
    assert data + config <= real - dry <= data + config + 4096, real - dry - data


# ---- open files ------------------------------------------------------------------------------------------

def test_outputs_share_a_bounded_set_of_source_fds(tmp_path, monkeypatch):
    """Forty outputs each copying from the same thirty sources (a distributed checkpoint's ranks) hold at
    most SOURCE_FILES of them open; they are all closed with the last output."""
    monkeypatch.setattr(outfile, "SOURCE_FILES", 8)
    monkeypatch.setattr(outfile, "_SOURCES", outfile._Sources())
    sources = []
    for k in range(30):
        (tmp_path / f"s{k}.bin").write_bytes(bytes([k]) * 5000)
        sources.append(str(tmp_path / f"s{k}.bin"))
    before = len(os.listdir("/proc/self/fd"))
    outs = [outfile.OutputFile(tmp_path / f"o{i}.bin") for i in range(40)]
    for out in outs:
        for path in sources:
            out.copy_from(path, 100, 50)
    assert len(os.listdir("/proc/self/fd")) <= before + 40 + 8
    for i, out in enumerate(outs):
        out.commit()
        assert (tmp_path / f"o{i}.bin").read_bytes() == b"".join(bytes([k]) * 50 for k in range(30))
    assert len(os.listdir("/proc/self/fd")) == before


def _write_many_shards(hf: Path, out: Path, soft: int, hard: int) -> subprocess.CompletedProcess:
    """An MS safetensors folder of 18 shards (1 KB each at most), under the given limits on open files."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
            "from mindformers_conv.cli import main; "
            f"sys.exit(main(['--model', 'llama', '--input_path', {str(hf)!r}, '--output_path', {f'{out}/'!r}, "
            "'--max_shard_size', '1KB', '--no-progress']))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_a_low_soft_limit_on_open_files_is_raised_for_many_outputs(tiny_llama, tmp_path):
    done = _write_many_shards(tiny_llama(), tmp_path / "out", soft=16, hard=4096)  # 18 outputs: 16 is short
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 18


def test_a_hard_limit_too_low_for_the_outputs_is_one_clear_error(tiny_llama, tmp_path):
    done = _write_many_shards(tiny_llama(), tmp_path / "out", soft=24, hard=24)
    assert done.returncode == 5
    assert done.stderr.startswith("error: writing 18 files at once needs about ")
    assert done.stderr.endswith(" open files, but the limit is 24 (raise it with `ulimit -n`)\n")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_running_out_of_open_files_elsewhere_is_one_line(monkeypatch, capsys):
    import errno

    from mindformers_conv import cli

    def short(args):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(cli, "_run", short)
    assert cli.main(["--model", "llama", "--input_path", "x", "--output_path", "y"]) == 1
    assert capsys.readouterr().err == "error: too many open files (Too many open files); raise the limit with `ulimit -n`\n"


def test_a_cast_of_a_source_that_shrank_is_a_clear_error(tmp_path):
    """The cast reads its source (a mapping would die of SIGBUS past the end): one BadInput naming the file."""
    from mindformers_conv.errors import BadInput

    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 4000)
    cast = CastBytes(FileRanges(((str(path), 0, 8000),)), dtypes.BY_CODE["BF16"], dtypes.BY_CODE["F16"])
    with pytest.raises(BadInput, match=r"x\.bin: unexpected end of file at byte 4000"):
        b"".join(bytes(p) for p in cast.pieces())


def test_reading_a_tensor_of_a_file_that_shrank_names_the_file_and_the_tensor(tmp_path):
    from mindformers_conv.errors import BadInput
    from mindformers_conv.tensor_ref import TensorRef

    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 300)
    rows = TensorRef("w", dtypes.BY_CODE["BF16"], (2, 100), ((str(path), 0, 200), (str(path), 250, 200)))
    with pytest.raises(BadInput, match=r"x\.bin: unexpected end of file at byte 300: tensor 'w' is truncated"):
        rows.read()
