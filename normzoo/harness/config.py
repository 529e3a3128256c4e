"""Everything that defines a run, in three groups that the rest of normzoo derives from.

:class:`RunConfig` is :class:`~normzoo.workloads.slots.ModelSettings` (the workload and the
norm in its slots), :class:`TrainingSettings` (the protocol) and :class:`Resources` (where and
how the run happens). The first two are *what the run computes*: the comparison cache keys a
result by them and pages may set them; the third is where and how, and stays out of both (it
can still move numbers: float rounding across devices, per-process statistics of a norm
without ``sync`` under ``--nproc``, a ``--data-dir`` with other files). Each field's help, range and
choices sit in its metadata, from which the command line builds its options and
:meth:`RunConfig.validate` its checks, so a default or a bound is written once.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from normzoo import registry
from normzoo.errors import NormzooError
from normzoo.workloads.slots import ModelSettings

#: ``--seed`` must fit torch's generators (a signed 64-bit integer; ``seed + 1`` seeds a second).
MAX_SEED = 2**63 - 1
#: The re-estimation's default in batches of the default batch size (256), its unit before it
#: counted examples: what the stored results' keys call the default.
PRECISE_BATCHES = 50


@dataclass(frozen=True)
class TrainingSettings:
    """The protocol: the chapter's (lr 1.0, 10 epochs, batch 256), plus ``precise_examples``.

    Before each test, ``precise_examples`` training examples re-estimate the norms' running
    statistics with the epoch's final weights (see
    :func:`~normzoo.harness.train.reestimate_running_stats`). At lr 1.0 the running averages
    trail the weights so far that eval accuracy swings by several points from epoch to epoch
    (batch norm: 0.895 then 0.835), which would drown the differences between norms; 0
    restores the book's protocol exactly. A re-estimating run also tests each epoch's weights
    with the running averages first (``running_test_acc``), so it measures both protocols on the
    same weights. The count is of examples, not batches, so that
    every batch size re-estimates on about the same data (rounded up to whole batches).

    ``precise_stats`` is the older spelling, in batches: ``precise_stats=N`` sets
    ``precise_examples`` to ``N * batch_size``, the same computation as before.
    """

    epochs: int = field(default=10, metadata={"help": "passes over the data", "minimum": 1})
    lr: float = field(default=1.0, metadata={"help": "SGD learning rate", "positive": True})
    batch_size: int = field(
        default=256,
        metadata={
            "help": "examples per SGD step (the last incomplete batch of an epoch is dropped)",
            "minimum": 1,
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "0 to 2**63 - 1; same seed, same numbers on a CPU",
            "minimum": 0,
            "maximum": MAX_SEED,
        },
    )
    train_subset: int | None = field(
        default=None,
        metadata={"help": "use the first N training examples", "minimum": 2, "type": int},
    )
    test_subset: int | None = field(
        default=None,
        metadata={
            "help": "use the first N test examples (with --val-split: validation examples)",
            "minimum": 2,
            "type": int,
        },
    )
    val_split: int = field(
        default=0,
        metadata={
            "help": "hold out N training examples (stratified by class, the same ones for "
            "every seed) and evaluate on them instead of the test set, which is then never "
            "read: the split on which settings are chosen; 0 trains on the whole training set "
            "and tests on the test set",
            "minimum": 0,
            "metavar": "N",
        },
    )
    precise_examples: int = field(
        default=PRECISE_BATCHES * 256,
        metadata={
            "help": "before each test, re-estimate the norms' running statistics over N "
            "training examples (in batches of --batch-size, rounded up to whole batches) with "
            "frozen weights, after testing once with the running averages from training (both "
            "are recorded per epoch); 0 tests with the running averages only (the book's "
            "protocol, whose eval accuracy swings by several points between epochs at lr 1.0)",
            "minimum": 0,
            "metavar": "N",
        },
    )
    precise_stats: InitVar[int | None] = None

    def __post_init__(self, precise_stats: int | None) -> None:
        if precise_stats is not None:  # the older spelling, in batches
            check_bounds("precise_stats", precise_stats, {"minimum": 0})
            object.__setattr__(self, "precise_examples", precise_stats * self.batch_size)

    @property
    def precise_batches(self) -> int:
        """The batches the re-estimation runs: ``precise_examples`` in whole batches."""
        return -(-self.precise_examples // self.batch_size)


@dataclass(frozen=True)
class Resources:
    """Where and how a run happens; none of it is part of what the run computes."""

    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:N"}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "directory with the workload's data files (Fashion-MNIST: the four IDX "
            "files, gzipped or not, or torchvision's FashionMNIST/raw layout); default: the "
            "copy bundled with normzoo (the bundled workloads' own default)",
            "type": str,
        },
    )
    download: bool = field(default=False, metadata={"help": "fetch the data into --data-dir first"})
    runs_dir: str = field(
        default="runs", metadata={"help": "parent directory of the run directories"}
    )
    nproc: int = field(
        default=1,
        metadata={
            "help": "train on N local processes (DDP; gloo on CPU, NCCL on CUDA), each on its "
            "share of every batch; the norms with a sync option (batchnorm, zca, iternorm, pit) "
            "compute their statistics over the whole batch, others (e.g. torch-batchnorm) per "
            "process; the cores are split between them. Under torchrun, leave it at 1: the "
            "processes come from torchrun",
            "minimum": 1,
            "metavar": "N",
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "run the training steps through torch.compile: the first step compiles "
            "(seconds to a minute, per norm; on a CPU it needs a C++ compiler), later ones are "
            "faster (see docs/performance.md)"
        },
    )


#: Field names of each group, in declaration order.
MODEL_FIELDS = tuple(f.name for f in fields(ModelSettings))
TRAINING_FIELDS = tuple(f.name for f in fields(TrainingSettings))
RESOURCE_FIELDS = tuple(f.name for f in fields(Resources))
#: What a run computes: the fields a comparison's cache key covers.
COMPUTED_FIELDS = MODEL_FIELDS + TRAINING_FIELDS
#: What a run asks for rather than how the model is trained: a workload declares no default
#: for these.
_CHOSEN_PER_RUN = ("workload", "norm", "norm_options", "seed", "train_subset", "test_subset",
                   "val_split")  # fmt: skip
#: The settings a workload may declare defaults for (:attr:`WorkloadInfo.defaults`).
WORKLOAD_SETTINGS = tuple(name for name in COMPUTED_FIELDS if name not in _CHOSEN_PER_RUN)


@dataclass(frozen=True)
class RunConfig(Resources, TrainingSettings, ModelSettings):
    """Everything that defines a run; the defaults are the chapter's settings.

    A flat dataclass (``RunConfig(norm="zca", lr=0.1)``) whose fields come from its three
    groups; :data:`COMPUTED_FIELDS` and :data:`RESOURCE_FIELDS` name them.
    """

    @classmethod
    def for_workload(cls, **settings: Any) -> RunConfig:
        """The run that ``settings`` ask for, each setting they leave out taken from the
        workload's declared :attr:`~normzoo.interface.WorkloadInfo.defaults` where it
        declares one, else from these fields' defaults (the chapter's LeNet settings).

        How the command line and pages configure a run: ``RunConfig(**settings)`` alone
        gives every workload the chapter's lr 1.0 and sigmoid. A workload that declares a
        default no run could use is a :class:`NormzooError` naming it and its plugin.
        """
        workload = registry.workload(settings.get("workload", cls.workload))
        unknown = sorted(set(workload.defaults) - set(WORKLOAD_SETTINGS))
        if unknown:
            raise NormzooError(
                f"workload {workload.name!r} (plugin {workload.plugin!r}) declares a default "
                f"for {', '.join(unknown)}, which a workload cannot set; it may set "
                f"{', '.join(WORKLOAD_SETTINGS)}"
            )
        return cls(**{**workload.defaults, **settings})

    @property
    def evaluated_on(self) -> str:
        """The split the run's accuracy is measured on: ``"validation"`` with a ``val_split``,
        else ``"test"``."""
        return "validation" if self.val_split else "test"

    def validate(self) -> None:
        """Reject values no run could use, naming the bad one; the bounds are the fields'.

        Non-finite floats are rejected explicitly: ``nan`` fails every comparison, so a range
        check alone lets ``lr=nan`` through, and a NaN learning rate silently produces a NaN
        model (``inf`` one that diverges at the first step).
        """
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None:
                continue
            if isinstance(spec.default, float) and (
                not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise NormzooError(f"{spec.name} must be a finite number, got {value!r}")
            check_bounds(spec.name, value, spec.metadata)
        if not 0.0 <= self.dropout < 1.0:
            raise NormzooError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.download and self.data_dir is None:
            raise NormzooError("--download needs --data-dir, the directory to download into")
        if self.compile and self.nproc > 1:
            raise NormzooError(
                f"--compile runs in one process only, got --nproc {self.nproc}; drop one of them"
            )


def check_bounds(name: str, value: Any, metadata: Any) -> None:
    """Raise :class:`NormzooError` when ``value`` breaks the bounds in a field's metadata
    (``minimum``, ``maximum``, ``positive``)."""
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if metadata.get("positive") and not value > 0:
        raise NormzooError(f"{name} must be > 0, got {value}")
    if low is not None and high is not None and not low <= value <= high:
        top = "2**63 - 1" if high == MAX_SEED else high
        raise NormzooError(f"{name} must be in [{low}, {top}], got {value}")
    if low is not None and value < low:
        raise NormzooError(f"{name} must be >= {low}, got {value}")
