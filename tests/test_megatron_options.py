"""MindSpeed-MM's Megatron options (spec §3.5, §4.6, §5, §8): a tower's own TP size (--vit_tp / --audio_tp)
and its discovery on the way back, towers with fewer pipeline stages than the LLM repeated over its stages
(and the error where MindSpeed-MM drops stages), a third tower (--audio_pp_layers) through a test-only
declaration, --iteration, and experts over EP ranks; each HF → Megatron → HF byte-identical, per-rank
shapes as the spec's patterns say."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_same_tensors, tensors_of, write_hf
from megatron_helpers import assert_same_rank_files, rank_files
from safetensors.torch import load_file
from test_megatron_mixtral import EXPERTS, FFN, HIDDEN, write_mixtral
from test_megatron_qwen2_vl import write_qwen2_vl

from mindformers_conv import registry
from mindformers_conv.mapping import attention_heads, invert, qkv_grouped, rename, transform
from mindformers_conv.megatron.layout import Modality
from mindformers_conv.megatron.tensor_parallel import COL, ROW, qkv

# tests/test_megatron_qwen2_vl.py's tiny Qwen2-VL: ViT 4 blocks of width 32 (4 heads, MLP 64), merger 128;
# LLM 6 layers of width 64 (8 heads, 2 KV heads of 8), vocab 161.
VIT_QKV, LLM_QKV = "image_encoder.encoder.blocks.layers.{}.self_attention.linear_qkv.weight", \
    "text_decoder.decoder.layers.{}.self_attention.linear_qkv.weight"
VIT_FC1 = "image_encoder.encoder.blocks.layers.{}.mlp.linear_fc1.weight"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl") / "hf", tied=False)


def ok(r):
    assert r.code == 0, r.err
    return r


def to_megatron(cli, model, source, out, *flags):
    return ok(cli("--model", model, "--input_path", source, "--output_path", out, "--target", "megatron", *flags))


def assert_round_trip(cli, model, hf, mg, out):
    ok(cli("--model", model, "--reversed", "--input_path", mg, "--output_path", f"{out}/", "--config_path", hf))
    assert_same_tensors(tensors_of(hf), tensors_of(out))


def chunks(state):
    return {k: v for k, v in state.items() if k.startswith("model")}


# --- heterogeneous TP (spec §3.5) ---

@pytest.mark.parametrize("tp,vit_tp,pp", [(2, 1, None), (4, 2, None), (1, 2, None), (2, 4, ("2,2", "3,3")),
                                          (4, 0, None)])
def test_tower_tp_round_trip(cli, hf, tmp_path, tp, vit_tp, pp):
    flags = ["--tp", tp, "--vit_tp", vit_tp] + (["--vit_pp_layers", pp[0], "--llm_pp_layers", pp[1]] if pp else [])
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", *flags)
    folders = max(tp, vit_tp)
    assert len({f.split("_")[2] for f in rank_files(tmp_path / "mg")}) == folders
    assert_round_trip(cli, "qwen2_vl", hf, tmp_path / "mg", tmp_path / "back")


def test_vit_tp_2_under_tp_4_folder_r_holds_vit_shard_r_mod_2(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--tp", "4", "--vit_tp", "2")
    files = rank_files(tmp_path / "mg")
    assert sorted(files) == [f"release/mp_rank_0{r}" for r in range(4)]
    states = [files[f"release/mp_rank_0{r}"]["model"] for r in range(4)]
    for r, state in enumerate(states):
        assert tuple(state[VIT_QKV.format(0)].shape) == (48, 32)  # 2 of 4 heads × [q; k; v] of 8
        assert tuple(state[VIT_FC1.format(0)].shape) == (32, 32)  # MLP 64 rows / 2
        assert tuple(state["image_encoder.projector.encoder.linear_fc2.weight"].shape) == (64, 64)  # 128 / 2
        assert tuple(state[LLM_QKV.format(0)].shape) == (32, 64)  # 8/4 q heads + k, v of its KV group, × 8
        assert tuple(state["text_decoder.embedding.word_embeddings.weight"].shape) == (41, 64)  # 164 / 4
        same = states[r % 2]
        assert state[VIT_QKV.format(3)].equal(same[VIT_QKV.format(3)])
        assert state["image_encoder.projector.encoder.linear_fc1.weight"].equal(
            same["image_encoder.projector.encoder.linear_fc1.weight"])
    assert not states[0][LLM_QKV.format(0)].equal(states[2][LLM_QKV.format(0)])


def test_vit_tp_1_puts_the_whole_vit_in_every_folder(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--tp", "2", "--vit_tp", "1")
    source = tensors_of(hf)
    for r in range(2):
        state = rank_files(tmp_path / "mg")[f"release/mp_rank_0{r}"]["model"]
        assert tuple(state[VIT_QKV.format(1)].shape) == (96, 32)
        assert tuple(state[VIT_FC1.format(1)].shape) == (64, 32)
        fc2 = source["visual.blocks.1.mlp.fc2.weight"]
        assert state["image_encoder.encoder.blocks.layers.1.mlp.linear_fc2.weight"].equal(
            fc2[2].view(torch.bfloat16).reshape(fc2[1]))


def test_resharding_keeps_a_tower_tp_that_differs_and_follows_tp_otherwise(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "a", "--tp", "2", "--vit_tp", "1")
    to_megatron(cli, "qwen2_vl", tmp_path / "a", tmp_path / "same", "--config_path", hf)
    assert_same_rank_files(rank_files(tmp_path / "a"), rank_files(tmp_path / "same"))
    to_megatron(cli, "qwen2_vl", tmp_path / "a", tmp_path / "tp4", "--tp", "4", "--config_path", hf)
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "tp4_direct", "--tp", "4", "--vit_tp", "1")
    assert_same_rank_files(rank_files(tmp_path / "tp4"), rank_files(tmp_path / "tp4_direct"))
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "b", "--tp", "2")
    to_megatron(cli, "qwen2_vl", tmp_path / "b", tmp_path / "b4", "--tp", "4", "--config_path", hf)
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "b4_direct", "--tp", "4")
    assert_same_rank_files(rank_files(tmp_path / "b4"), rank_files(tmp_path / "b4_direct"))


@pytest.mark.parametrize("model,flags,message", [
    ("qwen2_vl", ["--tp", "2", "--vit_tp", "3"], "TP sizes vit 3, llm 2: each must divide the largest"),
    ("llama", ["--vit_tp", "2"], "--vit_tp: the model has no such tower (it has llm)"),
    ("qwen2_vl", ["--audio_pp_layers", "1"], "--audio_pp_layers: the model has no such tower (it has llm, vit)"),
    ("qwen2_vl", ["--vit_pp_layers", "1,1,1,1", "--llm_pp_layers", "3,3"],
     "--vit_pp_layers [[1, 1, 1, 1]] has 4 stages, more than the 2 of --llm_pp_layers"),
])
def test_tower_option_errors_are_one_line_and_write_nothing(cli, hf, tiny_llama, tmp_path, model, flags, message):
    source = tiny_llama() if model == "llama" else hf
    r = cli("--model", model, "--input_path", source, "--output_path", tmp_path / "mg", "--target", "megatron",
            *flags)
    assert r.code == 2 and r.err.count("\n") == 1 and message in r.err, r.err
    assert not (tmp_path / "mg").exists()


# --- heterogeneous PP across towers (spec §4.6) ---

def held(files, prefix):
    """{folder: {chunk: sorted local layer numbers, or True for a non-layer tensor}} of names under prefix."""
    out = {}
    for folder, state in files.items():
        for key, names in chunks(state).items():
            found = sorted({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})
            if found:
                out.setdefault(folder.split("/")[1], {})[key] = found
    return out


def test_a_one_stage_vit_is_repeated_on_every_llm_stage(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--vit_pp_layers", "4", "--llm_pp_layers", "3,3")
    files = rank_files(tmp_path / "mg")
    assert held(files, "image_encoder.encoder.blocks.layers.") == {
        "mp_rank_00_000": {"model": ["0", "1", "2", "3"]}, "mp_rank_00_001": {"model": ["0", "1", "2", "3"]}}
    for stage in ("000", "001"):
        state = files[f"release/mp_rank_00_{stage}"]["model"]
        assert "image_encoder.encoder.patch_embed.proj.weight" in state
        assert "image_encoder.projector.encoder.linear_fc2.weight" in state
    assert held(files, "text_decoder.decoder.layers.") == {"mp_rank_00_000": {"model": ["0", "1", "2"]},
                                                           "mp_rank_00_001": {"model": ["0", "1", "2"]}}
    assert_round_trip(cli, "qwen2_vl", hf, tmp_path / "mg", tmp_path / "back")


def test_a_two_stage_vit_over_four_llm_stages_cycles(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--vit_pp_layers", "1,3", "--llm_pp_layers", "1,2,2,1")
    files = rank_files(tmp_path / "mg")
    assert held(files, "image_encoder.encoder.blocks.layers.") == {
        "mp_rank_00_000": {"model": ["0"]}, "mp_rank_00_001": {"model": ["0", "1", "2"]},
        "mp_rank_00_002": {"model": ["0"]}, "mp_rank_00_003": {"model": ["0", "1", "2"]}}
    for prefix, stages in (("image_encoder.encoder.patch_embed.", ["000", "002"]),
                           ("image_encoder.projector.", ["001", "003"])):
        assert sorted(f[-3:] for f, s in files.items() if any(n.startswith(prefix) for n in s["model"])) == stages
    vit0 = files["release/mp_rank_00_000"]["model"][VIT_QKV.format(0)]
    assert vit0.equal(files["release/mp_rank_00_002"]["model"][VIT_QKV.format(0)])
    assert_round_trip(cli, "qwen2_vl", hf, tmp_path / "mg", tmp_path / "back")
    to_megatron(cli, "qwen2_vl", tmp_path / "mg", tmp_path / "again", "--config_path", hf)  # keeps the layout
    assert_same_rank_files(files, rank_files(tmp_path / "again"))


@pytest.mark.parametrize("vit,llm,tp", [("4", "[[1,2],[2,1]]", 2), ("2,2,0", "1,2,2,1", 1),
                                        ("[[0,4]]", "[[1,1],[2,2]]", 2)])
def test_hetero_pp_round_trips(cli, hf, tmp_path, vit, llm, tp):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--tp", tp, "--vit_pp_layers", vit, "--llm_pp_layers", llm)
    assert_round_trip(cli, "qwen2_vl", hf, tmp_path / "mg", tmp_path / "back")


def test_vit_over_vpp_chunks_is_on_every_chunk_of_every_rank(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--vit_pp_layers", "4", "--llm_pp_layers", "[[1,2],[2,1]]")
    every = {"model0": ["0", "1", "2", "3"], "model1": ["0", "1", "2", "3"]}
    assert held(rank_files(tmp_path / "mg"), "image_encoder.encoder.blocks.layers.") == {
        "mp_rank_00_000": every, "mp_rank_00_001": every}


# --- a third tower: audio (spec §4.1 audio schema, §3.3 Qwen2.5-Omni audio TP) ---

AUDIO_E, AUDIO_HEADS, AUDIO_FFN, AUDIO_LAYERS, AUDIO_OUT, MELS = 16, 2, 32, 3, 64, 8
AUDIO_CONFIG = dict(d_model=AUDIO_E, encoder_attention_heads=AUDIO_HEADS, encoder_layers=AUDIO_LAYERS)
HA, MA = "audio_tower.layers.{i}", "audio_encoder.encoder.blocks.layers.{i}"
AUDIO_QKV = attention_heads("audio_config", heads=("encoder_attention_heads",), kv=None, hidden="d_model")


def audio_declaration():
    """Qwen2-VL plus an audio tower in the shape of Qwen2.5-Omni's (test-only: the machinery, not the family)."""
    base = registry.get_megatron("qwen2_vl")
    rules = (
        rename("audio_tower.conv{j}.{p}", "audio_encoder.encoder.conv{j}.{p}"),
        rename("audio_tower.audio_bos_eos_token.weight", "audio_encoder.encoder.audio_bos_eos_token.weight"),
        transform([f"{HA}.self_attn.{x}_proj.weight" for x in "qkv"], f"{MA}.self_attention.linear_qkv.weight",
                  invert(qkv_grouped(AUDIO_QKV))),
        rename(f"{HA}.self_attn.out_proj.{{p}}", f"{MA}.self_attention.linear_proj.{{p}}"),
        rename(f"{HA}.fc1.{{p}}", f"{MA}.mlp.linear_fc1.{{p}}"),
        rename(f"{HA}.fc2.{{p}}", f"{MA}.mlp.linear_fc2.{{p}}"),
        rename(f"{HA}.self_attn_layer_norm.{{p}}", f"{MA}.input_layernorm.{{p}}"),
        rename(f"{HA}.final_layer_norm.{{p}}", f"{MA}.pre_mlp_layernorm.{{p}}"),
        rename("audio_tower.ln_post.{p}", "audio_encoder.encoder.ln_post.{p}"),
        rename("audio_tower.proj.{p}", "audio_encoder.encoder.proj.{p}"),
    )
    audio = Modality("audio", firsts=("audio_encoder.encoder.conv", "audio_encoder.encoder.audio_bos_eos_token"),
                     lasts=("audio_encoder.encoder.proj", "audio_encoder.encoder.ln_post"),
                     layers="audio_encoder.encoder.blocks.layers.")
    tp = ((f"{MA}.self_attention.linear_qkv.weight", qkv(AUDIO_QKV)), (f"{MA}.self_attention.linear_proj.weight", COL),
          (f"{MA}.mlp.linear_fc1.{{p}}", ROW), (f"{MA}.mlp.linear_fc2.weight", COL))
    layout = replace(base.megatron, modalities=(*base.megatron.modalities, audio), tp_rules=base.megatron.tp_rules + tp)
    return replace(base, key="tiny_omni", rules=base.rules + rules, megatron=layout)


@pytest.fixture
def omni(hf, tmp_path, monkeypatch):
    """The test-only declaration under --model tiny_omni, and a Qwen2-VL checkpoint with an audio tower."""
    monkeypatch.setitem(registry.MEGATRON, "tiny_omni", audio_declaration())
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    audio = {"audio_tower.conv1.weight": rand(AUDIO_E, MELS, 3), "audio_tower.conv1.bias": rand(AUDIO_E),
             "audio_tower.conv2.weight": rand(AUDIO_E, AUDIO_E, 3), "audio_tower.conv2.bias": rand(AUDIO_E),
             "audio_tower.audio_bos_eos_token.weight": rand(2, AUDIO_OUT),
             "audio_tower.ln_post.weight": rand(AUDIO_E), "audio_tower.ln_post.bias": rand(AUDIO_E),
             "audio_tower.proj.weight": rand(AUDIO_OUT, AUDIO_E), "audio_tower.proj.bias": rand(AUDIO_OUT)}
    for i in range(AUDIO_LAYERS):
        layer = {**{f"self_attn.{x}_proj.weight": rand(AUDIO_E, AUDIO_E) for x in "qkv"},
                 "self_attn.out_proj.weight": rand(AUDIO_E, AUDIO_E), "self_attn.out_proj.bias": rand(AUDIO_E),
                 "fc1.weight": rand(AUDIO_FFN, AUDIO_E), "fc1.bias": rand(AUDIO_FFN),
                 "fc2.weight": rand(AUDIO_E, AUDIO_FFN), "fc2.bias": rand(AUDIO_E),
                 "self_attn_layer_norm.weight": rand(AUDIO_E), "final_layer_norm.weight": rand(AUDIO_E)}
        audio.update({f"audio_tower.layers.{i}.{n}": t for n, t in layer.items()})
    config = {**json.loads((hf / "config.json").read_text()), "audio_config": AUDIO_CONFIG}
    return write_hf(tmp_path / "omni_hf", {**load_file(hf / "model.safetensors"), **audio}, config)


@pytest.mark.parametrize("flags", [
    ["--audio_pp_layers", "1,2", "--vit_pp_layers", "4,0", "--llm_pp_layers", "3,3", "--tp", "2"],
    ["--audio_pp_layers", "3", "--llm_pp_layers", "2,2,2", "--tp", "2", "--audio_tp", "1"],
    ["--audio_pp_layers", "[[0,1],[2,0]]", "--llm_pp_layers", "[[1,2],[2,1]]"],
    ["--tp", "2", "--audio_tp", "2", "--vit_tp", "1"],
])
def test_audio_tower_round_trip(cli, omni, tmp_path, flags):
    to_megatron(cli, "tiny_omni", omni, tmp_path / "mg", *flags)
    assert_round_trip(cli, "tiny_omni", omni, tmp_path / "mg", tmp_path / "back")


def test_audio_schema_conv_and_bos_eos_first_proj_and_ln_post_last(cli, omni, tmp_path):
    to_megatron(cli, "tiny_omni", omni, tmp_path / "mg", "--audio_pp_layers", "0,1,2", "--vit_pp_layers", "4,0,0",
                "--llm_pp_layers", "2,2,2", "--tp", "2", "--audio_tp", "1")
    files = rank_files(tmp_path / "mg")
    first, last = files["release/mp_rank_01_001"]["model"], files["release/mp_rank_01_002"]["model"]
    assert [n for n in first if n.startswith("audio_encoder.encoder.c") or "bos_eos" in n] == [
        "audio_encoder.encoder.conv1.bias", "audio_encoder.encoder.conv1.weight", "audio_encoder.encoder.conv2.bias",
        "audio_encoder.encoder.conv2.weight", "audio_encoder.encoder.audio_bos_eos_token.weight"]
    assert [n for n in last if n.startswith(("audio_encoder.encoder.proj", "audio_encoder.encoder.ln_post"))] == [
        "audio_encoder.encoder.proj.bias", "audio_encoder.encoder.proj.weight", "audio_encoder.encoder.ln_post.bias",
        "audio_encoder.encoder.ln_post.weight"]
    assert held(files, "audio_encoder.encoder.blocks.layers.") == {
        f"mp_rank_{t:02d}_{p:03d}": {"model": n} for t in range(2) for p, n in ((1, ["0"]), (2, ["0", "1"]))}
    names = list(last)  # stage order: vision, text, audio (spec §4.1)
    assert names.index("text_decoder.output_layer.weight") < names.index("audio_encoder.encoder.blocks.layers.0."
                                                                           "input_layernorm.weight")
    qkv_full = (3 * AUDIO_E, AUDIO_E)  # --audio_tp 1: every folder holds the whole tower
    assert tuple(last["audio_encoder.encoder.blocks.layers.1.self_attention.linear_qkv.weight"].shape) == qkv_full
    assert tuple(last[LLM_QKV.format(0)].shape) == (48, 64)  # 4 q heads + k + v of one KV group, × 8


def test_audio_tp_2_splits_the_audio_tower(cli, omni, tmp_path):
    to_megatron(cli, "tiny_omni", omni, tmp_path / "mg", "--tp", "2")
    for r in range(2):
        state = rank_files(tmp_path / "mg")[f"release/mp_rank_0{r}"]["model"]
        block = "audio_encoder.encoder.blocks.layers.2."
        assert tuple(state[f"{block}self_attention.linear_qkv.weight"].shape) == (24, 16)  # 1 head × [q; k; v] of 8
        assert tuple(state[f"{block}self_attention.linear_proj.weight"].shape) == (16, 8)
        assert tuple(state[f"{block}mlp.linear_fc1.bias"].shape) == (16,)
        assert tuple(state[f"{block}mlp.linear_fc2.weight"].shape) == (16, 16)
        assert tuple(state["audio_encoder.encoder.conv1.weight"].shape) == (16, 8, 3)


# --- iteration (spec §1.1) ---

def test_iteration_folder_marker_and_the_reverse_reads_either_folder(cli, hf, tmp_path):
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--tp", "2", "--iteration", "1000")
    assert (tmp_path / "mg/latest_checkpointed_iteration.txt").read_bytes() == b"1000"
    assert sorted(p.name for p in (tmp_path / "mg").iterdir()) == ["iter_0001000", "latest_checkpointed_iteration.txt"]
    assert sorted(rank_files(tmp_path / "mg")) == ["iter_0001000/mp_rank_00", "iter_0001000/mp_rank_01"]
    assert_round_trip(cli, "qwen2_vl", hf, tmp_path / "mg", tmp_path / "back")
    assert_round_trip(cli, "qwen2_vl", hf, tmp_path / "mg/iter_0001000", tmp_path / "back2")
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "rel", "--tp", "2")
    a, b = rank_files(tmp_path / "mg"), rank_files(tmp_path / "rel")
    assert_same_rank_files({k.split("/")[1]: v for k, v in a.items()}, {k.split("/")[1]: v for k, v in b.items()})


# --- expert parallelism (spec §5) ---

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return write_mixtral(tmp_path_factory.mktemp("mixtral") / "hf")


@pytest.mark.parametrize("tp,ep,pp", [(1, 4, None), (2, 4, "1,1"), (4, 2, None), (4, 4, "1,1"), (2, 2, None)])
def test_experts_over_ep_ranks_round_trip(cli, mixtral, tmp_path, tp, ep, pp):
    to_megatron(cli, "mixtral", mixtral, tmp_path / "mg", "--tp", tp, "--ep", ep, *(["--llm_pp_layers", pp] if pp else []))
    files = rank_files(tmp_path / "mg")
    stages = ["_000", "_001"] if pp else [""]
    assert sorted(files) == sorted(f"release/mp_rank_{t:02d}{s}_{e:03d}" for t in range(tp) for s in stages
                                   for e in range(ep))
    per_rank = EXPERTS // ep
    for name, state in files.items():
        experts = {n.split(".")[6] for n in state["model"] if ".local_experts." in n}
        assert experts == {str(i) for i in range(per_rank)}, name
        fc1 = next(t for n, t in state["model"].items() if n.endswith("local_experts.0.linear_fc1.weight"))
        fc2 = next(t for n, t in state["model"].items() if n.endswith("local_experts.0.linear_fc2.weight"))
        assert tuple(fc1.shape) == (2 * FFN // tp, HIDDEN) and tuple(fc2.shape) == (HIDDEN, FFN // tp)
    assert_round_trip(cli, "mixtral", mixtral, tmp_path / "mg", tmp_path / "back")


def test_ep_rank_k_holds_global_experts_k_times_per_rank_onward(cli, mixtral, tmp_path):
    to_megatron(cli, "mixtral", mixtral, tmp_path / "mg", "--ep", "4")
    source = tensors_of(mixtral)
    for e in range(4):
        state = rank_files(tmp_path / "mg")[f"release/mp_rank_00_{e:03d}"]["model"]
        w2 = source[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"]
        expected = w2[2].view(torch.bfloat16).reshape(w2[1])
        assert state["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"].equal(expected)
        assert "decoder.layers.1.mlp.router.weight" in state and "embedding.word_embeddings.weight" in state


# --- what a checkpoint holds: --save_vit_only, --llm_hf_dir (spec §8) ---

def test_save_vit_only_writes_the_vision_tower_and_projector_only(cli, hf, tmp_path):
    layout = ["--tp", "2", "--vit_pp_layers", "4,0", "--llm_pp_layers", "3,3"]
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "vit", "--save_vit_only", *layout)
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "all", *layout)
    vit, whole = rank_files(tmp_path / "vit"), rank_files(tmp_path / "all")
    assert vit.keys() == whole.keys()
    for folder, state in vit.items():
        expected = {n: t for n, t in whole[folder]["model"].items() if n.startswith("image_encoder.")}
        assert list(state["model"]) == list(expected), folder
        assert all(t.equal(expected[n]) for n, t in state["model"].items())
    assert "image_encoder.projector.encoder.linear_fc2.weight" in vit["release/mp_rank_01_000"]["model"]
    assert vit["release/mp_rank_00_001"]["model"] == {}
    ok(cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "vit", "--output_path",
           f"{tmp_path}/back/", "--config_path", hf))
    source = tensors_of(hf)
    assert_same_tensors({n: v for n, v in source.items() if n.startswith("visual.")}, tensors_of(tmp_path / "back"))


def test_llm_hf_dir_swaps_in_the_language_model(cli, hf, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = json.loads((hf / "config.json").read_text())["text_config"]
    sizes = {k: text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                  "vocab_size", "intermediate_size")}
    torch.manual_seed(7)
    Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=False)).to(torch.bfloat16).save_pretrained(tmp_path / "llm")
    to_megatron(cli, "qwen2_vl", hf, tmp_path / "mg", "--tp", "2", "--llm_pp_layers", "3,3",
                "--llm_hf_dir", tmp_path / "llm")
    ok(cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
           f"{tmp_path}/back/", "--config_path", hf))
    source, llm, back = tensors_of(hf), tensors_of(tmp_path / "llm"), tensors_of(tmp_path / "back")
    assert back.keys() == source.keys()
    assert_same_tensors({n: v for n, v in back.items() if n.startswith("visual.")},
                        {n: v for n, v in source.items() if n.startswith("visual.")})
    assert_same_tensors({n: v for n, v in back.items() if not n.startswith("visual.")}, llm)
    assert not back["model.layers.0.self_attn.q_proj.weight"][2].equal(source["model.layers.0.self_attn.q_proj.weight"][2])

    Qwen2ForCausalLM(Qwen2Config(**{**sizes, "num_hidden_layers": 4})).save_pretrained(tmp_path / "short")
    r = cli("--model", "qwen2_vl", "--input_path", hf, "--output_path", tmp_path / "mg2", "--target", "megatron",
            "--llm_hf_dir", tmp_path / "short")
    assert r.code == 2 and "num_hidden_layers 4 is not the model's 6" in r.err, r.err
    assert not (tmp_path / "mg2").exists()


# --- DCP (spec §1.2) saved by torch from 2 ranks: tensors in several chunks ---

def test_a_dcp_saved_by_two_ranks_is_reassembled(cli, tiny_llama, tmp_path):
    from megatron_helpers import save_dcp_from_two_ranks
    from torch.distributed.checkpoint import FileSystemReader

    hf = tiny_llama()
    to_megatron(cli, "llama", hf, tmp_path / "mg")
    state = rank_files(tmp_path / "mg")["release/mp_rank_00"]["model"]
    torch.save(state, tmp_path / "state.pt")
    save_dcp_from_two_ranks(tmp_path / "dcp/iter_0000005", tmp_path / "state.pt", tmp_path / "store")
    (tmp_path / "dcp/latest_checkpointed_iteration.txt").write_text("5")
    md = FileSystemReader(tmp_path / "dcp/iter_0000005").read_metadata()
    chunks_of = {n: len(m.chunks) for n, m in md.state_dict_metadata.items() if n.startswith("model.")}
    assert chunks_of["model.decoder.layers.0.mlp.linear_fc1.weight"] == 2  # rows
    assert chunks_of["model.decoder.layers.0.mlp.linear_fc2.weight"] == 2  # columns
    assert chunks_of["model.decoder.final_layernorm.weight"] == 1
    assert {i.relative_path for i in md.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}
    assert_round_trip(cli, "llama", hf, tmp_path / "dcp", tmp_path / "back")
    to_megatron(cli, "llama", tmp_path / "dcp", tmp_path / "mg2", "--config_path", hf)
    assert_same_rank_files(rank_files(tmp_path / "mg"), rank_files(tmp_path / "mg2"))


# --- LoRA (spec §6.3: `<module>.lora_A|lora_B.default.weight`; A of a row-parallel layer split like its
# input columns, B of a column-parallel layer like its output rows) ---

RANK = 4
LORA = {"model.layers.{i}.self_attn.o_proj": (64, 64), "model.layers.{i}.mlp.down_proj": (64, 96),
        "visual.blocks.{i}.mlp.fc1": (64, 32)}  # base (out, in)


@pytest.fixture
def with_lora(hf, tmp_path):
    g = torch.Generator().manual_seed(2)
    adapters = {}
    for i in range(2):
        for module, (out, inp) in LORA.items():
            adapters[f"{module.format(i=i)}.lora_A.weight"] = torch.randn(RANK, inp, generator=g).to(torch.bfloat16)
            adapters[f"{module.format(i=i)}.lora_B.weight"] = torch.randn(out, RANK, generator=g).to(torch.bfloat16)
    folder = write_hf(tmp_path / "lora_hf", {**load_file(hf / "model.safetensors"), **adapters},
                      json.loads((hf / "config.json").read_text()))
    return folder, adapters


def test_save_lora_only_writes_megatron_lora_names_split_over_tp(cli, with_lora, tmp_path):
    source, adapters = with_lora
    to_megatron(cli, "qwen2_vl", source, tmp_path / "mg", "--tp", "2", "--save_lora_only")
    files = rank_files(tmp_path / "mg")
    proj, fc2 = "text_decoder.decoder.layers.1.self_attention.linear_proj", "text_decoder.decoder.layers.1.mlp.linear_fc2"
    vit = "image_encoder.encoder.blocks.layers.1.mlp.linear_fc1"
    for r in range(2):
        state = files[f"release/mp_rank_0{r}"]["model"]
        assert len(state) == 12 and all(".lora_" in n and n.endswith(".default.weight") for n in state)
        assert tuple(state[f"{proj}.lora_A.default.weight"].shape) == (RANK, 32)  # row-parallel: A's columns
        assert tuple(state[f"{proj}.lora_B.default.weight"].shape) == (64, RANK)
        assert tuple(state[f"{fc2}.lora_A.default.weight"].shape) == (RANK, 48)
        assert tuple(state[f"{vit}.lora_A.default.weight"].shape) == (RANK, 32)
        assert tuple(state[f"{vit}.lora_B.default.weight"].shape) == (32, RANK)  # column-parallel: B's rows
        a = adapters["model.layers.1.self_attn.o_proj.lora_A.weight"]
        assert state[f"{proj}.lora_A.default.weight"].equal(a[:, r * 32:(r + 1) * 32])
    ok(cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
           f"{tmp_path}/back/", "--config_path", source))
    back = tensors_of(tmp_path / "back/adapter_model.safetensors")  # an adapter alone: the folder is the adapter
    assert_same_tensors({f"base_model.model.{n}": v for n, v in tensors_of(source).items() if ".lora_" in n}, back)


def test_base_and_lora_round_trip(cli, with_lora, tmp_path):
    source, _ = with_lora
    to_megatron(cli, "qwen2_vl", source, tmp_path / "mg", "--tp", "2", "--llm_pp_layers", "3,3")
    ok(cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
           f"{tmp_path}/back/", "--config_path", source))
    back = {**tensors_of(tmp_path / "back/model.safetensors"),
            **{n.removeprefix("base_model.model."): v
               for n, v in tensors_of(tmp_path / "back/adapter/adapter_model.safetensors").items()}}
    assert_same_tensors(tensors_of(source), back)
