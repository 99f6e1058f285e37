"""Hyperparameter sweeps: Ray Tune over the fusion, hidden size, lr, dropouts and the branch of each
modality whose sequence the store holds (pooled or temporal), early-stopped by ASHA.

Every trial trains with ``mmpipe train``'s loop and reports the validation macro-F1 after each
epoch: the local engine runs ``loop.fit_local`` in the trial's own actor (its state, RNG included,
checkpointed every epoch), the Ray engine launches Ray Train workers from the trial
(``train._fit_ray`` with a callback that forwards each epoch's report to Tune). ASHA stops the
trials that trail at its rungs. With a branch search the trials' inputs are read once both ways,
each searched modality pooled and as its sequence, and every trial takes the columns its branches read.

The sweep lives under ``<store>/models/_tune/<name>``: the same command again restores it
(``Tuner.restore``): finished trials are kept, unfinished and failed ones go on from their last
checkpoint. The best configuration is then trained as a normal model (``train.train``, same seed,
data snapshot and epoch budget) into ``<store>/models/<name>/``, beside ``tune.md`` and
``tune.json``: the trials, best first, and the model's test metrics.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow.compute as pc
import torch
from pydantic import ValidationError
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from core.config import Config, ConfigError, TrainingConfig
from core.store import Store
from training.data import TrainingData
from training.fusion import BRANCHES, FUSIONS, check_fusion
from training.loop import EpochStats, TrainState, fit_local, model_spec
from training.stream import FeaturesSummary, open_snapshot, summarize
from training.train import _fit_ray, check_features, local_data, resolve_modalities, train

METRIC = "val_macro_f1"
TIME_ATTR = "epochs"   # epochs done: ASHA's clock, the same for both engines and across restores
FAULT_ENV = "MMPIPE_TUNE_FAULT"   # "EPOCH:MARKER": the first trial to finish EPOCH fails once (tests)
SWEEP_FILE = "sweep.json"         # in models/<name>/: what the sweep was started with
RAY_TRIAL_CPUS = 0.1              # a Ray-engine trial only drives its Ray Train run


class SweepIncomplete(RuntimeError):
    """Some trials failed; their checkpoints are kept and the same command resumes them."""


class SweepInterrupted(SweepIncomplete):
    """The sweep was stopped (Ctrl-C: Tune saves its state and returns); the same command continues it."""


# ---------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Knob:
    """One tuned ``training`` key: drawn from choices, or uniformly / log-uniformly from a range."""

    kind: Literal["choice", "uniform", "loguniform"]
    default: tuple = ()   # choices, or (lo, hi); empty for fusion: every registered fusion


KNOBS: dict[str, Knob] = {
    "fusion": Knob("choice"),
    "hidden": Knob("choice", (64, 128, 256)),
    "lr": Knob("loguniform", (3e-4, 1e-2)),
    "dropout": Knob("uniform", (0.0, 0.4)),
    "modality_dropout": Knob("uniform", (0.0, 0.4)),
    # per modality with a stored sequence (none stored: not searched); a temporal branch reads it
    "branches": Knob("choice", ("pooled", "gru", "cnn")),
}
BRANCH_KINDS = ("pooled", *BRANCHES)


def _check_value(key: str, value: Any) -> Any:
    """``value`` as ``training.<key>`` takes it (TrainingConfig's bounds), or a ``ConfigError``."""
    if key == "fusion":
        try:
            return check_fusion(str(value))
        except ConfigError as exc:
            raise ConfigError(f"tune.space.fusion: {exc}") from None
    if key == "branches":
        if value not in BRANCH_KINDS:
            raise ConfigError(f"tune.space.branches: unknown branch {value!r}; known: {', '.join(BRANCH_KINDS)}")
        return value
    try:
        return getattr(TrainingConfig(**{key: value}), key)
    except ValidationError as exc:
        raise ConfigError(f"tune.space.{key}: {value!r} is not a valid training.{key} "
                          f"({exc.errors()[0]['msg']})") from None


def search_space(overrides: dict[str, Any], sequences: list[str] | tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The checked space, ``{key: {"kind": ..., "values": [...]}}``; a fixed key is a one-value choice.
    ``branches`` is searched for each of ``sequences`` (the trained modalities with a stored sequence)
    and records them as its ``modalities``; without any it is left out."""
    unknown = sorted(set(overrides) - set(KNOBS))
    if unknown:
        raise ConfigError(f"tune.space: unknown key(s) {', '.join(unknown)}; tunable: {', '.join(KNOBS)}")
    space = {}
    for key, knob in KNOBS.items():
        if key == "branches" and not sequences:
            given = overrides.get(key, "pooled")
            if any(_check_value(key, v) != "pooled" for v in (given if isinstance(given, (list, tuple)) else [given])):
                raise ConfigError("tune.space.branches: the features table holds no sequence of the trained modalities "
                                  "for a temporal branch; set stages.features.<modality>.params.sequence and run again")
            continue
        given = overrides.get(key, list(knob.default) if knob.default else sorted(FUSIONS))
        values = list(given) if isinstance(given, (list, tuple)) else [given]
        kind = knob.kind
        if not values:
            raise ConfigError(f"tune.space.{key} is empty")
        if kind != "choice" and len(values) not in (1, 2):
            raise ConfigError(f"tune.space.{key} takes [lo, hi] or one value, got {given!r}")
        values = [_check_value(key, v) for v in values]
        if kind != "choice":
            if values[0] > values[-1]:
                raise ConfigError(f"tune.space.{key}: lo {values[0]} is above hi {values[-1]}")
            if values[0] == values[-1]:
                kind, values = "choice", values[:1]
        space[key] = {"kind": kind, "values": list(dict.fromkeys(values)) if kind == "choice" else values}
    if "branches" in space:
        space["branches"]["modalities"] = list(sequences)
    return space


def param_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The space as Ray Tune domains (a one-value choice is a constant)."""
    def domain(s: dict[str, Any]) -> Any:
        values = s["values"]
        if s["kind"] == "choice":
            return values[0] if len(values) == 1 else tune.choice(values)
        return (tune.loguniform if s["kind"] == "loguniform" else tune.uniform)(*values)

    # branches: {modality: kind}, as training.branches takes it, drawn for each modality on its own
    return {key: {m: domain(s) for m in s["modalities"]} if key == "branches" else domain(s)
            for key, s in space.items()}


def stored_sequences(store: str, modalities: list[str], version: int | None = None) -> list[str]:
    """The modalities some row of the features table holds a sequence of (a non-null ``<m>_seq_len``)."""
    ds = Store(store).dataset("features", version)
    names = set(ds.schema.names) if ds is not None else set()
    return [m for m in modalities if f"{m}_seq_len" in names
            and ds.count_rows(filter=pc.field(f"{m}_seq_len").is_valid()) > 0]


# ---------------------------------------------------------------- the plan


@dataclass
class Sweep:
    """A checked sweep: everything that fixes its trials (``settings``) and where it lives."""

    name: str
    store: str
    settings: dict[str, Any]          # stored in models/<name>/sweep.json; a rerun must match it
    features_version: int             # the pinned snapshot every trial and the best model read
    resume: bool = False              # an earlier run of it is at ``path``: restore it

    @property
    def model_dir(self) -> Path:
        return Path(self.store) / "models" / self.name

    @property
    def storage(self) -> str:
        """Tune's storage_path; the experiment is ``<storage>/<name>``."""
        return f"{self.store}/models/_tune" if "://" in self.store else str(Path(self.store).resolve() / "models" / "_tune")

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    def training(self, params: dict[str, Any] | None = None) -> TrainingConfig:
        """``training`` as a trial with ``params`` (or the base, without) trains."""
        return TrainingConfig(**{**self.settings["training"], **(params or {})})


def default_tune_name(space: dict[str, dict[str, Any]]) -> str:
    fusions = space["fusion"]["values"]
    return f"tune-{fusions[0] if len(fusions) == 1 else 'mixed'}"


def plan(cfg: Config, store: str) -> Sweep:
    """Check the request (``ConfigError``: unknown fusion, branch or key in the space, no features table,
    a rerun with other settings) before Ray starts; pin the features snapshot."""
    tc, tu = cfg.training, cfg.tune
    check_features(store, tc.features_version)
    modalities = resolve_modalities(store, tc.modalities, tc.features_version)
    space = search_space(tu.space, stored_sequences(store, modalities, tc.features_version))
    name = tu.name or default_tune_name(space)
    epochs = tu.epochs or tc.epochs
    base = tc.model_dump(exclude={"name", "features_version", *KNOBS})
    base.update(modalities=modalities, epochs=epochs, engine=tu.engine)
    settings = {"space": space, "samples": tu.samples, "max_concurrent": tu.max_concurrent,
                "grace_period": min(tu.grace_period, epochs), "reduction_factor": tu.reduction_factor,
                "engine": tu.engine, "cpus_per_trial": tu.cpus_per_trial, "training": base}
    sweep = Sweep(name, store, settings, -1)
    if not tune.Tuner.can_restore(sweep.path):
        sweep.features_version = open_snapshot(store, tc.features_version).version
        return sweep
    sweep_file = sweep.model_dir / SWEEP_FILE
    if not sweep_file.is_file():
        raise ConfigError(f"{sweep.path} holds a sweep {name!r} whose settings ({sweep_file}) are gone; "
                          f"delete {sweep.path} to start it over")
    saved = json.loads(sweep_file.read_text())
    now = json.loads(json.dumps(settings))   # compared as stored
    changed = sorted(k for k in {*now, *saved["settings"]} if now.get(k) != saved["settings"].get(k))
    if tc.features_version not in (None, saved["features_version"]):
        changed.append("training.features_version")
    if changed:
        raise ConfigError(f"sweep {name!r} was started with other settings ({', '.join(changed)}); run it with "
                          f"those, pick another --name, or delete {sweep.path} to start over")
    sweep.features_version, sweep.resume = saved["features_version"], True
    return sweep


# ---------------------------------------------------------------- trials


@dataclass
class TrialInputs:
    """What the trials read (a ``FeaturesSummary`` for the Ray engine, the splits in memory for the
    local one): every modality pooled and, with a branch search, the searched ones as their sequences."""

    pooled: FeaturesSummary | TrainingData
    sequences: FeaturesSummary | TrainingData | None = None

    def for_branches(self, branches: dict[str, str]) -> FeaturesSummary | TrainingData:
        """The pooled inputs with each modality on a temporal branch read as its sequence."""
        temporal = [m for m, kind in branches.items() if kind != "pooled"]
        if not temporal:
            return self.pooled
        pooled, seq = self.pooled, self.sequences
        changes: dict[str, Any] = {"dims": {m: (seq if m in temporal else pooled).dims[m] for m in pooled.dims},
                                   "sequences": {m: seq.sequences[m] for m in temporal}}
        if isinstance(pooled, TrainingData):   # the same rows in the same order: both read one snapshot alike
            for split in ("train", "val"):
                changes[split] = {**getattr(pooled, split), **{f"{m}_emb": getattr(seq, split)[f"{m}_emb"] for m in temporal}}
        return replace(pooled, **changes)


def trial_inputs(sweep: Sweep) -> TrialInputs:
    """The summaries (Ray engine) or the train and val splits (local engine) the trials read."""
    tc, space = sweep.training(), sweep.settings["space"]
    snapshot = open_snapshot(sweep.store, sweep.features_version)
    searched = space["branches"]["modalities"] if "branches" in space else []
    pooled = summarize(snapshot, tc.modalities, use_augmented=tc.use_augmented)
    sequences = (summarize(snapshot, tc.modalities, use_augmented=tc.use_augmented,
                           branches=dict.fromkeys(searched, "gru"))   # any temporal kind: the sequence columns
                 if searched else None)
    if tc.engine == "ray":
        return TrialInputs(pooled, sequences)
    inputs = TrialInputs(local_data(pooled, tc))
    if sequences is not None:
        data = inputs.sequences = local_data(sequences, tc)
        for split in ("train", "val"):   # the pooled read has every other column
            setattr(data, split, {f"{m}_emb": getattr(data, split)[f"{m}_emb"] for m in searched})
    return inputs


def _maybe_fail(fault: str | None, epochs: int) -> None:
    """Fault injection for the resume test: the first trial to finish epoch ``at`` raises, once."""
    if not fault:
        return
    at, marker = fault.split(":", 1)
    if epochs != int(at):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise RuntimeError(f"injected fault after epoch {epochs} ({FAULT_ENV})")


def local_trial(params: dict[str, Any], *, inputs: TrialInputs, base: dict[str, Any], threads: int,
                fault: str | None = None) -> None:
    """A trial with the local engine: ``fit_local`` in this actor, checkpointed and reported every epoch."""
    torch.set_num_threads(threads)   # the best model is trained with as many (see ``train_best``)
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)   # a line per checkpoint
    tc = TrainingConfig(**{**base, **params})
    checkpoint = tune.get_checkpoint()

    def restore(state: TrainState) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location=state.device, weights_only=False)
        state.load_state_dict(saved["state"])
        state.resumed_at.append(state.epoch)
        torch.set_rng_state(saved["rng"])   # dropout draws go on as if never interrupted

    def report(state: TrainState, stats: EpochStats) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save({"state": state.state_dict(), "rng": torch.get_rng_state()}, Path(d) / "state.pt")
            tune.report({TIME_ATTR: state.epoch, METRIC: stats.val_macro_f1, "val_loss": stats.val_loss,
                         "train_loss": stats.train_loss, "best_f1": state.best_f1},
                        checkpoint=tune.Checkpoint.from_directory(d))
        _maybe_fail(fault, state.epoch)

    fit_local(inputs.for_branches(tc.branches), tc, tc.fusion, restore=restore, on_epoch=report)


class EpochsReport(TuneReportCallback):
    """Ray Train's rank-0 report forwarded to Tune, with ``epochs`` (done) added: ASHA's clock."""

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], TIME_ATTR: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def ray_trial(params: dict[str, Any], *, inputs: TrialInputs, base: dict[str, Any], runs: str) -> None:
    """A trial with the Ray engine: a Ray Train run of its own (``runs/<trial id>``), which
    resumes from its own checkpoints when the trial is restored."""
    tc = TrainingConfig(**{**base, **params})
    summary = inputs.for_branches(tc.branches)
    trial_id = tune.get_context().get_trial_id()
    _fit_ray(summary, tc, model_spec(summary, tc, tc.fusion), f"{runs}/{trial_id}", callbacks=[EpochsReport()])


class Progress(tune.Callback):
    """One line per finished or failed trial."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
        self.log(f"trial {trial.trial_id}: best val macro-F1 {result.get('best_f1', float('nan')):.4f} after "
                 f"{result.get(TIME_ATTR, 0)} epochs ({done} of {len(trials)} done)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id} failed; the same command resumes it")


def _trainable(sweep: Sweep, inputs: TrialInputs):
    base = sweep.training().model_dump()
    if sweep.settings["engine"] == "ray":
        fn = tune.with_parameters(ray_trial, inputs=inputs, base=base, runs=sweep.path + "/runs")
        return tune.with_resources(fn, {"cpu": RAY_TRIAL_CPUS})
    threads = max(1, int(sweep.settings["cpus_per_trial"]))
    fn = tune.with_parameters(local_trial, inputs=inputs, base=base, threads=threads, fault=os.environ.get(FAULT_ENV))
    return tune.with_resources(fn, {"cpu": sweep.settings["cpus_per_trial"]})


def _max_concurrent(sweep: Sweep) -> int:
    """``max_concurrent``; with the Ray engine no more trials than the cluster holds while one
    CPU stays free for Ray Data's read tasks (``train._cpus_per_worker``'s rule for one run)."""
    import ray

    wanted = sweep.settings["max_concurrent"]
    if sweep.settings["engine"] != "ray":
        return wanted
    tc = sweep.training()
    spare = ray.cluster_resources().get("CPU", 1.0) - 1
    return max(1, min(wanted, int(spare // (RAY_TRIAL_CPUS + tc.num_workers * tc.cpus_per_worker))))


def _tuner(sweep: Sweep, inputs: TrialInputs, log: Callable[[str], None] | None) -> tune.Tuner:
    """A new Tuner, or the interrupted one restored from ``sweep.path``."""
    trainable = _trainable(sweep, inputs)
    domains = param_space(sweep.settings["space"])
    if sweep.resume:
        return tune.Tuner.restore(sweep.path, trainable=trainable, param_space=domains, resume_errored=True)
    s = sweep.settings
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=s["training"]["epochs"], grace_period=s["grace_period"],
                              reduction_factor=s["reduction_factor"])
    # max_concurrent goes to the generator: Tune ignores max_concurrent_trials beside a search_alg
    search = BasicVariantGenerator(max_concurrent=_max_concurrent(sweep), random_state=s["training"]["seed"])
    return tune.Tuner(
        trainable, param_space=domains,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=search,
                                    num_samples=s["samples"],
                                    reuse_actors=s["engine"] == "local", trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage, verbose=0,
                                  callbacks=[Progress(log)] if log else None,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )


# ---------------------------------------------------------------- results


@dataclass
class TrialRow:
    """One trial of the table."""

    trial_id: str
    params: dict[str, Any]
    best_val_macro_f1: float | None
    epochs: int
    stopped: str                      # "" (ran its epochs), "asha", "patience", "error", "unfinished"
    history: list[float] = field(default_factory=list)   # val macro-F1 per epoch
    error: str = ""
    val_loss: float | None = None     # at the best epoch: breaks ties of macro-F1 (the Ray engine has none)

    @property
    def stopped_early(self) -> bool:
        return self.stopped in ("asha", "patience")


def _history(result, column: str = METRIC) -> list[float]:
    """``column`` per epoch; a restored trial's repeated epochs count once (the last report)."""
    df = result.metrics_dataframe
    if df is None or df.empty or TIME_ATTR not in df or column not in df:
        return []
    by_epoch = {int(e): float(v) for e, v in zip(df[TIME_ATTR], df[column])}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _why_stopped(history: list[float], max_epochs: int, patience: int) -> str:
    if len(history) >= max_epochs:
        return ""
    best, bad = -1.0, 0
    for f1 in history:   # run_epoch's early stopping, replayed
        best, bad = (f1, 0) if f1 > best else (best, bad + 1)
    return "patience" if bad >= patience else "asha"


def trial_rows(grid, sweep: Sweep) -> list[TrialRow]:
    """Every trial, best first (failed ones last)."""
    tc = sweep.training()
    # A Result has no status, and after Ctrl-C the live trials all read TERMINATED: the statuses
    # saved with the experiment tell the interrupted ones (still RUNNING or PENDING there).
    status = {t.trial_id: t.status for t in tune.ExperimentAnalysis(sweep.path).trials}
    rows = []
    for result in grid:
        history, losses = _history(result), _history(result, "val_loss")
        best = max(range(len(history)), key=history.__getitem__, default=None)   # the first best epoch
        params = {k: result.config[k] for k in KNOBS if k in result.config}
        trial_id = Path(result.path).name
        if result.error:
            stopped = "error"
        elif status.get(trial_id, "TERMINATED") != "TERMINATED":
            stopped = "unfinished"
        else:
            stopped = _why_stopped(history, tc.epochs, tc.patience)
        error = str(result.error).strip().splitlines()[-1] if result.error else ""
        rows.append(TrialRow(trial_id, params, None if best is None else history[best], len(history),
                             stopped, history, error, losses[best] if best is not None and losses else None))
    return sorted(rows, key=lambda r: (r.stopped in ("error", "unfinished"), r.best_val_macro_f1 is None, -(r.best_val_macro_f1 or 0.0),
                                       math.inf if r.val_loss is None else r.val_loss, r.trial_id))


def _fmt(value: Any) -> str:
    if isinstance(value, dict):   # branches: "audio:gru text:pooled"
        return " ".join(f"{k}:{v}" for k, v in value.items())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_tables(sweep: Sweep, rows: list[TrialRow], best: dict[str, Any] | None = None) -> Path:
    """``tune.json`` and ``tune.md`` in the model folder; returns tune.md."""
    out = sweep.model_dir
    out.mkdir(parents=True, exist_ok=True)
    s = sweep.settings
    (out / "tune.json").write_text(json.dumps(
        {"name": sweep.name, "features_version": sweep.features_version, "settings": s,
         "trials": [{**asdict(r), "stopped_early": r.stopped_early} for r in rows], "best": best}, indent=2))
    keys = [k for k in KNOBS if k in s["space"]]
    lines = [f"# Tune sweep {sweep.name}", "",
             f"{len(rows)} trials, ASHA on val macro-F1 (grace {s['grace_period']} epochs, reduction factor "
             f"{s['reduction_factor']:g}, at most {s['training']['epochs']} epochs), {s['engine']} engine; "
             f"features version {sweep.features_version}, modalities {'+'.join(s['training']['modalities'])}.", "",
             f"| rank | trial | {' | '.join(keys)} | best val macro-F1 | val loss there | epochs | stopped early |",
             f"|---:|---|{'---|' * len(keys)}---:|---:|---:|---|"]
    for i, r in enumerate(rows, 1):
        stop = {"": "no", "asha": "yes (ASHA)", "patience": "yes (patience)", "error": f"failed: {r.error}",
                "unfinished": "not finished (interrupted)"}[r.stopped]
        lines.append(f"| {i} | {r.trial_id} | {' | '.join(_fmt(r.params.get(k, '')) for k in keys)} | "
                     f"{_score(r.best_val_macro_f1)} | {_score(r.val_loss)} | {r.epochs} | {stop} |")
    if best:
        lines += ["", f"## Best configuration, trained as `models/{sweep.name}/`", "",
                  f"trial {best['trial_id']}: {', '.join(f'{k} {_fmt(v)}' for k, v in best['params'].items())}", "",
                  "| | val macro-F1 | test accuracy | test macro-F1 | test ROC-AUC (macro) |", "|---|---:|---:|---:|---:|",
                  f"| trial | {_score(best['trial_val_macro_f1'])} | | | |",
                  f"| model | {_score(best['val_macro_f1'])} | {_score(best['test_accuracy'])} | "
                  f"{_score(best['test_macro_f1'])} | {_score(best['test_roc_auc'])} |"]
        if not best["reproduced"]:
            lines += ["", "The model's validation curve differs from its trial's over the epochs the trial ran "
                          "(see tune.json): the retrained model did not reproduce the trial."]
    path = out / "tune.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- the sweep


@dataclass
class TuneResult:
    model_dir: Path
    table: Path
    trials: list[TrialRow]
    best: dict[str, Any]
    metrics: dict[str, Any]           # the best model's metrics.json


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_best(cfg: Config, sweep: Sweep, row: TrialRow) -> dict[str, Any]:
    """Train the best trial's configuration as ``models/<name>/``; its summary for the table."""
    tc = sweep.training(row.params).model_copy(update={"features_version": sweep.features_version, "name": sweep.name})
    best_cfg = cfg.model_copy(update={"training": tc})
    local = tc.engine == "local"
    # Intra-op threads change float summation order: train with the trial's count to reproduce it.
    with torch_threads(max(1, int(sweep.settings["cpus_per_trial"]))) if local else nullcontext():
        metrics = train(best_cfg, sweep.store, name=sweep.name).metrics
    curve = [h["val_macro_f1"] for h in metrics["history"]][: row.epochs]
    reproduced = len(curve) == len(row.history) and all(abs(a - b) <= 1e-6 for a, b in zip(curve, row.history))
    return {"trial_id": row.trial_id, "params": row.params, "trial_val_macro_f1": row.best_val_macro_f1,
            "val_macro_f1": metrics["val_macro_f1"], "best_epoch": metrics["best_epoch"],
            "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
            "test_roc_auc": metrics["roc_auc"]["macro"], "reproduced": reproduced}


def run(cfg: Config, sweep: Sweep, log: Callable[[str], None] | None = None) -> TuneResult:
    """Run (or resume) the sweep, write the tables, train the best configuration (Ray must be up)."""
    sweep.model_dir.mkdir(parents=True, exist_ok=True)
    if not sweep.resume:
        (sweep.model_dir / SWEEP_FILE).write_text(json.dumps(
            {"settings": sweep.settings, "features_version": sweep.features_version}, indent=2))
    inputs = trial_inputs(sweep)
    started = time.perf_counter()
    with redirect_stdout(sys.stderr):   # Tune's banner and tables: stdout is for results
        grid = _tuner(sweep, inputs, log).fit()
    sweep_s = time.perf_counter() - started
    rows = trial_rows(grid, sweep)
    write_tables(sweep, rows)
    failed = [r for r in rows if r.stopped == "error"]
    if failed:
        raise SweepIncomplete(f"{len(failed)} of {len(rows)} trials of sweep {sweep.name!r} failed (trial "
                              f"{failed[0].trial_id}: {failed[0].error}); run the same command again to resume them "
                              f"from their last checkpoints")
    finished = sum(r.stopped != "unfinished" for r in rows)
    if finished < sweep.settings["samples"]:
        raise SweepInterrupted(f"sweep {sweep.name!r} interrupted with {finished} of {sweep.settings['samples']} "
                               f"trials finished; run the same command again to continue it")
    started = time.perf_counter()
    best = train_best(cfg, sweep, rows[0])
    best.update(sweep_s=round(sweep_s, 1), best_model_s=round(time.perf_counter() - started, 1))
    table = write_tables(sweep, rows, best)
    metrics = json.loads((sweep.model_dir / "metrics.json").read_text())
    return TuneResult(sweep.model_dir, table, rows, best, metrics)

