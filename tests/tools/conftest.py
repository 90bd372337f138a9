import pytest
import torch


@pytest.fixture
def threads_restored():
    """`vtr bench --threads` sets torch's thread count for the process; put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
