import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """For modules that run the toy or tiny UNets (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they are too small to gain from a second thread, and on a busy machine two OpenMP threads
    waiting for each other made such tests many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_unet():
    from embroidery_core.tiny_unet import TinyUNet, TinyUNetConfig

    torch.manual_seed(0)
    return TinyUNet(TinyUNetConfig())
