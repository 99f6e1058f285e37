"""Shared device handling for pretrained (torch) encoders.

The model loads once per actor, in eval mode, on cuda when there is one. On the GPU, host tensors
go through pinned memory with non-blocking copies and the forward pass runs under autocast
(``precision``: bf16 by default); on the CPU everything is fp32.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Literal

import numpy as np

from stages.features.base import Encoder, EncoderParams

# torch loads lazily: actors of weight-free encoders skip its ~2 s / ~650 MB import.
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": None}   # torch dtype names


class TorchParams(EncoderParams):
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"   # autocast dtype on GPU; ignored on CPU


class TorchEncoder(Encoder):
    """Role base for model-backed encoders: fill in ``load_model`` and ``forward``."""

    Params: ClassVar[type[EncoderParams]] = TorchParams
    pretrained: ClassVar[bool] = True

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        import torch

        super().__init__(params, inference=inference)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: torch.nn.Module | None = None
        if inference:
            self.model = self.load_model().eval().to(self.device)

    def load_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def forward(self, prepped: list[Any]) -> torch.Tensor:
        """Payloads -> (n, dim) tensor; runs under inference mode and autocast already."""
        raise NotImplementedError

    def encode(self, prepped: list[Any]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"encoder {self.name!r} was built for preprocessing only (inference=False)")
        import torch

        with torch.inference_mode(), self.autocast():
            out = self.forward(prepped)
        return out.float().cpu().numpy()

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        dtype = AUTOCAST_DTYPES[self.params.precision]
        if self.device.type != "cuda" or dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, dtype))

    def to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Host array -> tensor on the model's device (pinned + non-blocking on GPU)."""
        import torch

        tensor = torch.as_tensor(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the time axis of (n, t, d) counting only positions where ``mask`` (n, t) is set."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pad_stack(arrays: list[np.ndarray], value: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D arrays to the longest: (padded (n, t), mask (n, t) int64)."""
    longest = max(len(a) for a in arrays)
    padded = np.full((len(arrays), longest), value, dtype=arrays[0].dtype)
    mask = np.zeros((len(arrays), longest), dtype=np.int64)
    for i, a in enumerate(arrays):
        padded[i, : len(a)] = a
        mask[i, : len(a)] = 1
    return padded, mask


def equal_length_groups(lengths: list[int]) -> Iterator[list[int]]:
    """Indices grouped by equal length, for models whose outputs padding would change."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    yield from groups.values()
