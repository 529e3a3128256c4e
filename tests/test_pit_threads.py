"""pit's numba pool in a process that trains with one thread: sized to the process's share,
and still usable after numba reads its configuration again (it does at every compilation)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    from normzoo.harness.group import use_threads

    use_threads(1)  # what every launcher of a training process does first
    import numba
    import torch
    import normzoo

    layer = normzoo.build("pit", 4, "fc")
    layer(torch.randn(64, 4, requires_grad=True)).sum().backward()  # the pool is launched
    numba.config.reload_config()  # what each compilation does; refused if the pool size changed
    print(numba.config.NUMBA_NUM_THREADS, os.environ["NUMBA_NUM_THREADS"])
    """
)


def test_a_one_thread_process_keeps_a_one_thread_pool_through_recompilation():
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]
