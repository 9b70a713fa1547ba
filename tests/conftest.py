"""Shared test settings: deterministic, small thread count (CI has 2 cores)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
