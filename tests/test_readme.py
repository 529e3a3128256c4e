"""The README's "write your own norm plugin" example works as printed."""

import re
import types
from pathlib import Path

from normzoo import Registry
from normzoo.testing import check_norm

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_plugin_example_registers_and_conforms():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (source,) = [block for block in blocks if "normzoo_register_norms" in block]
    plugin = types.ModuleType("my_norms")
    exec(compile(source, "README.md", "exec"), plugin.__dict__)
    registry = Registry(entry_points=False)
    registry.register(plugin, name="my-norms")
    assert [norm.name for norm in registry.available()] == ["mean-only-bn"]
    check_norm("mean-only-bn", registry)
    check_norm("mean-only-bn", registry, options={"momentum": None}, num_features=8)


def test_the_example_package_ships_the_readme_plugin_as_printed():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (source,) = [block for block in blocks if "normzoo_register_norms" in block]
    package = README.parent / "examples" / "normzoo-mean-only-bn" / "normzoo_mean_only_bn.py"
    assert source.replace("# my_norms.py\n", "") in package.read_text()


def test_readme_error_examples_are_what_normzoo_prints():
    import pytest
    import torch

    import normzoo

    text = README.read_text()
    with pytest.raises(normzoo.OptionError) as raised:
        normzoo.build("groupnorm", 6, groups=4)
    assert f"OptionError: {raised.value}" in text
    with pytest.raises(normzoo.LayoutError) as raised:
        normzoo.build("batchnorm", 6, layout="seq")(torch.randn(4, 6, 9))
    assert f"LayoutError: {raised.value}" in text
