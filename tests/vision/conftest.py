"""The vision tests: `fold_batchnorm` on torchvision's and timm's models. Collected only with ``BNSGD_VISION=1``
(tests/conftest.py), in an environment with the ``vision`` extra (CI's third environment): there torchvision and
timm must import, and a failure to import them is an error, not a skip."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("BNSGD_VISION") != "1":
    raise pytest.UsageError(
        "tests/vision runs only with BNSGD_VISION=1, in an environment with the vision extra and its torch "
        "(docs/contributing.md, 'The vision environment'); the main suite leaves it out."
    )
try:
    import timm  # noqa: F401
    import torchvision  # noqa: F401
except Exception as err:  # torchvision's wheel also fails at import against another torch than its own
    raise pytest.UsageError(
        f"BNSGD_VISION=1 but torchvision or timm does not import ({type(err).__name__}: {err}): install the vision "
        "extra with its torch (docs/contributing.md, 'The vision environment')."
    ) from err


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these models run faster so on a shared CPU, and a test must not depend on the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
