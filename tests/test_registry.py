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

from .conftest import GOOD_PLUGIN, install_fake_distribution, lenet


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


def test_registering_a_norm_twice_in_process_says_how_to_undo_the_first():
    # a notebook cell run twice
    with normzoo.register(make_info("cell-norm"), name="first-run"):
        with pytest.raises(normzoo.DuplicateNormError) as raised:
            normzoo.register(make_info("cell-norm"), name="second-run")
        message = str(raised.value)
        assert "call .undo() on the registration it returned" in message
        assert "unregister('first-run')" in message and "uninstall" not in message


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


# -- plugin diagnostics --------------------------------------------------------------------------

MISSPELLED_HOOK = GOOD_PLUGIN.replace(
    "def normzoo_register_norms(register):", "def normzoo_register_norm(register):"
)
UNDECORATED_HOOK = GOOD_PLUGIN.replace("    @normzoo.hookimpl\n", "")
EXITS_AT_IMPORT = """
    raise SystemExit("this plugin exits on import")
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install fake third-party distributions on sys.path: ``third_party(dist, source, entry)``."""
    installed: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(dist: str, source: str, entry: str, module: str | None = None) -> None:
        module = module or dist
        install_fake_distribution(tmp_path / dist, dist, module, source, entry)
        monkeypatch.syspath_prepend(str(tmp_path / dist))
        installed.append(module)

    yield install
    for module in installed:
        sys.modules.pop(module, None)


def record_of(registry: Registry, name: str):
    return {record.name: record for record in registry.plugins()}[name]


def test_a_misspelled_hook_is_reported_as_a_failure_with_the_reason(third_party):
    third_party("normzoo_typo", MISSPELLED_HOOK, "typo")
    registry, caught = loaded_registry()
    record = record_of(registry, "typo")
    assert record.failed and record.norms == []
    assert "unknown hook 'normzoo_register_norm'" in record.error
    assert "normzoo_register_norms" in record.error
    assert "third-party-scale" not in {norm.name for norm in registry.available()}
    assert any("'typo' skipped" in str(w.message) for w in caught)


def test_a_plugin_that_registers_no_norm_is_a_failure(third_party):
    third_party("normzoo_plain", UNDECORATED_HOOK, "plain")
    registry, _ = loaded_registry()
    assert "registers no norm" in record_of(registry, "plain").error
    assert "@normzoo.hookimpl" in record_of(registry, "plain").error


def test_a_plugin_calling_systemexit_at_import_takes_nothing_down(third_party):
    third_party("normzoo_exits", EXITS_AT_IMPORT, "exits")
    registry, _ = loaded_registry()
    assert "SystemExit: this plugin exits on import" in record_of(registry, "exits").error
    assert "batchnorm" in {norm.name for norm in registry.available()}


def test_a_failed_plugin_keeps_its_exception_and_traceback_and_the_warning_points_at_it(
    fake_site,
):
    registry, caught = loaded_registry()
    record = record_of(registry, "broken")
    assert isinstance(record.exception, RuntimeError)
    plugin_file = str(fake_site / "normzoo_broken.py")
    assert "Traceback (most recent call last)" in record.traceback
    assert plugin_file in record.traceback and "broken on purpose" in record.traceback
    (warning,) = [w for w in caught if "'broken'" in str(w.message)]
    assert warning.filename == plugin_file and warning.lineno == 2


def test_two_distributions_with_one_entry_point_name_are_both_named(third_party):
    third_party("normzoo_first", GOOD_PLUGIN, "same-name")
    other = GOOD_PLUGIN.replace('name="third-party-scale"', 'name="other-scale"')
    third_party("normzoo_second", other, "same-name")
    registry, _ = loaded_registry()
    failed = [record for record in registry.plugins() if record.failed]
    assert len(failed) == 1
    assert "'same-name'" in failed[0].error
    assert "normzoo_first" in failed[0].error and "normzoo_second" in failed[0].error
    assert "third-party-scale" in {norm.name for norm in registry.available()}


def test_a_third_party_entry_point_named_like_a_bundled_one_is_rejected(third_party):
    third_party("normzoo_imposter", GOOD_PLUGIN, "batchnorm")
    registry, _ = loaded_registry()
    record = record_of(registry, "batchnorm (normzoo_imposter)")
    assert "already taken by distribution 'normzoo'" in record.error
    assert record_of(registry, "batchnorm").builtin and record_of(registry, "batchnorm").norms


def test_a_strict_mode_failure_stays_a_failure_on_every_later_call(fake_site, monkeypatch):
    monkeypatch.setenv("NORMZOO_STRICT_PLUGINS", "1")
    registry = Registry()
    for call in (registry.available, registry.plugins, lambda: registry.info("batchnorm")):
        with pytest.raises(normzoo.PluginLoadError, match="broken on purpose"):
            call()


@pytest.mark.parametrize(
    "word, strict", [("false", False), ("0", False), ("", False), ("on", True)]
)
def test_strict_switch_reads_words(fake_site, monkeypatch, word, strict):
    monkeypatch.setenv("NORMZOO_STRICT_PLUGINS", word)
    if strict:
        with pytest.raises(normzoo.PluginLoadError):
            Registry().available()
    else:
        loaded_registry()


def test_a_switch_that_is_not_a_word_for_on_or_off_is_an_error(monkeypatch):
    monkeypatch.setenv("NORMZOO_BUILTIN_ONLY", "maybe")
    with pytest.raises(normzoo.NormzooError, match="NORMZOO_BUILTIN_ONLY='maybe'.*1/true"):
        Registry().available()


def test_normzoo_disable_skips_the_named_plugins(fake_site, monkeypatch):
    monkeypatch.setenv("NORMZOO_DISABLE", "broken, scale")
    registry, caught = loaded_registry()
    assert not [w for w in caught if issubclass(w.category, normzoo.PluginWarning)]
    assert record_of(registry, "broken").disabled and record_of(registry, "scale").disabled
    with pytest.raises(normzoo.UnknownNormError, match="NORMZOO_DISABLE skips 'broken', 'scale'"):
        registry.info("third-party-scale")


def test_an_unknown_norm_mentions_failed_plugins_and_builtin_only(fake_site, monkeypatch):
    registry, _ = loaded_registry()
    with pytest.raises(normzoo.UnknownNormError, match="plugin.*'broken' failed to load"):
        registry.info("broken-norm")
    monkeypatch.setenv("NORMZOO_BUILTIN_ONLY", "1")
    registry, _ = loaded_registry()
    with pytest.raises(normzoo.UnknownNormError, match="NORMZOO_BUILTIN_ONLY is set"):
        registry.info("third-party-scale")


# -- validated builds ----------------------------------------------------------------------------


def test_a_factory_that_raises_is_wrapped_naming_the_norm_with_the_cause():
    def factory(num_features, layout):
        raise ZeroDivisionError("plugin bug")

    with normzoo.register(make_info("raises", factory=factory), name="buggy"):
        with pytest.raises(normzoo.NormBuildError) as raised:
            normzoo.build("raises", 4, layout="fc")
    message = str(raised.value)
    assert "norm 'raises' (plugin 'buggy') failed to build" in message
    assert "ZeroDivisionError: plugin bug" in message and "\n" not in message
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_a_factory_that_returns_no_module_is_rejected_at_build():
    with normzoo.register(make_info("not-a-module", factory=lambda n, layout: "a string")):
        with pytest.raises(normzoo.NormBuildError, match="returned str, not a torch.nn.Module"):
            normzoo.build("not-a-module", 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"options": (Option("layout", str, "fc", "clash"),)}, "option 'layout'.*rename"),
        ({"options": (Option("num_features", int, 1, "clash"),)}, "option 'num_features'"),
        (
            {"factory": lambda num_features, layout: None,
             "options": (Option("scale", float, 1.0, "scale"),)},
            "cannot be called as factory\\(num_features, layout, scale",
        ),
        ({"layouts": ("conv", "2d")}, "layouts"),
        ({"layouts": "conv"}, "layouts"),
        ({"check": "not callable"}, "check that is not callable"),
    ],
)  # fmt: skip
def test_declarations_that_cannot_build_are_rejected_at_registration(overrides, message):
    with pytest.raises(normzoo.DeclarationError, match=message):
        Registry(entry_points=False).register(make_info("some-norm", **overrides))


def test_the_check_runs_before_the_factory_with_resolved_options():
    calls = []

    def check(options, num_features):
        calls.append((dict(options), num_features))
        if num_features % options["groups"]:
            raise normzoo.OptionError(f"groups={options['groups']} does not divide {num_features}")

    def factory(num_features, layout, groups):
        calls.append("factory")
        return nn.Identity()

    info = make_info(
        "checked", factory=factory, check=check, options=(Option("groups", int, 2, "groups"),)
    )
    with normzoo.register(info):
        with pytest.raises(normzoo.OptionError, match="groups=4 does not divide 6"):
            normzoo.build("checked", 6, groups="4")
        assert calls == [({"groups": 4}, 6)]
        normzoo.build("checked", 8, groups=4)
        assert calls[-1] == "factory"


def test_a_check_with_a_bug_is_a_build_error_not_a_traceback():
    info = make_info("bad-check", check=lambda options, n: options["missing"])
    with normzoo.register(info):
        with pytest.raises(normzoo.NormBuildError, match="option check of norm 'bad-check' raised"):
            normzoo.build("bad-check", 4)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"momentum": float("nan")}, "'momentum' of norm 'batchnorm' must be a finite number"),
        ({"eps": float("inf")}, "'eps' of norm 'batchnorm' must be a finite number"),
        ({"eps": "inf"}, "must be a finite number"),
        ({"eps": 0.0}, "'eps' of norm 'batchnorm' must be > 0.0, got 0.0"),
    ],
)
def test_non_finite_and_zero_eps_values_are_rejected(options, message):
    with pytest.raises(normzoo.OptionError, match=message):
        normzoo.build("batchnorm", 4, **options)


def test_torch_batchnorm_rejects_eps_zero_before_torch_does():
    with pytest.raises(normzoo.OptionError, match="'eps' of norm 'torch-batchnorm' must be > 0"):
        normzoo.build("torch-batchnorm", 4, eps="0")


def test_numpy_scalars_are_accepted_as_option_values():
    np = pytest.importorskip("numpy")
    layer = normzoo.build("zca", np.int64(6), group_size=np.int64(3), momentum=np.float32(0.25))
    assert (layer.group_size, layer.momentum) == (3, 0.25)
    assert type(layer.group_size) is int and type(layer.momentum) is float
    assert normzoo.build("batchnorm", 4, affine=np.bool_(False)).affine is False
    with pytest.raises(normzoo.OptionError, match="expects int"):
        normzoo.build("zca", 6, group_size=np.float64(2.5))


def test_groupnorm_with_groups_that_do_not_divide_is_one_cli_line(capsys, tmp_path):
    from normzoo.cli import main

    status = main(
        ["run", "--norm", "groupnorm", "--norm-opt", "groups=4", "--epochs", "1",
         "--train-subset", "512", "--test-subset", "256", "--runs-dir", str(tmp_path)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert err.count("\n") == 0 and "groups" in err and "must divide" in err
    assert list(tmp_path.iterdir()) == []  # no run directory for a run that cannot start


def test_a_plugin_package_that_exits_in_its_init_is_isolated_without_a_second_import(
    tmp_path, monkeypatch
):
    """The entry point names a module inside a package whose ``__init__`` exits: the import
    fails once, is recorded, and nothing re-imports it (which would exit outside the guard)."""
    package = tmp_path / "exiting_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise SystemExit(3)\n")
    (package / "plugin.py").write_text("")
    info = tmp_path / "exiting_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exiting_pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[normzoo]\nexiting = exiting_pkg.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry, caught = loaded_registry()
        assert "SystemExit: 3" in record_of(registry, "exiting").error
        (warning,) = [w for w in caught if "'exiting'" in str(w.message)]
        assert warning.filename == str(package / "__init__.py")
        assert "batchnorm" in {norm.name for norm in registry.available()}
    finally:
        sys.modules.pop("exiting_pkg", None)


def test_normzoo_disable_takes_the_names_normzoo_plugins_lists(third_party, monkeypatch):
    third_party("normzoo_first", GOOD_PLUGIN, "same-name")
    other = GOOD_PLUGIN.replace('name="third-party-scale"', 'name="other-scale"')
    third_party("normzoo_second", other, "same-name")
    monkeypatch.setenv("NORMZOO_DISABLE", "same-name (normzoo_second)")
    registry, caught = loaded_registry()
    assert record_of(registry, "same-name (normzoo_second)").disabled
    assert not [record for record in registry.plugins() if record.failed]
    assert not [w for w in caught if issubclass(w.category, normzoo.PluginWarning)]


def test_a_disabled_bundled_plugin_leaves_its_entry_point_name_free(third_party, monkeypatch):
    renamed = GOOD_PLUGIN.replace('name="third-party-scale"', 'name="replacement-norm"')
    third_party("normzoo_replacement", renamed, "pit")
    monkeypatch.setenv("NORMZOO_DISABLE", "pit")
    registry, _ = loaded_registry()
    assert "pit" not in {norm.name for norm in registry.available()}
    assert all(record.disabled for record in registry.plugins() if record.name == "pit")


def test_a_misspelled_name_in_normzoo_disable_is_warned_of_with_the_closest(monkeypatch):
    monkeypatch.setenv("NORMZOO_DISABLE", "whitning, pit")
    registry, caught = loaded_registry()
    (warning,) = [w for w in caught if "NORMZOO_DISABLE" in str(w.message)]
    assert str(warning.message).startswith(
        "NORMZOO_DISABLE: unknown plugin 'whitning'; valid plugins: whitening"
    )
    assert "pit" not in {norm.name for norm in registry.available()}  # the real name still works


def test_reserved_names_passed_as_options_are_one_line():
    with pytest.raises(normzoo.OptionError, match="'layout' is not an option but an argument"):
        normzoo.info("batchnorm").resolve_options({"layout": "seq"})
    with pytest.raises(normzoo.OptionError, match="'num_features' is not an option"):
        lenet("batchnorm", {"num_features": "3"})


def test_the_cli_warning_about_a_skipped_plugin_names_its_file(fake_site, capsys):
    from normzoo import cli

    cli._show_warning("normzoo plugin 'x' skipped", normzoo.PluginWarning, "/p/x.py", 7)
    assert capsys.readouterr().err.strip().endswith("(/p/x.py:7)")


# -- one default per option, one plugin-author API ----------------------------------------------


def test_a_factory_default_that_disagrees_with_its_option_is_refused_naming_both():
    def factory(num_features: int, layout: str, momentum: float = 0.5) -> nn.Module:
        return nn.Identity()

    declared = make_info("two-defaults", factory=factory, options=(normzoo.MOMENTUM,))
    with pytest.raises(normzoo.DeclarationError) as raised:
        Registry(entry_points=False).register(declared)
    message = str(raised.value)
    assert "'two-defaults'" in message and "'momentum'" in message
    assert "0.1" in message and "0.5" in message


def test_a_factory_default_equal_to_its_option_or_none_at_all_is_accepted():
    def same(num_features: int, layout: str, momentum: float | None = 0.1) -> nn.Module:
        return nn.Identity()

    def none(num_features: int, layout: str, momentum: float | None) -> nn.Module:
        return nn.Identity()

    registry = Registry(entry_points=False)
    for name, factory in (("same-default", same), ("no-default", none)):
        registry.register(make_info(name, factory=factory, options=(normzoo.MOMENTUM,)))
        assert isinstance(registry.build(name, 3, "fc"), nn.Identity)


def test_no_bundled_factory_keeps_a_second_copy_of_an_option_default():
    """Bundled factories take their options without defaults, or with the Option's own default
    object (``AffineNorm``'s ``eps = EPS.default``): the Option holds the only copy."""
    import inspect

    for norm in normzoo.available():
        if norm.plugin not in {"batchnorm", "torch-norms", "whitening", "pit"}:
            continue
        parameters = inspect.signature(norm.factory).parameters
        for option in norm.options:
            default = parameters[option.name].default
            assert default is inspect.Parameter.empty or default is option.default, norm.name


def test_the_plugin_author_api_is_the_package_root():
    from normzoo import (  # noqa: F401
        AFFINE,
        EPS,
        LAYOUTS,
        MOMENTUM,
        SYNC,
        AffineNorm,
        BatchSizeError,
        LayoutError,
        NormBase,
        NormInfo,
        Option,
        OptionError,
        Slot,
        WorkloadInfo,
        check_batch_size,
        check_input,
        hookimpl,
    )

    assert issubclass(NormBase, AffineNorm)
    assert all(isinstance(layout, normzoo.Layout) for layout in LAYOUTS.values())
    assert not hasattr(normzoo.interface, "LAYOUTS")  # one LAYOUTS, not a second with one name


def test_the_example_plugin_imports_nothing_of_normzoo_but_the_package_root():
    import ast

    source = Path(__file__).resolve().parents[1] / "examples/normzoo-mean-only-bn"
    tree = ast.parse((source / "normzoo_mean_only_bn.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name for name in imported if name.startswith("normzoo")} == {"normzoo"}
