"""baichuan / baichuan2: Baichuan-7B/13B v1 and Baichuan2-7B/13B (remote code); one conversion, two keys.

Facts: spec/mindformers_llm.md §4.11 (llama table plus W_pack split by config.json hidden_size; NormHead
lm_head copied raw; alibi/rotary rebuilt at runtime; baichuan ≡ baichuan2 files) and §8 (Float32 default).
"""

from models.llama.declaration import BODY, EMBEDDING, LAYER, LLAMA

from mindformers_conv.mapping import ModelSpec, split, transform
from mindformers_conv.registry import register


def qkv_rows(cfg, rows: int) -> list[int]:
    """W_pack is [q; k; v] of hidden_size rows each (MHA): torch.split(W_pack, hidden_size) in MindFormers."""
    hidden = cfg.get("hidden_size")
    if not isinstance(hidden, int):
        raise ValueError("config.json has no hidden_size; pass --hidden_size or --config_path")
    return [hidden] * 3


W_PACK = transform(f"{LAYER}.self_attn.W_pack.weight",
                   [f"{LAYER}.attention.wq.weight", f"{LAYER}.attention.wk.weight", f"{LAYER}.attention.wv.weight"],
                   split(qkv_rows))

# Not a llama variant: the MS names are llama's, but the HF side fuses q/k/v, so `--model auto` on MS
# names alone must not pick llama for it. Baichuan2's NormHead lm_head is copied unnormalised (both
# sides L2-normalise rows at runtime, idempotently).
BAICHUAN = register(ModelSpec(
    key="baichuan",
    ms_names_of="llama",  # the MindSpore side is llama's layout
    description="Baichuan-7B/13B (v1)",
    model_types=("baichuan",),
    architectures=("BaiChuanForCausalLM", "BaichuanForCausalLM"),
    forward_dtype=LLAMA.forward_dtype,  # the remote-code loader materialises fp32 under transformers 4.x (§8)
    tied=LLAMA.tied,  # state_dict() emits a tied head
    rules=(EMBEDDING, W_PACK, *BODY),
))

register(BAICHUAN.variant("baichuan2", "Baichuan2-7B/13B (NormHead)"))
