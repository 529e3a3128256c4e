"""The registry: entry-point discovery, isolation of broken plugins, duplicates, lookups,
option conversion and in-process registration."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import normzoo
from normzoo import NormInfo, Option, Registry
from normzoo.testing import check_norm

from .conftest import GOOD_PLUGIN, install_fake_distribution


def identity_factory(num_features: int, layout: str, **options) -> nn.Module:
    return nn.Identity()


def make_info(name: str, **overrides) -> NormInfo:
    fields = dict(
        name=name, summary="test norm", layouts=("fc", "conv"), uses_batch_stats=False,
        factory=identity_factory, reference="tests",
    )  # fmt: skip
    fields.update(overrides)
    return NormInfo(**fields)


def loaded_registry() -> tuple[Registry, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry()
        registry.available()
    return registry, caught


# -- entry points ------------------------------------------------------------------------------


def test_bundled_plugins_load_through_the_entry_point_group():
    records = {record.name: record for record in normzoo.plugins()}
    assert records["batchnorm"].builtin and records["batchnorm"].error is None
    assert {"torch-batchnorm", "layernorm", "none"} <= set(records["torch-norms"].norms)


def test_third_party_distribution_is_discovered_and_conforms(fake_site):
    registry, _ = loaded_registry()
    names = [norm.name for norm in registry.available()]
    assert "third-party-scale" in names and "batchnorm" in names
    record = {r.name: r for r in registry.plugins()}["scale"]
    assert (record.distribution, record.version, record.builtin) == (
        "normzoo_scale",
        "1.2.3",
        False,
    )
    assert registry.info("third-party-scale").plugin == "scale"
    layer = registry.build("third-party-scale", 3, "fc", factor="2.5")
    torch.testing.assert_close(layer(torch.ones(2, 3)), torch.full((2, 3), 2.5))
    check_norm("third-party-scale", registry)


def test_a_plugin_that_raises_on_import_is_skipped_with_a_warning(fake_site):
    registry, caught = loaded_registry()
    messages = [str(w.message) for w in caught if issubclass(w.category, normzoo.PluginWarning)]
    assert any("'broken'" in m and "broken on purpose" in m for m in messages), messages
    broken = {r.name: r for r in registry.plugins()}["broken"]
    assert "RuntimeError: this plugin is broken on purpose" in broken.error
    assert {"batchnorm", "third-party-scale"} <= {n.name for n in registry.available()}


def test_strict_mode_makes_a_broken_plugin_fatal(fake_site, monkeypatch):
    monkeypatch.setenv("NORMZOO_STRICT_PLUGINS", "1")
    with pytest.raises(normzoo.PluginLoadError, match="'broken'.*broken on purpose"):
        Registry().available()


def test_builtin_only_skips_third_party_entry_points(fake_site, monkeypatch):
    monkeypatch.setenv("NORMZOO_BUILTIN_ONLY", "1")
    registry, caught = loaded_registry()
    assert not [w for w in caught if "broken" in str(w.message)]
    assert all(record.builtin for record in registry.plugins())
    assert "third-party-scale" not in {n.name for n in registry.available()}


def test_plugin_claiming_a_taken_name_fails_and_names_both_plugins(tmp_path, monkeypatch):
    clash = GOOD_PLUGIN.replace('name="third-party-scale"', 'name="batchnorm"')
    install_fake_distribution(tmp_path, "normzoo_clash", "normzoo_clash", clash, "clash")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry, caught = loaded_registry()
    error = {r.name: r for r in registry.plugins()}["clash"].error
    assert "'batchnorm'" in error and "plugin 'batchnorm'" in error and "plugin 'clash'" in error
    assert registry.info("batchnorm").plugin == "batchnorm"
    sys.modules.pop("normzoo_clash", None)


def test_invalid_declaration_is_isolated(tmp_path, monkeypatch):
    bad = GOOD_PLUGIN.replace('name="third-party-scale"', 'name="Bad Name"')
    install_fake_distribution(tmp_path, "normzoo_bad", "normzoo_bad", bad, "bad")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry, caught = loaded_registry()
    assert "invalid norm name 'Bad Name'" in {r.name: r for r in registry.plugins()}["bad"].error
    assert "batchnorm" in {n.name for n in registry.available()}
    sys.modules.pop("normzoo_bad", None)


def test_cli_lists_a_third_party_norm_and_survives_a_broken_one(fake_site):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(fake_site), os.environ.get("PYTHONPATH", "")])
    )
    listing = subprocess.run(
        [sys.executable, "-m", "normzoo", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "third-party-scale" in listing.stdout and "batchnorm" in listing.stdout
    assert "normzoo: warning: normzoo plugin 'broken' skipped" in listing.stderr
    plugins = subprocess.run(
        [sys.executable, "-m", "normzoo", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "scale (normzoo_scale 1.2.3): norms: third-party-scale" in plugins.stdout
    assert (
        "broken (normzoo_broken 1.2.3): FAILED: import of 'normzoo_broken' failed" in plugins.stdout
    )


# -- lookups and options -------------------------------------------------------------------------


def test_available_is_sorted_by_name():
    names = [norm.name for norm in normzoo.available()]
    assert names == sorted(names)


def test_unknown_norm_lists_valid_names_closest_first():
    with pytest.raises(normzoo.UnknownNormError) as raised:
        normzoo.build("batchnrom", 4)
    message = str(raised.value)
    assert message.startswith("unknown norm 'batchnrom'; valid norms: batchnorm, ")
    assert "layernorm" in message and "\n" not in message


def test_unknown_option_lists_valid_options_closest_first():
    with pytest.raises(
        normzoo.OptionError, match=r"unknown option 'momentm'; valid options: momentum, "
    ):
        normzoo.build("batchnorm", 4, momentm=0.5)


@pytest.mark.parametrize(
    "value, message",
    [
        ("fast", r"option 'momentum' of norm 'batchnorm' expects float, got 'fast'"),
        (True, r"expects float, got True \(bool\)"),
        (1.5, r"must be <= 1.0, got 1.5"),
        ([0.1], r"expects float, got \[0.1\] \(list\)"),
    ],
)
def test_bad_option_values_are_named(value, message):
    with pytest.raises(normzoo.OptionError, match=message):
        normzoo.build("batchnorm", 4, momentum=value)


def test_string_options_are_converted_by_declared_type():
    layer = normzoo.build("batchnorm", 4, layout="fc", momentum="0.25", eps="1e-3")
    assert (layer.momentum, layer.eps) == (0.25, 1e-3)
    flag = Option("flag", bool, False, "a flag")
    assert [flag.convert(text, "x") for text in ("yes", "0", "True")] == [True, False, True]
    assert Option("n", int, 1, "count").convert(2, "x") == 2
    with pytest.raises(normzoo.OptionError, match="expects int, got 2.5"):
        Option("n", int, 1, "count").convert(2.5, "x")


def test_unsupported_layout_names_the_supported_ones():
    with normzoo.register(make_info("conv-only", layouts=("conv",))):
        with pytest.raises(
            normzoo.LayoutError, match="does not support layout 'fc'; supported: conv"
        ):
            normzoo.build("conv-only", 4, layout="fc")
    with pytest.raises(normzoo.LayoutError, match="unknown layout 'cnov'; valid layouts: conv, "):
        normzoo.build("batchnorm", 4, layout="cnov")


def test_num_features_must_be_positive():
    with pytest.raises(normzoo.NormzooError, match="positive int, got 0"):
        normzoo.build("batchnorm", 0)


# -- in-process registration -------------------------------------------------------------------


def test_register_and_undo():
    registration = normzoo.register(make_info("session-norm"), name="notebook")
    assert normzoo.info("session-norm").plugin == "notebook"
    assert "notebook" in {r.name for r in normzoo.plugins()}
    registration.undo()
    registration.undo()
    with pytest.raises(normzoo.UnknownNormError):
        normzoo.info("session-norm")


def test_register_a_plugin_object():
    class Plugin:
        @normzoo.hookimpl
        def normzoo_register_norms(self, register):
            register(make_info("object-norm-a"))
            register(make_info("object-norm-b"))

    with normzoo.register(Plugin()):
        assert {"object-norm-a", "object-norm-b"} <= {n.name for n in normzoo.available()}
    assert "object-norm-a" not in {n.name for n in normzoo.available()}


def test_register_rejects_duplicates_naming_both_plugins():
    with pytest.raises(
        normzoo.DuplicateNormError, match="both plugin 'batchnorm' and plugin 'mine'"
    ):
        normzoo.register(make_info("batchnorm"), name="mine")
    assert normzoo.info("batchnorm").plugin == "batchnorm"


def test_a_failing_registration_leaves_nothing_behind():
    with pytest.raises(normzoo.DeclarationError, match="layouts"):
        normzoo.register(
            make_info("fine-one"), make_info("bad-one", layouts=("3d",)), name="partial"
        )
    assert "fine-one" not in {n.name for n in normzoo.available()}
    assert "partial" not in {r.name for r in normzoo.plugins()}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "Bad_Name"}, "invalid norm name 'Bad_Name'"),
        ({"summary": ""}, "one-line summary"),
        ({"layouts": ()}, "layouts"),
        ({"factory": 3}, "not callable"),
        ({"options": (Option("eps", float, -1.0, "eps", minimum=0.0),)}, "invalid default"),
        ({"options": (Option("eps", complex, 1.0, "eps"),)}, "use int, float, bool or str"),
    ],
)
def test_invalid_declarations_are_rejected(overrides, message):
    with pytest.raises(normzoo.DeclarationError, match=message):
        name = overrides.pop("name", "some-norm")
        Registry(entry_points=False).register(make_info(name, **overrides))


def test_isolated_registry_starts_empty():
    registry = Registry(entry_points=False)
    assert registry.available() == []
    with registry.register(make_info("only-one")):
        assert [n.name for n in registry.available()] == ["only-one"]
    assert not Path("nonexistent").exists()
