"""Run MindFormers v1.3.2's own llama converter, for the benchmark (in benchmarks/.venv-mindformers only).

    .venv-mindformers/bin/python run_mindformers.py forward HF_FOLDER/ OUT.ckpt [--dtype bf16]
    .venv-mindformers/bin/python run_mindformers.py reverse IN.ckpt OUT.bin [--dtype bf16]
    .venv-mindformers/bin/python run_mindformers.py --check      # imports only (start-up cost)

The calls are the ones MindFormers' root convert_weight.py makes for `--model llama [--reversed]`:
`convert_pt_to_ms(input_path, output_path, dtype)` / `convert_ms_to_pt(...)`, with its dtype maps
(MindSpore dtypes forward, torch dtypes in reverse). A False return (MindFormers prints and returns on
failure) exits 1 here, so the benchmark notices.
"""

from __future__ import annotations

import argparse
import sys
import types


def _import_converters():
    # MindSpore 2.10 removed this module; mindformers.dataset still subclasses one class from it.
    placeholder = types.ModuleType("mindspore.dataset.transforms.py_transforms")
    placeholder.PyTensorOperation = object
    sys.modules[placeholder.__name__] = placeholder
    from mindformers.models.llama.convert_reversed import convert_ms_to_pt
    from mindformers.models.llama.convert_weight import convert_pt_to_ms
    return convert_pt_to_ms, convert_ms_to_pt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="import MindFormers' llama converters and stop")
    p.add_argument("direction", nargs="?", choices=["forward", "reverse"])
    p.add_argument("input_path", nargs="?")
    p.add_argument("output_path", nargs="?")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    args = p.parse_args()
    forward, reverse = _import_converters()
    if args.check:
        return 0
    if not (args.direction and args.input_path and args.output_path):
        p.error("direction, input_path and output_path are required")
    if args.direction == "forward":
        import mindspore as ms
        dtypes = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
        convert = forward
    else:
        import torch
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        convert = reverse
    ok = convert(input_path=args.input_path, output_path=args.output_path, dtype=dtypes.get(args.dtype))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
