"""Shared fixtures: a fake third-party distribution installed on sys.path for real, and a
compared page of two variants for the compare tests."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest


def install_fake_distribution(
    root: Path, dist: str, module: str, source: str, entry_name: str
) -> Path:
    """Write ``module.py`` and a ``dist-info`` declaring it in the ``normzoo`` group under
    ``root``, exactly what ``pip install`` of a third-party plugin leaves behind."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[normzoo]\n{entry_name} = {module}\n")
    return root


GOOD_PLUGIN = '''
    import torch
    from torch import nn
    import normzoo
    from normzoo.interface import check_input

    class Scale(nn.Module):
        """Multiplies by a learnable per-channel factor; no statistics."""

        def __init__(self, num_features, layout, factor):
            super().__init__()
            self.num_features, self.layout = num_features, layout
            shape = normzoo.get_layout(layout).channel_shape(num_features)
            self.scale = nn.Parameter(torch.full(shape, factor))

        def forward(self, x):
            check_input(x, self.num_features, self.layout, "third-party-scale")
            return x * self.scale

    @normzoo.hookimpl
    def normzoo_register_norms(register):
        register(normzoo.NormInfo(
            name="third-party-scale", summary="a third party's per-channel scale",
            layouts=("fc", "conv"), uses_batch_stats=False, factory=Scale,
            options=(normzoo.Option("factor", float, 1.0, "initial scale"),),
            reference="tests",
        ))
'''

BROKEN_PLUGIN = """
    raise RuntimeError("this plugin is broken on purpose")
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A site directory on sys.path holding a good and a broken third-party plugin."""
    site = tmp_path / "site"
    install_fake_distribution(site, "normzoo_scale", "normzoo_scale", GOOD_PLUGIN, "scale")
    install_fake_distribution(site, "normzoo_broken", "normzoo_broken", BROKEN_PLUGIN, "broken")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in ("normzoo_scale", "normzoo_broken"):
        sys.modules.pop(module, None)


def lenet(norm: str = "batchnorm", norm_options: dict | None = None, **settings):
    """The book's LeNet with ``norm`` in its slots, built as the harness builds it."""
    from normzoo.workloads.slots import ModelSettings, build_model

    return build_model(ModelSettings(norm=norm, norm_options=norm_options or {}, **settings))


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """A page of two variants, one seed each, compared once per module: its results stored,
    its section and plots written, and ``--check`` finding nothing wrong."""
    from normzoo.compare import check, compare

    from .pages import QUIET, TWO_ARMS, write_page

    directory = tmp_path_factory.mktemp("compared")
    assert compare([write_page(directory, TWO_ARMS)], QUIET) == 0
    assert check([directory / "page.md"]) == []
    return directory


@pytest.fixture()
def page(compared, tmp_path) -> Path:
    """A fresh copy of the compared page, its results and plots."""
    shutil.copytree(compared, tmp_path / "copy")
    return tmp_path / "copy" / "page.md"


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Every test starts with Python's own SIGINT and SIGTERM handling, and a test that leaves
    another behind fails. The suite run as a shell's background job (`bash .ci/run &`) starts
    with SIGINT ignored, which the interrupt tests' child processes would inherit; and a
    handler left over would change what the next test's interrupts do."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    left = {
        signal.Signals(number).name: handler
        for number, default in (
            (signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)
        )
        if (handler := signal.getsignal(number)) is not default
    }  # fmt: skip
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert not left, f"the test left signal handlers behind: {left}"
