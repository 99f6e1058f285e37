"""``cleanup.image``: crawled image bytes -> one RGB encoding, after safety and quality checks."""
from __future__ import annotations

import io
import struct
import warnings
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import Field

from stages.base import BudgetedBytes, Cleaned, ModalityCleaner, Reject, StageParams
from stages.media import IMAGE_FORMATS, encode_image, remember
from stages.registry import register_stage

# What PIL (or one of its many format plugins) may raise on hostile or damaged bytes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)
DEFAULT_INPUT_FORMATS = ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]  # JPEG covers MPO
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"P", "PA", "LA", "La", "RGBA", "RGBa"}
_SRGB = ImageCms.createProfile("sRGB")
# Header facts that leave the pixels and the privacy of a file as they are: an image holding only
# these may be stored as it came (no EXIF, ICC, XMP, comments or text chunks to strip).
_PLAIN_INFO = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "progressive", "progression",
               "adobe", "adobe_transform", "gamma", "srgb", "aspect"}


class ImageParams(StageParams):
    max_raw_bytes: int = Field(50 * 1024 * 1024, gt=0)      # image_too_large_bytes, before opening
    max_pixels: int = Field(40_000_000, gt=0)               # header width*height: image_too_large_pixels
    input_formats: list[str] = Field(default_factory=lambda: list(DEFAULT_INPUT_FORMATS))
    min_side: int = Field(32, ge=1)                         # image_too_small
    max_aspect: float = Field(4.0, ge=1.0)                  # long side / short side: image_bad_aspect
    blank_std: float = Field(3.0, ge=0.0)                   # grey std (0-255) below this: image_blank
    blur_threshold: float = Field(30.0, ge=0.0)             # Laplacian variance below this: image_blurry; 0 = off
    work_side: int = Field(256, ge=32)                      # long side of the grey image the checks run on
    max_side: int = Field(1024, ge=16)                      # output long side (downscale only)
    icc_to_srgb: bool = True                                # apply an embedded ICC profile (CMYK, wide gamut)
    format: Literal["jpg", "png"] = "jpg"
    quality: int = Field(90, ge=1, le=100)                  # jpg only
    keep_unchanged: bool = True                             # store the input bytes when cleaning changed nothing


def identify_format(data: bytes) -> str | None:
    """The format any PIL plugin recognises in the header, or None (used only to name a reject)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except (Image.DecompressionBombError, *DECODE_ERRORS):
        return None


def open_image(data: bytes, p: ImageParams) -> Image.Image:
    """Open lazily and check the header (format, pixel count, sides) before any pixel is decoded."""
    try:
        im = Image.open(BudgetedBytes(data), formats=p.input_formats)   # every read checks the deadline
    except Image.DecompressionBombError as exc:
        raise Reject("image_too_large_pixels", str(exc)) from None
    except UnidentifiedImageError:
        other = identify_format(data)
        if other:
            raise Reject("image_unsupported_format", f"{other} is not in input_formats {p.input_formats}") from None
        raise Reject("image_corrupt", f"not a decodable {'/'.join(p.input_formats)} image") from None
    except DECODE_ERRORS as exc:
        raise Reject("image_corrupt", f"header: {type(exc).__name__}: {exc}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise Reject("image_corrupt", f"header size {w}x{h}")
    if w * h > p.max_pixels:
        raise Reject("image_too_large_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {p.max_pixels}")
    if min(w, h) < p.min_side:
        raise Reject("image_too_small", f"{w}x{h}: shorter side < min_side {p.min_side}")
    if max(w, h) / min(w, h) > p.max_aspect:
        aspect = max(w, h) / min(w, h)
        raise Reject("image_bad_aspect", f"{w}x{h}: aspect {aspect:.2f} > max_aspect {p.max_aspect}")
    return im


def _require_strict_truncation() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): "
                           "truncated images would pass as clean; leave it False in cleanup workers")


def decode_pixels(im: Image.Image, draft_side: int) -> Image.Image:
    """Decode every pixel (truncated files raise here), then undo the EXIF orientation."""
    _require_strict_truncation()
    if im.format in ("JPEG", "MPO"):
        im.draft(None, (draft_side, draft_side))  # DCT-domain downscale, never below draft_side
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise Reject("image_too_large_pixels", str(exc)) from None
    except DECODE_ERRORS as exc:
        raise Reject("image_corrupt", f"{type(exc).__name__}: {exc}") from None
    try:
        return ImageOps.exif_transpose(im)
    except DECODE_ERRORS:
        return im  # unreadable EXIF: the pixels are fine, keep them as stored


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im, dtype=np.float64)
    peak = float(np.nanmax(arr)) if arr.size else 0.0
    top = 1.0 if im.mode == "F" and peak <= 1.0 else 65535.0 if peak > 255 else 255.0
    return Image.fromarray(np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).round().astype(np.uint8), "L")


def _apply_icc(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK"):
        return im
    try:
        return ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im  # a broken profile: plain conversion below is the best we can do


def to_rgb(im: Image.Image, icc_to_srgb: bool = True) -> Image.Image:
    """Any PIL mode -> RGB: 16/32-bit scaled to 8-bit, alpha composited onto white, CMYK via ICC."""
    if im.mode in _HIGH_DEPTH_MODES:
        im = _high_depth_to_l(im)
    if icc_to_srgb:
        im = _apply_icc(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise Reject("image_unsupported_mode", f"cannot convert mode {im.mode} to RGB: {exc}") from None


def work_grey(rgb: np.ndarray, side: int) -> np.ndarray:
    """Grey image with its long side resized to ``side``, so scores do not depend on resolution."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def grey_std(grey: np.ndarray) -> float:
    """Standard deviation of the grey levels (OpenCV's, a sixth of numpy's time on uint8)."""
    return float(cv2.meanStdDev(grey)[1][0, 0])


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: low for blurred or out-of-focus images. On uint8 the 3x3 Laplacian
    lies in [-1020, 1020]: int16 holds it exactly, at a quarter of float64's time."""
    return float(cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))[1][0, 0] ** 2)


@register_stage
class ImageCleaner(ModalityCleaner):
    """Crawled image bytes -> RGB, oriented, resized, re-encoded; rejects unsafe or useless images."""

    name = "cleanup.image"
    version = 3   # 2: unchanged inputs are stored as they came (keep_unchanged); 3: OpenCV's std and variance
    modality = "image"
    Params = ImageParams
    reasons: ClassVar[dict[str, str]] = {
        "image_corrupt": "empty, garbage, truncated or undecodable bytes (pixels are fully decoded)",
        "image_too_large_bytes": "raw bytes longer than max_raw_bytes; checked before opening",
        "image_too_large_pixels": "header width*height above max_pixels (decompression bomb guard)",
        "image_unsupported_format": "a format PIL knows but not listed in input_formats",
        "image_unsupported_mode": "a colour mode that cannot be converted to RGB",
        "image_too_small": "shorter side below min_side",
        "image_bad_aspect": "long side / short side above max_aspect",
        "image_blank": "std of the grey image below blank_std (uniform or near-uniform)",
        "image_blurry": "variance of the Laplacian at work_side below blur_threshold",
    }

    def __init__(self, params: ImageParams | dict | None = None, context=None):
        super().__init__(params, context)
        _require_strict_truncation()
        Image.init()
        unknown = sorted(set(self.params.input_formats) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"cleanup.image: unknown input_formats {unknown}; PIL names such as JPEG, PNG, WEBP")

    def clean(self, value: Any) -> Cleaned:
        p: ImageParams = self.params
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) == 0:
            raise Reject("image_corrupt", "empty or not bytes")
        if len(value) > p.max_raw_bytes:
            raise Reject("image_too_large_bytes", f"{len(value)} bytes > max_raw_bytes {p.max_raw_bytes}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)     # max_pixels decides
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # odd EXIF / tags
            data = bytes(value)
            with open_image(data, p) as im:
                src_format, (src_w, src_h) = im.format or "", im.size
                plain = im.mode == "RGB" and set(im.info) <= _PLAIN_INFO and src_format == IMAGE_FORMATS[p.format]
                rgb = to_rgb(decode_pixels(im, max(p.max_side, p.work_side)), p.icc_to_srgb)
        grey = work_grey(np.asarray(rgb), p.work_side)   # quality checks before the output resize
        std = grey_std(grey)
        if std < p.blank_std:
            raise Reject("image_blank", f"grey std {std:.2f} < blank_std {p.blank_std}")
        sharp = sharpness(grey)
        if sharp < p.blur_threshold:
            raise Reject("image_blurry", f"Laplacian variance {sharp:.1f} < blur_threshold {p.blur_threshold}")
        rgb.thumbnail((p.max_side, p.max_side), Image.Resampling.LANCZOS)
        pixels = np.asarray(rgb)
        # Unchanged (same format and size, plain RGB, nothing to strip): re-encoding would only
        # lose quality and time. These pixels are what decoding the input gives: later stages
        # in this process take them instead of decoding again.
        kept = p.keep_unchanged and plain and rgb.size == (src_w, src_h)
        meta = {
            "width": pixels.shape[1], "height": pixels.shape[0], "format": p.format,
            "src_format": src_format, "src_width": src_w, "src_height": src_h,
            "sharpness": round(sharp, 2), "grey_std": round(std, 2), "stored": "input" if kept else "encoded",
        }
        if kept:
            remember(data, pixels, pixels.nbytes)
            return Cleaned(data, meta)
        return Cleaned(encode_image(pixels, p.format, p.quality), meta)

