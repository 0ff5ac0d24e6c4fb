"""`from models.qwen3.convert_reversed import convert_ms_to_pt` — MindSpore → HF, as in MindFormers."""

from mindformers_conv.api import converter

convert_ms_to_pt = converter("qwen3", reverse=True)
