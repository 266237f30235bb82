"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a 2-core machine running two pytest workers: a second intra-op thread only
    # waits for a busy core (a 31 us matmul took 18 ms with two threads under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
