"""Image encoders ("hist": weight-free; "torchvision", "hf_vision": pretrained) and the image feature stages."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlparse

import cv2
import numpy as np
from pydantic import Field, field_validator

from stages.features.base import Encoder, EncoderParams, MissingWeights, register_encoder
from stages.features.hf import HFEncoder, HFParams, load_companion
from stages.features.stage import FeaturePrepStage, FeatureStage
from stages.features.torch_encoder import TorchEncoder, TorchParams
from stages.media import decode_image
from stages.registry import register_stage

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HistParams(EncoderParams):
    size: int = Field(64, ge=8)                  # images are resized to size x size first
    grid: int = Field(2, ge=1)                   # grid x grid cells of orientation histograms
    orientation_bins: int = Field(9, ge=2)       # unsigned gradient angle, 0..180 degrees
    hsv_bins: tuple[int, int, int] = (8, 3, 3)   # joint hue x saturation x value histogram


@register_encoder
class HistImageEncoder(Encoder):
    """Gradient-orientation histograms (Sobel, magnitude-weighted, per grid cell) + an HSV colour histogram."""

    name = "hist"
    modality = "image"
    Params: ClassVar[type[EncoderParams]] = HistParams

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        return params.grid ** 2 * params.orientation_bins + int(np.prod(params.hsv_bins))

    def preprocess(self, values: list[Any]) -> list[Any]:
        size = (self.params.size, self.params.size)
        return [cv2.resize(decode_image(v), size, interpolation=cv2.INTER_AREA) for v in values]

    def encode(self, prepped: list[Any]) -> np.ndarray:
        return np.stack([np.concatenate([self._gradients(img), self._colours(img)]) for img in prepped])

    def _gradients(self, img: np.ndarray) -> np.ndarray:
        p = self.params
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float32)
        mag, ang = cv2.cartToPolar(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3),
                                   cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3), angleInDegrees=True)
        bins = (np.mod(ang, 180.0) * p.orientation_bins / 180.0).astype(np.int64) % p.orientation_bins
        h, w = gray.shape
        cell = (np.arange(h)[:, None] * p.grid // h) * p.grid + (np.arange(w)[None, :] * p.grid // w)
        hist = np.bincount((cell * p.orientation_bins + bins).ravel(), weights=mag.ravel(),
                           minlength=p.grid ** 2 * p.orientation_bins)
        return (hist / max(np.linalg.norm(hist), 1e-12)).astype(np.float32)

    def _colours(self, img: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, list(self.params.hsv_bins), [0, 180, 0, 256, 0, 256]).ravel()
        hist = np.sqrt(hist / max(hist.sum(), 1.0))   # Hellinger: sqrt of proportions, unit L2 norm
        return hist.astype(np.float32)


class TorchvisionParams(TorchParams):
    arch: str = "resnet50"
    weights: str = Field(min_length=1)   # a .pth state_dict, or a weights enum name (ResNet50_Weights.IMAGENET1K_V2)
    resize_size: int = Field(256, ge=8)
    crop_size: int = Field(224, ge=8)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            raise ValueError(f"unknown torchvision classification model {arch!r}; e.g. {', '.join(known[:8])}")
        return arch


def torchvision_weights_path(arch: str, weights: str, modality: str = "image") -> Path:
    """A local state_dict file, or a weights enum's checkpoint in the torch hub cache; never downloads."""
    import torch
    import torchvision

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    how = (f"set stages.features.{modality}.params.weights to a local .pth state_dict, or put the torchvision "
           f"checkpoint in {hub} (TORCH_HOME sets the cache)")
    if weights.endswith((".pth", ".pt")) or "/" in weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingWeights(f"no torchvision weights file at {path.resolve()}; {how}")
        return path
    try:
        enum = torchvision.models.get_weight(weights) if "." in weights else torchvision.models.get_model_weights(arch)[weights]
    except (KeyError, ValueError, AttributeError):
        raise ValueError(f"unknown torchvision weights {weights!r} for {arch}") from None
    path = hub / Path(urlparse(enum.url).path).name
    if not path.is_file():
        raise MissingWeights(f"torchvision weights {weights} not found at {path}; {how}")
    return path


def strip_head(model: torch.nn.Module) -> int:
    """Replace the last Linear layer (the classifier) by Identity; returns the feature width it took."""
    import torch

    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, torch.nn.Identity())
    return head.in_features


@register_encoder
class TorchvisionImageEncoder(TorchEncoder):
    """A torchvision classification backbone; penultimate-layer features."""

    name = "torchvision"
    modality = "image"
    Params: ClassVar[type[EncoderParams]] = TorchvisionParams

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})
        self.weights_path = torchvision_weights_path(params.arch, params.weights, self.modality)
        super().__init__(params, inference=inference)
        if inference:
            import torch

            shape = (1, 3, 1, 1)
            self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape)
            self.std = torch.tensor(IMAGENET_STD, device=self.device).view(shape)

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        import torch
        import torchvision

        torchvision_weights_path(params.arch, params.weights, cls.modality)   # fail at plan time, not in the actor
        with torch.device("meta"):   # shapes only: no memory, no weights
            return strip_head(torchvision.models.get_model(params.arch, weights=None))

    def load_model(self) -> torch.nn.Module:
        import torchvision

        model = torchvision.models.get_model(self.params.arch, weights=None)
        import torch

        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            raise ValueError(f"{self.weights_path} does not hold {self.params.arch} weights: "
                             f"{lines[min(1, len(lines) - 1)].strip()[:200]}") from None
        strip_head(model)
        return model

    def preprocess(self, values: list[Any]) -> list[Any]:
        """Resize + centre crop, kept as uint8 CHW (a quarter of float32 on the way to the GPU)."""
        import torch
        from torchvision.transforms.v2 import functional as F

        out = []
        for v in values:
            img = torch.from_numpy(np.array(decode_image(v))).permute(2, 0, 1)   # a writable copy
            img = F.center_crop(F.resize(img, [self.params.resize_size], antialias=True), [self.params.crop_size])
            out.append(img.numpy())
        return out

    def forward(self, prepped: list[Any]) -> torch.Tensor:
        x = self.to_device(np.stack(prepped)).float().div_(255.0)
        return self.model((x - self.mean) / self.std)


class HFVisionParams(HFParams):
    pooling: Literal["auto", "pooler", "cls", "mean"] = "auto"   # auto: projection / pooler output, else CLS


@register_encoder
class HFVisionEncoder(HFEncoder):
    """CLIP vision / ViT / DINOv2 ... via AutoModel + AutoImageProcessor from a local directory."""

    name = "hf_vision"
    modality = "image"
    Params: ClassVar[type[EncoderParams]] = HFVisionParams

    def load_companions(self) -> None:
        from transformers import AutoImageProcessor

        self.processor = load_companion(AutoImageProcessor.from_pretrained, self.model_dir, "image processor", "image")

    def preprocess(self, values: list[Any]) -> list[Any]:
        pixels = self.processor(images=[np.array(decode_image(v)) for v in values], return_tensors="pt")["pixel_values"]
        return list(pixels.float().numpy())

    def forward(self, prepped: list[Any]) -> torch.Tensor:
        pixels = self.to_device(np.stack(prepped))
        if self.dual:
            return self.tower_features(pixel_values=pixels)
        out = self.model(pixel_values=pixels)
        pooling = self.params.pooling
        if pooling == "mean":
            return out.last_hidden_state.mean(dim=1)
        if pooling == "pooler" or (pooling == "auto" and getattr(out, "pooler_output", None) is not None):
            return out.pooler_output
        return out.last_hidden_state[:, 0]


@register_stage
class ImageFeaturesPrep(FeaturePrepStage):
    name = "features.image.prep"
    modality = "image"


@register_stage
class ImageFeatures(FeatureStage):
    name = "features.image"
    modality = "image"
