"""Feature extraction: per-modality encoder registries and the ``features.<m>`` stages.

The runner asks ``plan_feature_stages`` which stages to run for a configured encoder (one stage for
weight-free encoders; a CPU ``.prep`` stage then the model stage for pretrained ones, so that
preprocessing overlaps inference on separate actor pools) and ``feature_dim`` for the stored width.
"""
from __future__ import annotations

from typing import Any

from stages.features import audio, image, text  # noqa: F401  (register the built-in encoders and stages)
from stages.features.base import ENCODERS, Encoder, EncoderParams, MissingWeights, get_encoder, register_encoder

__all__ = ["ENCODERS", "Encoder", "EncoderParams", "MissingWeights", "feature_dim", "get_encoder",
           "plan_feature_stages", "register_encoder"]


def plan_feature_stages(modality: str, encoder: str, options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The ordered (stage name, params) to run for this encoder (each stage's ``fingerprint``
    validates the options and checks the model files)."""
    cls = get_encoder(modality, encoder)
    params = {"encoder": encoder, "options": dict(options or {})}
    stage = f"features.{modality}"
    return [(f"{stage}.prep", params), (stage, params)] if cls.pretrained else [(stage, params)]


def feature_dim(modality: str, encoder: str, options: dict[str, Any] | None = None) -> int:
    """Output width of this encoder; for pretrained ones, fails (MissingWeights) if the model is absent."""
    cls = get_encoder(modality, encoder)
    return cls.dim_for(cls.Params.model_validate(options or {}))
