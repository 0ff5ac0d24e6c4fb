"""`from models.glm4_mcore.convert_weight import convert_pt_to_ms` — HF → MindSpore, as in MindFormers."""

from mindformers_conv.api import converter

convert_pt_to_ms = converter("glm4-mcore", reverse=False)
