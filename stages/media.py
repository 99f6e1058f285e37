"""Decoding and encoding media, shared by cleanup, augmentation and feature stages.

Decoded once per process: a stage chain hands each row's media from stage to stage as encoded
bytes (what the shards and the object store hold), and every stage used to decode them again.
``decode_image`` / ``decode_audio`` keep what they decode, and the encoders keep what they
encoded (where that is exactly what decoding the bytes gives back), in a small memo keyed by the
bytes object itself; the stage chain empties it after each block (``forget_decoded``). Decoded
arrays from the memo are read-only: a caller that changes pixels or samples copies them first.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}
MEMO_BYTES = 128 * 1024 * 1024   # decoded media kept per process at most (a block's worth)

# id(encoded bytes) -> (the bytes, decoded form, its size). The entry holds the bytes object, so its
# id cannot be reused by another object while the entry lives; a lookup also checks identity.
_memo: dict[int, tuple[bytes, Any, int]] = {}
_memo_size = 0


def remember(data: bytes, decoded: Any, nbytes: int) -> None:
    """Keep ``decoded`` as what decoding ``data`` gives (it must be exactly that)."""
    global _memo_size
    if not isinstance(data, bytes) or nbytes > MEMO_BYTES:
        return
    for part in decoded if isinstance(decoded, tuple) else (decoded,):
        if isinstance(part, np.ndarray):
            part.flags.writeable = False
    old = _memo.pop(id(data), None)
    if old is not None:
        _memo_size -= old[2]
    _memo[id(data)] = (data, decoded, nbytes)
    _memo_size += nbytes
    while _memo_size > MEMO_BYTES:   # oldest first: a stage reads a block in the order it was written
        _, _, size = _memo.pop(next(iter(_memo)))
        _memo_size -= size


def recall(data: Any) -> Any | None:
    entry = _memo.get(id(data))
    return entry[1] if entry is not None and entry[0] is data else None


def forget_decoded() -> None:
    global _memo_size
    _memo.clear()
    _memo_size = 0


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (as written by cleanup.image) -> HxWx3 uint8 RGB array (read-only)."""
    pixels = recall(data)
    if pixels is None:
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.asarray(im.convert("RGB"))
        remember(data, pixels, pixels.nbytes)
    return pixels


def encode_image(pixels: np.ndarray, fmt: str = "jpg", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt == "jpg" else {"optimize": False}
    Image.fromarray(pixels).save(buf, format=IMAGE_FORMATS[fmt], **kwargs)
    data = buf.getvalue()
    if fmt == "png" and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
        remember(data, np.array(pixels), pixels.nbytes)   # lossless: decoding gives these pixels back
    return data


def image_format(data: bytes) -> str:
    """'jpg' or 'png' from the magic bytes of an encoded image."""
    return "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Encoded bytes (FLAC/WAV/OGG) -> (mono float32 waveform (read-only), sample rate)."""
    known = recall(data)
    if known is None:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        known = (wave.mean(axis=1), int(sr))
        remember(data, known, known[0].nbytes)
    return known


def encode_flac(wave: np.ndarray, sr: int) -> bytes:
    """Mono float samples -> 16-bit FLAC. The samples are quantised here as libsndfile would
    (x 32768, rounded to nearest, clipped), so the decoded form is known without decoding."""
    pcm = np.clip(np.rint(np.clip(wave, -1.0, 1.0) * np.float32(32768)), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="FLAC", subtype="PCM_16")
    data = buf.getvalue()
    decoded = pcm.astype(np.float32) / np.float32(32768)
    remember(data, (decoded, int(sr)), decoded.nbytes)
    return data
