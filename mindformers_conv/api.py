"""The Python API MindFormers users call: `convert_pt_to_ms` / `convert_ms_to_pt` for a model key."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable

from .convert import SIZE_KEYS, Options, convert
from .dtypes import parse_user_dtype
from .errors import UsageError
from . import registry

# Keys a MindFormers caller may pass; size flags go to the model's config, the rest to Options.
SIZE_FLAGS = ("n_head", "hidden_size", "layers", "is_pretrain", "telechat_type", "qkv_concat", "use_gmm", "modal",
              "qkv_layout")
OPTION_FLAGS = ("allow_unmapped", "verify", "config_path", "dry_run", "progress", "max_shard_bytes", "merge_lora",
                "lora_alpha", "jobs")


def options_from(dtype, kwargs: dict) -> Options:
    unknown = sorted(set(kwargs) - set(SIZE_FLAGS) - set(OPTION_FLAGS))
    if unknown:
        raise UsageError(f"unknown argument(s): {', '.join(unknown)}")
    flags = {k: kwargs[k] for k in SIZE_FLAGS if kwargs.get(k) is not None}
    # MindFormers' root script always passes its --n_head/--hidden_size defaults: they only fill gaps.
    hints = {k: flags.pop(k) for k in SIZE_KEYS if k in flags}
    settings = {k: kwargs[k] for k in OPTION_FLAGS if k in kwargs}
    settings.setdefault("progress", False)
    return Options(dtype=parse_user_dtype(dtype), flags=flags, hints=hints, **settings)


def converter(key: str, reverse: bool) -> Callable[..., bool]:
    """The `convert_pt_to_ms` (or, reversed, `convert_ms_to_pt`) function of one key."""

    def run(input_path, output_path, dtype=None, **kwargs) -> bool:
        convert(registry.get(key), str(input_path), str(output_path), reverse=reverse,
                options=options_from(dtype, kwargs))
        return True

    run.__name__ = "convert_ms_to_pt" if reverse else "convert_pt_to_ms"
    direction = "MindSpore → HF" if reverse else "HF → MindSpore"
    run.__doc__ = f"Convert a {key} checkpoint {direction}; returns True, raises ConvError on failure."
    return run


class ConvertMap(Mapping):
    """MindFormers' `convert_map` / `reversed_convert_map`: every registered key → its converter. The
    declarations are imported on first use, so importing the root script stays cheap."""

    def __init__(self, reverse: bool):
        self.reverse = reverse

    def __getitem__(self, key: str) -> Callable[..., bool]:
        if key not in registry.load_models():
            raise KeyError(key)
        return converter(key, self.reverse)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.load_models())

    def __len__(self) -> int:
        return len(registry.load_models())
