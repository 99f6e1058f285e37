"""``augment.image``: torchvision v2 functional ops with explicitly drawn parameters.

Values are CxHxW uint8 tensors on the stage's device (CUDA when available under ``auto``);
every op keeps the image's size, so shapes and dtype never change.

torch and torchvision are imported on first use, not with this module: they take ~3 s to import,
which a driver that only validates this stage's parameters (``resolve_stages``) should not pay.
"""
from __future__ import annotations

import math
from functools import cache, partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from stages.augment.base import ModalityAugmenter, Op, OpPolicy, check_ops, noise_seed, register_op, uniform
from stages.base import StageParams
from stages.media import decode_image, encode_image, image_format
from stages.registry import register_stage

if TYPE_CHECKING:
    import torch

Range = tuple[float, float]
OPS: dict[str, Op] = {}
op = partial(register_op, OPS)


@cache
def _tv():
    """torchvision's v2 functional ops (see the module docstring)."""
    import torchvision.transforms.v2.functional as F

    return F


def _hw(img: torch.Tensor) -> tuple[int, int]:
    return int(img.shape[-2]), int(img.shape[-1])


# -- resized crop -----------------------------------------------------------------------------
class ResizedCropPolicy(OpPolicy):
    p: float = Field(0.5, ge=0.0, le=1.0)
    scale: Range = (0.6, 1.0)          # fraction of the area kept
    ratio: Range = (3 / 4, 4 / 3)      # aspect ratio range of the crop


def _draw_crop(rng: np.random.Generator, pol: ResizedCropPolicy, img: torch.Tensor, _stage: Any) -> dict:
    """torchvision's RandomResizedCrop.get_params, drawn from our generator."""
    h, w = _hw(img)
    log_ratio = (math.log(pol.ratio[0]), math.log(pol.ratio[1]))
    for _ in range(10):
        area = h * w * rng.uniform(*pol.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return {"top": top, "left": left, "height": ch, "width": cw, "size": [h, w]}
    return {"top": 0, "left": 0, "height": h, "width": w, "size": [h, w]}  # fallback: whole image


@op("resized_crop", _draw_crop)
def resized_crop(img: torch.Tensor, r: dict) -> torch.Tensor:
    return _tv().resized_crop(img, r["top"], r["left"], r["height"], r["width"], list(r["size"]), antialias=True)


# -- horizontal flip --------------------------------------------------------------------------
@op("hflip", lambda rng, pol, img, stage: {})
def hflip(img: torch.Tensor, r: dict) -> torch.Tensor:
    return _tv().horizontal_flip(img)


# -- rotation ---------------------------------------------------------------------------------
class RotatePolicy(OpPolicy):
    p: float = Field(0.3, ge=0.0, le=1.0)
    degrees: float = Field(15.0, ge=0.0, le=180.0)   # angle drawn in [-degrees, degrees]


@op("rotate", lambda rng, pol, img, stage: {"angle": uniform(rng, (-pol.degrees, pol.degrees), 3)})
def rotate(img: torch.Tensor, r: dict) -> torch.Tensor:
    F = _tv()
    return F.rotate(img, r["angle"], interpolation=F.InterpolationMode.BILINEAR, fill=0)


# -- colour jitter ----------------------------------------------------------------------------
class ColorJitterPolicy(OpPolicy):
    p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.3, ge=0.0)    # factor drawn in [1-b, 1+b]
    contrast: float = Field(0.3, ge=0.0)
    saturation: float = Field(0.3, ge=0.0)
    hue: float = Field(0.05, ge=0.0, le=0.5)  # shift drawn in [-hue, hue]


def _draw_jitter(rng: np.random.Generator, pol: ColorJitterPolicy, img: torch.Tensor, _stage: Any) -> dict:
    def factor(m: float) -> float:
        return uniform(rng, (max(0.0, 1 - m), 1 + m))

    return {"brightness": factor(pol.brightness), "contrast": factor(pol.contrast),
            "saturation": factor(pol.saturation), "hue": uniform(rng, (-pol.hue, pol.hue))}


@op("color_jitter", _draw_jitter)
def color_jitter(img: torch.Tensor, r: dict) -> torch.Tensor:
    F = _tv()
    img = F.adjust_brightness(img, r["brightness"])
    img = F.adjust_contrast(img, r["contrast"])
    img = F.adjust_saturation(img, r["saturation"])
    return F.adjust_hue(img, r["hue"])


# -- gaussian noise ---------------------------------------------------------------------------
class NoisePolicy(OpPolicy):
    p: float = Field(0.2, ge=0.0, le=1.0)
    sigma: Range = (0.01, 0.05)   # std of the noise on the [0, 1] scale


@op("gaussian_noise", lambda rng, pol, img, stage: {"sigma": uniform(rng, pol.sigma), "seed": noise_seed(rng)})
def gaussian_noise(img: torch.Tensor, r: dict) -> torch.Tensor:
    import torch

    # the field comes from numpy on the host so CPU and CUDA runs add the same noise
    field = np.random.default_rng(r["seed"]).standard_normal(tuple(img.shape), dtype=np.float32)
    noisy = img.float() / 255.0 + r["sigma"] * torch.from_numpy(field).to(img.device)
    return (noisy.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


# -- gaussian blur ----------------------------------------------------------------------------
class BlurPolicy(OpPolicy):
    p: float = Field(0.2, ge=0.0, le=1.0)
    sigma: Range = (0.1, 1.5)


def _draw_blur(rng: np.random.Generator, pol: BlurPolicy, img: torch.Tensor, _stage: Any) -> dict:
    sigma = uniform(rng, pol.sigma)
    kernel = 2 * math.ceil(3 * sigma) + 1
    limit = 2 * min(_hw(img)) - 1            # reflect padding needs kernel // 2 < side; both odd
    return {"sigma": sigma, "kernel_size": min(kernel, limit)}


@op("gaussian_blur", _draw_blur)
def gaussian_blur(img: torch.Tensor, r: dict) -> torch.Tensor:
    k, s = r["kernel_size"], r["sigma"]
    return _tv().gaussian_blur(img, [k, k], [s, s])


# -- the stage --------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("augment.image: device 'cuda' asked for but torch.cuda.is_available() is False")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class ImageAugParams(StageParams):
    ops: list[str] = Field(default_factory=lambda: [
        "resized_crop", "hflip", "rotate", "color_jitter", "gaussian_blur", "gaussian_noise"])
    resized_crop: ResizedCropPolicy = ResizedCropPolicy()
    hflip: OpPolicy = OpPolicy(p=0.5)
    rotate: RotatePolicy = RotatePolicy()
    color_jitter: ColorJitterPolicy = ColorJitterPolicy()
    gaussian_noise: NoisePolicy = NoisePolicy()
    gaussian_blur: BlurPolicy = BlurPolicy()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    jpeg_quality: int = Field(90, ge=1, le=100)

    @field_validator("ops")
    @classmethod
    def _known(cls, ops: list[str]) -> list[str]:
        return check_ops(ops, OPS)


@register_stage
class ImageAugmenter(ModalityAugmenter):
    """Random resized crop, flip, rotation, colour jitter, noise and blur on augmented copies."""

    name = "augment.image"
    version = 1
    modality = "image"
    Params = ImageAugParams
    OPS = OPS

    @classmethod
    def decode(cls, data: bytes, params: ImageAugParams) -> torch.Tensor:
        import torch

        pixels = decode_image(data)
        return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1).to(resolve_device(params.device))

    @classmethod
    def encode(cls, img: torch.Tensor, original: bytes, params: ImageAugParams) -> bytes:
        pixels = img.permute(1, 2, 0).contiguous().cpu().numpy()
        return encode_image(pixels, fmt=image_format(original), quality=params.jpeg_quality)
