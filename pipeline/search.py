"""``mmpipe align`` and ``mmpipe search``: train the shared space, then find stored samples of one
modality from raw queries of any.

A query (``--text``, ``--image``, ``--audio`` or each record of a ``--queries`` manifest) goes
through the same cleanup and feature stages the store was built with (``pipeline.predict``'s
featurizer, refusing when their fingerprints differ from those the alignment model was trained
on), then through the alignment heads; a record with several modalities is the normalised mean of
their aligned vectors. The store's index of the target modality is brought up to date first
(``training.index``), so results always reflect the latest features version.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer

from core.config import Config, ConfigError
from stages.modalities import MODALITIES, REGISTRY

QUERY_FLAGS = MODALITIES   # --text, --image, --audio, --video


def query_vectors(table, model, modalities: list[str]) -> np.ndarray:
    """One aligned vector per featurised query row: the normalised mean over its modalities."""
    import torch

    n = table.num_rows
    total, count = np.zeros((n, model.spec.dim), np.float32), np.zeros(n, np.float32)
    for m in modalities:
        has = np.asarray(table[f"has_{m}"].to_pylist(), bool)
        if not has.any():
            continue
        emb = np.stack([np.asarray(v, np.float32) for v in table[f"{m}_emb"].to_pylist()])
        with torch.no_grad():
            z = model.embed(m, torch.as_tensor(emb[has])).numpy()
        total[has] += z
        count[has] += 1
    total /= np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
    return total


def search_records(cfg: Config, store: str, model_dir: Path, modality: str, k: int) -> list[dict]:
    """Every record of ``cfg.source`` as a query: ``{"id", "results": [{"id", "score", "label"}]}``,
    or ``{"id", "results": [], "reason", "detail"}`` for a record the stages rejected."""
    from training.index import VectorIndex
    from pipeline.predict import featurize
    from training.align import load_aligner

    model, saved = load_aligner(model_dir)
    if modality not in model.spec.modalities:
        raise ConfigError(f"the alignment model maps {', '.join(model.spec.modalities)}; --modality {modality} is not one")
    index = VectorIndex(store, modality, model_dir)
    index.sync()
    features = featurize(cfg, saved.get("stage_fingerprints") or {}, model.spec.modalities)
    out = [{"id": r["id"], "results": [], "reason": r["reason"], "detail": r["detail"]} for r in features.rejects]
    if features.table is not None and features.table.num_rows:
        usable = [m for m in model.spec.modalities if f"has_{m}" in features.table.column_names]
        vectors = query_vectors(features.table, model, usable)
        found = index.search(vectors, k)
        ids = features.table["id"].to_pylist()
        out += [{"id": i, "results": r} for i, r in zip(ids, found)]
    return out


def _single_query(cfg: Config, flags: dict[str, Optional[str]], folder: Path) -> Config:
    """A one-record manifest for ``--text`` / ``--image`` / ``--audio`` (media paths as given)."""
    given = {m: v for m, v in flags.items() if v is not None}
    record: dict[str, Any] = {"id": "query"}
    roots = []
    for m, v in given.items():
        if REGISTRY[m].inline or v.startswith(("http://", "https://")):
            record[m] = v
            continue
        path = Path(v).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--{m}: no such file: {v}")
        record[m] = str(path)
        roots.append(str(path.parent))
    manifest = folder / "query.jsonl"
    manifest.write_text(json.dumps(record) + "\n")
    source = cfg.source.model_copy(update={"path": str(manifest), "kind": "manifest",
                                           "roots": [*cfg.source.roots, *roots]})
    return cfg.model_copy(update={"source": source})


def _format(results: list[dict]) -> str:
    lines = []
    for q in results:
        if q.get("reason"):
            lines.append(f"{q['id']}: rejected ({q['reason']}: {q['detail']})")
            continue
        lines.append(f"{q['id']}:")
        lines += [f"  {rank:>2}. {r['id']}  score {r['score']:.3f}  label {r['label'] or '-'}"
                  for rank, r in enumerate(q["results"], 1)]
    return "\n".join(lines)


def register(app: typer.Typer, config_loader: Callable) -> None:
    """Add align / search to the ``mmpipe`` app."""

    @app.command("align")
    def align_cmd(config: Path = typer.Argument(..., help="YAML config"),
                  store: Optional[str] = typer.Option(None, "--store"),
                  modalities: Optional[str] = typer.Option(None, "--modalities", help="e.g. image,text (two or more)"),
                  name: Optional[str] = typer.Option(None, "--name", help="Model name (models/<name>/); same name resumes"),
                  address: Optional[str] = typer.Option(None, "--address"),
                  set_: list[str] = typer.Option([], "--set", help="dotted.key=value (repeatable)")) -> None:
        """Train projection heads that map every modality's features into one shared space (contrastive,
        on Ray Train); writes recall@k per modality pair."""
        from pipeline.execution import init_ray
        from training.align import align
        from training.train import check_features, resolve_modalities

        cfg = config_loader(config, set_, store=store, ray__address=address)
        mods = cfg.align.modalities if modalities is None else [m.strip() for m in modalities.split(",") if m.strip()]
        check_features(cfg.store, cfg.training.features_version)
        mods = resolve_modalities(cfg.store, mods, cfg.training.features_version)
        if len(mods) < 2:
            raise ConfigError(f"alignment needs two modalities or more, got {', '.join(mods)}")
        if cfg.training.engine == "ray":
            init_ray(cfg)
        result = align(cfg, cfg.store, modalities=mods, name=name)
        pairs = result.metrics["retrieval"]
        typer.echo(f"model: {result.model_dir}")
        for pair, p in pairs.items():
            if "recall@1" in p:
                label = f"  same label first {p['label_precision@1']:.2f} (chance {p['label_chance@1']:.2f})" \
                    if "label_precision@1" in p else ""
                typer.echo(f"  {pair:<14} recall@1 {p['recall@1']:.3f}  @5 {p['recall@5']:.3f}  "
                           f"@10 {p['recall@10']:.3f}  median rank {p['median_rank']:.0f} of {p['candidates']}{label}")

    @app.command("search")
    def search_cmd(config: Path = typer.Argument(..., help="YAML config (the stages the store was built with)"),
                   store: Optional[str] = typer.Option(None, "--store"),
                   model: Path = typer.Option(..., "--model", help="models/<name>/ folder written by `mmpipe align`"),
                   modality: str = typer.Option(..., "--modality", help="What to find: image, text or audio"),
                   text: Optional[str] = typer.Option(None, "--text", help="A text query"),
                   image: Optional[str] = typer.Option(None, "--image", help="An image file (or http(s) URL) as the query"),
                   audio: Optional[str] = typer.Option(None, "--audio", help="An audio file (or http(s) URL) as the query"),
                   video: Optional[str] = typer.Option(None, "--video", help="A video file (or http(s) URL) as the query"),
                   queries: Optional[str] = typer.Option(None, "--queries", help="A manifest of query records (as for run)"),
                   k: int = typer.Option(10, "--k", min=1, max=1000, help="Results per query"),
                   as_json: bool = typer.Option(False, "--json", help="One JSON line per query"),
                   set_: list[str] = typer.Option([], "--set", help="dotted.key=value (repeatable)")) -> None:
        """Find stored samples of one modality from a text, image, audio or a manifest of queries."""
        if modality not in MODALITIES:
            raise ConfigError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        flags = {"text": text, "image": image, "audio": audio, "video": video}
        named = ", ".join(f"--{m}" for m in QUERY_FLAGS)
        if queries is not None and any(v is not None for v in flags.values()):
            raise ConfigError(f"--queries takes the queries from a manifest; drop {named}")
        if queries is None and all(v is None for v in flags.values()):
            raise ConfigError(f"give a query: {named} (one of each at most) or --queries MANIFEST")
        cfg = config_loader(config, set_, store=store, **({"source__path": queries} if queries else {}))
        with tempfile.TemporaryDirectory(prefix="mmpipe-query-") as folder:
            if queries is None:
                cfg = _single_query(cfg, flags, Path(folder))
            results = search_records(cfg, cfg.store, model, modality, k)
        typer.echo("\n".join(json.dumps(r) for r in results) if as_json else _format(results))
