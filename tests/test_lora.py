"""LoRA: MindFormers LoRA parameters ↔ PEFT adapters, and --merge_lora (guide promise; spec §4.1 reverse)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GQA, assert_same_tensors, tensors_of, write_hf

R, ALPHA = 4, 16.0
MODULES = {"q_proj": "wq", "v_proj": "wv"}
LAYER = "model.layers.{i}"


def lora_state(dtype=torch.bfloat16, seed=1) -> dict:
    """LoRA A [r, in] / B [out, r] for q_proj and v_proj of both layers, in PEFT's plain names."""
    gen = torch.Generator().manual_seed(seed)
    out_rows = {"q_proj": GQA.num_attention_heads * GQA.hd, "v_proj": GQA.num_key_value_heads * GQA.hd}
    state = {}
    for i in range(GQA.num_hidden_layers):
        for module, rows in out_rows.items():
            base = f"{LAYER.format(i=i)}.self_attn.{module}"
            state[f"{base}.lora_A.weight"] = torch.randn(R, GQA.hidden_size, generator=gen).to(dtype)
            state[f"{base}.lora_B.weight"] = torch.randn(rows, R, generator=gen).to(dtype)
    return state


@pytest.fixture
def hf_with_lora(tiny_llama, tmp_path):
    """A tiny bf16 llama whose model.safetensors also holds LoRA A/B (plain names) for q/v."""
    base = tiny_llama(dtype="BF16")
    state = {**load_file(str(base / "model.safetensors")), **lora_state()}
    return write_hf(tmp_path / "hf_lora", state, json.loads((base / "config.json").read_text()))


@pytest.fixture
def ms_with_lora(cli, hf_with_lora, tmp_path):
    out = tmp_path / "lora.ckpt"
    result = cli("--model", "llama", "--input_path", hf_with_lora, "--output_path", out, "--dtype", "bf16", "--verify")
    assert result.code == 0 and "verified" in result.out, result.err
    return out


def test_forward_writes_mindformers_llama_lora_names(ms_with_lora, hf_with_lora):
    ms, hf = tensors_of(ms_with_lora), tensors_of(hf_with_lora)
    assert len(ms) == len(hf)  # every LoRA tensor too
    for i in range(GQA.num_hidden_layers):
        for module, ms_module in MODULES.items():
            for ab in "ab":
                got = ms[f"{LAYER.format(i=i)}.attention.{ms_module}.tk_delta_lora_{ab}"]
                want = hf[f"{LAYER.format(i=i)}.self_attn.{module}.lora_{ab.upper()}.weight"]
                assert got[:2] == want[:2] and got[2].equal(want[2])


def test_lora_b_name_keeps_its_dot_in_the_bin_reverse(cli, ms_with_lora, hf_with_lora, tmp_path):
    """MindFormers' llama reverse writes `q_projlora_B.weight`; ours `q_proj.lora_B.weight`, as PEFT."""
    out = tmp_path / "back.bin"
    assert cli("--model", "llama", "--reversed", "--input_path", ms_with_lora, "--output_path", out).code == 0
    back = torch.load(out, weights_only=True)
    assert "model.layers.0.self_attn.q_proj.lora_B.weight" in back
    assert not any("projlora" in name for name in back)
    assert_same_tensors(tensors_of(out), tensors_of(hf_with_lora))


def test_reverse_to_folder_writes_base_weights_and_a_peft_adapter(cli, ms_with_lora, hf_with_lora, tmp_path):
    out = tmp_path / "hf_out"
    result = cli("--model", "llama", "--reversed", "--input_path", ms_with_lora, "--output_path", f"{out}/",
                 "--config_path", hf_with_lora, "--lora_alpha", ALPHA)
    assert result.code == 0, result.err
    original = tensors_of(hf_with_lora)
    base = {n: t for n, t in original.items() if ".lora_" not in n}
    assert_same_tensors(tensors_of(out / "model.safetensors"), base)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(adapter) == {f"base_model.model.{n}" for n in lora_state()}
    for name, tensor in lora_state().items():
        assert adapter[f"base_model.model.{name}"].view(torch.uint16).equal(tensor.view(torch.uint16))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, ALPHA)
    assert config["target_modules"] == ["q_proj", "v_proj"]


def test_peft_adapter_folder_converts_to_mindformers_names_and_back(cli, tmp_path):
    peft = tmp_path / "peft"
    peft.mkdir()
    save_file({f"base_model.model.{n}": t for n, t in lora_state().items()}, str(peft / "adapter_model.safetensors"))
    ckpt = tmp_path / "adapter.ckpt"
    result = cli("--model", "llama", "--input_path", peft / "adapter_model.safetensors", "--output_path", ckpt,
                 "--dtype", "bf16")
    assert result.code == 0, result.err
    assert set(tensors_of(ckpt)) == {n.replace("self_attn.q_proj.lora_", "attention.wq.tk_delta_lora_")
                                     .replace("self_attn.v_proj.lora_", "attention.wv.tk_delta_lora_")
                                     .replace(".weight", "").replace("_A", "_a").replace("_B", "_b")
                                     for n in lora_state()}
    back = tmp_path / "back"
    assert cli("--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/").code == 0
    assert_same_tensors(tensors_of(back / "adapter_model.safetensors"),  # an adapter alone: the folder is PEFT's
                        tensors_of(peft / "adapter_model.safetensors"))


def test_every_mindformers_lora_style_is_read(cli, tmp_path):
    """mindpet's `mindpet_delta_lora_a/b` (qwen, baichuan, …) written by MindSpore itself."""
    import mindspore as ms

    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(R, 8, generator=gen), torch.randn(8, R, generator=gen)
    ckpt = tmp_path / "mindpet.ckpt"
    ms.save_checkpoint([{"name": "model.layers.0.attention.wq.mindpet_delta_lora_a", "data": ms.Tensor(a.numpy())},
                        {"name": "model.layers.0.attention.wq.mindpet_delta_lora_b", "data": ms.Tensor(b.numpy())}],
                       str(ckpt))
    out = tmp_path / "x.bin"
    assert cli("--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", out).code == 0
    back = torch.load(out, weights_only=True)
    assert back["model.layers.0.self_attn.q_proj.lora_A.weight"].equal(a)
    assert back["model.layers.0.self_attn.q_proj.lora_B.weight"].equal(b)


@pytest.mark.parametrize("output", ["folder", "bin"])
def test_merge_lora_folds_the_adapter_in_fp32(cli, ms_with_lora, hf_with_lora, tmp_path, output):
    out = tmp_path / ("merged" if output == "folder" else "merged.bin")
    target = f"{out}/" if output == "folder" else out
    result = cli("--model", "llama", "--reversed", "--input_path", ms_with_lora, "--output_path", target,
                 "--config_path", hf_with_lora, "--merge_lora", "--lora_alpha", ALPHA)
    assert result.code == 0, result.err
    merged = tensors_of(out)
    original = load_file(str(hf_with_lora / "model.safetensors"))
    assert not any(".lora_" in n for n in merged)
    for name, tensor in original.items():
        if ".lora_" in name:
            continue
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in original:
            a, b = original[f"{module}.lora_A.weight"], original[f"{module}.lora_B.weight"]
            tensor = (tensor.float() + (ALPHA / R) * (b.float() @ a.float())).to(torch.bfloat16)
        assert merged[name][0] == "BF16" and merged[name][2].equal(tensor.view(torch.uint8).reshape(-1)), name


def test_merge_lora_needs_alpha_and_lora(cli, ms_with_lora, tiny_llama, tmp_path):
    no_alpha = cli("--model", "llama", "--reversed", "--input_path", ms_with_lora, "--output_path",
                   tmp_path / "a.bin", "--merge_lora")
    assert no_alpha.code == 2 and "--lora_alpha" in no_alpha.err and not (tmp_path / "a.bin").exists()
    plain = tiny_llama()
    no_lora = cli("--model", "llama", "--input_path", plain, "--output_path", tmp_path / "b.ckpt", "--merge_lora",
                  "--lora_alpha", ALPHA)
    assert no_lora.code == 3 and "no LoRA" in no_lora.err and not (tmp_path / "b.ckpt").exists()


def peft_folder(folder, config: dict | None = None):
    """A PEFT adapter folder as `save_pretrained` writes it (prefixed names, adapter_config.json)."""
    folder.mkdir()
    save_file({f"base_model.model.{n}": t for n, t in lora_state().items()}, str(folder / "adapter_model.safetensors"))
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


PEFT_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
               "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "Qwen/Qwen2.5-7B"}


def test_is_lora_writes_plain_lora_names_and_a_renamed_adapter_config_beside_the_output(cli, tmp_path):
    """qwen2_5 `--is_lora` (spec mindformers_other.md §3.1): `….attention.wq.lora_a`, target_modules wq/wv; the
    input's adapter_config.json is left as it was (MindFormers rewrites it in place)."""
    peft = peft_folder(tmp_path / "peft", PEFT_CONFIG)
    before = (peft / "adapter_config.json").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    result = cli("--model", "qwen2_5", "--input_path", peft, "--output_path", out / "lora.ckpt", "--is_lora")
    assert result.code == 0, result.err
    got = tensors_of(out / "lora.ckpt")
    assert set(got) == {f"{LAYER.format(i=i)}.attention.{m}.lora_{ab}"
                        for i in range(GQA.num_hidden_layers) for m in ("wq", "wv") for ab in "ab"}
    assert {d for d, _, _ in got.values()} == {"BF16"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {**PEFT_CONFIG, "target_modules": ["wq", "wv"]}
    assert (peft / "adapter_config.json").read_bytes() == before


def test_is_lora_reverse_gives_a_peft_adapter_folder_with_its_config(cli, tmp_path):
    """Back: adapter_model.safetensors with PEFT's names and bytes, and adapter_config.json in HF names."""
    peft = peft_folder(tmp_path / "peft", PEFT_CONFIG)
    ms = tmp_path / "ms"
    ms.mkdir()
    assert cli("--model", "qwen2_5", "--input_path", peft, "--output_path", ms / "lora.ckpt", "--is_lora").code == 0
    back = tmp_path / "back"
    result = cli("--model", "qwen2_5", "--reversed", "--input_path", ms / "lora.ckpt", "--output_path", f"{back}/")
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(back / "adapter_model.safetensors"), tensors_of(peft / "adapter_model.safetensors"))
    assert json.loads((back / "adapter_config.json").read_text()) == PEFT_CONFIG


def test_is_lora_takes_the_adapter_from_a_folder_that_also_holds_a_base_model(cli, tiny_llama, tmp_path):
    base = tiny_llama(dtype="BF16")
    save_file({f"base_model.model.{n}": t for n, t in lora_state().items()}, str(base / "adapter_model.safetensors"))
    out = tmp_path / "lora.ckpt"
    result = cli("--model", "llama", "--input_path", base, "--output_path", out, "--is_lora", "--lora_alpha", "8")
    assert result.code == 0, result.err
    assert len(tensors_of(out)) == len(lora_state())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (R, 8.0, ["wq", "wv"])


def test_is_lora_without_lora_tensors_is_refused(cli, tiny_llama, tmp_path):
    result = cli("--model", "llama", "--input_path", tiny_llama(), "--output_path", tmp_path / "x.ckpt", "--is_lora")
    assert result.code == 3 and "no LoRA parameters" in result.err
    assert not (tmp_path / "x.ckpt").exists()
