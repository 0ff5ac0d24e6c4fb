"""Synthetic HF llama checkpoints (real key names and config.json, random weights, fixed seed).

Used by the demo, the tests and the benchmarks; written tensor by tensor with our own writers, so even
a 7B-shaped model is built in bounded memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


from . import dtypes
from .formats import hf_safetensors
from .formats.safetensors_file import SafetensorsWriter
from .formats.torch_pickle import PickleWriter
from .outfile import OutputFile
from .tensor_ref import MemoryBytes, Shape, numel
from .lazy import torch


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    tie_word_embeddings: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, Shape]]:
        """HF LlamaForCausalLM names and shapes, in state_dict() order."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.hd
        out = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (self.num_attention_heads * hd, h)),
                    (p + "self_attn.k_proj.weight", (self.num_key_value_heads * hd, h)),
                    (p + "self_attn.v_proj.weight", (self.num_key_value_heads * hd, h)),
                    (p + "self_attn.o_proj.weight", (h, self.num_attention_heads * hd)),
                    (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, h)))
        return out

    def config(self, dtype: str) -> dict:
        cfg = {k: v for k, v in asdict(self).items() if v is not None}
        torch_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": torch_dtype,
                "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, **cfg}


TINYLLAMA_1B = LlamaShape(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4)
LLAMA_7B = LlamaShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)


def write_llama(folder: str | Path, shape: LlamaShape = LlamaShape(), *, dtype: str = "BF16", seed: int = 0,
                max_shard_bytes: int | None = None, fmt: str = "safetensors") -> Path:
    """An HF llama folder: config.json + model.safetensors (or shards + index; or pytorch_model*.bin)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dt = dtypes.BY_CODE[dtype]
    entries = [(name, dt, s) for name, s in shape.tensors()]
    shards = hf_safetensors.split_shards(entries, max_shard_bytes)
    prefix, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = hf_safetensors.shard_names(len(shards), prefix, ext)
    gen = torch.Generator().manual_seed(seed)
    for file, shard in zip(names, shards):
        out = OutputFile(folder / file)
        writer = (SafetensorsWriter(out, shard, hf_safetensors.METADATA) if fmt == "safetensors"
                  else PickleWriter(out, shard))
        for name, d, s in shard:
            writer.add(name, d, s, MemoryBytes.of(_random(name, s, gen).to(d.torch)))
        writer.close()
        out.commit()
    if len(shards) > 1:
        weight_map = {e[0]: n for n, s in zip(names, shards) for e in s}
        index = hf_safetensors.INDEX if fmt == "safetensors" else hf_safetensors.BIN_INDEX
        total = sum(numel(s) * d.itemsize for _, d, s in entries)
        (folder / index).write_bytes(hf_safetensors.index_json(weight_map, total))
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return folder


def _random(name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)
