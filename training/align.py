"""Cross-modal alignment: projection heads that map each modality's stored features into one
shared space, trained with a symmetric contrastive loss (InfoNCE, as in CLIP) over the pairs of
modalities a sample has together. A sample with a single modality teaches nothing and is left
out; labels are not used (unlabelled rows align as well as labelled ones).

The features table is read as ``training.train`` reads it (a pinned snapshot, streamed; Ray Data
feeds the Ray Train workers), the epochs follow the same resumable Ray Train run, and the test
split is embedded batch by batch. ``align(cfg, store)`` writes ``<store>/models/<name>/``:
align.pt (the heads, what ``mmpipe search`` rebuilds), metrics.json (retrieval recall@1/5/10,
median rank and label precision@1 for every modality pair and direction on the test split) and
recall.png.
"""
from __future__ import annotations

import copy
import itertools
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import AlignConfig, Config, ConfigError, TrainingConfig
from training.data import LABEL, Arrays, iterate, model_inputs, to_arrays, to_tensors
from training.loop import Collective, TorchCollective, lr_factor, seed_everything
from training.stream import READ_ROWS, Snapshot, SplitRows, discover_dims, open_snapshot
from training.train import (_cpus_per_worker, _stage_fingerprints, check_features, check_local_size, prepare_run,
                            resolve_modalities)

RECALL_AT = (1, 5, 10)


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class AlignSpec:
    """What rebuilds the heads: input dims per modality and the head shape."""

    modalities: list[str]
    dims: dict[str, int]
    dim: int
    hidden: int
    dropout: float
    temperature: float

    def build(self) -> "AlignModel":
        return AlignModel(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AlignModel(nn.Module):
    """One head per modality (LayerNorm, since the weight-free features differ wildly in scale, then
    a two-layer MLP) onto the unit sphere of ``dim``; a learnt temperature, as in CLIP."""

    def __init__(self, spec: AlignSpec):
        super().__init__()
        self.spec = spec
        self.heads = nn.ModuleDict({
            m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, spec.hidden), nn.GELU(), nn.Dropout(spec.dropout),
                             nn.Linear(spec.hidden, spec.dim))
            for m, d in spec.dims.items()})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / spec.temperature)))

    def embed(self, modality: str, x: Tensor) -> Tensor:
        return F.normalize(self.heads[modality](x), dim=-1)

    def forward(self, embs: dict[str, Tensor], mask: Tensor) -> Tensor:
        """The batch's contrastive loss (the module's forward, so DDP synchronises its gradients)."""
        z = {m: self.embed(m, embs[m]) for m in self.spec.modalities}
        present = {m: mask[:, i] > 0 for i, m in enumerate(self.spec.modalities)}
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        loss = contrastive_loss(z, present, scale)
        # Every parameter takes part in every step (a batch may lack a pair): DDP needs that.
        return loss + 0.0 * sum(p.sum() for p in self.parameters())


def contrastive_loss(z: dict[str, Tensor], present: dict[str, Tensor], scale: Tensor) -> Tensor:
    """Symmetric InfoNCE for every pair of modalities, over the rows that have both; the mean over
    the pairs that have at least two such rows (zero when none has)."""
    losses = []
    for a, b in itertools.combinations(list(z), 2):
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue
        logits = scale * z[a][both] @ z[b][both].T
        target = torch.arange(logits.shape[0], device=logits.device)
        losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    return torch.stack(losses).mean() if losses else scale * 0.0


# ---------------------------------------------------------------- the rows


@dataclass(frozen=True)
class PairRows(SplitRows):
    """The rows of a split with at least two of the selected modalities, labelled or not."""

    def arrays(self, batch: pa.Table | pa.RecordBatch) -> Arrays:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        arrays = to_arrays(table, self.dims, self.classes)
        if "id" in table.column_names:
            arrays["id"] = table["id"].to_numpy(zero_copy_only=False).astype(object)
        keep = sum(arrays[f"{m}_mask"] for m in self.dims) >= 2
        return arrays if keep.all() else {k: v[keep] for k, v in arrays.items()}

    def columns(self) -> list[str]:
        return ["id", *super().columns()]

    def stream(self, snapshot: Snapshot, batch_size: int = READ_ROWS) -> Iterator[Arrays]:
        for batch in snapshot.batches(self.columns(), self.filter(), batch_size, self.filter_columns()):
            arrays = self.arrays(batch)
            if len(arrays[LABEL]):
                yield arrays


@dataclass
class AlignSummary:
    modalities: list[str]
    dims: dict[str, int]
    classes: list[str]
    counts: dict[str, int]          # rows with at least two modalities, per split
    snapshot: Snapshot

    def rows(self, split: str) -> PairRows:
        if split == "val" and self.counts.get("val", 0) == 0:
            split = "train"
        return PairRows(split, self.dims, self.classes, originals_only=split != "train")


def summarize_pairs(snapshot: Snapshot, modalities: list[str]) -> AlignSummary:
    """One pass over the small columns: rows with two or more modalities per split, class names."""
    counts: dict[str, int] = {}
    labels: set[str] = set()
    for batch in snapshot.batches(["split", "label", *(f"has_{m}" for m in modalities)], batch_size=64 * READ_ROWS):
        present = sum(pc.cast(pc.fill_null(batch.column(f"has_{m}"), False), pa.int8()).to_numpy(zero_copy_only=False)
                      .astype(np.int64) for m in modalities)
        split = batch.column("split").to_numpy(zero_copy_only=False)
        for name in np.unique(split[present >= 2]):
            counts[str(name)] = counts.get(str(name), 0) + int(np.count_nonzero((split == name) & (present >= 2)))
        labels.update(v for v in pc.unique(batch.column("label")).to_pylist() if v)
    if counts.get("train", 0) < 2:
        raise ConfigError(f"alignment needs train rows with at least two of {', '.join(modalities)}; "
                          f"found {counts.get('train', 0)}")
    return AlignSummary(modalities, discover_dims(snapshot, modalities), sorted(labels), counts, snapshot)


# ---------------------------------------------------------------- the epochs


class AlignState:
    """Heads, optimiser, schedule and best-by-validation-loss bookkeeping; ``epoch`` is the next."""

    def __init__(self, spec: AlignSpec, ac: AlignConfig, steps_per_epoch: int, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.spec, self.ac, self.device = spec, ac, device
        self.model = wrap(spec.build().to(device))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=ac.lr, weight_decay=ac.weight_decay)
        total = max(ac.epochs * steps_per_epoch, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, "cosine", 0.05))
        self.epoch, self.history, self.resumed_at = 0, [], []
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, -1, 0
        self.best_state: dict[str, Tensor] | None = None
        self.stopped = False

    @property
    def net(self) -> AlignModel:
        return getattr(self.model, "module", self.model)

    KEYS = ("epoch", "history", "resumed_at", "best_loss", "best_epoch", "bad_epochs", "best_state", "stopped")

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), **{k: getattr(self, k) for k in self.KEYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for k in self.KEYS:
            setattr(self, k, state[k])


def _loss_of(state: AlignState, batch: dict[str, Tensor], model: nn.Module) -> Tensor:
    embs, mask = model_inputs(batch, state.spec.modalities, state.device)
    return model(embs, mask)


def run_epoch(state: AlignState, batches: Iterable[dict[str, Tensor]], val: Callable[[], Iterable[dict[str, Tensor]]] | None,
              comm: Collective = Collective()) -> dict[str, Any]:
    """Train one epoch, validate on rank 0 (mean contrastive loss over the val pairs), agree on the
    verdict so every rank stops together."""
    state.model.train()
    total, count = 0.0, 0
    for batch in batches:
        loss = _loss_of(state, batch, state.model)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
        state.optimizer.step()
        state.scheduler.step()
        n = len(batch[LABEL])
        total, count = total + float(loss.detach()) * n, count + n
    train_loss = comm.mean(total / max(count, 1))
    val_loss = 0.0
    if comm.rank == 0 and val is not None:
        state.net.eval()
        with torch.no_grad():
            losses = [(float(_loss_of(state, b, state.net)), len(b[LABEL])) for b in val()]
        val_loss = sum(v * n for v, n in losses) / max(sum(n for _, n in losses), 1)
    (val_loss,) = comm.from_rank0([val_loss])
    improved = val_loss < state.best_loss - 1e-6
    if improved:
        state.best_loss, state.best_epoch, state.bad_epochs = val_loss, state.epoch, 0
        if comm.rank == 0:
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in state.net.state_dict().items()})
    else:
        state.bad_epochs += 1
    stats = {"epoch": state.epoch, "train_loss": train_loss, "val_loss": val_loss,
             "temperature": float(1.0 / state.net.logit_scale.detach().exp())}
    state.history.append(stats)
    state.epoch += 1
    state.stopped = state.bad_epochs >= state.ac.patience
    return stats


def _fit_local(summary: AlignSummary, spec: AlignSpec, ac: AlignConfig, tc: TrainingConfig, run_dir: str) -> AlignState:
    rows = summary.counts.get("train", 0) + summary.counts.get("val", 0)
    check_local_size(rows, summary.dims, "the train and val pairs")   # training.train.LOCAL_MAX_BYTES
    seed_everything(ac.seed)
    train = summary.rows("train").load(summary.snapshot)
    val = summary.rows("val").load(summary.snapshot)
    steps = math.ceil(len(train[LABEL]) / ac.batch_size)
    state = AlignState(spec, ac, steps, torch.device("cpu"))
    while state.epoch < ac.epochs and not state.stopped:
        run_epoch(state, iterate(_model_arrays(train), ac.batch_size, shuffle_seed=ac.seed + state.epoch),
                  lambda: iterate(_model_arrays(val), 4 * ac.batch_size))
    return state


def _model_arrays(arrays: Arrays) -> Arrays:
    return {k: v for k, v in arrays.items() if k != "id"}


def ray_align_loop(config: dict[str, Any]) -> None:
    """The per-worker Ray Train loop: resume from the last checkpoint, then one report per epoch."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    ac = AlignConfig(**config["align"])
    seed_everything(ac.seed + rank)
    device = ray.train.torch.get_device()
    state = AlignState(AlignSpec(**config["spec"]), ac, config["steps_per_epoch"], device,
                       wrap=ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state.load_state_dict(torch.load(Path(d) / "state.pt", map_location=device, weights_only=False))
        state.resumed_at.append(state.epoch)
    comm = TorchCollective(device)
    shard = ray.train.get_dataset_shard("train")
    val = None
    if rank == 0:
        val_it = ray.train.get_dataset_shard("val")
        val = lambda: val_it.iter_torch_batches(batch_size=4 * ac.batch_size)  # noqa: E731
    while state.epoch < ac.epochs and not state.stopped:
        stats = run_epoch(state, shard.iter_torch_batches(batch_size=ac.batch_size), val, comm)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save(state.state_dict(), Path(d) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({k: v for k, v in stats.items()}, checkpoint=ckpt)


def _fit_ray(summary: AlignSummary, spec: AlignSpec, ac: AlignConfig, tc: TrainingConfig, run_dir: str) -> AlignState:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.data import shuffled

    if not ray.is_initialized():
        ray.init()
    storage, name = run_dir.rsplit("/", 1)
    snap = summary.snapshot
    per_worker = math.ceil(summary.counts["train"] // tc.num_workers / ac.batch_size)
    train = summary.rows("train").ray_dataset(snap).drop_columns(["id"])
    datasets = {"train": shuffled(train, ac.seed),
                "val": summary.rows("val").ray_dataset(snap).drop_columns(["id"]).materialize()}
    trainer = TorchTrainer(
        ray_align_loop,
        train_loop_config={"align": ac.model_dump(), "spec": spec.to_dict(), "steps_per_epoch": max(per_worker, 1)},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": _cpus_per_worker(tc),
                                                                     **({"GPU": 1} if tc.use_gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} reported no checkpoint")
    state = AlignState(spec, ac, 1, torch.device("cpu"))
    with result.checkpoint.as_directory() as d:
        state.load_state_dict(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False))
    return state


ENGINES = {"local": _fit_local, "ray": _fit_ray}


# ---------------------------------------------------------------- retrieval metrics


@dataclass
class Embedded:
    """Rows of a split in the shared space: per modality the unit vectors and a presence mask."""

    ids: np.ndarray
    labels: np.ndarray
    z: dict[str, np.ndarray]
    present: dict[str, np.ndarray]


@torch.no_grad()
def embed_rows(model: AlignModel, batches: Iterable[Arrays], limit: int) -> Embedded:
    """The first ``limit`` rows of ``batches`` embedded (the evaluation set: the test split, capped
    so the all-pairs similarity stays small)."""
    model.eval()
    ids, labels, z, present = [], [], {m: [] for m in model.spec.modalities}, {m: [] for m in model.spec.modalities}
    taken = 0
    for arrays in batches:
        arrays = {k: v[: limit - taken] for k, v in arrays.items()}
        t = to_tensors(_model_arrays(arrays))
        for m in model.spec.modalities:
            z[m].append(model.embed(m, t[f"{m}_emb"]).numpy())
            present[m].append(arrays[f"{m}_mask"] > 0)
        ids.append(arrays["id"])
        labels.append(arrays[LABEL])
        taken += len(arrays[LABEL])
        if taken >= limit:
            break
    if not taken:
        raise ConfigError("the test split has no rows with two modalities to measure retrieval on")
    return Embedded(np.concatenate(ids), np.concatenate(labels), {m: np.concatenate(v) for m, v in z.items()},
                    {m: np.concatenate(v) for m, v in present.items()})


def retrieval_metrics(e: Embedded, query: str, target: str) -> dict[str, float]:
    """Queries: rows with both modalities; candidates: every row with ``target``. Recall@k of the
    row's own ``target``, its median rank (1 = first), and how often the first result shares the
    query's label (``label_precision@1``, with its chance level). Within one modality
    (``query == target``) only the label precision, the row itself left out."""
    qrows = np.flatnonzero(e.present[query] & e.present[target])
    crows = np.flatnonzero(e.present[target])
    sims = e.z[query][qrows] @ e.z[target][crows].T
    own = np.searchsorted(crows, qrows)          # the query row's own column among the candidates
    out: dict[str, float] = {"queries": int(len(qrows)), "candidates": int(len(crows))}
    if query == target:   # within one modality the row itself is no answer: only labels say anything
        sims[np.arange(len(qrows)), own] = -np.inf
    else:
        ranks = 1 + np.sum(sims > sims[np.arange(len(qrows)), own][:, None], axis=1)
        out.update({f"recall@{k}": float(np.mean(ranks <= k)) for k in RECALL_AT})
        out["median_rank"] = float(np.median(ranks))
    labelled = e.labels[qrows] >= 0
    if labelled.any():
        top = crows[np.argmax(sims, axis=1)]
        out["label_precision@1"] = float(np.mean(e.labels[top][labelled] == e.labels[qrows][labelled]))
        share = np.bincount(e.labels[crows][e.labels[crows] >= 0]) / max(int(np.sum(e.labels[crows] >= 0)), 1)
        out["label_chance@1"] = float(np.sum(share ** 2))
    return out


def plot_recall(pairs: dict[str, dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pairs)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.5))
    width = 0.8 / len(RECALL_AT)
    for j, k in enumerate(RECALL_AT):
        ax.bar(np.arange(len(names)) + j * width, [pairs[n][f"recall@{k}"] for n in names], width, label=f"recall@{k}")
    ax.set_xticks(np.arange(len(names)) + width * (len(RECALL_AT) - 1) / 2, names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test split")
    ax.legend(fontsize=8)
    ax.set_title("cross-modal retrieval after alignment")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- driver


@dataclass
class AlignResult:
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def load_aligner(model_dir: str | Path) -> tuple[AlignModel, dict[str, Any]]:
    """The heads saved by ``align`` and what they were trained from."""
    path = Path(model_dir) / "align.pt"
    if not path.is_file():
        raise ConfigError(f"no alignment model at {path}; run `mmpipe align` first")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model = AlignSpec(**saved["spec"]).build()
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, saved


def align(cfg: Config, store: str, *, modalities: list[str] | None = None, name: str | None = None) -> AlignResult:
    """Train the heads on ``<store>/features`` and write ``<store>/models/<name>/``."""
    ac, tc = cfg.align, cfg.training
    check_features(store, tc.features_version)
    modalities = resolve_modalities(store, modalities or ac.modalities, tc.features_version)
    if len(modalities) < 2:
        raise ConfigError(f"alignment needs two modalities or more, got {', '.join(modalities)}")
    name = name or ac.name or f"align-{'+'.join(modalities)}"
    summary = summarize_pairs(open_snapshot(store, tc.features_version), modalities)
    spec = AlignSpec(modalities, summary.dims, ac.dim, ac.hidden, ac.dropout, ac.temperature)
    model_dir, run_dir = prepare_run(store, name)
    state = ENGINES[tc.engine](summary, spec, ac, tc, run_dir)
    if state.best_state is None:
        raise RuntimeError("alignment finished without a best epoch")
    torch.save({"format": 1, "kind": "align", "spec": spec.to_dict(), "state_dict": state.best_state,
                "classes": summary.classes, "features_version": summary.snapshot.version,
                "stage_fingerprints": _stage_fingerprints(store)}, model_dir / "align.pt")
    model, _ = load_aligner(model_dir)
    test = summary.rows("test" if summary.counts.get("test") else "val")
    embedded = embed_rows(model, test.stream(summary.snapshot), ac.eval_rows)
    pairs = {f"{a}->{b}": retrieval_metrics(embedded, a, b) for a, b in itertools.permutations(modalities, 2)}
    pairs.update({f"{m}->{m}": retrieval_metrics(embedded, m, m) for m in modalities})
    plot = plot_recall({k: v for k, v in pairs.items() if "->" in k and k.split("->")[0] != k.split("->")[1]},
                       model_dir / "recall.png")
    metrics = {"name": name, "kind": "align", "modalities": modalities, "dim": ac.dim, "retrieval": pairs,
               "eval_split": test.split, "eval_rows": int(len(embedded.ids)), "best_epoch": state.best_epoch,
               "val_loss": state.best_loss, "history": state.history, "resumed_at": state.resumed_at,
               "pairs_per_split": summary.counts, "features_version": summary.snapshot.version,
               "engine": tc.engine, "plots": [plot.name], "align": ac.model_dump()}
    from training.evaluate import write_metrics

    write_metrics(model_dir, metrics)
    return AlignResult(model_dir, metrics)
