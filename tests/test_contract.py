"""The contract every registered model key passes, automatically: plan, forward, verify, reverse, bytes.

Each family's test module registers how to build its tiny input with `@example(key, ...)` (conftest); a
key without one is reported here. A variant (yi, deepseek, …) is checked on its family's example.
"""

import importlib
from pathlib import Path

import pytest

from conftest import EXAMPLES, assert_same_tensors, tensors_of
from mindformers_conv.convert import Options, convert
from mindformers_conv.registry import load_models

for test_module in sorted(Path(__file__).parent.glob("test_*.py")):  # their @example registrations
    if test_module.stem != "test_contract":
        importlib.import_module(test_module.stem)

MODELS = load_models()


def example_for(key: str):
    spec = MODELS[key]
    return EXAMPLES.get(key) or EXAMPLES.get(spec.family)


def test_every_registered_key_has_an_example():
    assert sorted(k for k in MODELS if example_for(k) is None) == []


@pytest.mark.parametrize("key", sorted(k for k in MODELS if example_for(k)))
def test_forward_then_reverse_gives_back_every_input_byte(cli, key, tmp_path):
    hf, flags = example_for(key)(tmp_path / "hf", key)
    ckpt, back = tmp_path / "out.ckpt", tmp_path / "back"

    planned = cli("--model", key, "--input_path", hf, "--output_path", ckpt, "--dry-run", *flags)
    assert planned.code == 0 and not ckpt.exists(), planned.err

    forward = convert(MODELS[key], str(hf), str(ckpt), reverse=False, options=Options(progress=False, verify=True))
    assert forward.verified, "--verify compared nothing"
    dropped = {name for names in forward.plan.dropped.values() for name in names}

    folder = hf if hf.is_dir() else hf.parent
    config = ("--config_path", folder) if (folder / "config.json").is_file() else ()
    reverse = cli("--model", key, "--reversed", "--input_path", ckpt, "--output_path", f"{back}/", *config, *flags)
    assert reverse.code == 0, reverse.err
    original = {n: t for n, t in tensors_of(hf).items() if n not in dropped}
    assert_same_tensors(tensors_of(back), original)
