import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """These runs are tiny: one thread is faster, and much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
