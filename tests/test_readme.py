"""README promises that must stay true as the code changes."""

import re

from conftest import ROOT
from mindformers_conv.registry import load_models


def readme_keys_table() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- keys:start -->")[1].split("<!-- keys:end -->")[0]
    return [line.strip() for line in table.strip().splitlines()[2:]]


def registry_table() -> list[str]:
    rows = []
    for key, spec in sorted(load_models().items()):
        same = f"`{spec.family}`" if spec.family else ""
        rows.append(f"| `{key}` | {spec.description} | {same} |")
    return rows


def test_readme_supported_keys_table_equals_registry():
    assert readme_keys_table() == registry_table()


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"^make demo\b", text, re.M) and re.search(r"^make test\b", text, re.M)


def rewrite_readme_keys_table() -> None:
    """`python tests/test_readme.py` regenerates the keys table from the registry."""
    path = ROOT / "README.md"
    text = path.read_text()
    head, rest = text.split("<!-- keys:start -->")
    table, tail = rest.split("<!-- keys:end -->")
    header = "\n".join(table.strip().splitlines()[:2])
    rows = "\n".join(registry_table())
    path.write_text(f"{head}<!-- keys:start -->\n{header}\n{rows}\n<!-- keys:end -->{tail}")


if __name__ == "__main__":
    rewrite_readme_keys_table()
