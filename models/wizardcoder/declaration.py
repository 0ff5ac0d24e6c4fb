"""wizardcoder: WizardCoder-15B (StarCoder / transformers `GPTBigCodeForCausalLM`, multi-query attention).

Facts: spec/mindformers_llm.md §4.15 (legacy GPT-style `backbone.*` names; c_attn split into q, k, v
rows; c_proj / c_fc weights transposed to [in, out]; the head is `head.head_weight`; Float32 default).
MindFormers hard-codes the split at rows 6144/6272 (H = 6144, one KV head of 128); here the sizes come
from config.json (n_embd, n_head, multi_query) or --hidden_size / --n_head. MindFormers converts
`--layers` blocks (the CLI's default 12 of 40, silently); here every block unless --layers N is given.
"""

from mindformers_conv.mapping import TRANSPOSE, ModelSpec, drop_hf, rename, split, transform
from mindformers_conv.registry import register

LAYER, BLOCK = "transformer.h.{i}", "backbone.blocks.{i}"


def qkv_rows(cfg, rows: int) -> list[int]:
    """c_attn rows: H query rows, then k and v of one head_dim each (multi_query) or of H each."""
    hidden = cfg.get("n_embd") or cfg.get("hidden_size")
    n_heads = cfg.get("n_head") or cfg.get("num_attention_heads")
    if not hidden or not n_heads:
        raise ValueError("config.json has no n_embd/n_head; pass --config_path or --hidden_size and --n_head")
    kv = hidden // n_heads if cfg.get("multi_query", True) else hidden  # GPTBigCodeConfig: multi_query=True
    return [hidden, kv, kv]


WIZARDCODER = register(ModelSpec(
    key="wizardcoder",
    description="WizardCoder-15B / StarCoder (GPTBigCode, multi-query attention)",
    model_types=("gpt_bigcode",),
    architectures=("GPTBigCodeForCausalLM",),
    forward_dtype="F32",  # GPTBigCodeForCausalLM.from_pretrained materialises fp32 under transformers 4.x
    tied=("lm_head.weight", "transformer.wte.weight"),  # state_dict() emits the tied head
    layers_flag=True,
    rules=(
        rename("transformer.wte.weight", "backbone.embedding.word_embedding.embedding_table"),
        rename("transformer.wpe.weight", "backbone.embedding.position_embedding.embedding_table"),
        rename(f"{LAYER}.ln_1.weight", f"{BLOCK}.layernorm1.gamma"),
        rename(f"{LAYER}.ln_1.bias", f"{BLOCK}.layernorm1.beta"),
        transform(f"{LAYER}.attn.c_attn.{{p}}",
                  [f"{BLOCK}.attention.dense1.{{p}}", f"{BLOCK}.attention.dense2.{{p}}",
                   f"{BLOCK}.attention.dense3.{{p}}"],
                  split(qkv_rows)),
        transform(f"{LAYER}.attn.c_proj.weight", f"{BLOCK}.attention.projection.weight", TRANSPOSE),
        rename(f"{LAYER}.attn.c_proj.bias", f"{BLOCK}.attention.projection.bias"),
        rename(f"{LAYER}.ln_2.weight", f"{BLOCK}.layernorm2.gamma"),
        rename(f"{LAYER}.ln_2.bias", f"{BLOCK}.layernorm2.beta"),
        transform(f"{LAYER}.mlp.c_fc.weight", f"{BLOCK}.output.mapping.weight", TRANSPOSE),
        rename(f"{LAYER}.mlp.c_fc.bias", f"{BLOCK}.output.mapping.bias"),
        transform(f"{LAYER}.mlp.c_proj.weight", f"{BLOCK}.output.projection.weight", TRANSPOSE),
        rename(f"{LAYER}.mlp.c_proj.bias", f"{BLOCK}.output.projection.bias"),
        rename("transformer.ln_f.weight", "backbone.layernorm.gamma"),
        rename("transformer.ln_f.bias", "backbone.layernorm.beta"),
        rename("lm_head.weight", "head.head_weight"),
        drop_hf("transformer.bias", "causal-mask buffer, rebuilt at load"),
    ),
))
