"""Fusion classifiers over per-modality embeddings, in a registry: one class + one decorator each.

Every model takes ``forward(embs, mask)``: ``embs[m]`` is a ``[B, d_m]`` float tensor per modality
(in ``model.modalities`` order) and ``mask`` a ``[B, M]`` float tensor, 1 where the modality is
present. A missing modality contributes nothing, and a sample with every modality missing still
gets finite logits. In training mode, modality dropout masks present modalities at random, never
all of a sample's present ones.

A modality may come as a sequence instead of a pooled vector (``training.branches``): its input is
then the frames flattened with the length appended (``[B, T * d + 1]``, see ``pack_sequences``),
and a trainable temporal encoder (``BRANCHES``: GRU, LSTM, 1-D CNN, a small transformer; masked by
length) turns it into the ``hidden``-wide vector every fusion takes for that modality.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from core.config import ConfigError
from stages.registry import registry

FUSIONS, register_fusion = registry("fusion")


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over present entries only; all-missing rows give all-zero weights (never NaN)."""
    scores = scores.masked_fill(mask <= 0, float("-inf"))
    peak = scores.amax(dim=dim, keepdim=True).clamp_min(-1e4)  # -inf rows -> finite shift
    w = torch.exp(scores - peak) * (mask > 0)
    return w / w.sum(dim=dim, keepdim=True).clamp_min(1e-12)


def drop_modalities(mask: Tensor, p: float) -> Tensor:
    """Randomly mask present modalities with probability ``p``; a sample keeps at least one."""
    if p <= 0:
        return mask
    keep = (torch.rand_like(mask) >= p).to(mask.dtype)
    dropped = mask * keep
    emptied = (dropped.sum(dim=1, keepdim=True) == 0) & (mask.sum(dim=1, keepdim=True) > 0)
    # a sample that lost everything keeps one of its present modalities, chosen at random
    pick = torch.nn.functional.one_hot((torch.rand_like(mask) * mask).argmax(dim=1), mask.shape[1])
    return torch.where(emptied, pick.to(mask.dtype), dropped)


def projector(dim: int, hidden: int, dropout: float) -> nn.Module:
    """Per-modality encoder: normalise (encoders differ in scale), project, non-linearity."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))


def classifier(inp: int, hidden: int, n_classes: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))


def unpack_sequence(x: Tensor, frames: int, dim: int) -> tuple[Tensor, Tensor]:
    """``[B, frames * dim + 1]`` -> (``[B, frames, dim]``, lengths ``[B]`` >= 1: an absent row's 0
    becomes 1, its output is masked by the fusion anyway)."""
    seq = x[:, : frames * dim].reshape(x.shape[0], frames, dim)
    return seq, x[:, -1].round().long().clamp(1, frames)


def _valid(lengths: Tensor, frames: int) -> Tensor:
    """[B, frames] True on the real frames."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class TemporalBranch(nn.Module):
    """A sequence of frames -> one ``hidden``-wide vector: normalise, then ``kind``."""

    def __init__(self, kind: str, frames: int, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.kind, self.frames, self.dim = kind, frames, dim
        self.norm = nn.LayerNorm(dim)
        if kind in ("gru", "lstm"):
            self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(dim, hidden, batch_first=True)
        elif kind == "cnn":
            self.conv = nn.Sequential(nn.Conv1d(dim, hidden, 3, padding=1), nn.GELU(),
                                      nn.Conv1d(hidden, hidden, 3, padding=1), nn.GELU())
        elif kind == "transformer":
            self.proj = nn.Linear(dim, hidden)
            self.position = nn.Parameter(torch.zeros(1, frames, hidden))
            layer = nn.TransformerEncoderLayer(hidden, 4 if hidden % 4 == 0 else 1, dim_feedforward=2 * hidden,
                                               dropout=dropout, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown branch {kind!r}; known: {', '.join(BRANCHES)}")
        self.out = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        seq, lengths = unpack_sequence(x, self.frames, self.dim)
        valid = _valid(lengths, self.frames)
        seq = self.norm(seq) * valid[..., None]   # padding frames are zeros whatever they held (the CNN sees them)
        if self.kind in ("gru", "lstm"):
            packed = nn.utils.rnn.pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, state = self.rnn(packed)
            last = (state[0] if self.kind == "lstm" else state)[-1]   # the last real frame's state
        elif self.kind == "cnn":
            h = self.conv(seq.transpose(1, 2)).transpose(1, 2)
            last = h.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)   # max over real frames
        else:
            h = self.encoder(self.proj(seq) + self.position, src_key_padding_mask=~valid)
            last = (h * valid[..., None]).sum(dim=1) / lengths[:, None]          # mean over real frames
        return self.out(last)


BRANCHES = ("gru", "lstm", "cnn", "transformer")


class FusionModel(nn.Module):
    """Base: keeps the constructor arguments (to rebuild from a checkpoint) and modality dropout."""

    name = ""
    exposes_weights = False   # True: ``last_weights`` holds [B, M] per-sample modality weights

    def __init__(self, dims: dict[str, int], n_classes: int, hidden: int = 128, dropout: float = 0.1,
                 modality_dropout: float = 0.0, **extra) -> None:
        super().__init__()
        if not dims:
            raise ValueError("a fusion model needs at least one modality")
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.n_classes = n_classes
        self.hidden = hidden
        self.modality_dropout = modality_dropout
        self.last_weights: Tensor | None = None
        self.branches = nn.ModuleDict()   # modality -> TemporalBranch (``build_fusion`` adds them)

    def forward(self, embs: dict[str, Tensor], mask: Tensor) -> Tensor:
        if len(self.branches):
            embs = {m: self.branches[m](e) if m in self.branches else e for m, e in embs.items()}
        mask = mask.to(embs[self.modalities[0]].dtype)
        if self.training:
            mask = drop_modalities(mask, self.modality_dropout)
        return self.fuse(embs, mask)

    def fuse(self, embs: dict[str, Tensor], mask: Tensor) -> Tensor:
        raise NotImplementedError

    def _keep_weights(self, w: Tensor) -> None:
        self.last_weights = w.detach().float()


@register_fusion
class ConcatFusion(FusionModel):
    """Early (feature-level) fusion: per-modality projections, zeroed when missing, concat -> MLP."""

    name = "concat"

    def __init__(self, dims, n_classes, hidden=128, dropout=0.1, modality_dropout=0.0, **extra):
        super().__init__(dims, n_classes, hidden, dropout, modality_dropout)
        self.proj = nn.ModuleDict({m: projector(d, hidden, dropout) for m, d in dims.items()})
        # the mask itself is an input too, so "missing" is distinguishable from "zero features"
        self.head = classifier(hidden * len(dims) + len(dims), hidden, n_classes, dropout)

    def fuse(self, embs, mask):
        parts = [self.proj[m](embs[m]) * mask[:, i : i + 1] for i, m in enumerate(self.modalities)]
        return self.head(torch.cat([*parts, mask], dim=1))


@register_fusion
class LateFusion(FusionModel):
    """Decision-level fusion: one classifier per modality, a learned weighting of their
    log-probabilities, renormalised (masked softmax) over the modalities present."""

    name = "late"
    exposes_weights = True

    def __init__(self, dims, n_classes, hidden=128, dropout=0.1, modality_dropout=0.0, **extra):
        super().__init__(dims, n_classes, hidden, dropout, modality_dropout)
        self.heads = nn.ModuleDict(
            {m: nn.Sequential(projector(d, hidden, dropout), nn.Linear(hidden, n_classes)) for m, d in dims.items()})
        self.weight_logits = nn.Parameter(torch.zeros(len(dims)))
        self.scale = nn.Parameter(torch.tensor(float(len(dims))))  # sum-of-log-probs at init

    def fuse(self, embs, mask):
        logp = torch.stack([torch.log_softmax(self.heads[m](embs[m]), dim=-1) for m in self.modalities], dim=1)
        w = masked_softmax(self.weight_logits.expand_as(mask), mask)
        self._keep_weights(w)
        return self.scale * (w.unsqueeze(-1) * logp).sum(dim=1)


@register_fusion
class AttentionFusion(FusionModel):
    """Per-sample modality attention: a scorer rates each projected modality, masked softmax
    turns the scores into weights, the weighted sum goes to the classifier."""

    name = "attention"
    exposes_weights = True

    def __init__(self, dims, n_classes, hidden=128, dropout=0.1, modality_dropout=0.0, **extra):
        super().__init__(dims, n_classes, hidden, dropout, modality_dropout)
        self.proj = nn.ModuleDict({m: projector(d, hidden, dropout) for m, d in dims.items()})
        self.modality_emb = nn.Parameter(torch.zeros(len(dims), hidden))
        self.scorer = nn.Sequential(nn.Linear(hidden, hidden // 2 or 1), nn.Tanh(), nn.Linear(hidden // 2 or 1, 1))
        self.head = classifier(hidden, hidden, n_classes, dropout)

    def fuse(self, embs, mask):
        h = torch.stack([self.proj[m](embs[m]) for m in self.modalities], dim=1) + self.modality_emb
        w = masked_softmax(self.scorer(h).squeeze(-1), mask)
        self._keep_weights(w)
        return self.head((w.unsqueeze(-1) * h).sum(dim=1))


@register_fusion
class GatedFusion(FusionModel):
    """Gated multimodal unit (Arevalo et al. 2017) for M modalities: h_m = tanh(W_m x_m), gates
    z = softmax over present modalities of W_z [x_1..x_M] per hidden unit, h = sum_m z_m * h_m."""

    name = "gated"
    exposes_weights = True

    def __init__(self, dims, n_classes, hidden=128, dropout=0.1, modality_dropout=0.0, **extra):
        super().__init__(dims, n_classes, hidden, dropout, modality_dropout)
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in dims.items()})
        self.transform = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.gate = nn.Linear(sum(dims.values()) + len(dims), hidden * len(dims))
        self.drop = nn.Dropout(dropout)
        self.head = classifier(hidden, hidden, n_classes, dropout)

    def fuse(self, embs, mask):
        xs = [self.norm[m](embs[m]) * mask[:, i : i + 1] for i, m in enumerate(self.modalities)]
        h = torch.stack([torch.tanh(self.transform[m](x)) for m, x in zip(self.modalities, xs)], dim=1)
        z = self.gate(torch.cat([*xs, mask], dim=1)).view(-1, len(self.modalities), self.hidden)
        z = masked_softmax(z, mask.unsqueeze(-1).expand_as(z), dim=1)   # [B, M, H]
        self._keep_weights(z.mean(dim=-1))
        return self.head(self.drop((z * h).sum(dim=1)))


@register_fusion
class TransformerFusion(FusionModel):
    """One token per modality (+ modality embedding) and a CLS token through a transformer
    encoder; missing modalities are padding keys, so the CLS token never attends to them."""

    name = "transformer"

    def __init__(self, dims, n_classes, hidden=128, dropout=0.1, modality_dropout=0.0,
                 layers: int = 2, heads: int = 4, **extra):
        super().__init__(dims, n_classes, hidden, dropout, modality_dropout)
        heads = heads if hidden % heads == 0 else 1
        self.proj = nn.ModuleDict({m: projector(d, hidden, dropout) for m, d in dims.items()})
        self.modality_emb = nn.Parameter(torch.randn(len(dims), hidden) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n_classes))

    def fuse(self, embs, mask):
        tokens = torch.stack([self.proj[m](embs[m]) for m in self.modalities], dim=1) + self.modality_emb
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), 1 - mask], dim=1) > 0   # True = ignore
        return self.head(self.encoder(tokens, src_key_padding_mask=pad)[:, 0])


def _unknown(name: str) -> str:
    return f"unknown fusion {name!r}; known: {', '.join(sorted(FUSIONS))}"


def check_fusion(name: str) -> str:
    """``name`` when it is a registered fusion; a user error (``ConfigError``) otherwise."""
    if name not in FUSIONS:
        raise ConfigError(_unknown(name))
    return name


def build_fusion(name: str, dims: dict[str, int], n_classes: int, branches: dict[str, str] | None = None,
                 sequences: dict[str, list[int]] | None = None, **kwargs) -> FusionModel:
    """Build a registered fusion model by name (kwargs: hidden, dropout, modality_dropout, extras);
    ``branches``: modality -> temporal encoder kind over its sequence of ``sequences[m]`` = [frames, dim]."""
    try:
        cls = FUSIONS[name]
    except KeyError:
        raise KeyError(_unknown(name)) from None
    branches = {m: k for m, k in (branches or {}).items() if k != "pooled" and m in dims}
    hidden = kwargs.get("hidden", 128)
    model = cls({m: hidden if m in branches else d for m, d in dims.items()}, n_classes, **kwargs)
    for m, kind in branches.items():
        frames, dim = sequences[m]
        model.branches[m] = TemporalBranch(kind, frames, dim, hidden, kwargs.get("dropout", 0.1))
    model.dims = dict(dims)   # what the model takes: the packed sequences' widths for branched modalities
    return model
