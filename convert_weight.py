"""MindFormers-compatible entry point: `python convert_weight.py --model llama --input_path … --output_path …`.

`convert_map` / `reversed_convert_map` map every registered key to its `convert_pt_to_ms` /
`convert_ms_to_pt`, as in MindFormers' own root script.
"""

import sys

from mindformers_conv.api import ConvertMap
from mindformers_conv.cli import main

convert_map = ConvertMap(reverse=False)
reversed_convert_map = ConvertMap(reverse=True)

if __name__ == "__main__":
    sys.exit(main())
