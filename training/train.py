"""Train a fusion classifier on the features table: Ray Train (DDP) or in-process, then evaluate.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.config import Config, ConfigError, TrainingConfig
from training.data import LABEL, TrainingData, check_modalities, load_training_data, n_rows, train_dataset
from training.evaluate import (classification_metrics, plot_confusion, plot_curves, plot_modality_weights,
                               write_metrics)
from training.fusion import check_fusion
from training.loop import (ModelSpec, TorchCollective, TrainState, class_weights, fit_local, model_spec,
                           predict_proba, run_epoch, seed_everything)

log = logging.getLogger(__name__)
FAULT_ENV = "MMPIPE_TRAIN_FAULT"   # "EPOCH:MARKER": the last worker exits at EPOCH once (tests)


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


def _fit_local(data: TrainingData, tc: TrainingConfig, spec: ModelSpec, run_dir: str) -> FitOutcome:
    return _outcome(fit_local(data, tc, spec.fusion).state_dict())


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
    while state.epoch < tc.epochs and not state.stopped:
        _maybe_fail(config.get("fault"), state.epoch, rank, world)
        stats = run_epoch(state, shard.iter_torch_batches(batch_size=tc.batch_size), config["val"], comm)
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


def _fit_ray(data: TrainingData, tc: TrainingConfig, spec: ModelSpec, run_dir: str) -> FitOutcome:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    storage, name = run_dir.rsplit("/", 1)
    cpus = _cpus_per_worker(tc)
    per_worker = math.ceil(n_rows(data.train) // tc.num_workers / tc.batch_size)   # equal split
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"training": tc.model_dump(), "spec": spec.to_dict(), "val": data.val,
                           "weights": class_weights(data, tc.class_weights), "steps_per_epoch": max(per_worker, 1),
                           "fault": os.environ.get(FAULT_ENV)},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": cpus,
                                                                     **({"GPU": 1} if tc.use_gpu else {})}),
        datasets={"train": train_dataset(data.train, tc.seed)},
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()   # raises TrainingFailedError once max_failures is spent
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return _outcome(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False))


ENGINES: dict[str, Callable[[TrainingData, TrainingConfig, ModelSpec, str], FitOutcome]] = {
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


def evaluate_and_write(model_dir: Path, spec: ModelSpec, outcome: FitOutcome, data: TrainingData,
                       tc: TrainingConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Score the best weights on the whole test split; write metrics.json and plots."""
    model = spec.build()
    model.load_state_dict(outcome.best_state)
    probs, weights = predict_proba(model, data.test, tc.eval_batch_size)
    metrics = classification_metrics(data.test[LABEL], probs, spec.classes)
    plots = [plot_confusion(metrics["confusion_matrix"], spec.classes, model_dir / "confusion_matrix.png"),
             plot_curves(outcome.history, outcome.best_epoch, model_dir / "training_curves.png")]
    if weights is not None and len(weights):
        mask = np.stack([data.test[f"{m}_mask"] for m in spec.modalities], axis=1)
        plots.append(plot_modality_weights(weights, mask, spec.modalities, model_dir / "modality_weights.png"))
        metrics["modality_weights"] = dict(zip(spec.modalities, weights.mean(axis=0).round(4).tolist()))
    metrics.update(
        fusion=spec.fusion, modalities=spec.modalities, classes=spec.classes, best_epoch=outcome.best_epoch,
        val_macro_f1=outcome.best_f1, history=outcome.history, resumed_at=outcome.resumed_at,
        n_train=n_rows(data.train), n_val=n_rows(data.val), features_version=data.version,
        plots=[p.name for p in plots], training=tc.model_dump(), **extra)
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


def check_request(store: str, fusion: str, modalities: list[str], version: int | None = None) -> list[str]:
    """What the user asked for, checked before any data is read or Ray starts (``ConfigError``);
    returns the modalities in canonical order."""
    check_fusion(fusion)
    modalities = checked_modalities(modalities)
    check_features(store, version)
    return modalities


def train(cfg: Config, store: str, *, fusion: str | None = None, modalities: list[str] | None = None,
          name: str | None = None) -> TrainResult:
    """Train one fusion model on ``<store>/features`` and write ``<store>/models/<name>/``."""
    tc = cfg.training
    fusion = fusion or tc.fusion
    modalities = check_request(store, fusion, modalities or tc.modalities, tc.features_version)
    name = name or tc.name or default_name(fusion, modalities)
    data = load_training_data(store, modalities, use_augmented=tc.use_augmented, version=tc.features_version)
    spec = model_spec(data, tc, fusion)
    spec.build()   # fail on a bad fusion name / extra before any worker starts
    model_dir = Path(store) / "models" / name
    run_dir = f"{_ray_storage(store)}/{name}"
    if (model_dir / "metrics.json").exists():   # that run finished: start afresh, do not resume it
        if "://" not in run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        (model_dir / "metrics.json").unlink()
    model_dir.mkdir(parents=True, exist_ok=True)
    outcome = ENGINES[tc.engine](data, tc, spec, run_dir)
    save_model(model_dir, spec, outcome, data.version)
    metrics = evaluate_and_write(model_dir, spec, outcome, data, tc,
                                 {"name": name, "engine": tc.engine, "num_workers": tc.num_workers,
                                  "stage_fingerprints": _stage_fingerprints(store)})
    log.info("trained %s: test accuracy %.3f, macro-F1 %.3f", name, metrics["accuracy"], metrics["macro_f1"])
    return TrainResult(model_dir, metrics)
