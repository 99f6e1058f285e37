"""``mmpipe serve``: a trained model behind a REST endpoint on Ray Serve, in the foreground until
Ctrl-C or SIGTERM. The application itself is ``pipeline.serve_app`` (imported only when serving:
``mmpipe --help`` does not load Ray Serve)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

from core.config import Config, ConfigError


@dataclass
class Service:
    """A running application: where it answers and what stopping it must undo."""

    url: str
    ray_address: str
    started_ray: bool

    def stop(self) -> None:
        """Take the application down: on Ray this process started, Serve and Ray; on a cluster,
        only this application (other applications keep running there)."""
        import ray
        from ray import serve

        from pipeline.serve_app import APP_NAME

        try:
            if self.started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()


def check_model(cfg: Config, model_dir: Path) -> dict:
    """Refuse, before Ray starts, a model that is not there or stages configured otherwise than
    for its training (the replicas would refuse it one by one, later). Returns its metrics."""
    from pipeline.predict import Featurizer, read_model_metrics

    info = read_model_metrics(model_dir)
    if not (model_dir / "model.pt").is_file():
        raise ConfigError(f"no trained model at {model_dir} (model.pt missing)")
    Featurizer(cfg, info.get("stage_fingerprints", {}), list(info.get("modalities") or []), connect=False)
    return info


def check_aligner(cfg: Config, align_dir: Path) -> tuple[str, ...]:
    """Refuse an alignment model that is missing or was trained on stages configured otherwise, and
    bring the store's index of each modality it maps up to date (the replicas only load them).
    Returns those modalities."""
    from pipeline.predict import Featurizer
    from training.align import load_aligner
    from training.index import VectorIndex

    model, saved = load_aligner(align_dir)
    modalities = tuple(model.spec.modalities)
    Featurizer(cfg, saved.get("stage_fingerprints") or {}, list(modalities), connect=False)
    for m in modalities:
        VectorIndex(cfg.store, m, align_dir).sync()
    return modalities


def check_port(host: str, port: int) -> None:
    """A clear error now rather than a proxy that cannot bind later (Ray started here only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def start(cfg: Config, model_dir: Path, options) -> Service:
    """Ray (this process's, or ``ray.address``'s cluster), Serve's proxy on ``options.host:port``,
    and the application; returns once every replica has loaded the model."""
    import ray
    from ray import serve

    from pipeline.execution import init_ray
    from pipeline.serve_app import APP_NAME, build_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # this process's Serve client: no INFO lines
    info = init_ray(cfg)
    started_ray = not info["connected"]
    try:
        serve.start(http_options={"host": options.host, "port": options.port,
                                  # Serve's own limit, past the ingress's answer to a slow request
                                  "request_timeout_s": options.request_timeout_s + 30},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app(cfg, model_dir, options), name=APP_NAME, route_prefix="/",
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    host = f"[{options.host}]" if ":" in options.host else options.host
    return Service(f"http://{host}:{options.port}", ray.get_runtime_context().gcs_address, started_ray)


def serve_forever(cfg: Config, model_dir: Path, options, log: Callable[[str], None]) -> None:
    """``start``, then wait for SIGINT / SIGTERM and stop cleanly."""
    service = start(cfg, model_dir, options)
    stop = threading.Event()
    # Installed after Ray's start: ray.init installs its own SIGTERM handler, which dies loudly.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        search = ", POST /search" if options.align_model else ""
        log(f"serving {model_dir} on {service.url} (POST /predict{search}, GET /healthz, GET /metadata); "
            f"Ray at {service.ray_address}; Ctrl-C stops")
        while not stop.wait(0.5):
            pass
        log("stopping")
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("stopped")


# ServeOptions fields whose command-line option is named otherwise
OPTION_NAMES = {"max_body_bytes": "--max-body-mb", "batch_wait_s": "--batch-wait-ms", "request_timeout_s": "--timeout-s",
                "target_ongoing_requests": "--target-ongoing"}


def register(app: typer.Typer, config_loader: Callable) -> None:
    """Add ``serve`` to the ``mmpipe`` app."""

    @app.command("serve")
    def serve_cmd(config: Path = typer.Argument(..., help="YAML config: the stages the model was trained with"),
                  model: Path = typer.Option(..., "--model", help="models/<name>/ folder"),
                  port: int = typer.Option(8000, "--port"),
                  host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 to answer on every interface"),
                  address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to deploy to (or RAY_ADDRESS)"),
                  replicas: int = typer.Option(1, "--replicas", help="Model replicas (without autoscaling)"),
                  min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="Autoscaling: at least"),
                  max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="Autoscaling: at most"),
                  target_ongoing: float = typer.Option(2.0, "--target-ongoing",
                                                       help="Autoscaling: requests in flight per replica to aim at"),
                  max_batch_size: int = typer.Option(32, "--max-batch-size", help="Records per model batch, across requests"),
                  batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="How long a batch waits to fill"),
                  timeout_s: float = typer.Option(30.0, "--timeout-s", help="Per-request timeout (answered 504)"),
                  max_records: int = typer.Option(32, "--max-records", help="Records per request at most"),
                  max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Request body size limit, MiB"),
                  quantize: str = typer.Option("none", "--quantize", help="none | int8 (dynamic, CPU replicas)"),
                  replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="CPUs per model replica"),
                  replica_gpus: float = typer.Option(0.0, "--replica-gpus", help="GPUs per model replica"),
                  align: Optional[Path] = typer.Option(None, "--align", help="models/<name>/ of `mmpipe align`: "
                                                                              "also POST /search over --store's index"),
                  store: Optional[str] = typer.Option(None, "--store", help="The store searched (with --align)"),
                  set_: list[str] = typer.Option([], "--set", help="dotted.key=value (repeatable)")) -> None:
        """Serve a trained model over HTTP with Ray Serve: POST /predict, GET /healthz, GET /metadata."""
        from pydantic import ValidationError

        from pipeline.serve_app import ServeOptions

        cfg = config_loader(config, set_, ray__address=address, store=store)
        search_modalities = check_aligner(cfg, align) if align is not None else ()
        try:
            options = ServeOptions(host=host, port=port, replicas=replicas, min_replicas=min_replicas,
                                   max_replicas=max_replicas, target_ongoing_requests=target_ongoing,
                                   max_batch_size=max_batch_size, batch_wait_s=batch_wait_ms / 1000,
                                   request_timeout_s=timeout_s, max_records=max_records,
                                   max_body_bytes=int(max_body_mb * 1024 * 1024), quantize=quantize,
                                   replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                                   align_model=str(align.resolve()) if align is not None else None,
                                   search_modalities=search_modalities)
        except ValidationError as exc:
            e = exc.errors()[0]
            field = str(e["loc"][0])
            raise ConfigError(f"{OPTION_NAMES.get(field, '--' + field.replace('_', '-'))}: {e['msg']}") from None
        if options.problems():
            raise ConfigError(options.problems()[0])
        check_model(cfg, model)
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            check_port(host, port)
        serve_forever(cfg, model, options, log=lambda s: typer.echo(f"mmpipe serve: {s}", err=True))
