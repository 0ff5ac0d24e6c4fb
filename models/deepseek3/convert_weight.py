"""`from models.deepseek3.convert_weight import convert_pt_to_ms` — HF → MindSpore, as in MindFormers."""

from mindformers_conv.api import converter

convert_pt_to_ms = converter("deepseek3", reverse=False)
