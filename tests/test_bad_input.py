"""Bad-input corpus (DESIGN §6, README "Exit codes"): each case, run as a real process, prints exactly one
line `error: …` on stderr naming what is wrong, exits with the documented code, and leaves nothing in the
target folder (no output, no temporary file). `--allow-unmapped` continues and lists what it left out.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import GQA, run_script, tensors_of
from mindformers_conv.errors import BadInput, OutputError, UsageError

USAGE, BAD_INPUT, OUTPUT = UsageError.exit_code, BadInput.exit_code, OutputError.exit_code


def test_exit_codes_are_the_documented_ones():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert (USAGE, BAD_INPUT, OUTPUT) == (2, 3, 5)
    for text in ("`2` usage", "`3` bad input", "`4` `--verify`", "`5` output"):
        assert text in readme


def corrupt_header_json(hf: Path) -> Path:
    path = hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:10] = b"#!"  # the header's opening brace is gone
    path.write_bytes(bytes(data))
    return path


def corrupt_header_length(hf: Path) -> Path:
    path = hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    path.write_bytes(bytes(data))
    return path


def delete_a_shard(hf: Path) -> Path:
    shard = hf / "model-00002-of-00003.safetensors"
    shard.unlink()
    return hf / "model.safetensors.index.json"


def add_unknown_tensor(hf: Path) -> Path:
    import torch

    state = load_file(str(hf / "model.safetensors"))
    state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return hf / "model.safetensors"


def truncate_ckpt(cli_fixture, hf: Path, tmp: Path) -> Path:
    ckpt = tmp / "ms.ckpt"
    assert cli_fixture("--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16").code == 0
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) - 1000])
    return ckpt


# case → (how to break the input, the arguments, exit code, text the one line must contain)
# {hf}, {in} (the broken path), {out} are filled in per case.
FORWARD = ("--model", "llama", "--input_path", "{in}", "--output_path", "{out}/ms.ckpt")
CASES = {
    "missing-input": (None, ("--model", "llama", "--input_path", "{hf}/nope", "--output_path", "{out}/ms.ckpt"),
                      BAD_INPUT, "nope does not exist"),
    "unknown-model-key": (None, ("--model", "gpt17", "--input_path", "{hf}", "--output_path", "{out}/ms.ckpt"),
                          USAGE, "unknown --model 'gpt17'"),
    "corrupt-header-json": (corrupt_header_json, FORWARD, BAD_INPUT, "header is not valid JSON"),
    "corrupt-header-length": (corrupt_header_length, FORWARD, BAD_INPUT, "past the end of the file"),
    "index-names-missing-shard": (delete_a_shard, ("--model", "llama", "--input_path", "{hf}",
                                                   "--output_path", "{out}/ms.ckpt"),
                                  BAD_INPUT, "model-00002-of-00003.safetensors does not exist"),
    "unmapped-tensor": (add_unknown_tensor, FORWARD, BAD_INPUT, "model.layers.0.self_attn.extra_proj.weight"),
    "truncated-ckpt": ("truncate", ("--model", "llama", "--reversed", "--input_path", "{in}",
                                    "--output_path", "{out}/back/"), BAD_INPUT, "ms.ckpt"),
    "unknown-flag": (None, (*FORWARD, "--frobnicate", "1"), USAGE, "--frobnicate"),
    "bad-dtype": (None, (*FORWARD, "--dtype", "int4"), USAGE, "--dtype"),
    "bad-bool": (None, (*FORWARD, "--verify", "maybe"), USAGE, "'maybe'"),
    "bad-shard-size": (None, ("--model", "llama", "--reversed", "--input_path", "{in}", "--output_path",
                              "{out}/back/", "--max_shard_size", "lots"), USAGE, "invalid size 'lots'"),
}
SHARDED = {"index-names-missing-shard"}


@pytest.fixture
def broken(cli, tiny_llama, tmp_path):
    def build(case: str) -> tuple[list[str], Path]:
        breaker, argv, _, _ = CASES[case]
        hf = tiny_llama(max_shard_bytes=100_000 if case in SHARDED else None)
        src = hf
        if breaker == "truncate":
            src = truncate_ckpt(cli, hf, tmp_path)
        elif breaker is not None:
            src = breaker(hf)
        out = tmp_path / "out"
        out.mkdir()
        fill = {"{hf}": str(hf), "{in}": str(src), "{out}": str(out)}
        args = []
        for arg in argv:
            for key, value in fill.items():
                arg = arg.replace(key, value)
            args.append(arg)
        return args, out

    return build


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_documented_exit_code_nothing_written(broken, case):
    argv, out = broken(case)
    result = run_script(*argv)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ") and "Traceback" not in result.err
    assert CASES[case][3] in lines[0]
    assert result.code == CASES[case][2], result.err
    assert result.out == ""
    assert list(out.iterdir()) == []  # no output, no hidden temporary file, no half-made folder


def test_allow_unmapped_continues_and_lists_what_it_left_out(cli, tiny_llama, tmp_path):
    hf = tiny_llama()
    add_unknown_tensor(hf)
    out = tmp_path / "ms.ckpt"
    result = cli("--model", "llama", "--input_path", hf, "--output_path", out, "--allow-unmapped")
    assert result.code == 0, result.err
    assert "left out 1 unmapped (--allow-unmapped): model.layers.0.self_attn.extra_proj.weight" in result.out
    got = tensors_of(out)
    assert not any("extra_proj" in n for n in got)
    assert len(got) == len(GQA.tensors())


@pytest.mark.parametrize("target", ["ms.ckpt", "ms_folder/"])
@pytest.mark.parametrize("failure, code, text", [
    (lambda name: BadInput(f"tensor {name!r}: simulated read failure"), BAD_INPUT, "simulated read failure"),
    (lambda name: KeyboardInterrupt(), 130, "interrupted"),
], ids=["bad-input", "interrupted"])
def test_failure_while_writing_removes_the_partial_files(cli, tiny_llama, tmp_path, monkeypatch, target,
                                                         failure, code, text):
    """A run that fails (or is interrupted) after it started writing leaves no checkpoint, no temporary file."""
    from mindformers_conv import execute

    hf, real, calls = tiny_llama(), execute.GroupOutputs.bytes_of, []

    def failing(self, planned):
        calls.append(planned.name)
        if len(calls) == 5:
            raise failure(planned.name)
        return real(self, planned)

    monkeypatch.setattr(execute.GroupOutputs, "bytes_of", failing)
    out = tmp_path / "out"
    out.mkdir()
    result = cli("--model", "llama", "--input_path", hf, "--output_path", f"{out}/{target}", "--dtype", "fp16")
    assert result.code == code
    assert result.err.count("\n") == 1 and result.err.startswith("error: ") and text in result.err
    assert [p for p in out.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("target", ["ms.ckpt", "ms_folder/"])
def test_disk_full_exits_5_and_leaves_nothing(cli, tiny_llama, tmp_path, monkeypatch, target):
    from mindformers_conv.outfile import OutputFile

    hf, real = tiny_llama(), OutputFile._write_all

    def full(self, view):
        if self.position > 10_000:
            self._raise(OSError(errno.ENOSPC, "No space left on device"))
        real(self, view)

    monkeypatch.setattr(OutputFile, "_write_all", full)
    out = tmp_path / "out"
    out.mkdir()
    result = cli("--model", "llama", "--input_path", hf, "--output_path", f"{out}/{target}",
                 "--dtype", "fp32")
    assert result.code == OUTPUT
    assert result.err.splitlines() == [result.err.strip()] and "disk full" in result.err
    leftovers = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert leftovers == []
