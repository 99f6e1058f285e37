"""Train a fusion classifier on the features table: Ray Train (DDP) or in-process, then evaluate.

The driver never holds the table: class names, dims and counts come from ``training.stream``'s
aggregates over a pinned snapshot, Ray Data feeds the Ray Train workers from that snapshot, and
the test split is scored batch by batch. The local engine reads the train and val splits into
memory and is meant for small tables (``LOCAL_MAX_BYTES``).

``train(cfg, store)`` writes ``<store>/models/<name>/``: model.pt (best checkpoint by validation
macro-F1, with what ``predict`` needs to rebuild it), metrics.json, PNG plots. With the Ray engine
the run lives under ``<store>/models/_ray/<name>``: relaunching an unfinished run with the same name
resumes from its last checkpoint, and a killed worker restarts from it (``max_failures``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from core.config import Config, ConfigError, TrainingConfig
from stages.modalities import MODALITIES
from training.calibration import (ECE_BINS, Calibration, Reliability, batch_logits, fit_calibration,
                                  save_calibration, softmax)
from training.data import LABEL, Arrays, TrainingData, check_modalities, shuffled
from training.evaluate import (ModalityWeights, Robustness, StreamingMetrics, plot_confusion, plot_curves,
                               plot_modality_weights, plot_reliability, plot_robustness, write_metrics)
from training.fusion import FusionModel, check_fusion
from training.loop import (ModelSpec, TorchCollective, TrainState, class_weights, fit_local, model_spec,
                           run_epoch, seed_everything)
from training.stream import FeaturesSummary, open_snapshot, summarize

log = logging.getLogger(__name__)
GLOBAL_SHUFFLE_BYTES = 256 << 20   # train split size (model inputs) up to which each epoch is a full random shuffle
SHUFFLE_BUFFER_ROWS = 20_000    # rows each worker's iterator shuffles in, above that
FAULT_ENV = "MMPIPE_TRAIN_FAULT"   # "EPOCH:MARKER": the last worker exits at EPOCH once (tests)
# The local engine holds the train and val splits in this process, as wide as the model's inputs
# (a stored sequence is frames x dims per row); bigger tables take the Ray engine, which streams them.
LOCAL_MAX_BYTES = 1 << 30


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict[str, Any]


@dataclass
class FitOutcome:
    """What an engine hands back: the best weights and the loop's bookkeeping."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_f1: float
    history: list[dict[str, Any]]
    resumed_at: list[int] = field(default_factory=list)


def default_name(fusion: str, modalities: list[str]) -> str:
    return f"{fusion}-{'+'.join(modalities)}"


def _outcome(state: dict[str, Any]) -> FitOutcome:
    if state["best_state"] is None:
        raise RuntimeError("training finished without a best checkpoint (no epoch completed)")
    return FitOutcome(state["best_state"], state["best_epoch"], state["best_f1"], state["history"],
                      state.get("resumed_at", []))


# ---------------------------------------------------------------- engines


def local_row_bytes(dims: dict[str, int]) -> int:
    """Bytes one row takes in the local engine's arrays: per modality its float32 input (a packed
    sequence for a temporal branch) and mask, and the int64 label."""
    return sum(4 * (d + 1) for d in dims.values()) + 8


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_local_size(rows: int, dims: dict[str, int], what: str) -> None:
    """A ``ConfigError`` when ``rows`` of these widths would not fit ``LOCAL_MAX_BYTES`` in memory."""
    width = local_row_bytes(dims)
    if rows * width > LOCAL_MAX_BYTES:
        raise ConfigError(f"training.engine=local holds {what} in memory ({rows} rows x {_bytes(width)} = "
                          f"{_bytes(rows * width)}, at most {_bytes(LOCAL_MAX_BYTES)}); "
                          f"use training.engine=ray, which streams them")


def local_data(summary: FeaturesSummary, tc: TrainingConfig) -> TrainingData:
    """The train and val splits in memory, as the local engine (and a local Tune trial) trains on them."""
    check_local_size(summary.n_train + (summary.n_val or summary.n_train), summary.dims, "the train and val splits")
    snap = summary.snapshot
    train = summary.rows("train", use_augmented=tc.use_augmented).load(snap)
    return TrainingData(summary.classes, summary.modalities, summary.dims, train, summary.rows("val").load(snap),
                        sequences=summary.sequences)


def _fit_local(summary: FeaturesSummary, tc: TrainingConfig, spec: ModelSpec, run_dir: str) -> FitOutcome:
    """In this process, over the train and val splits read into memory (small tables only)."""
    return _outcome(fit_local(local_data(summary, tc), tc, spec.fusion).state_dict())


def _maybe_fail(fault: str | None, epoch: int, rank: int, world: int) -> None:
    """Fault injection for the recovery test: the last rank dies once at the given epoch. It first
    waits out two of the controller's polls (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
    default): a report not yet polled when a worker dies is dropped, and on a fast machine every
    earlier epoch's checkpoint could be lost that way, leaving nothing to resume from."""
    if not fault or rank != world - 1:
        return
    at, marker = fault.split(":", 1)
    if epoch == int(at) and not os.path.exists(marker):
        Path(marker).write_text(str(epoch))
        time.sleep(2.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
        os._exit(1)


def ray_train_loop(config: dict[str, Any]) -> None:
    """The per-worker Ray Train loop: resume, then ``run_epoch`` per epoch and one report each."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = TrainingConfig(**config["training"])
    seed_everything(tc.seed + rank)   # DDP broadcasts rank 0's initial weights; dropout differs per rank
    device = ray.train.torch.get_device()
    state = TrainState(ModelSpec(**config["spec"]), tc, config["steps_per_epoch"], config["weights"], device,
                       wrap=ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        state.load_state_dict(saved)
        state.resumed_at.append(state.epoch)
    comm = TorchCollective(device)
    shard = ray.train.get_dataset_shard("train")
    val = None
    if rank == 0:   # validation runs on rank 0 over the whole (unsplit) val dataset
        val_it = ray.train.get_dataset_shard("val")
        val = lambda: val_it.iter_torch_batches(batch_size=tc.eval_batch_size)  # noqa: E731
    while state.epoch < tc.epochs and not state.stopped:
        _maybe_fail(config.get("fault"), state.epoch, rank, world)
        buffer = config.get("shuffle_buffer") or None
        batches = shard.iter_torch_batches(batch_size=tc.batch_size, local_shuffle_buffer_size=buffer,
                                           local_shuffle_seed=tc.seed * 1000 + state.epoch * 10 + rank if buffer else None)
        stats = run_epoch(state, batches, val, comm)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save(state.state_dict(), Path(d) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"epoch": stats.epoch, "train_loss": stats.train_loss,
                              "val_macro_f1": stats.val_macro_f1, "best_f1": state.best_f1}, checkpoint=ckpt)


def _ray_storage(store: str) -> str:
    return f"{store}/models/_ray" if "://" in store else str(Path(store).resolve() / "models" / "_ray")


def _cpus_per_worker(tc: TrainingConfig) -> float:
    """Leave one CPU to Ray Data (it feeds the workers): otherwise its shuffle never gets scheduled
    and the run hangs, e.g. 2 workers x 1 CPU on a 2-CPU machine."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    if tc.num_workers * tc.cpus_per_worker <= total - 1:
        return tc.cpus_per_worker
    cpus = max(0.1, (total - 1) / tc.num_workers) if total > 1 else total / (2 * tc.num_workers)
    log.warning("training.cpus_per_worker=%s would leave no CPU for Ray Data on this %s-CPU cluster; using %.2f",
                tc.cpus_per_worker, total, cpus)
    return cpus


def _fit_ray(summary: FeaturesSummary, tc: TrainingConfig, spec: ModelSpec, run_dir: str,
             callbacks: list[Any] | None = None) -> FitOutcome:
    """Ray Train workers fed by Ray Data straight from the snapshot: the driver holds no rows.
    ``callbacks``: Ray Train callbacks (a Tune trial passes one that reports each epoch to Tune)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    storage, name = run_dir.rsplit("/", 1)
    cpus = _cpus_per_worker(tc)
    per_worker = math.ceil(summary.n_train // tc.num_workers / tc.batch_size)   # equal split
    snap = summary.snapshot
    # The val split is read once into the object store (not the driver): every epoch's rank-0
    # validation then reads blocks instead of re-scanning the table for a tenth of its rows.
    train = summary.rows("train", use_augmented=tc.use_augmented).ray_dataset(snap)
    # A global shuffle holds whole partitions in its reduce tasks (several times the split's size
    # in one worker); past GLOBAL_SHUFFLE_BYTES of model inputs the train split is shuffled as large
    # datasets are: block order, then a shuffle buffer in each worker's iterator.
    windowed = summary.n_train * local_row_bytes(summary.dims) > GLOBAL_SHUFFLE_BYTES   # (dims: packed sequences)
    datasets = {"train": train.randomize_block_order(seed=tc.seed) if windowed else shuffled(train, tc.seed),
                "val": summary.rows("val").ray_dataset(snap).materialize()}
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"training": tc.model_dump(), "spec": spec.to_dict(),
                           "weights": class_weights(summary, tc.class_weights), "steps_per_epoch": max(per_worker, 1),
                           "shuffle_buffer": SHUFFLE_BUFFER_ROWS if windowed else 0,
                           "fault": os.environ.get(FAULT_ENV)},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": cpus,
                                                                     **({"GPU": 1} if tc.use_gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()   # raises TrainingFailedError once max_failures is spent
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return _outcome(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False))


ENGINES: dict[str, Callable[[FeaturesSummary, TrainingConfig, ModelSpec, str], FitOutcome]] = {
    "local": _fit_local,
    "ray": _fit_ray,
}


# ---------------------------------------------------------------- driver


def save_model(model_dir: Path, spec: ModelSpec, outcome: FitOutcome, features_version: int | None) -> Path:
    path = model_dir / "model.pt"
    torch.save({"format": 1, "spec": spec.to_dict(), "state_dict": outcome.best_state,
                "best_epoch": outcome.best_epoch, "val_macro_f1": outcome.best_f1,
                "features_version": features_version}, path)
    return path


@dataclass
class Scores:
    """The test split's running state: headline metrics, modality weights (models that expose
    them), robustness per modality subset, reliability bins before and after temperature scaling."""

    metrics: StreamingMetrics
    robustness: Robustness
    before: Reliability
    after: Reliability
    weights: ModalityWeights | None = None


def score(model: FusionModel, batches: Iterable[Arrays], classes: list[str], modalities: list[str],
          temperature: float = 1.0) -> Scores:
    """Predict batch by batch, keeping only the metrics' running state; each batch is scored
    again under every modality subset (``Robustness``) while it is at hand."""
    model.eval()
    scores = Scores(StreamingMetrics(len(classes)), Robustness(modalities, len(classes)), Reliability(), Reliability())
    for arrays in batches:
        logits, w = batch_logits(model, arrays)
        y, probs = arrays[LABEL], softmax(logits)
        scores.metrics.update(y, probs)
        scores.before.update(y, probs)
        scores.after.update(y, softmax(logits, temperature))
        if w is not None:
            if scores.weights is None:
                scores.weights = ModalityWeights(modalities)
            scores.weights.update(w, np.stack([arrays[f"{m}_mask"] for m in modalities], axis=1))
        scores.robustness.update(arrays, lambda masked: batch_logits(model, masked)[0], full=logits)
    return scores


def calibration_report(scores: Scores, calibration: Calibration, model_dir: Path) -> tuple[dict[str, Any], Path]:
    """metrics.json's ``calibration`` (T, the fit, test ECE before / after T) and reliability.png."""
    panels = [("uncalibrated", scores.before)]
    if calibration.fitted_on:
        panels.append((f"T = {calibration.temperature:.2f}", scores.after))
    report = {**asdict(calibration), "bins": ECE_BINS, "ece_before": scores.before.ece(),
              "ece_after": scores.after.ece()}
    return report, plot_reliability(panels, model_dir / "reliability.png")


def evaluate_and_write(model_dir: Path, spec: ModelSpec, outcome: FitOutcome, summary: FeaturesSummary,
                       tc: TrainingConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Fit the temperature on the val split (``training.calibrate``), then score the best weights on
    the whole test split, streamed; write calibration.json, metrics.json and plots."""
    model = spec.build()
    model.load_state_dict(outcome.best_state)
    val = summary.rows("val")
    calibration = (fit_calibration(model, val.stream(summary.snapshot, tc.eval_batch_size), val.split)
                   if tc.calibrate else Calibration())
    save_calibration(model_dir, calibration)
    test = summary.rows("test").stream(summary.snapshot, tc.eval_batch_size)
    scores = score(model, test, spec.classes, spec.modalities, calibration.temperature)
    metrics = scores.metrics.result(spec.classes)
    plots = [plot_confusion(metrics["confusion_matrix"], spec.classes, model_dir / "confusion_matrix.png"),
             plot_curves(outcome.history, outcome.best_epoch, model_dir / "training_curves.png")]
    if scores.weights is not None and scores.weights.n:
        plots.append(plot_modality_weights(scores.weights.mean_where_present(), spec.modalities,
                                           model_dir / "modality_weights.png"))
        metrics["modality_weights"] = scores.weights.mean()
    metrics["robustness"] = scores.robustness.result()
    plots.append(plot_robustness(metrics["robustness"], model_dir / "robustness.png"))
    metrics["calibration"], reliability = calibration_report(scores, calibration, model_dir)
    plots.append(reliability)
    metrics.update(
        fusion=spec.fusion, modalities=spec.modalities, classes=spec.classes, best_epoch=outcome.best_epoch,
        val_macro_f1=outcome.best_f1, history=outcome.history, resumed_at=outcome.resumed_at,
        n_train=summary.n_train, n_val=summary.n_val or summary.n_train, features_version=summary.version,
        features_snapshot=summary.snapshot.version, plots=[p.name for p in plots], training=tc.model_dump(), **extra)
    write_metrics(model_dir, metrics)
    return metrics


def _stage_fingerprints(store: str) -> dict[str, str]:
    """The stage fingerprints of the run that last wrote the features (``predict`` checks them)."""
    from core.store import Store

    runs = [r for r in Store(store).runs() if r.get("fingerprints")]
    return runs[-1]["fingerprints"] if runs else {}


def checked_modalities(modalities: list[str]) -> list[str]:
    """Known modalities in canonical order; an unknown or empty choice is a user error."""
    try:
        return check_modalities(modalities)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_features(store: str, version: int | None = None) -> None:
    """A user error (``ConfigError``) unless the store has a features table (at ``version``)."""
    from core.store import Store

    st = Store(store)
    if st.dataset("features", version) is None:   # a version it never had raises ConfigError
        raise ConfigError(f"no features table at {st.features_uri}; run `mmpipe run` first")


def stored_modalities(store: str, version: int | None = None) -> list[str]:
    """The modalities some row of the features table has (counted by the reader, one small column each)."""
    import pyarrow.compute as pc

    from core.store import Store

    ds = Store(store).dataset("features", version)
    if ds is None:
        return []
    return [m for m in MODALITIES if ds.count_rows(filter=pc.field(f"has_{m}") == True) > 0]  # noqa: E712


def resolve_modalities(store: str, modalities: list[str] | None, version: int | None = None) -> list[str]:
    """The modalities asked for in canonical order, or (None) every modality the store holds."""
    if modalities is None:
        check_features(store, version)
        modalities = stored_modalities(store, version)
        if not modalities:
            raise ConfigError(f"the features table of {store} holds no modality's features")
    return checked_modalities(modalities)


def check_request(store: str, fusion: str, modalities: list[str] | None, version: int | None = None) -> list[str]:
    """What the user asked for, checked before any data is read or Ray starts (``ConfigError``);
    returns the modalities in canonical order (None: the store's)."""
    check_fusion(fusion)
    if modalities is not None:
        checked_modalities(modalities)
    check_features(store, version)
    return resolve_modalities(store, modalities, version)


def prepare_run(store: str, name: str) -> tuple[Path, str]:
    """``models/<name>/`` and its Ray Train folder: a run that finished (its metrics.json is
    there) starts afresh; an unfinished one resumes from its last checkpoint."""
    model_dir = Path(store) / "models" / name
    run_dir = f"{_ray_storage(store)}/{name}"
    if (model_dir / "metrics.json").exists():
        if "://" not in run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        (model_dir / "metrics.json").unlink()
    model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir, run_dir


def train(cfg: Config, store: str, *, fusion: str | None = None, modalities: list[str] | None = None,
          name: str | None = None) -> TrainResult:
    """Train one fusion model on ``<store>/features`` and write ``<store>/models/<name>/``."""
    tc = cfg.training
    fusion = fusion or tc.fusion
    modalities = check_request(store, fusion, modalities or tc.modalities, tc.features_version)
    name = name or tc.name or default_name(fusion, modalities)
    summary = summarize(open_snapshot(store, tc.features_version), modalities, use_augmented=tc.use_augmented,
                        branches=tc.branches)
    spec = model_spec(summary, tc, fusion)
    spec.build()   # fail on a bad fusion name / extra before any worker starts
    model_dir, run_dir = prepare_run(store, name)
    outcome = ENGINES[tc.engine](summary, tc, spec, run_dir)
    save_model(model_dir, spec, outcome, summary.version)
    metrics = evaluate_and_write(model_dir, spec, outcome, summary, tc,
                                 {"name": name, "engine": tc.engine, "num_workers": tc.num_workers,
                                  "stage_fingerprints": _stage_fingerprints(store)})
    log.info("trained %s: test accuracy %.3f, macro-F1 %.3f", name, metrics["accuracy"], metrics["macro_f1"])
    return TrainResult(model_dir, metrics)
