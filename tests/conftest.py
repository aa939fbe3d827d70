import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_unet():
    from embroidery_core.tiny_unet import TinyUNet, TinyUNetConfig

    torch.manual_seed(0)
    return TinyUNet(TinyUNetConfig())
