"""MindSpeed-MM's content options for HF → Megatron (spec §8): which tensors a checkpoint holds.

`--save_vit_only` keeps the vision tower and its projector, `--save_lora_only` the LoRA tensors, and
`--llm_hf_dir` takes the language model from another HF checkpoint (MindSpeed-MM's `llm_hf_config`).
They select or swap whole tensors around the plan; placement and the pipeline lists are unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from ..convert import load_config_in
from ..errors import BadInput, UsageError
from ..formats.inputs import Source, open_input
from ..lora import is_hf_lora
from ..mapping import Config, ModelSpec, config_section
from ..plan import Plan, build_plan
from .layout import LLM, MegatronLayout

VIT = "vit"
LLM_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
             "intermediate_size")


def kept(plan: Plan, layout: MegatronLayout, flags: dict) -> Plan:
    """The plan with only the tensors --save_vit_only / --save_lora_only keep (all without them)."""
    keep = []
    if flags.get("save_vit_only"):
        if VIT not in {m.name for m in layout.modalities}:
            raise UsageError(f"--save_vit_only: {plan.spec.key} has no vision tower")
        keep.append(lambda name: layout.modality_of(name).name == VIT)
    if flags.get("save_lora_only"):
        keep.append(is_hf_lora)  # the Megatron names (`….lora_A.default.weight`) have the same form
    if not keep:
        return plan
    tensors = [t for t in plan.tensors if all(k(t.name) for k in keep)]
    if not tensors:
        raise BadInput("--save_vit_only / --save_lora_only: the input has no such tensors")
    return replace(plan, tensors=tensors)


def with_llm_from(spec: ModelSpec, source: Source, llm_dir: str, cfg: Config) -> Source:
    """`source` with its language-model tensors replaced by those of the HF checkpoint in `llm_dir`.

    The tensors left out are those the declaration maps into the LLM tower; the checkpoint's config.json
    must give the multimodal config's text sizes, so every shape and split stays what the model says.
    """
    llm = open_input(llm_dir)
    theirs, ours = load_config_in(llm.folder, None, {}), config_section(cfg, "text_config")
    differ = [k for k in LLM_SIZES if k in theirs and k in ours and theirs[k] != ours[k]]
    if differ:
        raise UsageError(f"--llm_hf_dir {llm_dir}: its {differ[0]} {theirs[differ[0]]} is not the model's "
                         f"{ours[differ[0]]}")
    plan = build_plan(spec, source.refs, reverse=False, dtype=None, cfg=cfg, allow_unmapped=True,
                      mindformers_defaults=False)
    replaced = {s.name for t in plan.tensors if spec.megatron.modality_of(t.name).name == LLM for s in t.group.sources}
    if not replaced:
        raise BadInput(f"{source.folder}: no language-model tensors to replace with --llm_hf_dir")
    refs = {n: r for n, r in source.refs.items() if n not in replaced}
    clash = sorted(set(refs) & set(llm.refs))
    if clash:
        raise BadInput(f"--llm_hf_dir {llm_dir}: {clash[0]!r} is not a language-model tensor of {spec.key}")
    return replace(source, refs={**refs, **llm.refs}, files=[*source.files, *llm.files])
