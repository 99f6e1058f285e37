"""``mmpipe submit / status / logs / stop``: run the pipeline on a Ray cluster via the Ray Jobs API.

``submit`` validates the config here, uploads the working directory (the config travels with it;
big folders are excluded) and starts ``mmpipe run CONFIG ...`` as the job's entrypoint on the
cluster, where ``mmpipe`` must already be installed (the cluster image) or come from
``--pip``. The store should be an object store URI (``s3://...``) or a path every node shares.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from core.config import ConfigError

# gitignore-style patterns (Ray's runtime_env "excludes"), relative to the working dir.
DEFAULT_EXCLUDES = [".venv/", "venv/", ".git/", "store/", "data/", "models/", "benchmarks/results/",
                    "**/__pycache__/", "*.tar", "*.parquet", ".pytest_cache/", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobError(ConfigError):
    """A user-facing failure: unreachable cluster, unknown job, a job that failed. The CLI prints
    it as one line and exits non-zero (it is a ConfigError so ``mmpipe``'s handler catches it)."""


@dataclass
class JobSpec:
    """What ``submit`` sends: the entrypoint command and its runtime environment."""

    entrypoint: str
    runtime_env: dict[str, Any]
    notes: list[str] = field(default_factory=list)   # things the user should know (paths not shipped)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _excluded(rel: Path, excludes: list[str]) -> bool:
    """Whether Ray's upload skips ``rel``: the same matcher on the file and each parent folder."""
    from ray._private.thirdparty.pathspec import PathSpec   # the copy Ray applies to "excludes"

    spec = PathSpec.from_lines("gitwildmatch", excludes)
    return any(spec.match_file(p.as_posix()) for p in (rel, *rel.parents) if p != Path("."))


def _job_path(value: str, working_dir: Path, excludes: list[str], what: str, notes: list[str]) -> str:
    """A local path as the job will see it: relative if it is uploaded with the working dir,
    absolute otherwise (then it must exist on the cluster's nodes). URIs pass through."""
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    if _inside(path, working_dir):
        rel = path.relative_to(working_dir.resolve())
        if not _excluded(rel, excludes):
            return rel.as_posix()
    notes.append(f"{what} {path} is not uploaded with the working dir: it must exist at that path on the cluster")
    return str(path)


def build_job(config: Path, working_dir: Path, input: Optional[str] = None, store: Optional[str] = None,
              overrides: list[str] = (), excludes: list[str] = (), pip: list[str] = (),
              env: dict[str, str] | None = None) -> JobSpec:
    """The entrypoint and runtime_env for ``mmpipe run`` on a cluster (no network)."""
    working_dir = working_dir.resolve()
    if not working_dir.is_dir():
        raise JobError(f"working dir not found: {working_dir}")
    all_excludes = DEFAULT_EXCLUDES + list(excludes)
    config = config.resolve()
    if not _inside(config, working_dir) or _excluded(config.relative_to(working_dir), all_excludes):
        raise JobError(f"config {config} must be inside the uploaded working dir {working_dir} "
                       "(and not in an excluded folder); pass --working-dir")
    notes: list[str] = []
    args = ["mmpipe", "run", config.relative_to(working_dir).as_posix()]
    if input:
        args += ["--input", _job_path(input, working_dir, all_excludes, "input", notes)]
    if store and "://" in store:
        args += ["--store", store]
    elif store:        # never inside the uploaded copy: that folder is thrown away after the job
        local = Path(store).expanduser().resolve()
        args += ["--store", str(local)]
        notes.append(f"store {local} is a local path: every node must share it (prefer s3:// on a real cluster)")
    for item in overrides:
        args += ["--set", item]
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": all_excludes}
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = dict(env)
    return JobSpec(shlex.join(args), runtime_env, notes)


def forwarded_env(names: list[str]) -> dict[str, str]:
    """``--env NAME`` takes the value from this shell, ``--env NAME=VALUE`` sets it."""
    out = {}
    for item in names:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise JobError(f"--env {name}: not set in this shell")
            value = os.environ[name]
        out[name] = value
    return out


# -- talking to the cluster ---------------------------------------------------------------------
def resolve_address(address: Optional[str]) -> str:
    """``--address``, else the environment. A bare ``HOST:PORT`` is the job server's HTTP address
    (Ray would take it for a GCS address and try to connect to it for ~40 s before failing)."""
    for candidate in (address, *(os.environ.get(k) for k in ADDRESS_ENV)):
        if candidate:
            return f"http://{candidate}" if re.fullmatch(r"[\w.-]+:\d+|\[[0-9a-fA-F:]+\]:\d+", candidate) else candidate
    raise JobError("no cluster address: pass --address http://HOST:8265 or set RAY_API_SERVER_ADDRESS")


@contextmanager
def _api_server_env(addr: str) -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address a client is given; for
    the client's set-up, make that the address resolved here (``--address`` first)."""
    saved = os.environ.get(ADDRESS_ENV[0])
    os.environ[ADDRESS_ENV[0]] = addr
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ADDRESS_ENV[0], None)
        else:
            os.environ[ADDRESS_ENV[0]] = saved


def client(address: Optional[str]):
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    try:
        with _api_server_env(addr):
            return JobSubmissionClient(addr)
    # RayError: a bare HOST:PORT is taken as the cluster's GCS address, and an unreachable one
    # times out as an RpcError.
    except (ConnectionError, RuntimeError, ValueError, RayError) as exc:
        raise JobError(f"cannot reach the Ray cluster at {addr}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _call(fn: Callable, *args, **kwargs):
    """Run a client call; the errors it raises for unknown jobs or HTTP failures become JobError."""
    try:
        return fn(*args, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(_first_line(exc)) from None


def follow(job_client, job_id: str, echo: Callable[[str], None], status_echo: Callable[[str], None],
           timeout_s: float = 0, poll_s: float = 2.0) -> str:
    """Stream the job's log while reporting each status change; returns the final status."""
    asyncio.run(_follow(job_client, job_id, echo, status_echo, timeout_s, poll_s))
    return str(_call(job_client.get_job_status, job_id))


async def _follow(job_client, job_id, echo, status_echo, timeout_s, poll_s) -> None:
    async def tail() -> None:
        try:
            async for lines in job_client.tail_job_logs(job_id):
                echo(lines)
        except RuntimeError as exc:          # the log socket closed early: statuses still come
            status_echo(f"log stream ended: {_first_line(exc)}")

    async def statuses() -> None:
        last = None
        while True:
            status = str(await asyncio.to_thread(_call, job_client.get_job_status, job_id))
            if status != last:
                status_echo(f"job {job_id}: {status}")
                last = status
            if status in TERMINAL:
                return
            await asyncio.sleep(poll_s)

    tail_task = asyncio.create_task(tail())
    try:
        await asyncio.wait_for(statuses(), timeout=timeout_s or None)
    except asyncio.TimeoutError:
        raise JobError(f"gave up waiting for job {job_id} after {timeout_s:.0f} s (it is still running)") from None
    finally:
        try:
            await asyncio.wait_for(tail_task, timeout=10)   # let the last lines arrive
        except asyncio.TimeoutError:
            tail_task.cancel()


# -- the commands -------------------------------------------------------------------------------
AddressOpt = typer.Option(None, "--address", help="Ray dashboard / job server, e.g. http://HOST:8265 "
                                                  "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")


def _raise_unless_succeeded(jc, job_id: str, final: str) -> None:
    if final != "SUCCEEDED":
        message = (_call(jc.get_job_info, job_id).message or "").strip()
        raise JobError(f"job {job_id} {final}" + (f": {message.splitlines()[-1]}" if message else ""))


def register(app: typer.Typer, config_loader: Callable) -> None:
    """Add submit / status / logs / stop to the ``mmpipe`` app."""

    @app.command()
    def submit(config: Path = typer.Argument(..., help="YAML config (inside the working dir)"),
               address: Optional[str] = AddressOpt,
               input: Optional[str] = typer.Option(None, "--input", help="Manifest, folder or shards (source.path)"),
               store: Optional[str] = typer.Option(None, "--store", help="Store URI (s3://...) or a shared path"),
               set_: list[str] = typer.Option([], "--set", help="dotted.key=value (repeatable)"),
               wait: bool = typer.Option(False, "--wait", help="Follow the job to its end; non-zero exit if it failed"),
               timeout: float = typer.Option(0, "--timeout", help="With --wait: give up after this many seconds (0: never)"),
               working_dir: Path = typer.Option(Path("."), "--working-dir", help="Folder uploaded as the job's working dir"),
               exclude: list[str] = typer.Option([], "--exclude", help="More upload excludes (gitignore patterns)"),
               pip: list[str] = typer.Option([], "--pip", help="Extra pip requirement for the job (repeatable)"),
               env: list[str] = typer.Option([], "--env", help="NAME or NAME=VALUE to set in the job (repeatable)"),
               submission_id: Optional[str] = typer.Option(None, "--id", help="Job id to use")) -> None:
        """Submit `mmpipe run` to a Ray cluster through the Ray Jobs API; prints the job id."""
        config_loader(config, set_, source__path=input, store=store)     # fail here, not on the cluster
        spec = build_job(config, working_dir, input, store, set_, exclude, pip, forwarded_env(env))
        jc = client(address)
        job_id = _call(jc.submit_job, entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                       submission_id=submission_id, metadata={"mmpipe.config": config.name})
        for note in spec.notes:
            typer.echo(f"mmpipe: note: {note}", err=True)
        typer.echo(job_id)
        if not wait:
            typer.echo(f"follow it with: mmpipe logs {job_id} --follow --address {resolve_address(address)}", err=True)
            return
        start = time.monotonic()
        final = follow(jc, job_id, lambda s: typer.echo(s, nl=False),
                       lambda s: typer.echo(f"[{time.monotonic() - start:6.1f}s] {s}", err=True), timeout)
        _raise_unless_succeeded(jc, job_id, final)

    @app.command()
    def status(job: str = typer.Argument(..., help="Job (submission) id"), address: Optional[str] = AddressOpt) -> None:
        """Show a submitted job's status."""
        info = _call(client(address).get_job_info, job)
        typer.echo(f"{job}: {info.status}")
        for label, value in (("entrypoint", info.entrypoint), ("message", info.message),
                             ("started", _when(info.start_time)), ("ended", _when(info.end_time))):
            if value:
                typer.echo(f"  {label}: {value}")

    @app.command()
    def logs(job: str = typer.Argument(..., help="Job (submission) id"), address: Optional[str] = AddressOpt,
             follow_: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends")) -> None:
        """Print a submitted job's log (driver output)."""
        jc = client(address)
        if not follow_:
            typer.echo(_call(jc.get_job_logs, job), nl=False)
            return
        final = follow(jc, job, lambda s: typer.echo(s, nl=False), lambda s: typer.echo(s, err=True))
        _raise_unless_succeeded(jc, job, final)

    @app.command()
    def stop(job: str = typer.Argument(..., help="Job (submission) id"), address: Optional[str] = AddressOpt) -> None:
        """Ask the cluster to stop a submitted job."""
        stopped = _call(client(address).stop_job, job)
        typer.echo(f"{job}: stop requested" if stopped else f"{job}: already finished")


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""
