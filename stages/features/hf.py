"""Offline loading of Hugging Face models: a local directory, or a hub id already in the HF cache.

Nothing is ever downloaded (``local_files_only=True``). A model that is not on this machine fails
when the encoder is built, with the path that was looked at and how to provide it.

An encoder whose Params derive from ``HFSequenceParams`` also stores a sequence (``sequence: N``):
its forward pass hands the last hidden layer to ``keep_frames``, which keeps each row's real frames
cut to N (``pool_frames``: averaged into N equal stretches instead) for ``encode_sequence``; the
pooled vector is computed as without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import Field

from stages.features.base import EncoderParams, MissingWeights, SequenceParams
from stages.features.torch_encoder import TorchEncoder, TorchParams

if TYPE_CHECKING:
    import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class HFParams(TorchParams):
    model: str = Field(min_length=1)   # local directory (config.json + weights) or a hub id in the HF cache


class HFSequenceParams(HFParams, SequenceParams):
    """For transformers encoders that can also store their last hidden layer's frames."""


def how_to_provide(modality: str) -> str:
    return (f"set stages.features.{modality}.params.model to a local directory holding config.json + weights, "
            f"or run with HF_HOME pointing at a cache that has it")


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a directory."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def resolve_model_dir(model: str, modality: str) -> Path:
    """The directory holding ``model``'s config and weights, or MissingWeights naming where we looked."""
    path = Path(model).expanduser()
    if not path.is_dir():
        if _looks_like_path(model):
            raise MissingWeights(f"no model directory at {path.resolve()}; {how_to_provide(modality)}")
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:   # not a valid hub id either
            cached = None
        if not isinstance(cached, str):
            raise MissingWeights(f"model {model!r} is neither a directory ({path.resolve()}) nor in the Hugging Face "
                                 f"cache {HF_HUB_CACHE}; {how_to_provide(modality)}")
        path = Path(cached).parent
    if not (path / "config.json").is_file():
        raise MissingWeights(f"no config.json in {path.resolve()}; {how_to_provide(modality)}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise MissingWeights(f"no weights in {path.resolve()} (looked for {', '.join(WEIGHT_FILES)}); "
                             f"{how_to_provide(modality)}")
    return path


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_model(path: Path) -> torch.nn.Module:
    """fp32 weights: autocast decides the compute precision, not the checkpoint's dtype."""
    import torch
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def load_companion(loader: Callable[..., Any], path: Path, what: str, modality: str) -> Any:
    """Tokenizer / image processor / feature extractor from the model directory."""
    try:
        return loader(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingWeights(f"no {what} in {path.resolve()} ({first}); {how_to_provide(modality)}") from None


# modality -> (sub-config of a two-tower model, the method that gives that tower's features)
TOWERS = {"image": ("vision_config", "get_image_features"), "text": ("text_config", "get_text_features"),
          "audio": ("audio_config", "get_audio_features"), "video": ("vision_config", "get_video_features")}


def is_dual(config: Any, modality: str) -> bool:
    """A two-tower model (CLIP, CLAP, SigLIP, X-CLIP): features come from ``get_<modality>_features``."""
    towers = {sub for sub, _ in TOWERS.values() if getattr(config, sub, None) is not None}   # image, video: one tower
    return TOWERS[modality][0] in towers and len(towers) >= 2


def hidden_dim(config: Any) -> int:
    """Width of a model's hidden states (its last hidden layer)."""
    for key in ("hidden_size", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the output width of a {type(config).__name__}")


def output_dim(config: Any, modality: str) -> int:
    """Width of the pooled output: a dual encoder's projection, else the hidden size."""
    if is_dual(config, modality):
        if getattr(config, "projection_dim", None):
            return int(config.projection_dim)
        config = getattr(config, TOWERS[modality][0])
    return hidden_dim(config)


def stretch_means(frames: np.ndarray, n: int) -> np.ndarray:
    """(t, d) frames averaged over ``n`` equal stretches; with ``n`` or fewer frames, the frames."""
    if len(frames) <= n:
        return frames
    return np.stack([s.mean(axis=0) for s in np.array_split(frames, n)])


def features_of(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFEncoder(TorchEncoder):
    """Role base for transformers encoders: resolves the model directory, loads companions, then the model."""

    Params: ClassVar[type[EncoderParams]] = HFParams
    pool_frames: ClassVar[bool] = False   # ``sequence: N``: average the frames into N stretches, or keep the first N

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})
        self.model_dir = resolve_model_dir(self.params.model, self.modality)
        self.config = load_config(self.model_dir)
        self.dual = is_dual(self.config, self.modality)
        self.load_companions()   # cheap, and a missing tokenizer fails before the model loads
        super().__init__(self.params, inference=inference)

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        config = load_config(resolve_model_dir(params.model, cls.modality))
        if getattr(params, "sequence", 0) and is_dual(config, cls.modality):
            raise ValueError(f"stages.features.{cls.modality}.params.sequence: {params.model} is a two-tower model, "
                             f"whose features are a projection; sequences come from single-tower models")
        return output_dim(config, cls.modality)

    @classmethod
    def sequence_dim(cls, params: EncoderParams) -> int:
        if not isinstance(params, SequenceParams):
            return 0
        return hidden_dim(load_config(resolve_model_dir(params.model, cls.modality)))

    def encode(self, prepped: list[Any]) -> np.ndarray:
        self._frames: dict[int, np.ndarray] = {}   # payload id -> its sequence, filled by ``keep_frames``
        return super().encode(prepped)

    def keep_frames(self, prepped: list[Any], hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        """With ``sequence``: keep each payload's real frames of ``hidden`` (n, t, d), right-padded
        where ``mask`` (n, t) is 0, cut or pooled to the stored length, for ``encode_sequence``."""
        frames = getattr(self.params, "sequence", 0)
        if not frames:
            return
        lengths = [hidden.shape[1]] * len(prepped) if mask is None else mask.sum(dim=1).tolist()
        states = (hidden if self.pool_frames else hidden[:, :frames]).float().cpu().numpy()
        for payload, state, n in zip(prepped, states, lengths, strict=True):
            real = state[: int(n)]
            self._frames[id(payload)] = stretch_means(real, frames) if self.pool_frames else real[:frames]

    def encode_sequence(self, prepped: list[Any]) -> list[np.ndarray]:
        """The frames ``encode`` kept for these payloads (it runs first when it has not seen them)."""
        if any(id(p) not in getattr(self, "_frames", {}) for p in prepped):
            self.encode(prepped)
        return [self._frames.pop(id(p)) for p in prepped]

    def load_companions(self) -> None:
        """Load the tokenizer / processor / feature extractor from ``self.model_dir``."""

    def load_model(self) -> torch.nn.Module:
        return load_model(self.model_dir)

    def tower_features(self, **inputs: Any) -> torch.Tensor:
        """A two-tower model's projected features for this modality."""
        return features_of(getattr(self.model, TOWERS[self.modality][1])(**inputs))
