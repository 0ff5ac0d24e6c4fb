"""`from models.cogvlm2.convert_reversed import convert_ms_to_pt` — MindSpore → HF (MindFormers has none).

Our exact inverse of the forward."""

from mindformers_conv.api import converter

convert_ms_to_pt = converter("cogvlm2", reverse=True)
