"""The validation split: held out of the training set, stratified by class, the same for every
seed, and the only split a run that chooses settings evaluates on (the test set is never read).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import normzoo.harness.experiment as experiment
import normzoo.harness.train as train
from normzoo.errors import NormzooError
from normzoo.harness.config import RunConfig
from normzoo.harness.launch import launch
from normzoo.workloads.data import Dataset, Split, load_fashion_mnist


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return load_fashion_mnist()


def test_the_split_is_stratified_disjoint_and_complete(fashion):
    data = fashion.validation(1003)
    held = data.test
    assert len(held) == 1003 and len(data.train) == 60_000 - 1003
    counts = torch.bincount(held.labels, minlength=10).tolist()
    assert counts == [101, 101, 101, 100, 100, 100, 100, 100, 100, 100]
    # every training example is in exactly one part: compare the images as rows of bytes
    everything = sorted(image.numpy().tobytes() for image in fashion.train.images)
    parts = torch.cat([data.train.images, held.images])
    assert sorted(image.numpy().tobytes() for image in parts) == everything


def test_the_split_does_not_depend_on_anything_but_its_size(fashion):
    one, two = fashion.validation(500), fashion.validation(500)
    assert torch.equal(one.test.images, two.test.images)
    torch.manual_seed(123)  # the run's seed is set before the data loads: it must not matter
    three = fashion.validation(500)
    assert torch.equal(one.test.labels, three.test.labels)
    assert torch.equal(one.test.images, three.test.images)


def test_the_remaining_training_set_keeps_its_order(fashion):
    data = fashion.validation(100)
    first = data.train.images[:50]
    positions = [int(torch.nonzero((fashion.train.images == image).flatten(1).all(1))[0])
                 for image in first]  # fmt: skip
    assert positions == sorted(positions)


@pytest.mark.parametrize("size", [0, 60_000, 70_000])
def test_a_split_that_leaves_nothing_to_train_on_is_one_line(fashion, size):
    with pytest.raises(NormzooError, match=f"--val-split {size} must hold out between 1 and"):
        fashion.validation(size)


def test_a_split_larger_than_a_class_is_one_line():
    labels = torch.tensor([0] * 10 + [1] * 2)
    data = Dataset(Split(torch.zeros(12, 1, 2, 2), labels), Split(torch.zeros(2, 1, 2, 2),
                                                                  labels[:2]))  # fmt: skip
    with pytest.raises(NormzooError, match="needs 3 examples of class 1, the training set has 2"):
        data.validation(6)


def unreadable_test_set(monkeypatch) -> list[int]:
    """Give runs Fashion-MNIST with a test set on the meta device, which any computation
    refuses, and record the size of every split the harness measures accuracy on."""
    real_load = experiment.load_workload_data
    measured: list[int] = []

    def load(*args, **kwargs):
        data = real_load(*args, **kwargs)
        meta = Split(data.test.images.to("meta"), data.test.labels.to("meta"))
        return Dataset(data.train, meta)

    real_accuracy = train.accuracy

    def accuracy(model, split, *args, **kwargs):
        measured.append(len(split))
        return real_accuracy(model, split, *args, **kwargs)

    monkeypatch.setattr(experiment, "load_workload_data", load)
    monkeypatch.setattr(train, "accuracy", accuracy)
    return measured


TINY = RunConfig(epochs=2, train_subset=512, precise_stats=2, device="cpu")


def test_a_run_on_the_validation_split_never_reads_the_test_set(tmp_path, monkeypatch):
    measured = unreadable_test_set(monkeypatch)
    config = replace(TINY, val_split=300, runs_dir=str(tmp_path))
    result = launch(config, progress=False)
    assert result.status == "finished" and len(result.epochs) == 2
    # every evaluation, on the held-out examples: per epoch, with the running averages and
    # then with the re-estimated statistics
    assert measured == [300, 300, 300, 300]
    record = (result.directory.path / "config.json").read_text()
    assert '"evaluated_on": "validation"' in record and '"validation_examples": 300' in record


def test_without_the_split_the_same_run_reads_the_test_set(tmp_path, monkeypatch):
    """The guard above can fail: a run that tests touches the unreadable test set."""
    unreadable_test_set(monkeypatch)
    with pytest.raises(Exception, match="meta"):
        launch(replace(TINY, runs_dir=str(tmp_path)), progress=False)
