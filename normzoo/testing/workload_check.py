"""The check every workload must pass: its model builds with each norm that fits it, and trains
a step and evaluates with finite numbers, so that a third party's workload test is one line
(``check_workload("my-model")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normzoo.errors import NormzooError
from normzoo.registry import available, workload
from normzoo.workloads.data import load_workload_data
from normzoo.workloads.slots import (
    ModelSettings,
    build_model,
    check_model_settings,
    norm_modules,
)


def fitting_norms(workload_name: str) -> list[str]:
    """The registered norms that fit workload ``workload_name`` with their default options:
    they declare every slot layout, and every slot's channel count accepts their options
    (``groupnorm``'s 2 groups do not fit a slot of 7 channels)."""
    fitting = []
    for norm in available():
        try:
            check_model_settings(ModelSettings(workload=workload_name, norm=norm.name))
        except NormzooError:
            continue
        fitting.append(norm.name)
    return fitting


def check_workload(
    workload_name: str, norms: Sequence[str] | None = None, batch_size: int = 16
) -> None:
    """Check workload ``workload_name`` with every norm that fits it (or ``norms``): the model
    builds with the norm in every slot, a training step on ``batch_size`` examples of the
    workload's own data gives finite logits of one row per example and a finite loss and
    changes the parameters, and an eval forward gives finite logits too.

    Raises ``AssertionError`` naming the workload and the norm. A third party's workload test
    is one line: ``check_workload("my-model")``.
    """
    declared = workload(workload_name)
    data = load_workload_data(workload_name, None, False)
    images, labels = data.train.images[:batch_size], data.train.labels[:batch_size]
    assert len(labels) == batch_size, (
        f"workload {workload_name!r}: fewer than {batch_size} examples"
    )
    for norm in fitting_norms(workload_name) if norms is None else norms:
        where = f"workload {workload_name!r} with norm {norm!r}"
        torch.manual_seed(0)
        model = build_model(ModelSettings(workload=workload_name, norm=norm))
        placed = norm_modules(model)
        assert len(placed) == len(declared.slots), f"{where}: {len(placed)} norms in the model"
        before = [parameter.detach().clone() for parameter in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        logits = model(images)
        assert logits.ndim == 2 and logits.shape[0] == batch_size, f"{where}: {logits.shape}"
        assert logits.shape[1] > int(labels.max()), f"{where}: {logits.shape[1]} classes"
        loss = nn.functional.cross_entropy(logits, labels)
        assert torch.isfinite(loss), f"{where}: training loss {loss.item()}"
        loss.backward()
        optimizer.step()
        after = list(model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), where
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(images)).all(), f"{where}: non-finite eval logits"
