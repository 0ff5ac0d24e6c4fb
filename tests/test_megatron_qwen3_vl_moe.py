"""qwen3_vl_moe ↔ MindSpeed-MM Megatron layout (spec §5, §6.6): stacked HF experts as per-expert
SequentialMLP weights over TP × EP × PP, a model mixing dense and MoE layers (MindSpeed-MM's converter
stops on it), EP files holding only their own experts' bytes (MindSpeed-MM saves views with the whole
stacked storage), and transformers loading the reversed folder."""

import pytest
import torch
from conftest import assert_same_tensors, tensors_of
from test_megatron_qwen3_vl import convert, write_qwen3_vl

E, I, H = 4, 32, 64
MOE = dict(num_experts=E, num_experts_per_tok=2, moe_intermediate_size=I, decoder_sparse_step=1)
EXPERT = "text_decoder.decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc{}.weight"


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl_moe")
    return {"moe": write_qwen3_vl(root / "moe", MOE),
            "mixed": write_qwen3_vl(root / "mixed", {**MOE, "mlp_only_layers": [0, 2]})}


@pytest.mark.parametrize("tp,ep,vit,llm", [(1, 1, None, None), (2, 1, None, None), (1, 2, None, None),
                                           (2, 2, "4,0", "1,3"), (2, 4, "[[2,0],[2,0]]", "[[0,1],[2,1]]")])
def test_qwen3_vl_moe_hf_to_megatron_to_hf_is_byte_identical(cli, hf_models, tmp_path, tp, ep, vit, llm):
    convert(cli, "qwen3_vl_moe", hf_models["moe"], tmp_path, tp, vit, llm, "--ep", ep)
    assert_same_tensors(tensors_of(hf_models["moe"]), tensors_of(tmp_path / "back"))


def test_qwen3_vl_moe_experts_per_ep_and_tp_rank(cli, hf_models, tmp_path):
    hf = hf_models["moe"]
    files = convert(cli, "qwen3_vl_moe", hf, tmp_path, 2, "4,0", "1,3", "--ep", "2", back=False)
    assert sorted(files) == [f"release/mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                             for e in range(2)]
    gate_up = tensors_of(hf)["model.language_model.layers.2.mlp.experts.gate_up_proj"][2].view(torch.bfloat16)
    down = tensors_of(hf)["model.language_model.layers.2.mlp.experts.down_proj"][2].view(torch.bfloat16)
    gate_up, down = gate_up.reshape(E, H, 2 * I), down.reshape(E, I, H)
    for tp in range(2):
        for ep in range(2):
            state = files[f"release/mp_rank_{tp:02d}_001_{ep:03d}"]["model"]
            assert sorted({n.split(".")[7] for n in state if ".local_experts." in n}) == ["0", "1"]
            # Global layer 2 is local layer 1 of stage 1; EP rank 1 holds experts 2, 3 as local 0, 1.
            fc1, fc2 = state[EXPERT.format(1, 1, 1)], state[EXPERT.format(1, 1, 2)]
            assert tuple(fc1.shape) == (I, H) and tuple(fc2.shape) == (H, I // 2)  # [2I/tp, H], [H, I/tp]
            expert = gate_up[2 * ep + 1].t()  # [2I, H] = [gate; up]
            rows = slice(tp * I // 2, (tp + 1) * I // 2)
            assert fc1.equal(torch.cat([expert[:I][rows], expert[I:][rows]]))
            assert fc2.equal(down[2 * ep + 1].t()[:, rows])
            assert tuple(state["text_decoder.decoder.layers.1.mlp.router.weight"].shape) == (E, H)


def test_qwen3_vl_moe_dense_and_moe_layers_mixed(cli, hf_models, tmp_path):
    """mlp_only_layers [0, 2] are dense: MindSpeed-MM's ExpertSplitOp runs on every layer and KeyErrors."""
    hf = hf_models["mixed"]
    files = convert(cli, "qwen3_vl_moe", hf, tmp_path, 2, None, None, "--ep", "2")
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))
    state = files["release/mp_rank_00_001"]["model"]
    assert "text_decoder.decoder.layers.0.mlp.linear_fc1.weight" in state
    assert EXPERT.format(1, 0, 1) in state and "text_decoder.decoder.layers.1.mlp.linear_fc1.weight" not in state
    assert not any(n.startswith("text_decoder.decoder.layers.2.mlp.experts.") for n in state)


def test_qwen3_vl_moe_ep_files_hold_only_their_experts_bytes(cli, hf_models, tmp_path):
    """At TP 1 MindSpeed-MM saves transposed views: every EP file carries every expert's storage (§10.6)."""
    files = convert(cli, "qwen3_vl_moe", hf_models["moe"], tmp_path, 1, None, None, "--ep", "2", back=False)
    for folder in ("release/mp_rank_00_000", "release/mp_rank_00_001"):
        for name, t in files[folder]["model"].items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (folder, name)
            assert t.is_contiguous(), (folder, name)


def test_qwen3_vl_moe_experts_not_dividing_ep_is_an_error(cli, hf_models, tmp_path):
    r = cli("--model", "qwen3_vl_moe", "--input_path", hf_models["moe"], "--output_path", tmp_path / "mg",
            "--target", "megatron", "--ep", "3")
    assert r.code == 2 and "4 experts do not divide over --ep 3" in r.err, r.err


def test_qwen3_vl_moe_reversed_folder_loads_with_transformers(cli, hf_models, tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    hf = hf_models["mixed"]
    convert(cli, "qwen3_vl_moe", hf, tmp_path, 2, "1,3,0", "0,2,2", "--ep", "2")
    a = Qwen3VLMoeForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
