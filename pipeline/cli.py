"""The ``mmpipe`` command line. User errors print one line on stderr and exit 2."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer._click.exceptions import UsageError   # typer vendors its own click

from core.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="mmpipe: multimodal data pipeline on Ray (cleanup, dedup, augmentation, features, fusion training).")


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.sources import SourceError
    from core.store import StoreBusy

    return ConfigError, SourceError, StoreBusy


def _fail(message: str) -> None:
    typer.echo(f"mmpipe: error: {message}", err=True)
    raise typer.Exit(2)


def _config(path: Optional[Path], overrides: list[str], **values) -> Config:
    if path is not None and not path.is_file():
        _fail(f"config file not found: {path}")
    return load_config(path, overrides, {k.replace("__", "."): v for k, v in values.items()})


SetOpt = typer.Option([], "--set", help="Override a config value: dotted.key=value (repeatable).")


@app.command()
def run(config: Path = typer.Argument(..., help="YAML config"),
        input: Optional[str] = typer.Option(None, "--input", help="Manifest, folder or shards (source.path)"),
        store: Optional[str] = typer.Option(None, "--store", help="Store path or URI"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to run against (or RAY_ADDRESS)"),
        profile: bool = typer.Option(False, "--profile", help="Also print where the wall time went and each stage's CPU time"),
        retry_rejects: Optional[str] = typer.Option(None, "--retry-rejects", metavar="REASON[,REASON...]",
                                                    help="Process again the samples rejected with these reasons "
                                                         "(e.g. http_timeout,image_error); the rest as usual"),
        set_: list[str] = SetOpt) -> None:
    """Run the pipeline: only what changed since the last run is processed."""
    from pipeline.report import format_profile, format_run, process_start_time
    from pipeline.runner import run as run_pipeline

    retry = [r.strip() for r in (retry_rejects or "").split(",") if r.strip()]
    cfg = _config(config, set_, source__path=input, store=store, ray__address=address,
                  **({"execution__retry_rejects": retry} if retry else {}))
    if retry:
        from stages.registry import STAGES, load_builtin

        load_builtin()
        known = {code for cls in STAGES.values() for code in cls.reject_reasons()}
        unknown = sorted(set(retry) - known)
        if unknown:
            _fail(f"--retry-rejects: unknown reject reason(s) {', '.join(unknown)}; see README's reject reasons")
    result = run_pipeline(cfg, log=lambda s: typer.echo(s, err=True), release_ray=True)
    typer.echo(format_run(result.record))
    if profile:
        typer.echo(format_profile(result.record, process_start_time()))


@app.command()
def train(config: Path = typer.Argument(...),
          store: Optional[str] = typer.Option(None, "--store"),
          fusion: Optional[str] = typer.Option(None, "--fusion", help="concat | late | attention | gated | transformer"),
          modalities: Optional[str] = typer.Option(None, "--modalities", help="e.g. image,text"),
          name: Optional[str] = typer.Option(None, "--name", help="Model name (models/<name>/); same name resumes"),
          compare: bool = typer.Option(False, "--compare", help="Train every fusion and every single modality"),
          address: Optional[str] = typer.Option(None, "--address"),
          set_: list[str] = SetOpt) -> None:
    """Train a fusion classifier with Ray Train from the stored features."""
    cfg = _config(config, set_, store=store, ray__address=address)
    from training.compare import compare as run_compare, comparison_runs
    from training.train import check_request, train as run_train

    tc = cfg.training
    mods = None if modalities is None else [m.strip() for m in modalities.split(",") if m.strip()]
    # Fail on a user mistake here: starting Ray takes seconds.
    if compare:
        comparison_runs(cfg, cfg.store)
    else:
        check_request(cfg.store, fusion or tc.fusion, tc.modalities if mods is None else mods, tc.features_version)
    from pipeline.execution import init_ray

    init_ray(cfg)
    if compare:
        typer.echo(f"comparison written to {run_compare(cfg, cfg.store)}")
        return
    result = run_train(cfg, cfg.store, fusion=fusion, modalities=mods, name=name)
    m = result.metrics
    typer.echo(f"model: {result.model_dir}\naccuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f} "
               f"fusion={m['fusion']} modalities={','.join(m['modalities'])}")


@app.command()
def predict(config: Path = typer.Argument(...),
            model: Path = typer.Option(..., "--model", help="models/<name>/ folder"),
            input: str = typer.Option(..., "--input", help="Manifest of raw records"),
            out: Path = typer.Option(..., "--out", help="Output file (.csv, .jsonl or .parquet)"),
            set_: list[str] = SetOpt) -> None:
    """Run raw records through the same cleanup and feature stages, then the model."""
    cfg = _config(config, set_, source__path=input)
    typer.echo(predict_records(cfg, model, out))


def predict_records(cfg: Config, model: Path, out: Path) -> str:
    """The pipeline's inference stages over ``cfg.source``, then the model; returns a summary line."""
    import json

    metrics_path = Path(model) / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"no trained model at {model} (metrics.json missing)")
    if out.suffix not in (".csv", ".jsonl", ".json", ".parquet"):
        raise ConfigError(f"unknown output type {out.suffix!r} (use .csv, .jsonl or .parquet)")
    from pipeline.predict import featurize, summary, write_predictions   # torch: only past the checks
    from training.predict import load_model, predict_table

    loaded = load_model(model)
    feats = featurize(cfg, json.loads(metrics_path.read_text()).get("stage_fingerprints", {}), loaded.spec.modalities)
    preds = None
    if feats.table is not None:
        preds = predict_table(loaded, feats.table).append_column("label", feats.table["label"])
    write_predictions(preds, feats.rejects, out)
    return summary(0 if preds is None else preds.num_rows, feats.n_records, feats.rejects, out)


@app.command()
def report(store: str = typer.Argument(..., help="Store path or URI"),
           version: Optional[int] = typer.Option(None, "--version", help="Show the tables at this version")) -> None:
    """Show a store's tables, their versions and the run history."""
    from pipeline.report import format_store

    opened = _open_store(store)
    if version is not None:
        known = {h.get("version") for which in ("features", "rejects") for h in opened.versions(which)}
        if version not in known:
            _fail(f"no table of {store} has a version {version} (versions: "
                  f"{', '.join(str(v) for v in sorted(v for v in known if v is not None)) or 'none'})")
    typer.echo(format_store(opened, version))


@app.command("plan")
def plan_cmd(config: Path = typer.Argument(..., help="YAML config"),
             input: Optional[str] = typer.Option(None, "--input", help="Manifest, folder or shards (source.path)"),
             store: Optional[str] = typer.Option(None, "--store", help="Store path or URI"),
             as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
             set_: list[str] = SetOpt) -> None:
    """A dry run: what `run` would do (new, changed, unchanged, removed, rejected; features recomputed per
    modality; which stages changed and how; an estimated time). Nothing runs, nothing is written."""
    import json

    from pipeline.dryrun import dry_run, format_dry_run

    cfg = _config(config, set_, source__path=input, store=store)
    plan = dry_run(cfg)
    typer.echo(json.dumps(plan, sort_keys=True) if as_json else format_dry_run(plan))


@app.command("diff")
def diff_cmd(store: str = typer.Argument(..., help="Store path or URI"),
             from_: int = typer.Option(..., "--from", help="Features table version to compare from"),
             to: Optional[int] = typer.Option(None, "--to", help="... to (default: the latest)"),
             as_json: bool = typer.Option(False, "--json", help="Print the diff as JSON")) -> None:
    """Which ids were added, removed or changed between two features-table versions, and why
    (a content change or changed stages, per modality; counts per stage)."""
    import json

    from pipeline.explain import diff, format_diff

    opened = _open_store(store)
    known = sorted(h["version"] for h in opened.versions("features") if h.get("version") is not None)
    to = known[-1] if to is None and known else to
    for v in (from_, to):
        if v not in known:
            _fail(f"the features table of {store} has no version {v} (versions: {', '.join(map(str, known)) or 'none'})")
    d = diff(opened, from_, to)
    typer.echo(json.dumps(d, sort_keys=True) if as_json else format_diff(d))


def _open_store(store: str):
    from core.store import Store

    if "://" not in store and not Path(store).is_dir():
        _fail(f"store not found: {store}")
    return Store(store)


@app.command()
def why(store: str = typer.Argument(..., help="Store path or URI"),
        id: str = typer.Argument(..., help="The sample's id"),
        as_json: bool = typer.Option(False, "--json", help="Print the story as JSON")) -> None:
    """One sample's story: accepted or rejected (stage, reason, detail, the kept id of a duplicate),
    hashes, shard, augmented copies, the duplicates it absorbed, the run and version that wrote it."""
    import json

    from pipeline.explain import UnknownId, format_why, why as explain

    try:
        story = explain(_open_store(store), id)
    except UnknownId:
        _fail(f"no sample {id!r} in {store} (neither accepted nor rejected)")
    typer.echo(json.dumps(story, sort_keys=True) if as_json else format_why(story))


@app.command()
def funnel(store: str = typer.Argument(..., help="Store path or URI"),
           run_id: Optional[str] = typer.Option(None, "--run", help="A run id (default: the latest run)"),
           png: Optional[Path] = typer.Option(None, "--png", help="Where the plot goes (default: funnel-<run>.png here)"),
           as_json: bool = typer.Option(False, "--json", help="Print the steps as JSON (no plot)")) -> None:
    """Rows entering and leaving each step of a run (scan, plan, every stage) with rejects by reason,
    as a table and a PNG."""
    import json

    from pipeline.explain import UnknownId, format_funnel, funnel as steps_of, plot_funnel, run_record

    try:
        record = run_record(_open_store(store), run_id)
    except UnknownId as exc:
        _fail(f"no run {exc.args[0]!r} in {store}" if run_id else f"{store}: no run recorded yet")
    steps = steps_of(record)
    if as_json:
        typer.echo(json.dumps({"run_id": record["run_id"], "steps": steps}))
        return
    typer.echo(format_funnel(record, steps))
    path = png or Path(f"funnel-{record['run_id']}.png")
    typer.echo(f"plot: {plot_funnel(record, steps, path)}")


@app.command()
def compact(store: str = typer.Argument(..., help="Store path or URI"),
            retain_hours: int = typer.Option(168, "--retain-hours", min=0,
                                             help="Vacuum data files unreferenced for longer than this; time travel "
                                                  "to versions superseded longer ago stops working"),
            dry_run: bool = typer.Option(False, "--dry-run", help="Report what would change; change nothing"),
            as_json: bool = typer.Option(False, "--json", help="Print the result as JSON")) -> None:
    """Compact the store's Delta tables: bin-pack small files, checkpoint, vacuum old files."""
    import json

    from core.maintenance import compact as compact_store, format_compaction

    result = compact_store(store, vacuum_hours=retain_hours, dry_run=dry_run)
    typer.echo(json.dumps(result, indent=2) if as_json else format_compaction(result))


@app.command()
def demo(out: Path = typer.Option(Path("data/demo"), "--out", help="Where the demo dataset is written"),
         store: str = typer.Option("store/demo", "--store"),
         n: int = typer.Option(300, "--n", help="Number of good records"),
         videos: int = typer.Option(60, "--videos", help="Number of good records with a video clip (0: none)"),
         signal: str = typer.Option("partial", "--signal",
                                    help="partial: each modality carries part of the class; full: each carries all of it"),
         config: Optional[Path] = typer.Option(None, "--config", help="Default: configs/demo.yaml"),
         skip_train: bool = typer.Option(False, "--skip-train"),
         skip_compare: bool = typer.Option(False, "--skip-compare", help="Train the configured model only"),
         set_: list[str] = SetOpt) -> None:
    """Generate the demo dataset, run the pipeline on an in-process Ray, train, compare fusions,
    single modalities and pooled vs temporal branches, and summarise."""
    from pipeline.demo import SIGNALS, make_demo
    from pipeline.report import format_run
    from pipeline.runner import run as run_pipeline

    if signal not in SIGNALS:
        _fail(f"--signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    config = config or _default_config("demo.yaml")
    manifest = make_demo(out, n=n, videos=videos, signal=signal)
    typer.echo(f"demo data: {manifest}")
    cfg = _config(config, set_, source__path=str(manifest), store=store)
    if cfg.ray.dashboard == "auto":   # the demo shows where to watch it
        cfg.ray.dashboard = True
    result = run_pipeline(cfg, log=lambda s: typer.echo(s, err=True))
    typer.echo(format_run(result.record))
    if skip_train:
        return
    from training.train import train as run_train

    trained = run_train(cfg, cfg.store)
    m = trained.metrics
    branches = ",".join(f"{k}:{v}" for k, v in cfg.training.branches.items()) or "pooled"
    typer.echo(f"\ntraining: fusion={m['fusion']} modalities={','.join(m['modalities'])} branches={branches}\n"
               f"test accuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f}")
    if not skip_compare:
        from training.compare import compare

        # In-process training for the comparison's many small models: Ray Train's per-model start-up
        # would be most of their time at this size.
        local = cfg.model_copy(update={"training": cfg.training.model_copy(update={"engine": "local"})})
        table = compare(local, cfg.store).read_text().split("\n## ")[0].split("\n\n", 1)[1]
        typer.echo("\nfusion comparison (test split; compare.md has robustness per modality):\n" + table.rstrip())
    s = result.store
    typer.echo("\noutputs:\n"
               f"  features (Delta): {s.features_uri}\n  rejects (Delta):  {s.rejects_uri}\n"
               f"  samples (WebDataset shards): {s.uri_of('samples', result.run_id)}\n"
               f"  run record: {s.uri_of('runs', result.run_id + '.json')}\n  model: {Path(trained.model_dir).resolve()}"
               + ("" if skip_compare else f"\n  comparison: {Path(cfg.store, 'models', 'compare.md').resolve()}"))


def _default_config(name: str) -> Path:
    for base in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        if (base / name).is_file():
            return base / name
    _fail(f"cannot find configs/{name}; pass --config")


# Commands that live beside the code they drive: each module has ``register(app, config_loader)``.
COMMAND_MODULES = ("pipeline.jobs", "pipeline.serve", "pipeline.export", "pipeline.search", "pipeline.tune")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:   # the module is there but something it imports is missing
                raise
            continue
        module.register(app, _config)


_register_commands()


def _one_line(message: str) -> str:
    """The message on one line: the contract is exactly one ``mmpipe: error:`` line."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    errors = _user_errors()
    try:
        # Non-standalone click returns (not raises) the code of a typer.Exit, and raises its own
        # exceptions so that they can be shown here, not as a traceback.
        sys.exit(app(prog_name="mmpipe", standalone_mode=False) or 0)
    except errors as exc:
        typer.echo(f"mmpipe: error: {_one_line(str(exc)) or type(exc).__name__}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("mmpipe: aborted", err=True)
        sys.exit(130)
    except UsageError as exc:   # malformed command line: click's usage message
        exc.show()
        sys.exit(2)
    except typer.TyperException as exc:   # other click errors (a file option that cannot be opened)
        typer.echo(f"mmpipe: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
