"""A MindFormers YAML (`model.model_config`) read as the config.json keys our declarations use.

MindFormers' own fusing converters take `--config_path <yaml>`; accepting the same file saves users from
writing a config.json by hand. Unknown keys pass through; HF names (in 2.x YAMLs) are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BadInput

# MindFormers 1.x / 2.x model_config names → config.json names
HF_NAMES = {
    "num_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "num_query_groups": "num_key_value_heads",
    "num_layers": "num_hidden_layers",
    "kv_channels": "head_dim",
    "ffn_hidden_size": "intermediate_size",
}


def read_yaml_config(path: Path) -> dict:
    import yaml

    try:
        document = yaml.safe_load(path.read_text())
        config = document["model"]["model_config"]
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInput(f"{path}: not valid YAML ({e})") from None
    except (KeyError, TypeError):
        raise BadInput(f"{path}: no model.model_config section (is it a MindFormers YAML?)") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: model.model_config is not a mapping")
    return {HF_NAMES.get(key, key): value for key, value in config.items() if value is not None}
