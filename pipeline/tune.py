"""``mmpipe tune``: a Ray Tune sweep (ASHA) over fusion, hidden size, lr, dropouts and the branch of each
stored sequence, then the best configuration trained as a normal model (``training.tune``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer


def _stderr(line: str) -> None:
    typer.echo(line, err=True)


def _param(key: str, value: Any) -> str:
    if isinstance(value, dict):   # branches
        return f"{key}=" + ",".join(f"{m}:{kind}" for m, kind in value.items())
    return f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"


def register(app: typer.Typer, config_loader: Callable) -> None:
    """Add ``tune`` to the ``mmpipe`` app."""

    @app.command("tune")
    def tune_cmd(config: Path = typer.Argument(..., help="YAML config"),
                 store: Optional[str] = typer.Option(None, "--store", help="Store path or URI"),
                 samples: Optional[int] = typer.Option(None, "--samples", help="Trials (tune.samples, default 8)"),
                 max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent",
                                                              help="Trials at a time (tune.max_concurrent, default 2)"),
                 name: Optional[str] = typer.Option(None, "--name", help="models/<name>/ (default tune-<fusion or mixed>); "
                                                                         "the same name resumes the sweep"),
                 address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to run on (or RAY_ADDRESS)"),
                 set_: list[str] = typer.Option([], "--set", help="dotted.key=value (repeatable)")) -> None:
        """Sweep fusion, hidden size, lr, dropout, modality dropout and, for each modality whose sequence the
        store holds, its branch (pooled or temporal) with Ray Tune (ASHA early stopping); write the trials best
        first (tune.md, tune.json) and train the best configuration as models/<name>/."""
        cfg = config_loader(config, set_, store=store, ray__address=address, tune__samples=samples,
                            tune__max_concurrent=max_concurrent, tune__name=name)
        from pipeline.execution import init_ray
        from training.tune import SweepIncomplete, SweepInterrupted, plan, run

        sweep = plan(cfg, cfg.store)   # user errors before Ray starts
        # Each trial checkpoints every epoch, which makes Tune snapshot the experiment as often and warn.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        init_ray(cfg)
        try:
            result = run(cfg, sweep, log=_stderr)
        except SweepIncomplete as exc:
            import ray

            ray.shutdown()   # the trial actors' exit noise before, not after, the one line that matters
            interrupted = isinstance(exc, SweepInterrupted)
            typer.echo(f"mmpipe: {'aborted' if interrupted else 'error'}: {exc}", err=True)
            raise typer.Exit(130 if interrupted else 1)
        best = result.best
        typer.echo(f"trials: {result.table}\nmodel: {result.model_dir}\nbest trial {best['trial_id']}: "
                   + ", ".join(_param(k, v) for k, v in best["params"].items())
                   + f"\nval macro_f1={best['val_macro_f1']:.4f} (trial {best['trial_val_macro_f1']:.4f}) "
                   f"test accuracy={best['test_accuracy']:.4f} macro_f1={best['test_macro_f1']:.4f}")
