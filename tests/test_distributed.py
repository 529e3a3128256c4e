"""Global batch statistics: 2 gloo processes on CPU against 1 process on the same batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests import distributed_worker as worker

SPLITS = [[8, 8], [3, 13], [0, 16]]
#: pit's tolerance: exact, up to the order of float64 sums, while every process holds at most
#: ``sample_size`` values per channel (see the pit module's ``sync`` parameter)
TOLERANCE = {"batchnorm": 1e-6, "zca": 1e-6, "iternorm": 1e-6, "pit": 1e-6}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dist")
    mp.spawn(worker.worker, args=(2, str(directory / "store"), str(directory), SPLITS),
             nprocs=2, join=True)  # fmt: skip
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("layout", list(worker.CHANNELS))
@pytest.mark.parametrize("norm", worker.NORMS)
def test_two_processes_equal_one_on_the_same_batch(two_processes, norm, layout, split):
    single = worker.train_step(norm, layout, [sum(split)], 0)
    ranks = [two_processes[r][(norm, layout, tuple(split))] for r in (0, 1)]
    tolerance = TOLERANCE[norm]
    for key, expected in single.items():
        if key.startswith(("y", "grad_x")):  # per example: the ranks' shares side by side
            got = torch.cat([ranks[0][key], ranks[1][key]])
        else:  # parameters' gradients (summed) and running statistics: equal on every rank
            got = ranks[0][key]
            torch.testing.assert_close(ranks[1][key], got, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance, msg=key)


def test_eval_mode_communicates_nothing(two_processes):
    assert two_processes[0]["eval_collectives"] == 0


def test_sync_false_keeps_each_process_to_its_own_batch(two_processes):
    """With ``sync=False`` rank 0's 3 examples are normalized by their own statistics, as one
    process with just those 3 would."""
    alone = worker.train_step("batchnorm", "fc", [3, 13], 0)  # no process group: local
    unsynced = two_processes[0]["unsynced"]
    for key in ("y0", "grad_x0", "y1", "running_mean", "running_var"):
        torch.testing.assert_close(unsynced[key], alone[key], rtol=1e-12, atol=1e-12)
