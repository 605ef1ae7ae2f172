"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread and restore the thread count afterwards.

    The tiny models gain nothing from threads, and on shared cores two spinning threads per run
    made an epoch take a second instead of milliseconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
