"""Feature extraction: per-modality encoder registries and the ``features.<m>`` stages.

``plan_feature_stages`` says which stages a configured encoder runs as (``FeatureStage.expand``: one
stage for weight-free encoders; a CPU ``.prep`` stage then the model stage for pretrained ones, so
that preprocessing overlaps inference on separate actor pools); ``feature_dim`` the stored width.
"""
from __future__ import annotations

from typing import Any

from stages.features import audio, image, text, video  # noqa: F401  (register the built-in encoders and stages)
from stages.features.base import ENCODERS, Encoder, EncoderParams, MissingWeights, get_encoder, register_encoder

__all__ = ["ENCODERS", "Encoder", "EncoderParams", "MissingWeights", "feature_dim", "get_encoder",
           "plan_feature_stages", "register_encoder"]


def plan_feature_stages(modality: str, encoder: str, options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The ordered (stage name, params) to run for this encoder (each stage's ``fingerprint``
    validates the options and checks the model files)."""
    from stages.registry import get_stage

    stage = get_stage(f"features.{modality}")
    return [(name, params) for name, params, _ in stage.expand(stage.from_config(options or {}, encoder=encoder))]


def feature_dim(modality: str, encoder: str, options: dict[str, Any] | None = None) -> int:
    """Output width of this encoder; for pretrained ones, fails (MissingWeights) if the model is absent."""
    cls = get_encoder(modality, encoder)
    return cls.dim_for(cls.Params.model_validate(options or {}))
