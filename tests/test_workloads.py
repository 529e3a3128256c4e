"""Workloads: registered like norms, isolated like norms, trained by `run` and `compare`, and
the run configuration's groups that the cache key, the pages and the command line derive from."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
from torch import nn

import normzoo
from normzoo.cli import build_parser, main
from normzoo.compare import CompareConfig, compare
from normzoo.compare.cache import resolved_config, run_key
from normzoo.compare.page import SETTINGS
from normzoo.harness.config import (
    COMPUTED_FIELDS,
    RESOURCE_FIELDS,
    WORKLOAD_SETTINGS,
    RunConfig,
)
from normzoo.testing import check_workload, fitting_norms
from normzoo.workloads.data import load_fashion_mnist
from normzoo.workloads.slots import ModelSettings, build_model, norm_modules

from .conftest import install_fake_distribution

SMALL = ["--epochs", "1", "--train-subset", "512", "--test-subset", "128", "--precise-stats",
         "2", "--no-progress"]  # fmt: skip


def tiny_model(slots) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), *slots.block("hidden", nn.Linear(28 * 28, 8)), nn.Linear(8, 10)
    )


TINY = normzoo.WorkloadInfo(
    name="tiny",
    summary="one hidden fc layer of 8 units on Fashion-MNIST",
    slots=(normzoo.Slot("hidden", 8, "fc"),),
    factory=tiny_model,
    data=load_fashion_mnist,
    reference="tests",
)


def test_the_bundled_workloads_come_through_the_entry_point_group():
    assert [w.name for w in normzoo.available_workloads()][:2] == ["lenet", "mlp"]
    records = {record.name: record for record in normzoo.plugins()}
    assert records["lenet"].workloads == ["lenet"] and records["lenet"].builtin
    assert records["mlp"].workloads == ["mlp"] and records["mlp"].norms == []


@pytest.mark.parametrize("workload", ["lenet", "mlp"])
def test_every_norm_that_fits_a_bundled_workload_builds_trains_a_step_and_evaluates(workload):
    norms = fitting_norms(workload)
    assert {"batchnorm", "zca", "iternorm", "pit", "layernorm"} <= set(norms)
    assert ("instancenorm" in norms) is False  # no fc layout: fits neither workload
    check_workload(workload)


def test_lenet_is_the_books_model_with_its_state_dict_keys():
    model = build_model(ModelSettings())
    assert [name for name, _ in norm_modules(model)] == ["1", "5", "10", "13"]
    widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
              for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    assert widths == [6, 16, 120, 84, 10]
    assert [slot.channels for slot in normzoo.workload("lenet").slots] == [6, 16, 120, 84]
    assert "0.weight" in model.state_dict() and "15.bias" in model.state_dict()


def test_the_mlp_has_four_hidden_layers_of_256_each_followed_by_a_norm():
    model = build_model(ModelSettings(workload="mlp", norm="zca"))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 256), (256, 256), (256, 256), (256, 256), (256, 10)
    ]  # fmt: skip
    norms = [module for _, module in norm_modules(model)]
    assert len(norms) == 4 and all(n.layout == "fc" and n.num_features == 256 for n in norms)


def test_run_trains_the_mlp_and_records_its_workload(tmp_path, capsys):
    argv = ["run", "--workload", "mlp", "--norm", "zca", *SMALL, "--train-subset", "4096",
            "--lr", "0.1", "--runs-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (directory,) = tmp_path.iterdir()
    record = json.loads((directory / "config.json").read_text())
    assert record["config"]["workload"] == "mlp" and record["workload_version"] == "1"
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"][0]["test_acc"] > 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workload", "mpl"], "unknown workload 'mpl'; valid workloads: mlp, lenet"),
        (["--workload", "mlp", "--placement", "conv"], "(workload 'mlp' has fc slots)"),
        (["--workload", "mlp", "--norm", "instancenorm"], "does not support layout 'fc'"),
    ],
)
def test_a_bad_workload_setting_is_one_line(argv, message, tmp_path, capsys):
    assert main(["run", *argv, *SMALL, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_third_party_workload_trains_through_run_and_compare(tmp_path, capsys):
    page = tmp_path / "tiny.md"
    page.write_text(
        '# tiny\n\n```normzoo\nseeds = 1\nbaseline = "batchnorm"\nresults = "results"\n\n'
        '[base]\nworkload = "tiny"\nepochs = 1\ntrain_subset = 512\ntest_subset = 128\n'
        'precise_stats = 2\n\n[[variant]]\nlabel = "batchnorm"\nnorm = "batchnorm"\n\n'
        '[[variant]]\nlabel = "layernorm"\nnorm = "layernorm"\n```\n\n'
        "<!-- normzoo:results:begin -->\n<!-- normzoo:results:end -->\n"
    )
    with normzoo.register(TINY, name="tiny-workloads"):
        check_workload("tiny", norms=["batchnorm", "layernorm"])
        runs = tmp_path / "runs"
        assert main(["run", "--workload", "tiny", *SMALL, "--runs-dir", str(runs)]) == 0
        (directory,) = runs.iterdir()
        assert json.loads((directory / "config.json").read_text())["config"]["workload"] == "tiny"
        assert compare([page], CompareConfig(progress=False), say=lambda line: None) == 0
        stored = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
        assert sorted(r["config"]["norm"] for r in stored) == ["batchnorm", "layernorm"]
        assert all(r["config"]["workload"] == "tiny" for r in stored)
        assert "| layernorm |" in page.read_text()
    with pytest.raises(normzoo.UnknownWorkloadError):
        normzoo.workload("tiny")


BROKEN_WORKLOAD = """
    import normzoo
    from torch import nn

    @normzoo.hookimpl
    def normzoo_register_workloads(register):
        register(normzoo.WorkloadInfo(
            name="twice", summary="declares one slot twice", factory=lambda slots: nn.Identity(),
            slots=(normzoo.Slot("a", 4, "fc"), normzoo.Slot("a", 4, "fc")),
            data=lambda data_dir, download: None,
        ))
"""
RAISING_WORKLOAD = """
    import normzoo

    @normzoo.hookimpl
    def normzoo_register_workloads(register):
        raise RuntimeError("the workload hook fails on purpose")
"""


def test_a_broken_workload_plugin_is_isolated_like_a_broken_norm_plugin(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, "nz_twice", "nz_twice", BROKEN_WORKLOAD, "twice")
    install_fake_distribution(tmp_path, "nz_raises", "nz_raises", RAISING_WORKLOAD, "raises")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registry = normzoo.Registry()
            names = [workload.name for workload in registry.workloads()]
        records = {record.name: record for record in registry.plugins()}
        assert "declares slot 'a' twice" in records["twice"].error
        assert "the workload hook fails on purpose" in records["raises"].error
        assert {"lenet", "mlp"} <= set(names) and "twice" not in names
        assert "batchnorm" in {norm.name for norm in registry.available()}
        skipped = [str(w.message) for w in caught if issubclass(w.category, normzoo.PluginWarning)]
        assert any("'raises' skipped" in text for text in skipped), skipped
        with pytest.raises(normzoo.UnknownWorkloadError, match="'raises'.* failed to load"):
            registry.workload("twice")
    finally:
        for module in ("nz_twice", "nz_raises"):
            sys.modules.pop(module, None)


# -- one run configuration ---------------------------------------------------------------------


def test_the_default_workload_keeps_every_stored_key_and_another_changes_it():
    default = run_key(resolved_config(RunConfig()))
    assert run_key(resolved_config(RunConfig(workload="lenet"))) == default
    assert run_key(resolved_config(RunConfig(workload="mlp"))) != default


def test_where_a_run_happens_is_no_part_of_its_key():
    key = run_key(resolved_config(RunConfig(norm="zca")))
    moved = RunConfig(norm="zca", device="cpu", nproc=2, runs_dir="elsewhere", compile=True)
    assert run_key(resolved_config(moved)) == key
    assert set(RESOURCE_FIELDS).isdisjoint(resolved_config(moved))


def test_the_pages_and_the_command_line_derive_their_fields_from_the_run_configuration():
    # a page sets what a run computes but the seed (its seeds) and the validation split (its
    # [tune]), and takes the re-estimation's older spelling, in batches
    assert set(SETTINGS) == set(COMPUTED_FIELDS) - {"seed", "val_split"} | {"precise_stats"}
    assert set(COMPUTED_FIELDS) | set(RESOURCE_FIELDS) == {f.name for f in fields(RunConfig)}
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    destinations = {action.dest: action for action in run._actions}
    for spec in fields(RunConfig):
        assert spec.name in destinations, spec.name
        default = destinations[spec.name].default
        if spec.name in WORKLOAD_SETTINGS:  # not given: the workload's or the field's default
            assert default == argparse.SUPPRESS, spec.name
        else:
            assert default == getattr(RunConfig(), spec.name) or spec.name == "norm_options"
    assert destinations["activation"].choices == ("sigmoid", "relu")


def test_option_bounds_come_from_the_configuration_in_the_cli_and_in_python(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--train-subset", "1", "--runs-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "--train-subset: expected an integer >= 2, got '1'" in capsys.readouterr().err
    with pytest.raises(normzoo.NormzooError, match="train_subset must be >= 2, got 1"):
        RunConfig(train_subset=1).validate()


def test_a_workload_factory_that_skips_a_slot_is_named():
    def skips(slots) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    broken = normzoo.WorkloadInfo(
        name="skips", summary="never fills its slot", slots=(normzoo.Slot("hidden", 8, "fc"),),
        factory=skips, data=load_fashion_mnist,
    )  # fmt: skip
    with normzoo.register(broken):
        with pytest.raises(normzoo.NormzooError, match="slot.*hidden.*never filled"):
            build_model(ModelSettings(workload="skips"))


def test_the_writing_a_workload_page_example_runs_as_printed():
    import re
    import types

    page = Path(__file__).resolve().parents[1] / "docs" / "writing-a-workload.md"
    plugin_source, test_source = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)[:2]
    plugin = types.ModuleType("my_workloads")
    exec(compile(plugin_source, str(page), "exec"), plugin.__dict__)
    tests: dict = {}
    exec(compile(test_source, str(page), "exec"), tests)
    with normzoo.register(plugin, name="my-workloads"):
        (name,) = [w.name for w in normzoo.available_workloads() if w.plugin == "my-workloads"]
        for test in [f for key, f in tests.items() if key.startswith("test_")]:
            test()
    assert name not in {w.name for w in normzoo.available_workloads()}


def test_a_slots_input_shape_follows_its_layout_and_spatial_sizes_must_fit_it():
    assert normzoo.Slot("tokens", 16, "seq", (28,)).input_shape(4) == (4, 28, 16)
    assert normzoo.Slot("maps", 6, "conv2d", (3, 3)).input_shape(2) == (2, 6, 3, 3)
    for spatial in ((), (4, 4, 4), (True, 2)):
        with pytest.raises(normzoo.DeclarationError, match="tuple of 2 positive sizes"):
            normzoo.Slot("maps", 6, "conv", spatial).validate("w")


def _tiny_with(**parts) -> normzoo.WorkloadInfo:
    fields = dict(name="faulty", summary="fails on purpose", slots=TINY.slots, factory=tiny_model,
                  data=load_fashion_mnist)  # fmt: skip
    return normzoo.WorkloadInfo(**{**fields, **parts})


def _boom(*args):
    raise ValueError("boom")


@pytest.mark.parametrize(
    "parts, message",
    [
        (dict(factory=_boom), "its factory raised ValueError: boom"),
        (dict(data=_boom), "its data function raised ValueError: boom"),
        (dict(data=lambda data_dir, download: [1, 2]), "returned list, not a normzoo"),
    ],
)
def test_a_workload_whose_factory_or_data_fails_is_one_line_naming_it(
    parts, message, tmp_path, capsys
):
    with normzoo.register(_tiny_with(**parts), name="faulty-plugin"):
        assert main(["run", "--workload", "faulty", *SMALL, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'faulty' (plugin 'faulty-plugin')" in err[0] and message in err[0]


def test_check_workload_leaves_out_norms_whose_default_options_do_not_fit_a_slot():
    odd = _tiny_with(name="odd", slots=(normzoo.Slot("hidden", 7, "fc"),),
                     factory=lambda slots: nn.Sequential(
                         nn.Flatten(), *slots.block("hidden", nn.Linear(784, 7)),
                         nn.Linear(7, 10)))  # fmt: skip
    with normzoo.register(odd):
        norms = fitting_norms("odd")
        assert "groupnorm" not in norms and "batchnorm" in norms  # 2 groups cannot split 7
        check_workload("odd", norms=["batchnorm", "layernorm"])


def test_download_without_a_directory_is_refused_in_python_too():
    with pytest.raises(normzoo.NormzooError, match="--download needs --data-dir"):
        RunConfig(download=True).validate()


def test_nproc_refuses_a_workload_registered_in_this_process_before_any_directory(tmp_path):
    from normzoo.harness.launch import launch

    with normzoo.register(TINY, name="inline-tiny"):
        with pytest.raises(normzoo.NormzooError, match="registered in this process"):
            launch(RunConfig(workload="tiny", nproc=2, runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


def test_a_workload_version_bump_changes_its_keys_and_no_other(monkeypatch):
    from dataclasses import replace

    from normzoo.registry import default_registry

    keys = {name: run_key(resolved_config(RunConfig(workload=name))) for name in ("lenet", "mlp")}
    registry = default_registry()
    registry.available()
    monkeypatch.setitem(
        registry._workloads, "lenet", replace(normzoo.workload("lenet"), version="2")
    )
    assert run_key(resolved_config(RunConfig(workload="lenet"))) != keys["lenet"]
    assert run_key(resolved_config(RunConfig(workload="mlp"))) == keys["mlp"]


# -- a workload's own training defaults --------------------------------------------------------


def test_a_workload_runs_with_its_declared_defaults_where_the_run_sets_none():
    resnet = normzoo.workload("resnet").defaults
    assert resnet == {"activation": "relu", "lr": 0.3}
    assert normzoo.workload("transformer").defaults == {"lr": 0.1}
    config = RunConfig.for_workload(workload="resnet", norm="groupnorm")
    assert (config.activation, config.lr, config.norm) == ("relu", 0.3, "groupnorm")
    assert RunConfig.for_workload(workload="resnet", lr=0.5).lr == 0.5  # what a run sets wins
    assert config.epochs == RunConfig().epochs  # a default the workload leaves alone
    # the chapter's LeNet declares none, so its runs and their stored keys are as before
    assert normzoo.workload("lenet").defaults == {} and RunConfig.for_workload() == RunConfig()


def test_a_page_on_a_workload_runs_with_its_defaults(tmp_path):
    from normzoo.compare.page import parse_page

    from .pages import write_page

    page = parse_page(write_page(tmp_path, 'seeds = 1\nbaseline = "a"\n\n[base]\n'
                                 'workload = "resnet"\n\n[[variant]]\nlabel = "a"\n\n'
                                 '[[variant]]\nlabel = "b"\nlr = 0.05\n'))  # fmt: skip
    first, second = (variant.config(0) for variant in page.variants)
    assert (first.lr, first.activation) == (0.3, "relu")
    assert (second.lr, second.activation) == (0.05, "relu")


@pytest.mark.parametrize(
    "defaults, says",
    [
        ([("lr", 0.3)], "needs defaults as a mapping of run settings"),
        ({"lr": [0.3]}, "default lr=[0.3] is not a str, int, float or bool"),
    ],
)
def test_defaults_that_are_no_settings_fail_the_workloads_registration(defaults, says):
    from dataclasses import replace

    with pytest.raises(normzoo.DeclarationError, match=re.escape(says)):
        with normzoo.register(replace(TINY, defaults=defaults), name="tiny-workloads"):
            pass


def test_a_default_a_workload_cannot_set_is_one_line_naming_it_and_its_plugin():
    from dataclasses import replace

    with normzoo.register(replace(TINY, defaults={"seed": 3}), name="tiny-workloads"):
        with pytest.raises(normzoo.NormzooError) as raised:
            RunConfig.for_workload(workload="tiny")
    message = str(raised.value)
    assert "workload 'tiny' (plugin 'tiny-workloads') declares a default for seed" in message
    assert "it may set activation, placement" in message and "\n" not in message


def test_the_workload_guide_lists_every_setting_a_workload_may_default():
    from normzoo.harness.config import WORKLOAD_SETTINGS

    guide = (Path(__file__).resolve().parents[1] / "docs" / "writing-a-workload.md").read_text()
    start = guide.index("Keys are run settings")
    listed = guide[guide.index("(", start) : guide.index(")", start)]
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(WORKLOAD_SETTINGS)
