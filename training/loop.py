"""The training loop proper, shared by the Ray Train workers and the in-process (local) engine.

``run_epoch`` trains one epoch over whatever batches it is given, evaluates the whole validation
set on rank 0, shares the verdict with every rank (so all stop together) and keeps the best
weights by validation macro-F1. ``TrainState`` holds everything a checkpoint must restore.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Union

import numpy as np
import torch
from torch import nn

from core.config import TrainingConfig
from training.data import LABEL, Arrays, DataInfo, TrainingData, iterate, model_inputs, n_rows
from training.evaluate import Confusion
from training.fusion import FusionModel, build_fusion


@dataclass
class ModelSpec:
    """Everything needed to rebuild a fusion model (saved in model.pt)."""

    fusion: str
    modalities: list[str]
    dims: dict[str, int]
    classes: list[str]
    hidden: int = 128
    dropout: float = 0.1
    modality_dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)          # modality -> temporal encoder kind
    sequences: dict[str, list[int]] = field(default_factory=dict)   # modality -> [frames, dim] it reads

    def build(self) -> FusionModel:
        return build_fusion(self.fusion, self.dims, len(self.classes), hidden=self.hidden, dropout=self.dropout,
                            modality_dropout=self.modality_dropout, branches=self.branches,
                            sequences=self.sequences, **self.extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_spec(data: DataInfo, tc: TrainingConfig, fusion: str) -> ModelSpec:
    sequences = dict(getattr(data, "sequences", {}))
    branches = {m: kind for m, kind in tc.branches.items() if m in sequences}
    return ModelSpec(fusion, list(data.modalities), dict(data.dims), list(data.classes), tc.hidden, tc.dropout,
                     tc.modality_dropout, dict(tc.extra), branches, sequences)


def class_weights(data: DataInfo, enabled: bool) -> list[float] | None:
    """Inverse-frequency class weights, normalised to mean 1 over the classes seen in training."""
    if not enabled:
        return None
    counts = data.class_counts().astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return w.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, schedule: str, warmup_frac: float) -> float:
    """Multiplier of the base lr: warm-up then cosine decay; 'onecycle' warms up over 30 %
    from lr/25 (the one-cycle shape). Clamped so an extra step never breaks it."""
    progress = min(step / max(total, 1), 1.0)
    warm, floor = (0.3, 1 / 25) if schedule == "onecycle" else (warmup_frac, 0.0)
    if progress < warm:
        return floor + (1 - floor) * progress / warm
    return 0.5 * (1 + math.cos(math.pi * (progress - warm) / max(1 - warm, 1e-8)))


class Collective:
    """How ranks agree; the local engine is a world of one."""

    rank = 0

    def mean(self, x: float) -> float:
        return x

    def from_rank0(self, values: list[float]) -> list[float]:
        return values


class TorchCollective(Collective):
    """torch.distributed (gloo / nccl) collectives, used inside Ray Train workers."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return float(t.item()) / self.world

    def from_rank0(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.broadcast(t, src=0)
        return t.tolist()


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_macro_f1: float
    val_accuracy: float
    lr: float
    improved: bool
    stop: bool


class TrainState:
    """Model, optimiser, schedule and early-stopping bookkeeping; ``epoch`` is the next to run."""

    def __init__(self, spec: ModelSpec, tc: TrainingConfig, steps_per_epoch: int, weights: list[float] | None,
                 device: torch.device, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        self.spec, self.tc, self.device = spec, tc, device
        self.model = wrap(spec.build().to(device))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        total = max(tc.epochs * steps_per_epoch, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, tc.schedule, tc.warmup_frac))
        w = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=w)
        self.amp = tc.amp and device.type == "cuda"
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_f1, self.best_epoch, self.bad_epochs = -1.0, -1, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped = False
        self.resumed_at: list[int] = []   # epochs at which a run resumed from a checkpoint

    @property
    def net(self) -> FusionModel:
        """The bare model (DDP unwrapped)."""
        return getattr(self.model, "module", self.model)

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "history": self.history,
                "best_f1": self.best_f1, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state, "stopped": self.stopped, "resumed_at": self.resumed_at,
                "spec": self.spec.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key in ("epoch", "history", "best_f1", "best_epoch", "bad_epochs", "best_state", "stopped", "resumed_at"):
            setattr(self, key, state[key])


def train_steps(state: TrainState, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """One pass over ``batches``; returns the mean training loss."""
    state.model.train()
    total, count = 0.0, 0
    for batch in batches:
        embs, mask = model_inputs(batch, state.spec.modalities, state.device)
        y = batch[LABEL].to(state.device, torch.long)
        with state.autocast():
            loss = state.loss_fn(state.model(embs, mask).float(), y)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if state.tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(state.model.parameters(), state.tc.grad_clip)
        state.optimizer.step()
        state.scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


Batches = Iterable[dict[str, torch.Tensor]]
ValSource = Union[Arrays, Callable[[], Batches]]   # arrays in memory, or a fresh pass per call


@torch.no_grad()
def predict_batch(model: FusionModel, batch: dict[str, torch.Tensor], device: torch.device,
                  amp: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities of one batch (the caller puts the model in eval mode), and the
    per-sample modality weights when the model exposes them."""
    embs, mask = model_inputs(batch, model.modalities, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        logits = model(embs, mask)
    probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    weights = model.last_weights.cpu().numpy() if model.exposes_weights and model.last_weights is not None else None
    return probs, weights


def predict_proba(model: FusionModel, arrays: Arrays, batch_size: int = 1024,
                  device: torch.device | str = "cpu", amp: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities over a whole split held in memory (bare model, eval mode), and the
    per-sample modality weights when the model exposes them."""
    model.eval()
    device = torch.device(device)
    probs, weights = [], []
    for batch in iterate(arrays, batch_size):
        p, w = predict_batch(model, batch, device, amp)
        probs.append(p)
        if w is not None:
            weights.append(w)
    empty = np.zeros((0, model.n_classes), np.float32)
    return (np.concatenate(probs) if probs else empty), (np.concatenate(weights) if weights else None)


def validate(state: TrainState, val: ValSource) -> tuple[float, float, float]:
    """(loss, macro-F1, accuracy) on the whole validation set, batch by batch."""
    batches = iterate(val, state.tc.eval_batch_size) if isinstance(val, dict) else val()
    state.net.eval()
    w = state.loss_fn.weight
    weights = None if w is None else w.detach().cpu().numpy().astype(np.float64)
    confusion = Confusion(len(state.spec.classes))
    loss, total = 0.0, 0.0
    for batch in batches:
        probs, _ = predict_batch(state.net, batch, state.device, state.amp)
        y = batch[LABEL].cpu().numpy().astype(np.int64)
        wy = np.ones(len(y)) if weights is None else weights[y]
        loss += float((wy * -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))).sum())
        total += float(wy.sum())
        confusion.update(y, probs.argmax(axis=1))
    return loss / total if total else 0.0, confusion.macro_f1(), confusion.accuracy()


def run_epoch(state: TrainState, batches: Batches, val: ValSource | None,
              comm: Collective = Collective()) -> EpochStats:
    """Train one epoch, validate on rank 0, agree on the verdict, update best / early stopping.

    Every rank returns the same ``stop`` so all reach ``ray.train.report`` equally often."""
    train_loss = comm.mean(train_steps(state, batches))
    val_loss = f1 = acc = 0.0
    if comm.rank == 0:
        val_loss, f1, acc = validate(state, val)
    val_loss, f1, acc = comm.from_rank0([val_loss, f1, acc])
    improved = f1 > state.best_f1
    if improved:
        state.best_f1, state.best_epoch, state.bad_epochs = f1, state.epoch, 0
        if comm.rank == 0:
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in state.net.state_dict().items()})
    else:
        state.bad_epochs += 1
    stats = EpochStats(state.epoch, train_loss, val_loss, f1, acc, state.optimizer.param_groups[0]["lr"],
                       improved, state.bad_epochs >= state.tc.patience)
    state.history.append({k: v for k, v in asdict(stats).items() if k not in ("improved", "stop")})
    state.epoch += 1
    state.stopped = stats.stop
    return stats


def fit_local(data: TrainingData, tc: TrainingConfig, fusion: str | None = None,
              device: torch.device | str | None = None, *, restore: Callable[[TrainState], None] | None = None,
              on_epoch: Callable[[TrainState, EpochStats], None] | None = None) -> TrainState:
    """The local engine: the same ``run_epoch`` in this process, batches from numpy. ``restore``
    may load a checkpoint into the fresh state and ``on_epoch`` sees every epoch's end (a Tune
    trial resumes and reports through them)."""
    seed_everything(tc.seed)
    device = torch.device(device or ("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu"))
    spec = model_spec(data, tc, fusion or tc.fusion)
    steps = math.ceil(n_rows(data.train) / tc.batch_size)
    state = TrainState(spec, tc, steps, class_weights(data, tc.class_weights), device)
    if restore is not None:
        restore(state)
    while state.epoch < tc.epochs and not state.stopped:
        stats = run_epoch(state, iterate(data.train, tc.batch_size, shuffle_seed=tc.seed + state.epoch), data.val)
        if on_epoch is not None:
            on_epoch(state, stats)
    return state
