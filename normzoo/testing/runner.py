"""The entry points of the conformance suite: :func:`run_check` runs one check on a norm (one
pytest case per check), :func:`check_norm` runs them all; both look the norm up in a registry
and limit each check's time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normzoo.registry import Registry, default_registry
from normzoo.testing.checks import CHECKS, CONFORMANCE_CHECKS
from normzoo.testing.subject import Subject
from normzoo.testing.timeout import run_with_timeout

#: Seconds one conformance check may take before it fails (``timeout=`` of :func:`run_check`
#: and :func:`check_norm` overrides it): generous, since the slowest check of a bundled norm
#: (pit's gradcheck with 5 channels) takes about 10 s on two busy CPU cores, yet a norm whose
#: forward blocks fails instead of hanging the suite.
CHECK_TIMEOUT = 120.0


def run_check(
    check: str,
    norm_name: str,
    registry: Registry | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    num_features: int | None = None,
    timeout: float | None = CHECK_TIMEOUT,
) -> None:
    """Run conformance check ``check`` on norm ``norm_name`` over every layout it declares.

    Parameters
    ----------
    check:
        A name from :data:`CONFORMANCE_CHECKS`.
    norm_name:
        The norm, looked up in ``registry`` (the default registry when ``None``).
    options:
        Options for every build, e.g. ``{"groups": 4}``; the norm's defaults otherwise.
    num_features:
        Channel count of the test inputs, for options that constrain it; ``None`` for the
        suite's own (4, and 2 in gradcheck).
    timeout:
        Seconds the check may take (:data:`CHECK_TIMEOUT` by default); past them it fails with
        an ``AssertionError`` naming the norm and the check. ``None``: no limit.
    """
    registry = registry or default_registry()
    subject = Subject(registry.info(norm_name), registry, dict(options or {}), num_features)
    run_with_timeout(
        lambda: CHECKS[check](subject),
        timeout,
        f"norm {norm_name!r}: check {check!r}",
        error=lambda message: AssertionError(
            f"{message}; does its forward block? Pass timeout= (None for no limit) to allow more"
        ),
    )


def check_norm(
    norm_name: str,
    registry: Registry | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    num_features: int | None = None,
    timeout: float | None = CHECK_TIMEOUT,
) -> None:
    """Run every conformance check on ``norm_name``; the first failure raises. ``timeout``
    limits each check, as in :func:`run_check`."""
    for check in CONFORMANCE_CHECKS:
        run_check(
            check, norm_name, registry, options=options, num_features=num_features, timeout=timeout
        )
