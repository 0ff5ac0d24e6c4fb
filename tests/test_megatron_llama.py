"""llama ↔ Megatron-core GPT layout: bit-exact round trips over a TP × PP/VPP grid, per-rank shapes as the
spec's TP patterns say (§3.3, §2.4), reshards, tied heads, vocab padding and the one-line errors."""

import json

import pytest
import torch
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import assert_same_rank_files, rank_files

from mindformers_conv.synthetic import LlamaShape, write_llama

# nkv 2 < TP 4 (replicated KV heads); vocab 255 divides by no TP > 1; ffn 96 splits over 4.
SHAPE = LlamaShape(vocab_size=255, hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2)
PP_LISTS = [None, "1,3", "0,2,2", "[[1,1],[1,1]]", "[[0,1],[2,1]]"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {tied: write_llama(root / f"tied{tied}", SHAPE.__class__(**{**SHAPE.__dict__, "tie_word_embeddings": tied}))
            for tied in (False, True)}


def megatron_flags(tp, pp):
    return ["--target", "megatron", "--tp", tp] + (["--llm_pp_layers", pp] if pp else [])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("pp", PP_LISTS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_llama_hf_to_megatron_to_hf_is_byte_identical(cli, hf_models, tmp_path, tp, pp, tied):
    hf = hf_models[tied]
    r = cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", *megatron_flags(tp, pp))
    assert r.code == 0, r.err
    r = cli("--model", "llama", "--reversed", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/",
            "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads((hf / "config.json").read_text())


def expected_shard_shapes(tp, pp_stages_hold_layers=True):
    """Spec §3.3 per-rank shapes for SHAPE: qkv whole KV groups (KV replicated when nkv < TP), fc1 GLU
    halves, proj/fc2 columns, vocab rows padded to a TP multiple, norms whole."""
    h, f, hd = SHAPE.hidden_size, SHAPE.intermediate_size, SHAPE.hd
    nh, nkv = SHAPE.num_attention_heads, SHAPE.num_key_value_heads
    vocab = -(-SHAPE.vocab_size // tp) * tp
    return {
        "embedding.word_embeddings.weight": (vocab // tp, h),
        "output_layer.weight": (vocab // tp, h),
        "self_attention.linear_qkv.weight": ((nh // tp + 2 * max(1, nkv // tp)) * hd, h),
        "self_attention.linear_proj.weight": (h, nh * hd // tp),
        "mlp.linear_fc1.weight": (2 * f // tp, h),
        "mlp.linear_fc2.weight": (h, f // tp),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "decoder.final_layernorm.weight": (h,),
    }


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_llama_rank_shapes_follow_the_spec_tp_patterns(cli, hf_models, tmp_path, tp):
    r = cli("--model", "llama", "--input_path", hf_models[False], "--output_path", tmp_path / "mg",
            *megatron_flags(tp, "1,3"))
    assert r.code == 0, r.err
    expected = expected_shard_shapes(tp)
    files = rank_files(tmp_path / "mg")
    assert sorted(files) == [f"release/mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(2)]
    for folder, state in files.items():
        assert set(state) == {"model", "checkpoint_version"} and state["checkpoint_version"] == 3.0
        for name, tensor in state["model"].items():
            suffix = next(k for k in expected if name.endswith(k))
            assert tuple(tensor.shape) == expected[suffix], (folder, name)
    first, last = files["release/mp_rank_00_000"]["model"], files["release/mp_rank_00_001"]["model"]
    assert list(first) == ["embedding.word_embeddings.weight", *[f"decoder.layers.0.{n}" for n in (
        "input_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight", "pre_mlp_layernorm.weight",
        "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight")]]
    assert {n.split(".")[2] for n in last if n.startswith("decoder.layers.")} == {"0", "1", "2"}
    assert list(last)[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]


def test_llama_qkv_rows_are_kv_groups_and_fc1_is_gate_then_up_per_rank(cli, hf_models, tmp_path):
    hf = tensors_of(hf_models[False])

    def hf_tensor(name):
        return hf[name][2].view(torch.bfloat16).reshape(hf[name][1])

    r = cli("--model", "llama", "--input_path", hf_models[False], "--output_path", tmp_path / "mg",
            *megatron_flags(4, None))
    assert r.code == 0, r.err
    files = rank_files(tmp_path / "mg")
    hd, p = SHAPE.hd, "model.layers.1."
    q, k, v = (hf_tensor(f"{p}self_attn.{x}_proj.weight") for x in "qkv")
    gate, up = hf_tensor(f"{p}mlp.gate_proj.weight"), hf_tensor(f"{p}mlp.up_proj.weight")
    for rank in range(4):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        group = rank // 2  # 2 KV heads over 4 ranks: ranks 0,1 share KV head 0 (spec §3.6: replicated)
        expected = torch.cat([q[rank * hd:(rank + 1) * hd], k[group * hd:(group + 1) * hd], v[group * hd:(group + 1) * hd]])
        assert state["decoder.layers.1.self_attention.linear_qkv.weight"].equal(expected)
        rows = SHAPE.intermediate_size // 4
        assert state["decoder.layers.1.mlp.linear_fc1.weight"].equal(
            torch.cat([gate[rank * rows:(rank + 1) * rows], up[rank * rows:(rank + 1) * rows]]))
    last = files["release/mp_rank_03"]["model"]["embedding.word_embeddings.weight"]
    assert last.shape[0] == 64 and last[-1].eq(0).all()  # 255 rows padded to 256


@pytest.mark.parametrize("a,b", [((2, "1,3"), (4, "[[1,1],[1,1]]")), ((4, "0,2,2"), (1, None)),
                                 ((1, "[[0,1],[2,1]]"), (2, "2,2"))])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_megatron_reshard_and_back_is_identical_per_rank_file(cli, hf_models, tmp_path, a, b, tied):
    hf = hf_models[tied]
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "a", *megatron_flags(*a)).code == 0
    r = cli("--model", "llama", "--input_path", tmp_path / "a", "--output_path", tmp_path / "b",
            *megatron_flags(*b), "--config_path", hf, "--verify")
    assert r.code == 0, r.err
    r = cli("--model", "llama", "--input_path", tmp_path / "b", "--output_path", tmp_path / "a2",
            *megatron_flags(*a), "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_rank_files(rank_files(tmp_path / "a"), rank_files(tmp_path / "a2"))


def test_llama_tied_head_only_on_a_last_stage_apart_from_the_embedding(cli, hf_models, tmp_path):
    hf = hf_models[True]
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "one",
               *megatron_flags(2, None)).code == 0
    one = rank_files(tmp_path / "one")["release/mp_rank_00"]["model"]
    assert "output_layer.weight" not in one  # Megatron shares the embedding on a single stage (spec §4.7)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "two",
               *megatron_flags(2, "2,2")).code == 0
    files = rank_files(tmp_path / "two")
    for rank in range(2):
        first = files[f"release/mp_rank_{rank:02d}_000"]["model"]
        last = files[f"release/mp_rank_{rank:02d}_001"]["model"]
        assert "output_layer.weight" not in first
        assert last["output_layer.weight"].equal(first["embedding.word_embeddings.weight"])


def test_llama_vocab_padding_follows_make_vocab_size_divisible_by(cli, hf_models, tmp_path):
    r = cli("--model", "llama", "--input_path", hf_models[False], "--output_path", tmp_path / "mg",
            *megatron_flags(2, None), "--make_vocab_size_divisible_by", "128")
    assert r.code == 0, r.err
    state = rank_files(tmp_path / "mg")["release/mp_rank_01"]["model"]
    assert state["embedding.word_embeddings.weight"].shape[0] == 128  # 255 → 256 (128 × TP 2) → 128 per rank
    r = cli("--model", "llama", "--reversed", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/",
            "--config_path", hf_models[False])
    assert r.code == 0, r.err
    assert_same_tensors(tensors_of(hf_models[False]), tensors_of(tmp_path / "back"))


def test_llama_iteration_folder_and_tracker(cli, hf_models, tmp_path):
    r = cli("--model", "llama", "--input_path", hf_models[False], "--output_path", tmp_path / "mg",
            *megatron_flags(1, None), "--iteration", "100")
    assert r.code == 0, r.err
    assert (tmp_path / "mg/latest_checkpointed_iteration.txt").read_bytes() == b"100"
    assert (tmp_path / "mg/iter_0000100/mp_rank_00/model_optim_rng.pt").is_file()
    r = cli("--model", "llama", "--reversed", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/",
            "--config_path", hf_models[False])
    assert r.code == 0, r.err
    assert (tmp_path / "back/model.safetensors").is_file()


@pytest.mark.parametrize("shape,flags,message", [
    (LlamaShape(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), ["--tp", "2"],
     "num_key_value_heads 3 does not divide over --tp 2"),
    (LlamaShape(num_attention_heads=6, num_key_value_heads=6, hidden_size=48), ["--tp", "4"],
     "num_attention_heads 6 is not divisible by --tp 4"),
    (LlamaShape(intermediate_size=98), ["--tp", "4"], "98 gate/up rows (ffn size) do not divide over --tp 4"),
    (LlamaShape(num_hidden_layers=4), ["--llm_pp_layers", "1,2"], "sum to 3, but the model has 4 llm layers"),
    (LlamaShape(), ["--llm_pp_layers", "[[1,1],[1]]"], "same number of PP stages"),
    (LlamaShape(), ["--vpp", "2", "--llm_pp_layers", "1,1"], "--vpp 2: --llm_pp_layers 1,1 has 1 chunk(s)"),
])
def test_llama_megatron_layout_errors_are_one_line_and_write_nothing(cli, tmp_path, shape, flags, message):
    hf = write_llama(tmp_path / "hf", shape)
    r = cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron", *flags)
    assert r.code == 2 and r.err.count("\n") == 1 and message in r.err, r.err
    assert not (tmp_path / "mg").exists()


def test_llama_reverse_without_config_says_to_pass_config_path(cli, hf_models, tmp_path):
    assert cli("--model", "llama", "--input_path", hf_models[False], "--output_path", tmp_path / "mg",
               *megatron_flags(2, None)).code == 0
    r = cli("--model", "llama", "--reversed", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/")
    assert r.code == 2 and "--config_path" in r.err, r.err
    assert not (tmp_path / "back").exists()
