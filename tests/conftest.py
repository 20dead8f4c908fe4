"""Shared test configuration: Hypothesis profiles and the host backends (docs/DESIGN.md §9).

Hypothesis profiles
-------------------
* ``dev``: a handful of examples per property, for the edit-test loop.
* ``ci``: derandomised (the same examples on every run, so CI is reproducible), a moderate
  number of examples, and ``print_blob`` so a failure can be replayed with
  ``@reproduce_failure``.
* ``thorough``: many examples, for a long run before a release or after touching a kernel.

Every profile has ``deadline=None``: the first call of a Numba kernel JIT-compiles it, which
would otherwise trip Hypothesis' per-example deadline.

Selecting a profile, strongest first:

1. ``python -m pytest --hypothesis-profile=thorough`` (Hypothesis' own pytest option; its
   plugin loads the profile after this file has registered it);
2. the environment variable ``BLASST_HYPOTHESIS_PROFILE=thorough``;
3. ``ci`` when the environment variable ``CI`` is set to any non-empty value, else ``dev``.

Backends
--------
``HOST_BACKENDS`` is the list of backends that run on numpy arrays. Tests parametrize over it
with ``pytest.mark.parametrize("backend", HOST_BACKENDS)`` or use the ``backend`` fixture.
The ``cpu`` parameters are never skipped: if ``blasst_ref.cpu`` cannot be imported, they fail
with the import error, so a missing backend cannot hide behind a skip.
"""

from __future__ import annotations

import os

# The CUDA kernels are tested on Numba's CUDA simulator where there is no GPU (CI): the
# switch must be set before numba.cuda is first imported, so it comes first in this file.
if not os.path.exists("/dev/nvidia0") and "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

HOST_BACKENDS = ["reference", "cpu"]

# Problems are small, but one example still runs a numpy tile loop (reference) or a Numba
# kernel whose first call compiles: neither is "too slow" in the sense of the health check.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "dev", max_examples=8, deadline=None, suppress_health_check=_SUPPRESS
)
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    database=None,  # derandomised: the example database would add nothing but state
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=_SUPPRESS,
)


def _default_profile() -> str:
    chosen = os.environ.get("BLASST_HYPOTHESIS_PROFILE", "").strip()
    if chosen:
        return chosen
    return "ci" if os.environ.get("CI") else "dev"


# Loaded at import time; ``--hypothesis-profile`` (handled by Hypothesis' pytest plugin in
# ``pytest_configure``, which runs after this conftest is imported) overrides it.
settings.load_profile(_default_profile())


@pytest.fixture(params=HOST_BACKENDS, scope="session")
def backend(request) -> str:
    """Each host backend in turn. Session-scoped so that it can be used with ``@given``
    (Hypothesis rejects function-scoped fixtures, which are not reset between examples)."""
    return request.param
