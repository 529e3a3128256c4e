"""``normzoo bench``: what a norm costs, as a ratio to torch's batch norm measured in the same run.

Timings from separate runs on a shared machine are not comparable, so everything here measures
a norm and its baseline side by side. One concept per module:

:mod:`~normzoo.bench.timing`
    the cases a workload's model and norm slots make, their interleaved timing against
    ``torch-batchnorm``, and the results as a table or JSON;
:mod:`~normzoo.bench.pipelines`
    the whole training loop, the harness against the textbook ``DataLoader`` pipeline;
:mod:`~normzoo.bench.page`
    a page's generated bench section, rendered from a stored measurement (what
    ``normzoo bench --page`` writes and ``normzoo compare --check`` checks).

The names below are what the command line uses; the rest lives in the modules.
"""

from normzoo.bench.pipelines import end_to_end
from normzoo.bench.timing import BenchConfig, format_table, run_bench, to_json, write_json

__all__ = ["BenchConfig", "end_to_end", "format_table", "run_bench", "to_json", "write_json"]
