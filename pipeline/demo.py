"""A small demo dataset made with numpy (and PyAV for the clips; no system packages): coloured
textured images, class-vocabulary captions (some as crawled HTML), tone-plus-noise audio, and short
clips of a shape moving a class's way with a tone on their audio track; plus the bad rows a crawl
always has.

Two kinds of signal. ``full``: every modality tells the four classes apart on its own (tests use it
to check that training learns). ``partial`` (what ``mmpipe demo`` makes): each class is two binary
traits and each modality carries part of them, so no single modality comes near perfect and fusion
has something to add. Warm or cool (city and desert are warm) is in the image colour and in the
pitch of a clip's audio track; still or moving water-and-road (ocean and desert) is in the order of
a sample's two tones (low then high, or high then low: the same pooled statistics, so only a
temporal branch over the audio frames hears it) and in the direction a clip's shape moves; the
caption holds a class word 60% of the time, among others."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

CLASSES = ("forest", "ocean", "city", "desert")
_COLOURS = {"forest": (40, 140, 50), "ocean": (30, 80, 190), "city": (120, 120, 130), "desert": (210, 170, 90)}
_WORDS = {
    "forest": "trees moss fern pine canopy trail leaves owl branch woodland",
    "ocean": "waves tide coral reef surf whale salt shore sailing deep",
    "city": "traffic tower street subway neon crowd office bridge taxi avenue",
    "desert": "dune sand cactus heat mirage camel dry canyon sun oasis",
}
_COMMON = "the a of and with in on at near under over today photo view scene picture some many".split()
_TONES = {"forest": 330.0, "ocean": 180.0, "city": 660.0, "desert": 990.0}
SR = 16000
# partial signal: the class as two traits (warm, ordered)
_TRAITS = {"forest": (0, 0), "ocean": (0, 1), "city": (1, 0), "desert": (1, 1)}
_PAIR_TONES = (400.0, 800.0)             # every partial sample's two tones; only their order differs
_TRACK_TONES = (260.0, 720.0)            # a partial clip's track: cool low, warm high


def _warm(label: str) -> int:
    return _TRAITS[label][0]


def _ordered(label: str) -> int:
    return _TRAITS[label][1]


def _image(label: str, rng: np.random.Generator, size: int = 96, partial: bool = False) -> bytes:
    if partial:   # the colour of the warm or cool pair of classes; stripes at any angle
        pair = [c for c in CLASSES if _warm(c) == _warm(label)]
        base = np.mean([_COLOURS[c] for c in pair], axis=0).astype(np.float32) + rng.normal(0, 25, 3)
        angle = rng.uniform(0, np.pi)
    else:
        base = np.array(_COLOURS[label], dtype=np.float32) + rng.normal(0, 25, 3)
        angle = {"forest": 0.0, "ocean": np.pi / 2, "city": np.pi / 4, "desert": 3 * np.pi / 4}[label]
        angle += rng.normal(0, 0.3)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(3, 6))
    img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _text(label: str, rng: np.random.Generator, html: bool, partial: bool = False) -> str:
    # Class words are a minority among shared words, and some come from another class.
    if partial:   # a class word 60% of the time, among one or two of any class's
        own = rng.choice(_WORDS[label].split(), size=int(rng.random() < 0.6))
        other = rng.choice(_WORDS[CLASSES[rng.integers(len(CLASSES))]].split(), size=rng.integers(1, 3))
    else:
        own = rng.choice(_WORDS[label].split(), size=rng.integers(2, 4))
        other = rng.choice(_WORDS[CLASSES[rng.integers(len(CLASSES))]].split(), size=1)
    words = list(own) + list(other) + list(rng.choice(_COMMON, size=rng.integers(6, 10)))
    rng.shuffle(words)
    sentence = " ".join(words).capitalize() + "."
    if not html:
        return sentence
    return (f"<html><head><title>Photo</title><style>p {{color: red}}</style><script>var x = 1;</script></head>"
            f"<body><nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
            f"<article><p>{sentence}</p></article><footer>&copy; 2026 example</footer></body></html>")


def _audio(label: str, rng: np.random.Generator, seconds: float = 1.0, partial: bool = False) -> bytes:
    t = np.arange(int(SR * seconds)) / SR
    if partial:   # the same two tones, low then high or high then low
        low, high = (f * rng.uniform(0.95, 1.05) for f in _PAIR_TONES)
        first, second = (high, low) if _ordered(label) else (low, high)
        f0 = np.where(t < seconds / 2, first, second)
        wave = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / SR) + 0.1 * np.sin(4 * np.pi * np.cumsum(f0) / SR)
    else:
        f0 = _TONES[label] * rng.uniform(0.92, 1.08)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2 * f0 * t)
    wave = wave * np.hanning(len(t)) ** 0.3 + rng.normal(0, rng.uniform(0.03, 0.12), len(t))
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# Where each class's shape travels over a clip (dy, dx per second, in frame heights / widths).
_MOTION = {"forest": (0.0, 0.6), "ocean": (0.6, 0.0), "city": (0.45, 0.45), "desert": (-0.45, 0.45)}
CLIP_FPS, CLIP_SIDE = 8, 64


def _clip(label: str, rng: np.random.Generator, seconds: float = 2.0, partial: bool = False) -> bytes:
    """A clip (H.264 mp4 with an AAC track) of a bright square moving the class's way over noise;
    ``partial``: across or down (the ordered trait) in a colour of any class, the track's pitch
    telling warm from cool."""
    from stages.video import encode_mp4

    frames = int(CLIP_FPS * seconds)
    dy, dx = (_MOTION["ocean"] if _ordered(label) else _MOTION["forest"]) if partial else _MOTION[label]
    y0, x0 = rng.uniform(0.2, 0.5, 2) if dy >= 0 else (rng.uniform(0.5, 0.8), rng.uniform(0.2, 0.5))
    hue = CLASSES[rng.integers(len(CLASSES))] if partial else label
    colour = np.array(_COLOURS[hue], np.float32) * rng.uniform(0.8, 1.2) + 40
    side, size = CLIP_SIDE, CLIP_SIDE // 5
    # a dim backdrop of its own (smooth random shading): two clips are different scenes, as real ones are
    backdrop = np.kron(rng.uniform(10, 90, (4, 4, 1)), np.ones((side // 4, side // 4, 3)))
    video = np.empty((frames, side, side, 3), np.uint8)
    for k in range(frames):
        t = k / CLIP_FPS
        y, x = int((y0 + dy * t / seconds) * side) % side, int((x0 + dx * t / seconds) * side) % side
        picture = backdrop + rng.normal(0, 8, (side, side, 3))
        picture[max(0, y - size):y + size, max(0, x - size):x + size] = colour
        video[k] = np.clip(picture, 0, 255).astype(np.uint8)
    t = np.arange(int(SR * seconds)) / SR
    pitch = _TRACK_TONES[_warm(label)] if partial else _TONES[label]
    tone = 0.3 * np.sin(2 * np.pi * pitch * rng.uniform(0.92, 1.08) * t) + rng.normal(0, 0.05, len(t))
    return encode_mp4(video, CLIP_FPS, audio=tone.astype(np.float32), sample_rate=SR)


SIGNALS = ("full", "partial")


def make_demo(out: str | Path, n: int = 300, seed: int = 0, videos: int = 0, signal: str = "full") -> Path:
    """Write ``out/manifest.jsonl`` plus media files; returns the manifest path. ``videos``: rows
    of a clip (its audio track is the row's audio) and some text, plus the clips' bad cases.
    ``signal``: ``full`` or ``partial`` (see the module docstring)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    partial = signal == "partial"
    out = Path(out)
    (out / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        label = CLASSES[k % len(CLASSES)]
        row: dict = {"id": f"s{k:05d}", "label": label}
        missing = rng.choice(["", "image", "text", "audio"], p=[0.7, 0.1, 0.1, 0.1])
        if missing != "image":
            (out / "media" / f"{row['id']}.jpg").write_bytes(_image(label, rng, partial=partial))
            row["image"] = f"media/{row['id']}.jpg"
        if missing != "text":
            row["text"] = _text(label, rng, html=rng.random() < 0.3, partial=partial)
        if missing != "audio":
            (out / "media" / f"{row['id']}.wav").write_bytes(_audio(label, rng, partial=partial))
            row["audio"] = f"media/{row['id']}.wav"
        rows.append(row)
    rows += _bad_rows(out, rows, rng)
    if videos:
        rows += _video_rows(out, videos, np.random.default_rng(seed + 1), partial)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _bad_rows(out: Path, good: list[dict], rng: np.random.Generator) -> list[dict]:
    media = out / "media"
    jpg = _image("forest", rng)
    (media / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (media / "garbage.wav").write_bytes(rng.bytes(3000))
    (media / "blank.png").write_bytes(_png(np.full((96, 96, 3), 200, np.uint8)))
    silent = io.BytesIO()
    sf.write(silent, np.zeros(SR, np.float32), SR, format="WAV")
    (media / "silent.wav").write_bytes(silent.getvalue())
    first = good[0]
    return [
        {"id": "bad-truncated-jpeg", "label": "forest", "image": "media/truncated.jpg", "text": "pine trees"},
        {"id": "bad-missing-file", "label": "ocean", "image": "media/does-not-exist.jpg"},
        {"id": "bad-garbage-audio", "label": "city", "audio": "media/garbage.wav"},
        {"id": "bad-empty-row", "label": "desert"},
        {"id": "bad-outside-root", "label": "forest", "image": "../../etc/hostname"},
        {"id": "bad-blank-image", "label": "city", "image": "media/blank.png"},
        {"id": "bad-silent-audio", "label": "ocean", "audio": "media/silent.wav"},
        {**{k: v for k, v in first.items() if k != "id"}, "id": "dup-of-" + first["id"]},
    ]


def _video_rows(out: Path, n: int, rng: np.random.Generator, partial: bool = False) -> list[dict]:
    from stages.video import encode_mp4

    media, rows = out / "media", []
    for k in range(n):
        label = CLASSES[k % len(CLASSES)]
        row = {"id": f"v{k:05d}", "label": label, "video": f"media/v{k:05d}.mp4"}
        (media / f"v{k:05d}.mp4").write_bytes(_clip(label, rng, partial=partial))
        if rng.random() < 0.5:
            row["text"] = _text(label, rng, html=False, partial=partial)
        rows.append(row)
    clip = _clip("forest", rng)
    (media / "truncated.mp4").write_bytes(clip[: len(clip) // 2])
    (media / "black.mp4").write_bytes(encode_mp4(np.zeros((16, CLIP_SIDE, CLIP_SIDE, 3), np.uint8), CLIP_FPS))
    (media / "audio-only.mp4").write_bytes(_audio_only(_audio("ocean", rng)))
    return rows + [
        {"id": "bad-truncated-video", "label": "forest", "video": "media/truncated.mp4"},
        {"id": "bad-black-video", "label": "city", "video": "media/black.mp4", "text": "a dark street at night"},
        {"id": "bad-audio-only-video", "label": "ocean", "video": "media/audio-only.mp4"},
    ]


def _audio_only(wav: bytes) -> bytes:
    """An mp4 holding only an AAC track (what a podcast download named .mp4 is)."""
    from stages.video import encode_mp4

    wave, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return encode_mp4(None, 0, audio=wave, sample_rate=sr)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
