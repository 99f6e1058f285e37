"""The encoder role: values of one modality in, a fixed-width float32 matrix out.

An encoder is one small class: ``name``, ``modality``, ``version``, a pydantic ``Params``,
``dim_for(params)`` (the output width, known without touching data), ``preprocess`` (CPU work:
decode, resize, tokenise) and ``encode`` (the model). ``embed`` is what stages call: it checks the
shape and applies the optional L2 normalisation. Adding an encoder = one class + ``@register_encoder``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stages.base import MODALITIES
from stages.registry import registry


class MissingWeights(FileNotFoundError, ValueError):
    """A pretrained encoder's files are not on this machine; the message says where we looked.

    A ValueError too, so plan building reports it as a bad parameter (one line, no traceback)."""


class EncoderParams(BaseModel):
    """Options every encoder takes; subclasses add their own. Unknown keys are config errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    l2_normalize: bool = False
    batch_size: int = Field(64, ge=1)     # rows per encode call; does not change the output

    # Options that change throughput only, left out of the stage fingerprint.
    RUNTIME_ONLY: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    # Options added after stores were written: at their defaults they leave the fingerprint as it was.
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset({"sequence"})


class SequenceParams(EncoderParams):
    """For encoders that can also store a sequence (``<m>_seq``) next to the pooled vector."""

    sequence: int = Field(0, ge=0, le=1024)   # frames of the stored sequence (padded / pooled to it); 0: none


class Encoder:
    """Role base: fill in ``dim_for`` and ``encode`` (and ``preprocess`` when there is CPU work).

    ``inference=False`` builds the encoder for preprocessing only (a CPU actor feeding a GPU one):
    tokenisers and image processors load, models do not.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    version: ClassVar[int] = 1
    Params: ClassVar[type[EncoderParams]] = EncoderParams
    pretrained: ClassVar[bool] = False   # True: the runner splits preprocess and encode into two stages

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})
        self.inference = inference
        self.dim = self.dim_for(self.params)

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        """Output width for these params, without loading a model or reading data."""
        raise NotImplementedError

    def preprocess(self, values: list[Any]) -> list[Any]:
        """CPU work per value (decode, resize, tokenise); one payload per value, in order."""
        return list(values)

    def encode(self, prepped: list[Any]) -> np.ndarray:
        """Payloads from ``preprocess`` -> float32 array (len(prepped), dim)."""
        raise NotImplementedError

    def embed(self, prepped: list[Any]) -> np.ndarray:
        """``encode`` plus the shape check and optional L2 normalisation; what stages call."""
        out = np.asarray(self.encode(prepped), dtype=np.float32)
        if out.shape != (len(prepped), self.dim):
            raise ValueError(f"encoder {self.name!r} returned shape {out.shape}, expected ({len(prepped)}, {self.dim})")
        if self.params.l2_normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    @classmethod
    def fingerprint_params(cls, params: EncoderParams) -> dict[str, Any]:
        """What identifies this encoder's output: name, version and the options that matter."""
        later = {k for k in params.ADDED_LATER if k in type(params).model_fields
                 and getattr(params, k) == type(params).model_fields[k].default}
        options = params.model_dump(mode="json", exclude=set(params.RUNTIME_ONLY) | later)
        return {"encoder": cls.name, "encoder_version": cls.version, "options": options}

    # -- sequences (encoders whose Params derive from SequenceParams) --------------------------
    @classmethod
    def sequence_dim(cls, params: EncoderParams) -> int:
        """Width of one frame of the stored sequence; 0: the encoder stores none."""
        return 0

    def encode_sequence(self, prepped: list[Any]) -> list[np.ndarray]:
        """Payloads -> one (frames, sequence_dim) float32 array each, frames <= params.sequence."""
        raise NotImplementedError

    def sequences(self, prepped: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``encode_sequence`` zero-padded to (n, params.sequence, sequence_dim), and the real lengths."""
        frames, dim = self.params.sequence, self.sequence_dim(self.params)
        out = np.zeros((len(prepped), frames, dim), np.float32)
        lengths = np.zeros(len(prepped), np.int32)
        for i, seq in enumerate(self.encode_sequence(prepped)):
            seq = np.asarray(seq, np.float32)[:frames]
            if seq.ndim != 2 or seq.shape[1] != dim:
                raise ValueError(f"encoder {self.name!r} returned a sequence of shape {seq.shape}, expected (<= {frames}, {dim})")
            out[i, :len(seq)], lengths[i] = seq, len(seq)
        return out, lengths


ENCODERS: dict[str, dict[str, type[Encoder]]] = {}
_ADD: dict[str, Any] = {}
for _m in MODALITIES:
    ENCODERS[_m], _ADD[_m] = registry(f"{_m} encoder")


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    if cls.modality not in _ADD:
        raise ValueError(f"encoder {cls.__qualname__} has modality {cls.modality!r}; expected one of {MODALITIES}")
    return _ADD[cls.modality](cls)


def get_encoder(modality: str, name: str) -> type[Encoder]:
    import stages.features  # noqa: F401  (imports the modules that register the built-in encoders)

    table = ENCODERS.get(modality)
    if table is None:
        raise KeyError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if name not in table:
        raise KeyError(f"unknown {modality} encoder {name!r}; known: {', '.join(sorted(table))}")
    return table[name]
