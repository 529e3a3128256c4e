"""The training loop: minibatch SGD with cross-entropy, per-epoch metrics, a live progress bar.

The data sit on the device as whole tensors; each epoch draws a permutation from a seeded
generator and slices batches out of it, so the same seed gives the same numbers on a CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from normzoo.base import cumulative_running_stats, reestimable_norms
from normzoo.errors import NormzooError, describe
from normzoo.harness.group import current, environment_seconds
from normzoo.testing import run_with_timeout
from normzoo.workloads.data import Dataset, Split
from normzoo.workloads.slots import norm_modules

EVAL_BATCH = 2048
#: Seconds the trial batch may take before a norm is taken to block (a first call of a norm
#: that compiles, such as pit's numba loops, takes seconds); ``NORMZOO_PROBE_TIMEOUT`` overrides.
PROBE_TIMEOUT = 300.0
#: On an accelerator, the loss is read (a host sync) every this many batches and at the last.
SYNC_EVERY = 32


class TrainingDiverged(NormzooError):
    """The loss or a running statistic became NaN or infinite."""


class TrainingFailed(NormzooError):
    """Training raised an error that is not normzoo's own, e.g. from inside a norm plugin;
    the original exception is the ``__cause__``."""


class NormProbeError(NormzooError):
    """A norm failed the trial batch run before training: it raised, or changed the shape of
    its input. The original exception, if any, is the ``__cause__``."""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; ``examples_per_sec`` counts training examples only.

    ``running_test_acc`` exists only for a run that re-estimates its norms' statistics before
    testing (``precise_examples``): the accuracy of the same weights tested with the running
    averages kept during training, before the re-estimation replaces them. Those are the
    averages the chapter tests with, so one run measures both protocols on identical weights.
    """

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    examples_per_sec: float
    seconds: float
    running_test_acc: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    def summary(self, evaluated_on: str = "test") -> str:
        """One line; ``evaluated_on`` names the split ``test_acc`` was measured on."""
        running = self.running_test_acc
        both = "" if running is None else f" ({running:.3f} with the running averages)"
        return (
            f"epoch {self.epoch:>2}: train loss {self.train_loss:.3f}, train acc "
            f"{self.train_acc:.3f}, {accuracy_label(evaluated_on)} {self.test_acc:.3f}{both}, "
            f"{self.examples_per_sec:,.0f} examples/s"
        )


def accuracy_label(evaluated_on: str) -> str:
    """``"test acc"``, or ``"val acc"`` for a run evaluated on its validation split."""
    return f"{'val' if evaluated_on == 'validation' else evaluated_on} acc"


def batch_bounds(size: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every complete batch; the incomplete last one is dropped.

    Raises :class:`NormzooError` when not even one batch fits.
    """
    if size < batch_size:
        raise NormzooError(
            f"the training set has {size} examples, fewer than one batch of {batch_size}; "
            "use a smaller --batch-size or a larger --train-subset"
        )
    return [(start, start + batch_size) for start in range(0, size - batch_size + 1, batch_size)]


@torch.no_grad()
def reestimate_running_stats(
    model: nn.Module, split: Split, batch_size: int, num_batches: int, generator: torch.Generator
) -> int:
    """Replace the running statistics by their average over ``num_batches`` fresh batches.

    During training at a large learning rate the running averages trail the weights: they mix
    statistics of many past versions of the network, so eval-mode accuracy lags and swings
    from epoch to epoch. This "precise BN" step (Wu & Johnson, *Rethinking "Batch" in
    BatchNorm*, 2021) resets each norm's running statistics and runs forward passes with
    frozen weights, averaging the batch statistics with equal weights (a cumulative average,
    ``momentum=None``). Only the norms run in train mode: dropout and every other layer stay
    in eval mode, so the statistics are those of the network that is tested.

    It applies to the norms that declare the capability (:func:`normzoo.base.reestimable_norms`:
    every :class:`normzoo.NormBase` and torch's own norms with running statistics); their
    momenta are restored afterwards. Returns the number of modules re-estimated.
    """
    norms = reestimable_norms(model)
    if not norms:
        return 0
    processes = current()  # several: each runs its share, the norms sum their statistics
    order = torch.randperm(len(split), generator=generator).to(split.images.device)
    model.eval()
    for module in norms:
        module.train()
    with cumulative_running_stats(norms):
        for start, stop in batch_bounds(len(split), batch_size)[:num_batches]:
            model(split.images[processes.share(order[start:stop])])
    return len(norms)


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block without consuming the global RNG streams the training run will use."""
    devices = []
    if device.type == "cuda":  # only then: asking for the current CUDA device initializes CUDA
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


#: Examples run alone through the model in eval mode by the trial batch, to check that a norm's
#: eval-mode output for them does not depend on the rest of the batch.
PROBE_EXAMPLES = 4
#: Relative tolerance of the trial batch's comparisons in float32 (kernels for different batch
#: sizes round differently, by about 1e-6); scaled up for lower precisions.
PROBE_RTOL = 1e-4


def _probe_tolerance(dtype: torch.dtype) -> float:
    return max(PROBE_RTOL, 50 * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def _relative_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    """``max |first - second|`` relative to the larger magnitude of the two (0 if both 0)."""
    first, second = first.detach().double(), second.detach().double()
    scale = max(float(first.abs().max()), float(second.abs().max()), 1e-12)
    return float((first - second).abs().max()) / scale


def _plain_state(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The tensors a module holds as plain attributes (not parameters, buffers or submodules),
    alone or in lists, tuples and dicts: the state its ``state_dict`` does not save."""
    found: dict[str, list[torch.Tensor]] = {}
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            found[key] = [value]
        elif isinstance(value, (list, tuple, dict)):
            items = value.values() if isinstance(value, dict) else value
            tensors = [item for item in items if isinstance(item, torch.Tensor)]
            if tensors or not value:  # an empty list may be filled by training
                found[key] = tensors
    return found


def _saved_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Copies of what a module's ``state_dict`` saves by default: its parameters and
    persistent buffers (read without calling ``state_dict``, which a plugin may override)."""
    tensors = [parameter.detach().clone() for parameter in module.parameters()]
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                tensors.append(buffer.detach().clone())
    return tensors


def _same_tensors(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return not _plain_state_changed(before, after)


def _plain_state_changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    if len(before) != len(after):
        return True
    return any(
        first.shape != second.shape or not torch.equal(first.detach(), second.detach())
        for first, second in zip(before, after, strict=True)
    )


def probe_norms(model: nn.Module, split: Split, batch_size: int, label: str) -> None:
    """Run one training batch through a copy of ``model`` and check every norm on the way.

    A norm plugin can fail in ways no declaration reveals: its forward raises, returns a
    different shape (which a later layer may even accept), or refuses the batch size (batch
    statistics of one example). Found during training, such a failure would leave a run
    directory behind and show as a traceback; found here, before the run directory exists,
    it becomes one :class:`NormProbeError` naming the norm, the module and the shapes, with
    the original exception as ``__cause__``. Forward hooks on the norms (see
    :func:`~normzoo.workloads.slots.norm_modules`) check that each returns a tensor of its
    input's shape; the batch runs forward and backward in train mode, then forward in eval
    mode. ``model`` itself, and the global random number generators, are left untouched.

    Two mistakes that would otherwise finish a run without a word are caught too:

    - a norm whose eval-mode output for an example depends on the other examples of the batch
      (it ignores ``training`` and uses batch statistics at test time): the first
      :data:`PROBE_EXAMPLES` examples run again alone, and each norm's output for them must
      match its output within the whole batch;
    - a norm that keeps its running statistics outside its ``state_dict`` (a plain list or
      tensor attribute), which ``model.pt`` would not save: tensors held as plain attributes
      must not change in the training step, and a fresh copy of the model given the trained
      copy's ``state_dict`` (what loading ``model.pt`` does) must give the same eval outputs.

    Both cost a forward pass of a few examples (and a copy of the model).
    """
    limit = environment_seconds("NORMZOO_PROBE_TIMEOUT", PROBE_TIMEOUT)
    try:
        trial = copy.deepcopy(model)
    except Exception as error:
        raise NormProbeError(
            f"norm {label!r}: the model cannot be copied for a trial batch ({describe(error)})"
        ) from error
    images, labels = split.images[:batch_size], split.labels[:batch_size]
    alone = min(PROBE_EXAMPLES, len(images) - 1)  # 0: a batch of 1 cannot be compared
    # the norms being run, innermost last: name, input shape, whether the input was finite
    running: list[tuple[str, tuple[int, ...], bool]] = []
    # while set, each norm's (input, output) for the first `alone` examples, by module, in
    # call order
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def before(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            shape = tuple(tensor.shape) if tensor is not None else ()
            finite = tensor is None or bool(torch.isfinite(tensor).all())
            running.append((name, shape, finite))

        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            _, shape, finite_input = running.pop()
            if not isinstance(output, torch.Tensor):
                raise NormProbeError(
                    f"norm {label!r} (module {name!r}) returned {type(output).__name__} for "
                    f"input {shape} in {mode} mode; a norm must return a tensor"
                )
            if tuple(output.shape) != shape:
                raise NormProbeError(
                    f"norm {label!r} (module {name!r}) returned shape {tuple(output.shape)} "
                    f"for input {shape} in {mode} mode; a norm must keep its input's shape"
                )
            if finite_input and not bool(torch.isfinite(output).all()):
                raise NormProbeError(
                    f"norm {label!r} (module {name!r}) returned NaN or infinite values for a "
                    f"finite input {shape} in {mode} mode, before any training step (a "
                    "smaller --lr cannot help: the norm's computation is at fault)"
                )
            if captured is not None and output.dim() > 0 and isinstance(args[0], torch.Tensor):
                pair = (args[0][:alone].detach().clone(), output[:alone].detach().clone())
                captured.setdefault(name, []).append(pair)

        return hook

    def hooked(network: nn.Module) -> list[tuple[str, nn.Module]]:
        norms = norm_modules(network)
        for name, module in norms:
            module.register_forward_pre_hook(before(name))
            module.register_forward_hook(after(name))
        return norms

    def differ(first: torch.Tensor, second: torch.Tensor) -> float:
        """Their relative difference when beyond the tolerance, else 0."""
        if first.shape != second.shape:
            return math.inf
        difference = _relative_difference(first, second)
        return difference if difference > _probe_tolerance(first.dtype) else 0.0

    def first_difference(
        expected: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        got: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        same_input: bool = False,
        among: set[str] | None = None,
    ) -> tuple[str, float] | None:
        """The first norm (in call order; of ``among``) whose outputs differ beyond the
        tolerance (for ``same_input``: where its input did not)."""
        for name, pairs in expected.items():
            if among is not None and name not in among:
                continue
            for (input1, output1), (input2, output2) in zip(pairs, got.get(name, []), strict=False):
                if same_input and differ(input1, input2):
                    continue
                difference = differ(output1, output2)
                if difference:
                    return name, difference
        return None

    def eval_pass(network: nn.Module, batch: torch.Tensor) -> dict:
        nonlocal captured
        network.eval()
        captured = {}
        try:
            with torch.no_grad():
                network(batch)
            return captured
        finally:
            captured = None

    norms = hooked(trial)
    mode = "train"
    step = "forward"
    try:

        def trial_batch() -> None:
            nonlocal mode, step
            before_step: dict | None = None
            saved_before = {name: _saved_tensors(module) for name, module in norms}
            if alone and norms:  # eval outputs before training, for the comparison below
                mode = "eval"
                try:
                    before_step = eval_pass(trial, images[:alone])
                except Exception:  # untrained statistics may not work yet: no comparison
                    running.clear()
                mode = "train"
            plain_before = {  # after that eval pass, which may fill caches
                name: {
                    key: [tensor.detach().clone() for tensor in tensors]
                    for key, tensors in _plain_state(module).items()
                }
                for name, module in norms
            }
            trial.train()
            loss = nn.functional.cross_entropy(trial(images), labels)
            step = "backward"
            loss.backward()
            for name, module in norms:  # before any eval pass, which may fill caches
                state = _plain_state(module)
                original = plain_before[name]
                for key in sorted(state):
                    if _plain_state_changed(original.get(key, []), state[key]):
                        raise NormProbeError(
                            f"norm {label!r} (module {name!r}) keeps running statistics "
                            f"outside its state_dict: its plain attribute {key!r} changed in a "
                            "training step, and model.pt would not save it; register them as "
                            "buffers (self.register_buffer)"
                        )
            mode, step = "eval", "forward"
            in_batch = eval_pass(trial, images)
            if alone and norms:
                step = f"forward of {alone} examples alone"
                by_themselves = eval_pass(trial, images[:alone])
                found = first_difference(in_batch, by_themselves)
                if found is not None:
                    name, difference = found
                    raise NormProbeError(
                        f"norm {label!r} (module {name!r}) in eval mode gives the first "
                        f"{alone} examples outputs that depend on the other examples of the "
                        f"batch (relative difference {difference:.2g} between a batch of "
                        f"{len(images)} and those {alone} alone); in eval mode a norm must "
                        "use its running statistics, not the batch's (does its forward "
                        "ignore self.training?)"
                    )
                # eval behaviour changed by the training step, with nothing saved changed
                unsaved = {
                    name
                    for name, module in norms
                    if _same_tensors(saved_before[name], _saved_tensors(module))
                }
                found = None
                if before_step is not None:
                    found = first_difference(before_step, by_themselves, True, unsaved)
                if found is not None:
                    name, difference = found
                    raise NormProbeError(
                        f"norm {label!r} (module {name!r}) keeps running statistics outside "
                        "its state_dict: a training step changed its eval-mode output (relative "
                        f"difference {difference:.2g}) but none of its parameters or buffers, "
                        "so model.pt would not save what changed; register them as buffers "
                        "(self.register_buffer)"
                    )

        with _forked_rng(images.device):
            run_with_timeout(
                trial_batch, limit, f"the trial batch of norm {label!r}",
                error=lambda text: NormProbeError(
                    f"{text}; does a norm's forward block? (NORMZOO_PROBE_TIMEOUT sets the limit)"
                ),
            )  # fmt: skip
    except NormProbeError:
        raise
    except (Exception, SystemExit) as error:  # a plugin's sys.exit is its failure too
        detail = (
            str(error).strip() if isinstance(error, NormzooError) else
            f"{describe(error)}"
        )  # fmt: skip
        if running:
            name, shape, _ = running[-1]
            where = f"norm {label!r} (module {name!r}) failed on input {shape} in {mode} mode"
        else:
            where = f"with norm {label!r}, the {step} pass in {mode} mode failed"
        raise NormProbeError(
            f"{where} (a trial batch of --batch-size {batch_size}): {detail}"
        ) from error


def check_finite_buffers(model: nn.Module, label: str, when: str) -> None:
    """Raise :class:`TrainingDiverged` naming the module whose floating buffer is not finite.

    A norm's running statistics can turn NaN or infinite while the training loss stays finite
    (train mode uses batch statistics); every eval-mode prediction would then be garbage and
    the accuracy silently near chance. ``when`` completes the sentence, e.g.
    ``"in epoch 3"``. Checks every floating buffer, not only the norms'.
    """
    norms = {name for name, _ in norm_modules(model)}
    for name, buffer in model.named_buffers():
        if not buffer.is_floating_point() or bool(torch.isfinite(buffer).all()):
            continue
        module = name.rpartition(".")[0]
        owner = label if module in norms else type(model.get_submodule(module)).__name__
        raise TrainingDiverged(
            f"running statistics of {module or '(model)'!r} ({owner}) became non-finite "
            f"{when} (buffer {name!r}); try a smaller --lr"
        )


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly, in eval mode.

    Raises :class:`NormzooError` for an empty split: its accuracy is undefined, and 0 would
    read as a (terrible) measurement.
    """
    if len(split) == 0:
        raise NormzooError("cannot measure accuracy on a split of 0 examples")
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        logits = model(split.images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == split.labels[start : start + batch_size]).sum())
    return correct / len(split)


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    label: str,
    on_epoch: Callable[[EpochMetrics], None] = lambda metrics: None,
    progress: bool = True,
    precise_batches: int = 0,
    compile: bool = False,
) -> list[EpochMetrics]:
    """Train ``model`` on ``data.train`` and measure it on ``data.test`` after every epoch.

    Parameters
    ----------
    precise_batches:
        When positive, re-estimate the norms' running statistics over this many training
        batches with the epoch's final weights before testing (see
        :func:`reestimate_running_stats`), after testing with the running averages kept during
        training (each epoch's ``running_test_acc``); 0 keeps the running averages from
        training for the test, the chapter's protocol.
    label:
        Names the run (the norm) in the progress bar and in errors.
    on_epoch:
        Called with each epoch's metrics as soon as they exist, e.g. to write them to disk.
    compile:
        Run the training steps through ``torch.compile(model)``: the first step compiles
        (seconds to a minute, depending on the norm), later ones run the fused kernels. The
        re-estimation and the test stay eager; they are a small share of an epoch and would
        each compile again for their own mode and batch sizes.

    Raises :class:`TrainingDiverged` when a batch loss is not finite, or a floating buffer
    (a running statistic) is not finite after an epoch's training or after the re-estimation;
    the epochs already reported through ``on_epoch`` stay reported. Any other error from
    training or testing (a plugin's forward failing in epoch 3, CUDA out of memory) becomes a
    one-line :class:`TrainingFailed` naming the epoch and the norm, the original chained.

    An incomplete last batch is dropped (a fresh permutation each epoch still reaches every
    example): a few leftover examples give batch statistics so noisy, or a covariance so
    singular, that one step at the chapter's lr 1.0 can undo an epoch (60,000 examples in
    batches of 256 drop 96 per epoch).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    network = getattr(model, "module", model)  # the model inside DistributedDataParallel
    stepped = torch.compile(model) if compile else model
    processes = current()
    generator = torch.Generator().manual_seed(seed)
    stats_generator = torch.Generator().manual_seed(seed + 1)  # training order stays the same
    batches = batch_bounds(len(data.train), batch_size)
    history: list[EpochMetrics] = []
    for epoch in range(1, epochs + 1):
        try:
            metrics = _epoch(
                stepped, data, optimizer, batches, generator, epoch, epochs, label, progress
            )
            check_finite_buffers(network, label, f"in epoch {epoch}")
            if precise_batches:
                # the chapter's protocol on the same weights, before the re-estimation
                # replaces the running averages it tests with
                running = accuracy(network, data.test) if processes.main else math.nan
                metrics = replace(metrics, running_test_acc=processes.from_main(running))
                reestimate_running_stats(
                    network, data.train, batch_size, precise_batches, stats_generator
                )
                check_finite_buffers(
                    network, label,
                    f"while re-estimating them (--precise-examples) in epoch {epoch}",
                )  # fmt: skip
            # eval mode communicates nothing: rank 0 tests alone and tells the others
            test_acc = accuracy(network, data.test) if processes.main else math.nan
            metrics = replace(metrics, test_acc=processes.from_main(test_acc))
        except NormzooError:
            raise
        except (Exception, SystemExit) as error:  # a plugin's sys.exit is its failure too
            raise TrainingFailed(
                f"training with norm {label!r} failed in epoch {epoch}: {describe(error)}"
            ) from error
        history.append(metrics)
        on_epoch(metrics)
    return history


def _epoch(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[int, int]],
    generator: torch.Generator,
    epoch: int,
    epochs: int,
    label: str,
    progress: bool,
) -> EpochMetrics:
    """One pass over the training set; the metrics' ``test_acc`` is still NaN."""
    loss_fn = nn.CrossEntropyLoss()
    device = data.train.images.device
    model.train()
    order = torch.randperm(len(data.train), generator=generator).to(device)
    processes = current()  # several: each trains on its share of every global batch
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    started = time.perf_counter()
    bar = tqdm(
        batches, desc=f"{label} epoch {epoch}/{epochs}", unit="batch", leave=False,
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        for step, (start, stop) in enumerate(bar):
            index = processes.share(order[start:stop])
            images, labels = data.train.images[index], data.train.labels[index]
            logits = model(images)
            loss = loss_fn(logits, labels)
            # reading the loss syncs with the device: every batch on a CPU (free there), every
            # SYNC_EVERY batches and at the last on an accelerator, where a sync per batch
            # would leave the device idle between LeNet's small kernels
            value = None
            if device.type == "cpu" or (step + 1) % SYNC_EVERY == 0 or step + 1 == len(batches):
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss became {value} in epoch {epoch} (batch {step + 1}) with norm "
                        f"{label!r}; try a smaller --lr"
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count = len(index)
            loss_sum += loss.detach() * count
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += count
            if progress and value is not None:
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    loss_sum, correct, seen = processes.sum(
        torch.stack([loss_sum.double(), correct.double(), loss_sum.new_tensor(seen).double()])
    ).tolist()
    return EpochMetrics(
        epoch=epoch,
        train_loss=loss_sum / seen,
        train_acc=correct / seen,
        test_acc=math.nan,
        examples_per_sec=seen / max(elapsed, 1e-9),
        seconds=elapsed,
    )
