"""Check benchmark outputs tensor by tensor against their HF source, independently of the converter's mapping.

    python benchmarks/check_outputs.py SRC_FOLDER KIND:DTYPE:PATH ...

KIND is `hf` (a safetensors folder), `ckpt` (a MindSpore .ckpt, MindFormers' llama names) or `bin` (a torch
pickle of HF names, MindFormers' reverse output); DTYPE is what every tensor must be: the source cast to it
(bf16 → fp16/fp32 by torch), or through several (`fp16>bf16`: to fp16, then back to bf16). Names are
mapped with the hand-written table below, not the converter's.
Prints one line per problem and exits 1 when there is any. Run as its own process by bench_convert.py, so
the measuring process never imports torch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# HF llama name → MindFormers name, written out here so the check does not trust the converter's tables.
MS_NAMES = [(r"model\.embed_tokens\.weight", "model.tok_embeddings.embedding_weight"),
            (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"model.layers.\1.attention.w\2.weight"),
            (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"model.layers.\1.feed_forward.w1.weight"),
            (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"model.layers.\1.feed_forward.w2.weight"),
            (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"model.layers.\1.feed_forward.w3.weight"),
            (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.attention_norm.weight"),
            (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.ffn_norm.weight"),
            (r"model\.norm\.weight", "model.norm_out.weight"),
            (r"lm_head\.weight", "lm_head.weight")]


def ms_name(hf: str) -> str:
    for pattern, repl in MS_NAMES:
        if re.fullmatch(pattern, hf):
            return re.sub(pattern, repl, hf)
    raise KeyError(hf)


def safetensors_tensors(folder: Path) -> dict:
    """name → a loader, for every tensor of every safetensors file of `folder`."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: (lambda file=file, name=name: _load(file, name)) for name in f.keys()})
    return out


def _load(file: Path, name: str):
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return f.get_tensor(name)


def output_tensors(kind: str, path: Path, source_names: list[str]) -> dict:
    """HF name → a loader of the output's tensor; names the output has that no source name maps to are
    returned under their own name (and so reported as unexpected)."""
    if kind == "hf":
        return safetensors_tensors(path)
    if kind == "bin":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {name: (lambda t=t: t) for name, t in state.items()}
    back = {ms_name(name): name for name in source_names}
    if kind == "ms":  # a MindSpore safetensors folder
        return {back.get(name, name): load for name, load in safetensors_tensors(path).items()}
    from mindformers_conv.formats.ms_ckpt import read_index

    refs = read_index(path)
    return {back.get(name, name): ref.read for name, ref in refs.items()}


def check(src: Path, kind: str, dtype: str, path: Path) -> list[str]:
    import torch

    casts = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in dtype.split(">")]
    source = safetensors_tensors(src)
    got = output_tensors(kind, path, list(source))
    problems = [f"{path.name}: unexpected tensor {n}" for n in sorted(got.keys() - source.keys())]
    problems += [f"{path.name}: missing {n}" for n in sorted(source.keys() - got.keys())]
    for name in sorted(source.keys() & got.keys()):
        want, have = source[name](), got[name]()
        for cast in casts:
            want = want.to(cast)
        if have.dtype != want.dtype or tuple(have.shape) != tuple(want.shape) or not torch.equal(
                have.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            problems.append(f"{path.name}: {name} differs from the source ({have.dtype} {tuple(have.shape)})")
    return problems


def main() -> int:
    src = Path(sys.argv[1])
    problems = []
    for spec in sys.argv[2:]:
        kind, dtype, path = spec.split(":", 2)
        problems += check(src, kind, dtype, Path(path))
    for line in problems[:30]:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
