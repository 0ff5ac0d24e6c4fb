"""HF ↔ MindFormers 2.x "mcore" (GPTModel, training) names shared by the mcore families.

Facts: spec/mindformers_other.md §3.3 (weight_mapping tables; "Fused layouts in 2.1.0 training models";
routed experts) and §3.2 (the v1.7.0 training names), spec/mindformers_llm.md §5 (mcore naming). Training
parameters have no `model.` prefix: `embedding.*`, `decoder.*`, `output_layer.*`.

Two TransformerConfig switches (CLI flags, else config.json, else MindFormers' defaults) choose the fused
layouts: `use_contiguous_weight_layout_attention` (False: `linear_qkv` grouped per KV head, g query heads
then k then v, biases too; True: [q; k; v]) and `use_interleaved_weight_layout_mlp` (True: `linear_fc1`
rows alternate gate/up; False: [gate; up]). Routed experts are always gate|up contiguous per expert.

deepseek3 reuses HEAD (embedding, final norm, output layer), NORMS, `mlp()` / SHARED_EXPERTS (dense and
shared-expert MLPs, in the configured fc1 layout), ROUTER and ROUTED_EXPERTS (GroupedMLP weight1 / weight2),
and `either()` with the switches for anything else that has two layouts.
"""

from typing import Callable

from models.llama.declaration import qkv_rows

from mindformers_conv.mapping import (Config, Op, Rule, config_heads, drop_hf, equal_parts, experts_matrix,
                                      interleave_rows, invert, qkv_grouped, rename, split, transform)

HF, MS = "model.layers.{i}", "decoder.layers.{i}"


def contiguous_attention(cfg: Config) -> bool:
    return bool(cfg.get("use_contiguous_weight_layout_attention", False))


def interleaved_mlp(cfg: Config) -> bool:
    return bool(cfg.get("use_interleaved_weight_layout_mlp", True))


def either(hf, ms, switch, if_on: Op, if_off: Op) -> tuple[Rule, Rule]:
    """The same tensors through `if_on` when `switch(cfg)` holds, else through `if_off`."""
    return (transform(hf, ms, if_on, when=switch), transform(hf, ms, if_off, when=lambda cfg: not switch(cfg)))


# HF → MS ops of the two layouts of each switch.
QKV_CONTIGUOUS, QKV_GROUPED = invert(split(qkv_rows)), invert(qkv_grouped(config_heads))
FC1_INTERLEAVED, FC1_CONTIGUOUS = interleave_rows(2), invert(split(equal_parts(2)))


def config_size(key: str) -> Callable[[Config], int]:
    """A size config.json must give (the reverse of the GroupedMLP experts needs it)."""

    def read(cfg: Config) -> int:
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"config.json has no {key}; pass --config_path with the HF config.json")
        return cfg[key]

    return read


def linear_qkv(hf: list[str], ms: str = f"{MS}.self_attention.linear_qkv.{{p}}") -> tuple[Rule, Rule]:
    """q, k, v (weight or bias, `{p}`) ↔ the fused `linear_qkv` in the configured layout."""
    return either(hf, ms, contiguous_attention, QKV_CONTIGUOUS, QKV_GROUPED)


def mlp(hf: str = f"{HF}.mlp", ms: str = f"{MS}.mlp") -> tuple[Rule, ...]:
    """A gated MLP (`gate_proj`, `up_proj`, `down_proj` under `hf`) ↔ `linear_fc1` / `linear_fc2` under `ms`."""
    return (*either([f"{hf}.gate_proj.{{p}}", f"{hf}.up_proj.{{p}}"], f"{ms}.linear_fc1.{{p}}", interleaved_mlp,
                    FC1_INTERLEAVED, FC1_CONTIGUOUS),
            rename(f"{hf}.down_proj.{{p}}", f"{ms}.linear_fc2.{{p}}"))


EMBEDDING = rename("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = rename("model.norm.weight", "decoder.final_layernorm.weight")
OUTPUT_LAYER = rename("lm_head.weight", "output_layer.weight")
NORMS = (rename(f"{HF}.input_layernorm.weight", f"{MS}.input_layernorm.weight"),
         rename(f"{HF}.post_attention_layernorm.weight", f"{MS}.pre_mlp_layernorm.weight"))
ATTENTION = (*linear_qkv([f"{HF}.self_attn.{x}_proj.{{p}}" for x in "qkv"]),
             rename(f"{HF}.self_attn.o_proj.{{p}}", f"{MS}.self_attention.linear_proj.{{p}}"))
# qwen3's per-head RMSNorm of q and k
QK_NORMS = (rename(f"{HF}.self_attn.q_norm.weight", f"{MS}.self_attention.q_layernorm.weight"),
            rename(f"{HF}.self_attn.k_norm.weight", f"{MS}.self_attention.k_layernorm.weight"))

# the router bias is Float32 in the hub's files whatever the model's dtype (DeepSeek-V3, GLM-4.5)
ROUTER = (rename(f"{HF}.mlp.gate.weight", f"{MS}.mlp.router.weight"),
          rename(f"{HF}.mlp.gate.e_score_correction_bias", f"{MS}.mlp.router.expert_bias", hf_dtype="F32"))
EXPERT = f"{HF}.mlp.experts.{{e}}"
# GroupedMLP: weight1 [E·H, 2Fm] (per expert [gate | up] transposed), weight2 [E·Fm, H] (per expert down.T)
ROUTED_EXPERTS = (
    transform([f"{EXPERT}.gate_proj.weight", f"{EXPERT}.up_proj.weight"], f"{MS}.mlp.experts.weight1",
              experts_matrix(2, config_size("hidden_size")), gather="e"),
    transform(f"{EXPERT}.down_proj.weight", f"{MS}.mlp.experts.weight2",
              experts_matrix(1, config_size("moe_intermediate_size")), gather="e"),
)
SHARED_EXPERTS = mlp(f"{HF}.mlp.shared_experts", f"{MS}.mlp.shared_experts")
HEAD = (EMBEDDING, FINAL_NORM, OUTPUT_LAYER,
        drop_hf(f"{HF}.self_attn.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"))
DENSE_LAYER = (*NORMS, *ATTENTION, *mlp())
