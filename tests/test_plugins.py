"""Third-party models register through the `mindformers_conv.models` entry-point group, touching nothing here.

The plugin is a real distribution on the path (a package plus its `.dist-info/entry_points.txt`), found by
`importlib.metadata` in a fresh interpreter, exactly as a `pip install`ed plugin would be.
"""

import os
import subprocess
import sys
import textwrap

import torch

from conftest import ROOT, assert_same_tensors, run_script, tensors_of, write_hf

PLUGIN = '''
"""A toy two-layer MLP family, declared outside mindformers-conv."""
from mindformers_conv.mapping import TRANSPOSE, ModelSpec, rename, transform
from mindformers_conv.registry import register

register(ModelSpec(
    key="toymlp",
    description="Toy MLP (plugin)",
    model_types=("toymlp",),
    rules=(
        transform("mlp.{i}.weight", "net.dense{i}.weight", TRANSPOSE),
        rename("mlp.{i}.bias", "net.dense{i}.bias"),
    ),
))
'''


def install_plugin(site) -> dict:
    """Write the plugin distribution under `site`; the environment that puts it on the path."""
    (site / "toymlp_plugin").mkdir(parents=True)
    (site / "toymlp_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "toymlp_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toymlp-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mindformers_conv.models]\ntoymlp = toymlp_plugin\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_plugin_key_converts_both_ways_and_is_listed(tmp_path):
    env = install_plugin(tmp_path / "site")
    gen = torch.Generator().manual_seed(0)
    state = {f"mlp.{i}.{p}": torch.randn((6, 4) if p == "weight" else (6,), generator=gen).to(torch.bfloat16)
             for i in range(2) for p in ("weight", "bias")}
    hf = write_hf(tmp_path / "hf", state, {"model_type": "toymlp", "torch_dtype": "bfloat16"})

    listed = run_script("--help", env=env)
    assert listed.code == 0 and "toymlp" in listed.out

    ckpt = tmp_path / "toy.ckpt"
    forward = run_script("--model", "auto", "--input_path", hf, "--output_path", ckpt, env=env)
    assert forward.code == 0, forward.err
    ms = tensors_of(ckpt)
    assert ms["net.dense0.weight"][:2] == ("BF16", (4, 6))  # transposed; no forward_dtype: source dtype kept
    assert ms["net.dense1.bias"][2].equal(tensors_of(hf)["mlp.1.bias"][2])

    back = tmp_path / "back"
    reverse = run_script("--model", "toymlp", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
                         "--config_path", hf, env=env)
    assert reverse.code == 0, reverse.err
    assert_same_tensors(tensors_of(back), tensors_of(hf))


def test_plugin_key_is_in_convert_map(tmp_path):
    env = {**os.environ, **install_plugin(tmp_path / "site")}
    code = "import convert_weight as c; print('toymlp' in c.convert_map and 'toymlp' in c.reversed_convert_map)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "True", proc.stderr
