"""`mindformers-conv inspect` and `diff`: headers-only listing, streaming comparison across formats."""

import json

import pytest

from conftest import GQA


@pytest.fixture
def converted(tiny_llama, cli, tmp_path):
    hf = tiny_llama(GQA, dtype="BF16")
    ckpt = tmp_path / "m.ckpt"
    assert cli("--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16").code == 0
    return hf, ckpt


@pytest.mark.parametrize("which", ["hf", "ckpt"])
def test_inspect_lists_every_tensor_with_totals(converted, capsys, which):
    path = dict(zip(("hf", "ckpt"), converted))[which]
    from mindformers_conv.cli import main

    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_tensors"] == len(info["tensors"]) == len(GQA.tensors())
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert info["format"] == ("safetensors" if which == "hf" else "ckpt")


def test_inspect_detects_the_family_from_config(converted, capsys):
    from mindformers_conv.cli import main

    assert main(["inspect", str(converted[0])]) == 0
    assert "model llama (from config.json model_type 'llama')" in capsys.readouterr().out


def test_diff_hf_against_its_ckpt_through_the_mapping_is_equal(converted, capsys):
    from mindformers_conv.cli import main

    assert main(["diff", str(converted[0]), str(converted[1]), "--model", "llama"]) == 0
    assert "equal: 21 tensors compared" in capsys.readouterr().out


def test_diff_catches_a_single_flipped_byte(converted, capsys):
    from mindformers_conv.cli import main
    from mindformers_conv.formats.inputs import open_input

    ref = open_input(converted[1]).refs["model.layers.1.attention.wk.weight"]
    path, offset, _ = ref.ranges[0]
    with open(path, "r+b") as f:
        f.seek(offset + 6)
        byte = f.read(1)
        f.seek(offset + 6)
        f.write(bytes([byte[0] ^ 0x01]))
    assert main(["diff", str(converted[0]), str(converted[1]), "--model", "llama"]) == 1
    out = capsys.readouterr().out
    assert "differs: model.layers.1.attention.wk.weight: first difference at element 3" in out


def test_diff_catches_a_swapped_pair_of_tensors(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from mindformers_conv.cli import main

    hf = tiny_llama(GQA)
    state = load_file(str(hf / "model.safetensors"))
    a, b = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    state[a], state[b] = state[b], state[a]
    swapped = tmp_path / "swapped.safetensors"
    save_file(state, str(swapped))
    assert main(["diff", str(hf / "model.safetensors"), str(swapped)]) == 1
    out = capsys.readouterr().out
    assert f"differs: {a}" in out and f"differs: {b}" in out


def test_inspect_piped_into_a_reader_that_stops_is_not_an_error(tiny_llama):
    """`mindformers-conv inspect … | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    from conftest import ROOT

    from mindformers_conv.synthetic import LlamaShape

    hf = tiny_llama(LlamaShape(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=600,
                               num_attention_heads=2, num_key_value_heads=1))  # > 64 KiB of listing
    proc = subprocess.run(f"'{sys.executable}' '{ROOT / 'convert_weight.py'}' inspect '{hf}' | head -1",
                          shell=True, capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


WRITTEN = {  # output kind → (CLI arguments after the input, the output path's name, format inspect reports)
    "ms-ckpt": ((), "m.ckpt", "ckpt"),
    "ms-safetensors": ((), "m.safetensors", "ms-safetensors"),
    "ms-folder": ((), "ms/", "ms-safetensors"),
    "hf-folder-sharded": (("--reversed", "--max_shard_size", "20000"), "hf_out/", "safetensors"),
    "hf-bin": (("--reversed",), "x.bin", "pickle"),
    "megatron": (("--target", "megatron", "--tp", "2", "--llm_pp_layers", "1,1"), "mm", "megatron"),
}


@pytest.mark.parametrize("kind", list(WRITTEN))
def test_inspect_reads_every_format_we_write(converted, cli, tmp_path, capsys, kind):
    from mindformers_conv.cli import main

    hf, ckpt = converted
    args, name, fmt = WRITTEN[kind]
    source = ckpt if "--reversed" in args else hf
    out = f"{tmp_path}/{name}"
    assert cli("--model", "llama", "--input_path", source, "--output_path", out, *args).code == 0
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"].startswith(fmt), info["format"]
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"]) > 0
    if kind == "megatron":  # 2 TP × 2 PP rank files; every full tensor is split or replicated over TP
        assert info["parallel"] == {"tp": 2, "pp": 2, "vpp": 1, "ep": 1, "iteration": "release"}
        assert len(info["files"]) == 4
    else:
        assert info["total_tensors"] == len(GQA.tensors())
