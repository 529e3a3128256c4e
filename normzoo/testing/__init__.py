"""The conformance suite every norm must pass, and the check every workload must pass, usable
from a third party's own tests.

Each check takes a :class:`Subject` (a norm, the registry it is in, the options and channel
count to build it with) and raises ``AssertionError`` naming the norm, the layout and what went
wrong when the norm breaks the contract of :mod:`normzoo.interface`. Every check runs over every
layout the norm declares, with the shapes of :mod:`normzoo.layouts`. Run them all with
:func:`check_norm`, or one pytest case per check::

    import pytest
    from normzoo.testing import CONFORMANCE_CHECKS, run_check

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
    def test_my_norm_conforms(check):
        run_check(check, "my-norm")
        run_check(check, "my-norm", options={"groups": 4}, num_features=8)

The checks use small random inputs, so the whole suite takes about a second per norm on a CPU.

Modules: :mod:`~normzoo.testing.subject` (the norm under test), :mod:`~normzoo.testing.inputs`
(the inputs the checks use), :mod:`~normzoo.testing.checks` (the checks),
:mod:`~normzoo.testing.runner` (:func:`run_check`, :func:`check_norm`),
:mod:`~normzoo.testing.timeout` (the time limit of each check) and
:mod:`~normzoo.testing.workload_check` (:func:`check_workload`). Import from
``normzoo.testing`` itself: the names below are its public API.
"""

from __future__ import annotations

from normzoo.testing.checks import (
    CHECKS,
    CONFORMANCE_CHECKS,
    check_batch_of_one,
    check_deepcopy,
    check_deterministic,
    check_eval_uses_parameters,
    check_gradcheck,
    check_instances_are_independent,
    check_leaves_input_unchanged,
    check_memory_format,
    check_rejects_wrong_shapes,
    check_shape_and_dtype,
    check_state_dict_round_trip,
    check_to_moves_state,
    check_train_eval,
)
from normzoo.testing.inputs import gradcheck_shape, input_shape, sample_input
from normzoo.testing.runner import CHECK_TIMEOUT, check_norm, run_check
from normzoo.testing.subject import GRADCHECK_FEATURES, NUM_FEATURES, Check, Subject
from normzoo.testing.timeout import ABANDONED_THREAD_PREFIX, run_with_timeout
from normzoo.testing.workload_check import check_workload, fitting_norms

__all__ = [
    "ABANDONED_THREAD_PREFIX",
    "CHECKS",
    "CHECK_TIMEOUT",
    "CONFORMANCE_CHECKS",
    "GRADCHECK_FEATURES",
    "NUM_FEATURES",
    "Check",
    "Subject",
    "check_batch_of_one",
    "check_deepcopy",
    "check_deterministic",
    "check_eval_uses_parameters",
    "check_gradcheck",
    "check_instances_are_independent",
    "check_leaves_input_unchanged",
    "check_memory_format",
    "check_norm",
    "check_rejects_wrong_shapes",
    "check_shape_and_dtype",
    "check_state_dict_round_trip",
    "check_to_moves_state",
    "check_train_eval",
    "check_workload",
    "fitting_norms",
    "gradcheck_shape",
    "input_shape",
    "run_check",
    "run_with_timeout",
    "sample_input",
]
