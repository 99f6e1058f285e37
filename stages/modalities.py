"""The modalities: one definition each, read by every layer (sources, stages, stores, training).

Adding a modality is one entry here plus one module per role (``stages/cleanup/<m>.py``,
``stages/features/<m>.py``, optionally ``stages/augment/<m>.py``); nothing else names modalities.
The order is the order of the features table's columns: new modalities go at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Modality:
    name: str
    inline: bool = False                 # True: the value is in the record (text); else a file / URL reference
    suffixes: tuple[str, ...] = ()       # file suffixes the folder and WebDataset sources read as this modality
    members: tuple[str, ...] = ()        # its member extensions in mmpipe's shards (several: per value)
    hf_feature: str = ""                 # Hugging Face datasets feature of its export column ("" = string)
    croissant: str = ""                  # schema.org type in the Croissant description
    # In-flight columns its stages add beside its own -> their member extension in the shards.
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def extra_columns(self) -> tuple[str, ...]:
        return tuple(self.extras)


REGISTRY: dict[str, Modality] = {m.name: m for m in (
    Modality("image", suffixes=(".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"), members=("jpg", "png"),
             hf_feature="Image", croissant="sc:ImageObject"),
    Modality("text", inline=True, suffixes=(".txt", ".text"), members=("txt",), croissant="sc:Text"),
    Modality("audio", suffixes=(".wav", ".flac", ".ogg", ".mp3", ".opus"), members=("flac",),
             hf_feature="Audio", croissant="sc:AudioObject"),
    Modality("video", suffixes=(".mp4", ".webm", ".mkv", ".mov"), members=("mp4",),
             hf_feature="Video", croissant="sc:VideoObject", extras={"video_frames": "video_frames.npy"}),
)}

MODALITIES: tuple[str, ...] = tuple(REGISTRY)
# Modalities whose records hold references (paths, URLs, tar members) that ingest reads as bytes.
MEDIA: tuple[str, ...] = tuple(m for m in MODALITIES if not REGISTRY[m].inline)
INLINE: tuple[str, ...] = tuple(m for m in MODALITIES if REGISTRY[m].inline)


def modality_of_suffix(suffix: str) -> str | None:
    """The modality a file suffix (``.jpg``, ``jpg``; any case) belongs to, or None."""
    suffix = "." + suffix.lower().lstrip(".")
    return next((m.name for m in REGISTRY.values() if suffix in m.suffixes), None)
