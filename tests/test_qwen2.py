"""qwen2 / qwen1_5 (§4.6): llama's names plus q/k/v biases; tied head emitted; no MindFormers reverse.

Fixtures are built with transformers' own Qwen2ForCausalLM (tiny config, `save_pretrained`). The helpers
above the tests are shared with the other transformers-built families (mixtral, qwen2-moe, skywork, knowlm).
"""

import json

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of

H, I, NH, NKV, HD, V, L = 16, 24, 4, 2, 4, 32, 2  # GQA: 4 query heads over 2 KV heads
SIZES = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
             num_key_value_heads=NKV, max_position_embeddings=64)
MS_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


# --- helpers shared with the other transformers-built families --------------------------------------------

def save_tiny(folder, model_class, config, dtype=torch.bfloat16, seed=0):
    """A transformers model with every parameter random (norms and biases too), saved as the hub does."""
    torch.manual_seed(seed)
    model = model_class(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.to(dtype).save_pretrained(folder)
    return folder


def logits(folder, model_class) -> torch.Tensor:
    model = model_class.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6) % V).logits


def forward_ok(cli, key, hf, out, *flags) -> dict:
    """Run HF → MS; MS name → (dtype code, shape) of the written file."""
    result = cli("--model", key, "--input_path", hf, "--output_path", out, *flags)
    assert result.code == 0, result.err
    return {n: (d, s) for n, (d, s, _) in tensors_of(out).items()}


def reverse_ok(cli, key, ckpt, target, *flags):
    result = cli("--model", key, "--reversed", "--input_path", ckpt, "--output_path", target, *flags)
    assert result.code == 0, result.err
    return result


def attention_names(bias: bool) -> dict:
    """Spec §4.1 / §4.6 tables for the tiny sizes: embedding, attention (q/k/v biases if any), norms, head."""
    out = {"model.tok_embeddings.embedding_weight": (V, H), "model.norm_out.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        a = f"model.layers.{i}.attention"
        out.update({f"{a}.wq.weight": (NH * HD, H), f"{a}.wk.weight": (NKV * HD, H), f"{a}.wv.weight": (NKV * HD, H),
                    f"{a}.wo.weight": (H, NH * HD), f"model.layers.{i}.attention_norm.weight": (H,),
                    f"model.layers.{i}.ffn_norm.weight": (H,)})
        if bias:
            out.update({f"{a}.wq.bias": (NH * HD,), f"{a}.wk.bias": (NKV * HD,), f"{a}.wv.bias": (NKV * HD,)})
    return out


def with_feed_forward(bias: bool, dtype: str, feed_forward: dict) -> dict:
    """attention_names plus `feed_forward` (name under `….feed_forward.` → shape) per layer; → (dtype, shape)."""
    out = attention_names(bias)
    for i in range(L):
        out.update({f"model.layers.{i}.feed_forward.{n}": s for n, s in feed_forward.items()})
    return {n: (dtype, s) for n, s in out.items()}


def dense_names(bias: bool, dtype: str) -> dict:
    """The §4.1 table (plus §4.6's biases)."""
    return with_feed_forward(bias, dtype, {"w1.weight": (I, H), "w2.weight": (H, I), "w3.weight": (I, H)})


def expert_stacks(experts: int, inner: int, gmm: bool) -> tuple:
    """(gate/up, down) stacked shapes: [E, out, in], or [E, in, out] in the gmm layout."""
    return ((experts, H, inner), (experts, inner, H)) if gmm else ((experts, inner, H), (experts, H, inner))


def assert_loads_in_mindspore(ckpt, expected: dict) -> None:
    import mindspore as ms

    codes = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}
    params = ms.load_checkpoint(str(ckpt))
    assert {n: (p.dtype, tuple(p.shape)) for n, p in params.items()} == \
        {n: (codes[d], s) for n, (d, s) in expected.items()}


def assert_round_trip_gives_equal_logits(cli, key, hf, tmp_path, model_class, forward_flags=()):
    """HF → MS → HF folder: the input's bytes exactly, and from_pretrained gives the same logits.
    The reverse is told the layout the forward wrote (`--use_gmm`)."""
    ckpt, back = tmp_path / "rt.ckpt", tmp_path / "back"
    forward_ok(cli, key, hf, ckpt, *forward_flags, "--verify")
    reverse_ok(cli, key, ckpt, f"{back}/", "--config_path", hf, *(f for f in forward_flags if f == "--use_gmm"))
    assert_same_tensors(tensors_of(back), tensors_of(hf))
    assert torch.equal(logits(back, model_class), logits(hf, model_class))


def assert_bin_reverse_gives_the_bytes(cli, key, hf, tmp_path, forward_flags=(), reverse_flags=()):
    """HF → MS → MindFormers' torch pickle (cast back to the checkpoint's bf16): the input's bytes."""
    ckpt, back = tmp_path / "rt.ckpt", tmp_path / "back.bin"
    forward_ok(cli, key, hf, ckpt, *forward_flags)
    reverse_ok(cli, key, ckpt, back, "--dtype", "bf16", *reverse_flags)
    assert_same_tensors(tensors_of(back), tensors_of(hf))


# --- qwen2 / qwen1_5 ---------------------------------------------------------------------------------------

def qwen2_config(tied: bool):
    from transformers import Qwen2Config

    return Qwen2Config(**SIZES, tie_word_embeddings=tied, rope_theta=1000000.0, torch_dtype="bfloat16")


@example("qwen2_5")
def qwen2_5_example(folder, key):
    """bf16, which qwen2_5's BFloat16 default keeps exactly."""
    from transformers import Qwen2ForCausalLM

    return save_tiny(folder, Qwen2ForCausalLM, qwen2_config(tied=False)), ()


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def qwen2_hf(request, tmp_path):
    """(tied?, HF folder): Qwen2-7B-like (untied) or Qwen2-0.5B-like (tied, no lm_head on disk)."""
    from transformers import Qwen2ForCausalLM

    return request.param, save_tiny(tmp_path / "hf", Qwen2ForCausalLM, qwen2_config(request.param))


# (key, --dtype flag, expected dtype): qwen2 Float32 as transformers 4.x loads; the qwen1_5 script Float16
# qwen2_5: BFloat16 (research/qwen2_5's default, mindformers_other.md §3.1)
DTYPES = [("qwen2", None, "F32"), ("qwen2", "bf16", "BF16"), ("qwen1_5", None, "F16"), ("qwen1_5", "fp32", "F32"),
          ("qwen2_5", None, "BF16"), ("qwen2_5", "fp32", "F32")]


@pytest.mark.parametrize("key, flag, dtype", DTYPES)
def test_qwen2_forward_names_shapes_and_dtypes(cli, qwen2_hf, tmp_path, key, flag, dtype):
    tied, hf = qwen2_hf
    assert ("lm_head.weight" in tensors_of(hf)) != tied
    got = forward_ok(cli, key, hf, tmp_path / "q.ckpt", *(["--dtype", flag] if flag else []))
    assert got == dense_names(bias=True, dtype=dtype)


def test_qwen2_values_are_the_hf_tensors_unchanged(cli, qwen2_hf, tmp_path):
    """No transform (§4.6, 3): each MS tensor is its HF tensor; the tied head is the embedding (state_dict())."""
    from mindformers_conv.formats.inputs import open_input
    from safetensors.torch import load_file

    tied, hf = qwen2_hf
    state = load_file(str(hf / "model.safetensors"))
    forward_ok(cli, "qwen2", hf, tmp_path / "q.ckpt", "--dtype", "bf16")
    got = {n: r.read() for n, r in open_input(tmp_path / "q.ckpt").refs.items()}
    assert torch.equal(got["model.layers.1.attention.wk.bias"], state["model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(got["model.layers.0.feed_forward.w2.weight"], state["model.layers.0.mlp.down_proj.weight"])
    head = state["model.embed_tokens.weight"] if tied else state["lm_head.weight"]
    assert torch.equal(got["lm_head.weight"], head)


@pytest.mark.parametrize("key, dtype", [("qwen2", "F32"), ("qwen2_5", "BF16")])
def test_qwen2_ckpt_loads_in_mindspore(cli, qwen2_hf, tmp_path, key, dtype):
    _, hf = qwen2_hf
    forward_ok(cli, key, hf, tmp_path / "q.ckpt")
    assert_loads_in_mindspore(tmp_path / "q.ckpt", dense_names(bias=True, dtype=dtype))


@pytest.mark.parametrize("key", ["qwen2", "qwen1_5", "qwen2_5"])
@pytest.mark.parametrize("flags", [(), ("--dtype", "bf16")])
def test_qwen2_round_trip_gives_back_the_hf_bytes_and_logits(cli, qwen2_hf, tmp_path, key, flags):
    """MindFormers has no qwen2 reverse (qwen1_5's script is the llama inverse); ours is the exact inverse.
    A tied model's reversed folder leaves the head out again, as the hub files do."""
    from transformers import Qwen2ForCausalLM

    _, hf = qwen2_hf
    assert_round_trip_gives_equal_logits(cli, key, hf, tmp_path, Qwen2ForCausalLM, flags)


def test_qwen2_bin_reverse_gives_back_the_hf_bytes(cli, tmp_path):
    from transformers import Qwen2ForCausalLM

    hf = save_tiny(tmp_path / "hf", Qwen2ForCausalLM, qwen2_config(tied=False))
    assert_bin_reverse_gives_the_bytes(cli, "qwen2", hf, tmp_path)


def test_qwen2_bf16_checkpoint_converts_where_mindformers_numpy_fails(cli, qwen2_hf, tmp_path):
    """MindFormers' qwen2 calls `.numpy()`, which raises TypeError on a model loaded in bf16; ours reads the
    bf16 bytes and writes BFloat16 exactly (and the Float32 default holds every bf16 value exactly)."""
    _, hf = qwen2_hf
    source = tensors_of(hf)["model.layers.0.self_attn.q_proj.weight"]
    assert source[0] == "BF16"
    forward_ok(cli, "qwen2", hf, tmp_path / "b.ckpt", "--dtype", "bf16")
    assert tensors_of(tmp_path / "b.ckpt")["model.layers.0.attention.wq.weight"][2].equal(source[2])
    forward_ok(cli, "qwen2", hf, tmp_path / "f.ckpt")
    from mindformers_conv.formats.inputs import open_input

    wq = open_input(tmp_path / "f.ckpt").refs["model.layers.0.attention.wq.weight"].read()
    assert wq.dtype == torch.float32 and torch.equal(wq.bfloat16().flatten().view(torch.uint8), source[2])


def test_qwen1_5_tied_head_kept_where_the_script_drops_it(cli, tmp_path):
    """research/qwen1_5's script iterates named_parameters(), so a tied model (Qwen1.5-0.5B) loses
    `lm_head.weight`; ours writes it (= the embedding), as every state_dict() converter does."""
    from transformers import Qwen2ForCausalLM

    hf = save_tiny(tmp_path / "hf", Qwen2ForCausalLM, qwen2_config(tied=True))
    forward_ok(cli, "qwen1_5", hf, tmp_path / "q.ckpt")
    got = tensors_of(tmp_path / "q.ckpt")
    assert got["lm_head.weight"][:2] == ("F16", (V, H))
    assert got["lm_head.weight"][2].equal(got["model.tok_embeddings.embedding_weight"][2])


def test_qwen2_auto_detects_the_qwen2_key(cli, qwen2_hf, tmp_path):
    """Qwen1.5 and Qwen2 configs both say model_type qwen2; auto picks the qwen2 (map) key."""
    _, hf = qwen2_hf
    assert json.loads((hf / "config.json").read_text())["model_type"] == "qwen2"
    result = cli("--model", "auto", "--input_path", hf, "--output_path", tmp_path / "a.ckpt")
    assert result.code == 0 and "model: qwen2 (" in result.out


@pytest.mark.parametrize("package", ["qwen2", "qwen1_5"])
def test_qwen2_python_api(qwen2_hf, tmp_path, package):
    import importlib

    _, hf = qwen2_hf
    forward = importlib.import_module(f"models.{package}.convert_weight").convert_pt_to_ms
    reverse = importlib.import_module(f"models.{package}.convert_reversed").convert_ms_to_pt
    assert forward(hf / "model.safetensors", tmp_path / "q.ckpt", dtype="bf16")
    assert reverse(tmp_path / "q.ckpt", tmp_path / "q.bin")
    back = tensors_of(tmp_path / "q.bin")
    original = tensors_of(hf)
    assert_same_tensors({n: back[n] for n in original}, original)  # (.bin keeps a tied head, as state_dict())


@pytest.mark.parametrize("evidence", ["config", "names"])
def test_qwen_key_picks_the_qwen2_layout_from_the_input(cli, qwen2_hf, tmp_path, evidence):
    """The guide's `--model qwen` covers Qwen, Qwen1.5 and Qwen2: the input decides, and the CLI says so."""
    _, hf = qwen2_hf
    if evidence == "names":
        (hf / "config.json").unlink()
    out = tmp_path / "q.ckpt"
    result = cli("--model", "qwen", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert "model: qwen2 (--model qwen: qwen2 layout" in result.out
    assert "model.layers.0.attention.wq.bias" in tensors_of(out)


@pytest.mark.parametrize("key", ["qwen2", "qwen2_5"])
def test_qwen2_qkv_concat_groups_the_biases_too(cli, tmp_path, key):
    """`--qkv_concat` (mindformers_other.md §3.1): q/k/v biases go into `attention.w_qkv.bias` with the same
    per-KV-head grouping as the weight; the reverse splits them back to the input's bytes and logits."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    hf = save_tiny(tmp_path / "hf", Qwen2ForCausalLM, qwen2_config(tied=False))
    state = load_file(str(hf / "model.safetensors"))
    ckpt, back = tmp_path / "fused.ckpt", tmp_path / "back"
    got = forward_ok(cli, key, hf, ckpt, "--qkv_concat", "--dtype", "bf16", "--verify")
    assert got["model.layers.0.attention.w_qkv.bias"] == ("BF16", ((NH + 2 * NKV) * HD,))
    q, k, v = (state[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv")
    g = NH // NKV
    expected = torch.cat([torch.cat([q[grp * g * HD:(grp + 1) * g * HD], k[grp * HD:(grp + 1) * HD],
                                     v[grp * HD:(grp + 1) * HD]]) for grp in range(NKV)])
    assert tensors_of(ckpt)["model.layers.1.attention.w_qkv.bias"][2].equal(expected.view(torch.uint8))
    reverse_ok(cli, key, ckpt, f"{back}/", "--config_path", hf)
    assert_same_tensors(tensors_of(back), tensors_of(hf))
    assert torch.equal(logits(back, Qwen2ForCausalLM), logits(hf, Qwen2ForCausalLM))
