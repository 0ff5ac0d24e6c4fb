"""deepseek3: DeepSeek-V3 / R1 ↔ MindFormers 2.x mcore training names (the v1.7.0 / master toolkit, which
matches the 2.1.0 training model): MLA unfused, MoE with shared experts, the MTP layer.

Facts: spec/mindformers_other.md §3.2 (v1.7.0 names; dense and shared-expert `linear_fc1` row-interleaved;
routed experts `weight1` [E·H, 2Fm] and `weight2` [E·Fm, H]; router rows not truncated; only names with
`expert_bias` kept fp32, the rest bf16; HF layer num_hidden_layers + m is MTP layer m), §3.3 (MLA names),
spec/mindformers_llm.md §5. FP8 sources are dequantised on read (mindformers_conv/fp8.py).

An MTP layer's `embed_tokens` and `shared_head.head` are copies of the main embedding and head, which
mcore's MTP shares: the forward leaves them out (MindFormers writes the first over the main embedding and
drops the second) and the reverse writes them again from `embedding.word_embeddings.weight` and
`output_layer.weight`, for every MTP layer the MindSpore input has.
"""

from dataclasses import replace

from models.mcore.rules import HEAD, HF, MS, NORMS, ROUTED_EXPERTS, ROUTER, SHARED_EXPERTS, mlp

from mindformers_conv.mapping import Alias, Config, ModelSpec, Pattern, Rule, drop_hf, rename
from mindformers_conv.registry import register

MLA = tuple(rename(f"{HF}.self_attn.{hf}.{{p}}", f"{MS}.self_attention.{ms}.{{p}}") for hf, ms in (
    ("q_a_proj", "linear_q_down_proj"), ("q_a_layernorm", "q_layernorm"), ("q_b_proj", "linear_q_up_proj"),
    ("kv_a_proj_with_mqa", "linear_kv_down_proj"), ("kv_a_layernorm", "kv_layernorm"),
    ("kv_b_proj", "linear_kv_up_proj"), ("o_proj", "linear_proj")))
# v1.7.0 keeps the names containing `expert_bias` in Float32 (§3.2)
FP32_ROUTER = tuple(replace(r, ms_dtype="F32") if "expert_bias" in r.ms[0].text else r for r in ROUTER)
# One decoder layer: dense layers (i < first_k_dense_replace) have mlp.{gate,up,down}_proj, MoE layers the rest.
LAYER = (*NORMS, *MLA, *mlp(), *FP32_ROUTER, *ROUTED_EXPERTS, *SHARED_EXPERTS)

# MindSpore names of an MTP layer's copies (they exist only while a MindSpore input is read; see `Alias`)
MTP_EMBEDDING, MTP_HEAD = "mtp.layers.{m}.embedding.word_embeddings.weight", "mtp.layers.{m}.output_layer.weight"
COPY = "an MTP layer's copy of the main embedding or head (mcore shares them)"


def moved(rules: tuple[Rule, ...], hf: str, ms: str) -> tuple[Rule, ...]:
    """Decoder-layer rules (prefixes HF / MS) for the layer at `hf` / `ms` (an MTP layer's transformer_layer)."""

    def move(patterns, old, new):
        assert all(p.text.startswith(old) for p in patterns)
        return tuple(Pattern(new + p.text.removeprefix(old)) for p in patterns)

    return tuple(replace(r, hf=move(r.hf, HF, hf), ms=move(r.ms, MS, ms)) for r in rules)


def mtp_layer(hf: str, m: int) -> tuple[Rule, ...]:
    """HF layer `hf` ↔ MTP layer m."""
    ms = f"mtp.layers.{m}"
    return (
        *(rename(f"{hf}.{x}.weight", f"{ms}.{x}.weight") for x in ("enorm", "hnorm", "eh_proj")),
        rename(f"{hf}.shared_head.norm.weight", f"{ms}.final_layernorm.weight"),
        drop_hf(f"{hf}.embed_tokens.weight", COPY),  # forward: first match wins; the reverse reads the alias
        drop_hf(f"{hf}.shared_head.head.weight", COPY),
        rename(f"{hf}.embed_tokens.weight", MTP_EMBEDDING.format(m=m)),
        rename(f"{hf}.shared_head.head.weight", MTP_HEAD.format(m=m)),
        *moved(LAYER, hf, f"{ms}.transformer_layer"),
    )


def mtp_rules(cfg: Config) -> tuple[Rule, ...]:
    """The MTP layers: HF `model.layers.{num_hidden_layers + m}` for m < num_nextn_predict_layers."""
    layers = cfg.get("num_hidden_layers")
    if not isinstance(layers, int):
        return ()
    return tuple(r for m in range(cfg.get("num_nextn_predict_layers") or 0)
                 for r in mtp_layer(f"model.layers.{layers + m}", m))


DEEPSEEK3 = register(ModelSpec(
    key="deepseek3",
    description="DeepSeek-V3 / R1 (MLA + MoE + MTP; FP8 dequantised) in MindFormers 2.x mcore training names",
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    forward_dtype="BF16",  # the toolkit's default dtype (§3.2)
    rules=(*HEAD, *LAYER),
    config_rules=mtp_rules,
    aliases=(Alias(MTP_EMBEDDING, "embedding.word_embeddings.weight", where="mtp.layers.{m}.enorm.weight"),
             Alias(MTP_HEAD, "output_layer.weight", where="mtp.layers.{m}.enorm.weight")),
))
