import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture
def small_cfg():
    from marl_sd.config import load_config

    return load_config(overrides=["env.horizon=20"])
