"""Tiny configs and datasets for pipeline tests."""
from __future__ import annotations

import tarfile
from pathlib import Path

import yaml

from core.config import load_config

BASE = {
    "name": "test",
    "seed": 0,
    "ray": {"dashboard": False, "progress_bars": False, "num_cpus": 2},
    "execution": {"batch_size": 16, "local_max_rows": 0},   # exercise the Ray Data path
    "stages": {
        "cleanup": {"text": {}, "image": {"params": {"blur_threshold": 5.0}}, "audio": {"params": {"min_duration_s": 0.2}}},
        "dedup": {},
        "features": {"image": {"encoder": "hist"}, "text": {"encoder": "hashed"}, "audio": {"encoder": "logmel"}},
    },
    "training": {"num_workers": 2, "epochs": 3},
}


def write_config(folder: Path, overrides: dict | None = None) -> Path:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    _merge(data, overrides or {})
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _merge(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v


def config(folder: Path, manifest: Path, store: Path, overrides: dict | None = None):
    return load_config(write_config(folder, overrides), values={"source.path": str(manifest), "store": str(store)})


def shard_members(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Every ``.tar`` shard under ``folder``: its path relative to ``folder`` -> (member name, bytes)."""
    out = {}
    for path in sorted(folder.rglob("*.tar")):
        with tarfile.open(path) as tar:
            out[str(path.relative_to(folder))] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out
