"""Decoding and encoding media, shared by cleanup, augmentation and feature stages."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (as written by cleanup.image) -> HxWx3 uint8 RGB array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_image(pixels: np.ndarray, fmt: str = "jpg", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt == "jpg" else {"optimize": False}
    Image.fromarray(pixels).save(buf, format=IMAGE_FORMATS[fmt], **kwargs)
    return buf.getvalue()


def image_format(data: bytes) -> str:
    """'jpg' or 'png' from the magic bytes of an encoded image."""
    return "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Encoded bytes (FLAC/WAV/OGG) -> (mono float32 waveform, sample rate)."""
    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave.mean(axis=1), int(sr)


def encode_flac(wave: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
