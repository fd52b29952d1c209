import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: on a busy machine, thread synchronisation costs far more than the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
