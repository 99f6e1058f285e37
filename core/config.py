"""The run configuration: YAML validated by pydantic, with ``--set dotted.key=value`` overrides.

Stage entries are validated by each stage's own ``Params`` model when the plan is built
(``pipeline.plan.resolve_stages``), so a typo anywhere stops the run before any row moves.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.base import redact_urls
from stages.fetch import HttpConfig


# a key naming a secret: one of these words as a whole ``_``-separated part (not ``tokenizer``)
SECRET_KEYS = re.compile(r"(^|_)(secret|password|passwd|token|credentials?|api_?key|access_?key)(_|$)", re.IGNORECASE)


def redacted(value: Any) -> Any:
    """A config dump safe to store and show: credentials written into URLs (``user:pass@``) and
    the values of keys that name a secret (``*_token``, ``password``, ``aws_secret_access_key``,
    ...) replaced. mmpipe reads credentials from the environment only; this is for what users
    write into paths and stage parameters anyway."""
    if isinstance(value, dict):
        return {k: "***" if SECRET_KEYS.search(str(k)) and v not in (None, "") else redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return redact_urls(value) if isinstance(value, str) else value


class ConfigError(ValueError):
    """A user error in the configuration; the CLI prints it as one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Strict):
    """How Ray runs a stage: an actor pool of ``concurrency`` actors, each with these resources."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)


class StageConfig(Strict):
    """One entry of ``stages``: a stage named by its place (``stages.cleanup.image`` runs the stage
    registered as ``cleanup.image``) or by ``uses`` (a registered name, an entry point of the
    ``mmpipe.stages`` group, or an import path ``package.module:Class``)."""

    model_config = ConfigDict(extra="allow")   # stage-specific keys (``encoder``), checked by the stage
    enabled: bool = True
    uses: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    resources: Resources | None = None       # None: the execution defaults
    after: str | None = None                  # place the stage right after (before) this one
    before: str | None = None


class SourceConfig(Strict):
    path: str = ""                                    # manifest file, folder, or .tar shards (glob ok)
    kind: Literal["auto", "manifest", "folder", "webdataset"] = "auto"
    roots: list[str] = Field(default_factory=list)    # extra folders media paths may resolve into
    # The stages every source runs through: pass 1 (resolve, fetch, hash) and the loading of the
    # bytes in the processing pass. Their parameters come from this section.
    scan_stage: str = "ingest.scan"
    load_stage: str = "ingest"
    http: HttpConfig = Field(default_factory=HttpConfig)


class SplitConfig(Strict):
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions must sum to 1")
        return self


class ExecutionConfig(Strict):
    batch_size: int = Field(32, ge=1)
    concurrency: int | None = Field(None, ge=1)   # actors per CPU stage group; None = CPUs available
    fuse: bool = True             # run consecutive stages with equal resources in one actor pool
    shard_max_count: int = Field(1000, ge=1)
    # Who writes the samples' shards: the stage actors (one shard per Ray Data block; media never
    # travel to the driver) or the driver. auto = the actors, unless the store is a local path on
    # a multi-node cluster (only the driver's disk has it; use actors there with a shared filesystem).
    shard_writer: Literal["auto", "actors", "driver"] = "auto"
    # Rows per Ray Data block (one task): several stage batches, so that scheduling, object-store
    # puts and conversions are paid per block, not per batch. Smaller for small runs (8 blocks per CPU).
    block_rows: int = Field(512, ge=1)
    # Plans this small (typical incremental runs) skip the actor pools and run the stages in the
    # driver: an actor pool's start-up costs more than the work. 0 = always use Ray Data.
    local_max_rows: int = Field(200, ge=0)
    # ... and only while the store holds at most this many rows: run-wide state such as dedup's
    # index grows with the store and belongs in actors, not in the driver.
    local_max_stored_rows: int = Field(100_000, ge=0)
    # Rows per bucket of a streamed plan: the input and the store's lineage are split into buckets
    # by id hash and planned one bucket at a time, so planning memory stays flat as rows grow.
    plan_bucket_rows: int = Field(100_000, ge=1)
    # Source records read and scanned per chunk.
    scan_chunk_rows: int = Field(10_000, ge=1)
    # Stored rejects with these reasons are processed again (`mmpipe run --retry-rejects`), whatever
    # else is unchanged; a retry list is for one run, not for a config file.
    retry_rejects: list[str] = Field(default_factory=list)
    # Cleaning one sample (decoding and checking one image, clip or text) may take this long; past
    # it the sample is rejected with decode_timeout and the worker goes on with the next one.
    decode_timeout_s: float = Field(30.0, gt=0)
    # A live line on a terminal during the processing pass (rows done, rows/s, rejects, time left).
    progress_line: bool = True
    # A rerun drops the stored rows it supersedes either by rewriting the files that hold them (copy
    # on write: a change spread over the ids rewrites the whole table) or by marking them in Delta
    # deletion vectors: "on", "off", or "auto" = on for a table of at least deletion_vectors_min_rows
    # rows. A table with deletion vectors is read by polars, deltalake's QueryBuilder and scan(),
    # Spark and DuckDB; deltalake's to_pyarrow_dataset / to_pandas refuse it.
    deletion_vectors: Literal["auto", "on", "off"] = "auto"
    deletion_vectors_min_rows: int = Field(500_000, ge=0)

    def vectors_from_rows(self) -> int | None:
        """A table's rows from which its commits use deletion vectors (None: never)."""
        return {"on": 0, "off": None}.get(self.deletion_vectors, self.deletion_vectors_min_rows)


class RayConfig(Strict):
    address: str | None = None            # None: RAY_ADDRESS or an in-process Ray
    num_cpus: int | None = None
    num_gpus: int | None = None
    metrics_export_port: int | None = None
    # auto: on where Ray runs long enough to watch (training, tuning, serving, a run of at least
    # DASHBOARD_ROWS new inputs), off for a short run (its processes cost seconds of start-up)
    dashboard: bool | Literal["auto"] = "auto"
    progress_bars: bool = False   # Ray Data's per-operator bars on a terminal (instead of mmpipe's line)


class TrainingConfig(Strict):
    fusion: str = "concat"
    modalities: list[str] | None = None   # None: every modality the store holds features for
    name: str | None = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)   # below 1 leaves CPUs to Ray Data on small machines
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    modality_dropout: float = Field(0.15, ge=0, lt=1)
    # modality -> its branch: "pooled" (the stored vector, the default) or a temporal encoder over its
    # stored sequence (an encoder's ``sequence`` option): gru, lstm, cnn, transformer
    branches: dict[str, Literal["pooled", "gru", "lstm", "cnn", "transformer"]] = Field(default_factory=dict)
    class_weights: bool = True
    patience: int = Field(8, ge=1)
    use_augmented: bool = True
    seed: int = 0
    max_failures: int = Field(2, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)   # fusion-specific knobs
    engine: Literal["ray", "local"] = "ray"     # local: same epoch loop in-process, no Ray Train
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_frac: float = Field(0.05, ge=0, lt=1)   # linear warm-up share of the cosine schedule
    grad_clip: float = Field(1.0, ge=0)         # 0: no clipping
    amp: bool = True                            # bf16 autocast, only ever on GPU
    eval_batch_size: int = Field(1024, ge=1)
    features_version: int | None = Field(None, ge=0)   # Delta time travel on the features table
    calibrate: bool = True   # fit a temperature on the val split; predict and serve divide the logits by it


class AlignConfig(Strict):
    """``mmpipe align``: projection heads into one shared space (engine, workers and resources are
    ``training``'s)."""

    modalities: list[str] | None = None   # None: every modality the store holds features for
    name: str | None = None
    dim: int = Field(128, ge=2)            # the shared space
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.07, gt=0)  # initial; learnt, as in CLIP
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(256, ge=2)      # in-batch negatives: larger batches, harder task
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(8, ge=1)
    seed: int = 0
    eval_rows: int = Field(5000, ge=2)      # test rows retrieval is measured over (all pairs of them)


class TuneConfig(Strict):
    """``mmpipe tune``: a Ray Tune sweep, early-stopped by ASHA, over ``training``'s fusion, hidden,
    lr, dropout, modality_dropout and branches (every other training setting is the ``training`` section's)."""

    samples: int = Field(8, ge=1)              # trials
    max_concurrent: int = Field(2, ge=1)       # trials running at a time
    epochs: int | None = Field(None, ge=1)     # most epochs a trial (and the best model) runs; None: training.epochs
    grace_period: int = Field(2, ge=1)         # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: float = Field(3.0, gt=1)  # ASHA: a trial goes on past a rung if in the top 1/reduction_factor
    # A trial's training loop: ``local`` runs it in the trial's own actor (cpus_per_trial); ``ray``
    # launches Ray Train workers from the trial (training.num_workers x training.cpus_per_worker).
    engine: Literal["local", "ray"] = "local"
    cpus_per_trial: float = Field(1.0, gt=0)
    name: str | None = None                    # models/<name>/; None: tune-<fusion, or mixed>
    # Overrides of the search space, by training key: a list of choices (fusion, hidden), [lo, hi]
    # for a range (lr: log-uniform; dropout, modality_dropout: uniform), or one value to fix it.
    # branches: the kinds (pooled, gru, lstm, cnn, transformer; default [pooled, gru, cnn]) drawn for
    # each trained modality whose sequence the features table holds; with none stored it is not searched.
    space: dict[str, Any] = Field(default_factory=dict)


class Config(Strict):
    name: str = "mmpipe"
    seed: int = 0
    store: str = "store"
    bad_modality: Literal["reject_sample", "drop_modality"] = "reject_sample"
    source: SourceConfig = Field(default_factory=SourceConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    # The processing stages, in order: nested mappings whose leaves are ``StageConfig`` entries
    # (resolved and validated by ``pipeline.plan.resolve_stages`` before any row moves).
    stages: dict[str, Any] = Field(default_factory=dict)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @field_validator("stages")
    @classmethod
    def _dedup_by_default(cls, stages: dict[str, Any]) -> dict[str, Any]:
        """Dedup runs unless a config turns it off (``stages.dedup.enabled: false``), as it always
        has: a config without a ``dedup`` entry gets it after its cleanup stages."""
        if "dedup" in stages:
            return stages
        keys = list(stages)
        at = keys.index("cleanup") + 1 if "cleanup" in keys else 0
        return {**{k: stages[k] for k in keys[:at]}, "dedup": {}, **{k: stages[k] for k in keys[at:]}}


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(data, key, _parse_value(value))
    return data


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    return f"bad config value at '{where}': {err['msg']}"


def load_config(path: str | Path | None, overrides: list[str] = (), values: dict[str, Any] | None = None) -> Config:
    """Read, override and validate a config; raise ConfigError with a one-line cause.

    ``overrides`` are ``--set`` strings; ``values`` are typed dotted keys from CLI options."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {p} must be a YAML mapping")
    data = apply_overrides(data, list(overrides))
    for key, value in (values or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None
