"""One intra-op thread for a test module of tiny models.

Tiny convs and matmuls are much slower with a second thread when the other core is busy (oneDNN
spin-waits), so these modules pin torch to one thread and restore the setting afterwards.  Import
the fixture into a test module to apply it there: ``from tests.helpers.threads import single_thread``.
"""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
