"""whisper: HF `WhisperForConditionalGeneration` (whisper-large-v3), `pytorch_model.bin` or safetensors.

Facts: spec/mindformers_other.md §2.10 (names as HF except: conv weights [d, c, 3] → [d, c, 1, 3] since the
MS Conv1d runs as a Conv2d; embeddings → `embedding_weight`; every `layer_norm` weight/bias → gamma/beta;
no transposes; `proj_out.weight`, when the file has it, is written under its own name and ignored at load)
and §7 (source dtype kept). MindFormers' reverse writes a flat torch dict.

MindFormers reads tensors through `.numpy()`, so a bf16 checkpoint raises there; it converts here.
"""

from models.vit.declaration import layer_norm

from mindformers_conv.mapping import ModelSpec, Op, rename, transform
from mindformers_conv.registry import register


def insert_axis(dim: int) -> Op:
    """A new length-1 axis at `dim` (np.expand_dims); backward removes it."""
    return Op(f"insert axis {dim}", lambda xs, cfg: [xs[0].unsqueeze(dim)], lambda xs, cfg: [xs[0].squeeze(dim)])


CONV_AS_CONV2D = insert_axis(2)  # [out, in, k] ↔ [out, in, 1, k]
LAYER = "model.{side}.layers.{i}"
CONVS = ("conv1", "conv2")

register(ModelSpec(
    key="whisper",
    description="Whisper (HF WhisperForConditionalGeneration, e.g. whisper-large-v3)",
    model_types=("whisper",),
    architectures=("WhisperForConditionalGeneration",),
    forward_dtype=None,  # ms.Tensor(array, dtype=None) keeps the stored dtype (§7)
    rules=(
        *(transform(f"model.encoder.{c}.weight", f"model.encoder.{c}.weight", CONV_AS_CONV2D) for c in CONVS),
        *(rename(f"model.encoder.{c}.bias", f"model.encoder.{c}.bias") for c in CONVS),
        rename("model.{side}.embed_{x}.weight", "model.{side}.embed_{x}.embedding_weight"),  # tokens, positions
        *layer_norm(f"{LAYER}.{{x}}_layer_norm", f"{LAYER}.{{x}}_layer_norm"),  # self_attn, encoder_attn, final
        *layer_norm("model.{side}.layer_norm", "model.{side}.layer_norm"),
        rename(f"{LAYER}.{{attn}}.{{x}}_proj.{{p}}", f"{LAYER}.{{attn}}.{{x}}_proj.{{p}}"),  # q/k/v/out, no transpose
        *(rename(f"{LAYER}.{fc}.{{p}}", f"{LAYER}.{fc}.{{p}}") for fc in ("fc1", "fc2")),
        rename("proj_out.weight", "proj_out.weight"),  # MS LMHead reuses embed_tokens; kept as MindFormers does
    ),
))
