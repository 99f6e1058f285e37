"""Fixtures shared by the stage tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def resnet_pth(tmp_path_factory) -> str:
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)
