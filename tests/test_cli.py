"""The command line and the Python API (DESIGN §4, README "Usage"): --help lists the registry, booleans
take true/false/1/0 or the bare flag, --dry-run reads headers only and writes nothing, --model auto,
--verify (and a flipped byte it must catch), progress on a terminal only and never with --no-progress,
MindFormers' Python functions, and the `mindformers-conv` console script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GQA, ROOT, assert_same_tensors, run_script, tensors_of, write_hf
from mindformers_conv import cli as cli_module
from mindformers_conv import registry
from mindformers_conv.errors import BadInput, ConvError, UsageError, VerifyMismatch
from mindformers_conv.formats.inputs import open_input

CONSOLE = Path(sys.executable).parent / "mindformers-conv"


def run(cli, *argv):
    result = cli(*argv)
    assert result.code == 0, result.err
    return result


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- --help ---------------------------------------------------------------------------------------

def test_help_lists_every_registered_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    keys = registry.load_models()
    assert len(keys) >= 11
    listed = set(re.findall(r"^  (\S+) {2,}", text.split("model keys:")[1], re.M))
    assert listed == {*keys, "auto"}
    for key, spec in keys.items():
        assert re.search(rf"^  {re.escape(key)}\s+{re.escape(spec.description[:30])}", text, re.M), key


# ---- booleans ---------------------------------------------------------------------------------------

BOOL_FLAGS = sorted(a.option_strings[0] for a in cli_module.build_parser()._actions if a.type is cli_module.str2bool)
BASE = ["--model", "llama", "--input_path", "in", "--output_path", "out.ckpt"]


def test_boolean_flags_are_the_documented_ones():
    assert {"--reversed", "--is_pretrain", "--dry-run", "--verify", "--allow-unmapped", "--no-progress",
            "--qkv_concat", "--use_gmm"} <= set(BOOL_FLAGS)


@pytest.mark.parametrize("flag", BOOL_FLAGS)
@pytest.mark.parametrize("given, expected", [
    ([], False), ([""], True), (["true"], True), (["True"], True), (["1"], True),
    (["false"], False), (["FALSE"], False), (["0"], False),
])
def test_boolean_flag_takes_true_false_1_0_or_bare(flag, given, expected):
    argv = [*BASE, flag] if given == [""] else [*BASE, *([flag, *given] if given else [])]
    args = cli_module.parse(argv)
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    assert (value if given or value is not None else False) is expected  # model flags: None = not given
    # a bare flag followed by another option does not swallow it
    assert cli_module.parse([*BASE, flag, "--dtype", "bf16"]).dtype == "bf16"


@pytest.mark.parametrize("value", ["0", "false"])
def test_reversed_false_converts_forward_and_reversed_1_converts_back(cli, tiny_llama, tmp_path, value):
    hf = tiny_llama()
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "back.bin"
    assert "HF → MindSpore" in run(cli, "--model", "llama", "--reversed", value, "--input_path", hf,
                                   "--output_path", ckpt, "--dtype", "bf16").out
    assert "MindSpore → HF" in run(cli, "--model", "llama", "--reversed", "1", "--input_path", ckpt,
                                   "--output_path", back).out
    assert_same_tensors(tensors_of(back), tensors_of(hf))


# ---- --dry-run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_dry_run_reads_headers_only_and_writes_nothing(cli, tiny_llama, tmp_path, monkeypatch, direction):
    from mindformers_conv import tensor_ref

    hf = tiny_llama(max_shard_bytes=100_000)
    ckpt = tmp_path / "ms.ckpt"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16")
    src = hf if direction == "forward" else ckpt
    n_in = len(GQA.tensors())
    in_bytes = open_input(src).total_bytes
    out = tmp_path / "out"
    out.mkdir()
    target = out / "new" if direction == "reverse" else out / "ms.ckpt"

    def no_data(*args, **kwargs):
        raise AssertionError("--dry-run read tensor data")

    monkeypatch.setattr(tensor_ref.TensorRef, "read", no_data)
    monkeypatch.setattr(tensor_ref.FileRanges, "write_to", no_data)
    monkeypatch.setattr(tensor_ref.FileRanges, "pieces", no_data)
    extra = ["--reversed", "--config_path", str(hf)] if direction == "reverse" else ["--dtype", "fp32"]
    result = run(cli, "--model", "llama", "--input_path", src, "--output_path", f"{target}/", "--dry-run", *extra)
    assert files_under(out) == []  # not even the output folder
    files = 3 if direction == "forward" else 1
    assert re.search(rf"read {n_in} tensors, [\d.]+ KiB from {files} file\(s\)", result.out), result.out
    assert cli_module._human(in_bytes) in result.out
    assert re.search(rf"write {n_in} tensors, [\d.]+ KiB \((BF16|F32)\) into 1 file\(s\) at {re.escape(str(target))}",
                     result.out), result.out
    peak = re.search(r"predicted peak memory: ([\d.]+ \w+)", result.out)
    assert peak, result.out
    if direction == "forward":  # bf16 → fp32 casts: the largest recipe is the embedding in + out
        largest = GQA.vocab_size * GQA.hidden_size
        assert peak.group(1) == cli_module._human(largest * 2 + largest * 4)


# ---- --model auto -------------------------------------------------------------------------------------

def test_model_auto_picks_llama_from_config_json(cli, tiny_llama, tmp_path):
    hf = tiny_llama()
    auto, named = tmp_path / "auto.ckpt", tmp_path / "named.ckpt"
    result = run(cli, "--model", "auto", "--input_path", hf, "--output_path", auto, "--dtype", "bf16")
    assert "model: llama (detected from config.json model_type 'llama')" in result.out
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", named, "--dtype", "bf16")
    assert auto.read_bytes() == named.read_bytes()


def test_model_auto_reverse_reads_config_path(cli, tiny_llama, tmp_path):
    hf = tiny_llama()
    ckpt = tmp_path / "ms.ckpt"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16")
    result = run(cli, "--model", "auto", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
                 "--config_path", hf / "config.json")
    assert "model: llama (detected from config.json model_type 'llama')" in result.out
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(hf))


def test_model_auto_without_any_config_picks_llama_for_llamas_mindspore_names(cli, tiny_llama, tmp_path):
    """Without config.json only the names tell. baichuan, internlm2 and phi3 write llama's MindSpore names
    too (declared `ms_names_of="llama"`), so from those names alone the plain reading is llama."""
    hf = tiny_llama()
    ckpt = tmp_path / "ms.ckpt"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16")
    result = cli("--model", "auto", "--reversed", "--input_path", ckpt, "--output_path", tmp_path / "x.bin")
    assert result.code == 0, result.err
    assert "model: llama (detected from the tensor names)" in result.out


def test_model_auto_with_an_ambiguous_config_and_names_says_what_fits(cli, tmp_path):
    """Names that several unrelated families know (here a bare `lm_head.weight`) stop with one line."""
    import torch

    hf = write_hf(tmp_path / "hf", {"lm_head.weight": torch.zeros(4, 4)})
    result = cli("--model", "auto", "--input_path", hf, "--output_path", tmp_path / "x.ckpt")
    assert result.code == BadInput.exit_code and result.err.count("\n") == 1
    assert re.match(r"error: --model auto: the tensor names fit .*; pass --model", result.err)
    assert not (tmp_path / "x.ckpt").exists()


# ---- --verify -----------------------------------------------------------------------------------------

VERIFY_CASES = {  # direction → (input builder, output)
    "forward-ckpt": ("hf", "ms.ckpt"),
    "forward-ms-safetensors": ("hf", "ms.safetensors"),
    "reverse-folder": ("ckpt", "back/"),
    "reverse-bin": ("ckpt", "x.bin"),
}


@pytest.fixture
def verify_run(cli, tiny_llama, tmp_path):
    def go(case: str, *extra):
        source, output = VERIFY_CASES[case]
        hf = tiny_llama()
        src, flags = hf, ["--dtype", "bf16"]
        if source == "ckpt":
            src = tmp_path / "in.ckpt"
            run(cli, "--model", "llama", "--input_path", hf, "--output_path", src, "--dtype", "bf16")
            flags = ["--reversed", "--config_path", str(hf)]
        return cli("--model", "llama", "--input_path", src, "--output_path", f"{tmp_path}/{output}",
                   "--verify", *flags, *extra)

    return go


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_passes_on_a_good_run(verify_run, case):
    result = verify_run(case)
    assert result.code == 0, result.err
    assert re.search(rf"verified: {len(GQA.tensors())} tensors convert back byte-identical", result.out), result.out


def flip_one_byte(path: Path, tensor: str) -> None:
    """Flip the last byte of one tensor's data inside a written file (its byte range from our reader)."""
    ref = open_input(path).refs[tensor]
    file, offset, length = ref.ranges[-1]
    with open(file, "r+b") as f:
        f.seek(offset + length - 1)
        byte = f.read(1)[0]
        f.seek(offset + length - 1)
        f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_catches_a_flipped_byte_between_write_and_verify(verify_run, case, monkeypatch):
    """The output is corrupted after it is written and before --verify reads it back: exit 4, one line
    naming the tensor."""
    from mindformers_conv import convert as convert_module

    real = convert_module.verify
    reverse = VERIFY_CASES[case][0] == "ckpt"
    victim = "model.layers.1.mlp.up_proj.weight" if reverse else "model.layers.1.feed_forward.w3.weight"
    input_name = "model.layers.1.feed_forward.w3.weight" if reverse else "model.layers.1.mlp.up_proj.weight"
    seen = []

    def corrupt_then_verify(plan, layout, *args, **kwargs):
        written = layout.folder or layout.files[0].path
        if not open_input(written).refs.get(victim):
            raise AssertionError(f"{victim} not in {written}")
        flip_one_byte(Path(written), victim)
        seen.append(written)
        return real(plan, layout, *args, **kwargs)

    monkeypatch.setattr(convert_module, "verify", corrupt_then_verify)
    result = verify_run(case)
    assert seen
    assert result.code == VerifyMismatch.exit_code == 4
    assert result.err.count("\n") == 1 and result.err.startswith("error: verify: ")
    assert input_name in result.err and "differs" in result.err
    assert "the output was removed" in result.err
    written = Path(seen[0])
    assert not (written.exists() and (written.is_file() or any(written.glob("*.safetensors"))))


# ---- progress -------------------------------------------------------------------------------------------

def run_on_terminal(argv: list[str]) -> tuple[int, str]:
    """Run convert_weight.py with stderr on a pseudo-terminal; returns (exit code, what the terminal got)."""
    import fcntl
    import pty
    import struct
    import termios

    try:
        master, slave = pty.openpty()
    except OSError:
        pytest.skip("no pseudo-terminals here")
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns: tqdm draws nothing
    proc = subprocess.Popen([sys.executable, str(ROOT / "convert_weight.py"), *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def progress_model(tmp_path_factory):
    from mindformers_conv.synthetic import LlamaShape, write_llama

    return write_llama(tmp_path_factory.mktemp("progress") / "hf", LlamaShape(num_hidden_layers=4))


def test_progress_bar_on_a_terminal_by_default(progress_model, tmp_path):
    code, terminal = run_on_terminal(["--model", "llama", "--input_path", str(progress_model),
                                      "--output_path", str(tmp_path / "ms.ckpt"), "--dtype", "fp32"])
    assert code == 0, terminal
    assert "converting" in terminal and "%|" in terminal


def test_no_progress_silences_the_bar_on_a_terminal(progress_model, tmp_path):
    code, terminal = run_on_terminal(["--model", "llama", "--input_path", str(progress_model),
                                      "--output_path", str(tmp_path / "ms.ckpt"), "--dtype", "fp32", "--no-progress"])
    assert code == 0, terminal
    assert terminal == ""


def test_no_progress_bar_when_stderr_is_not_a_terminal(progress_model, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "convert_weight.py"), "--model", "llama", "--input_path",
                           str(progress_model), "--output_path", str(tmp_path / "ms.ckpt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


# ---- Python API ---------------------------------------------------------------------------------------

def test_python_api_converts_both_ways_and_returns_true(tiny_llama, tmp_path):
    import mindspore
    import torch

    from models.llama.convert_reversed import convert_ms_to_pt
    from models.llama.convert_weight import convert_pt_to_ms

    hf = tiny_llama()
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "back.bin"
    assert convert_pt_to_ms(str(hf) + "/", str(ckpt), dtype=mindspore.bfloat16) is True
    assert {c for c, _, _ in tensors_of(ckpt).values()} == {"BF16"}
    assert convert_ms_to_pt(input_path=ckpt, output_path=back, dtype=torch.bfloat16) is True
    assert_same_tensors(tensors_of(back), tensors_of(hf))
    assert convert_pt_to_ms.__name__ == "convert_pt_to_ms" and convert_ms_to_pt.__name__ == "convert_ms_to_pt"


def test_python_api_raises_conv_error_on_failure(tiny_llama, tmp_path):
    from models.llama.convert_reversed import convert_ms_to_pt
    from models.llama.convert_weight import convert_pt_to_ms

    with pytest.raises(BadInput, match="does not exist"):
        convert_pt_to_ms(str(tmp_path / "nope"), str(tmp_path / "ms.ckpt"))
    with pytest.raises(UsageError, match="dtype"):
        convert_pt_to_ms(str(tiny_llama()), str(tmp_path / "ms.ckpt"), dtype="int4")
    with pytest.raises(UsageError, match="frobnicate"):
        convert_pt_to_ms(str(tiny_llama(name="b")), str(tmp_path / "ms.ckpt"), frobnicate=1)
    with pytest.raises(ConvError):
        convert_ms_to_pt(str(tiny_llama(name="c") / "config.json"), str(tmp_path / "x.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "hf"]


def test_root_convert_map_holds_every_key_and_takes_mindformers_dispatcher_kwargs(tiny_llama, tmp_path):
    """MindFormers' root script calls convert_map[key](input_path=…, output_path=…, dtype=…, n_head=32,
    hidden_size=4096, layers=12, is_pretrain=False, telechat_type='telechat_12b'); config.json wins."""
    import convert_weight

    keys = set(registry.load_models())
    assert set(convert_weight.convert_map) == keys == set(convert_weight.reversed_convert_map)
    hf = tiny_llama()
    defaults = dict(n_head=32, hidden_size=4096, layers=12, is_pretrain=False, telechat_type="telechat_12b")
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "x.bin"
    assert convert_weight.convert_map["llama"](input_path=str(hf / "model.safetensors"), output_path=str(ckpt),
                                               dtype=None, **defaults) is True
    assert {c for c, _, _ in tensors_of(ckpt).values()} == {"F32"}  # MindFormers' default
    assert convert_weight.reversed_convert_map["llama"](input_path=str(ckpt), output_path=str(back),
                                                        dtype=None, **defaults) is True
    got, source = tensors_of(back), tensors_of(hf)
    assert got.keys() == source.keys()
    with pytest.raises(BadInput):
        convert_weight.convert_map["llama"](input_path=str(tmp_path / "nope"), output_path=str(ckpt), dtype=None)


# ---- console script -------------------------------------------------------------------------------------

def test_console_script_is_installed():
    assert CONSOLE.is_file() and os.access(CONSOLE, os.X_OK)


@pytest.mark.parametrize("argv", [["--help"], ["--model", "gpt17"]], ids=["help", "bad-key"])
def test_console_script_prints_what_the_root_script_prints(argv, tiny_llama):
    hf = str(tiny_llama())
    argv = argv + (["--input_path", hf, "--output_path", "/nonexistent/x.ckpt"] if argv[1:] else [])
    ours = subprocess.run([str(CONSOLE), *argv], capture_output=True, text=True)
    root = subprocess.run([sys.executable, str(ROOT / "convert_weight.py"), *argv], capture_output=True, text=True)
    assert (ours.returncode, ours.stdout, ours.stderr) == (root.returncode, root.stdout, root.stderr)
    assert ours.returncode == (0 if argv == ["--help"] else 2)


def test_console_script_converts_like_the_root_script(tiny_llama, tmp_path):
    hf = tiny_llama()
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    ours = subprocess.run([str(CONSOLE), "--model", "llama", "--input_path", str(hf), "--output_path", str(a),
                           "--dtype", "bf16", "--verify"], capture_output=True, text=True)
    root = run_script("--model", "llama", "--input_path", hf, "--output_path", b, "--dtype", "bf16", "--verify")
    assert ours.returncode == root.code == 0, ours.stderr
    assert a.read_bytes() == b.read_bytes()
    assert "verified" in ours.stdout and "verified" in root.out


# ---- -j workers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["ms-folder", "hf-folder"])
def test_jobs_write_the_same_files_as_one_process(cli, tiny_llama, tmp_path, reverse):
    hf = tiny_llama()
    source, extra = hf, ["--dtype", "fp32"]
    if reverse:
        source = tmp_path / "in.ckpt"
        run(cli, "--model", "llama", "--input_path", hf, "--output_path", source, "--dtype", "bf16")
        extra = ["--reversed", "--config_path", str(hf)]
    outputs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"j{jobs}"
        run(cli, "--model", "llama", "--input_path", source, "--output_path", f"{out}/", "--max_shard_size", "40000",
            "-j", jobs, *extra)
        outputs[jobs] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len([n for n in outputs["2"] if n.endswith(".safetensors")]) > 2
    assert outputs["1"] == outputs["2"]
    assert not any(n.endswith(".partial") for n in outputs["2"])


def test_a_failing_worker_stops_the_run_and_leaves_nothing(cli, tiny_llama, tmp_path, monkeypatch):
    from mindformers_conv import execute as execute_module
    from mindformers_conv.errors import OutputError

    real = execute_module._write_file

    def fail_on_the_second_file(by_name, layout, outs, index, *args):
        if index == 1:
            raise OutputError(f"cannot write {layout.files[index].path}: disk full")
        return real(by_name, layout, outs, index, *args)

    monkeypatch.setattr(execute_module, "_write_file", fail_on_the_second_file)
    out = tmp_path / "ms"
    result = cli("--model", "llama", "--input_path", tiny_llama(), "--output_path", f"{out}/", "--max_shard_size",
                 "40000", "-j", "2")
    assert result.code == OutputError.exit_code and result.err.count("\n") == 1 and "disk full" in result.err
    assert not out.exists() or not any(out.iterdir())
