"""Fusion models: masking semantics, modality dropout, exposed weights, registry."""
from __future__ import annotations

import pytest
import torch

from training.fusion import FUSIONS, build_fusion, drop_modalities, masked_softmax

DIMS = {"image": 8, "text": 12, "audio": 6}


def inputs(b: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, d, generator=g) for m, d in DIMS.items()}


def test_registry_has_the_five_fusions():
    assert {"concat", "late", "attention", "gated", "transformer"} <= set(FUSIONS)
    with pytest.raises(KeyError, match="unknown fusion"):
        build_fusion("nope", DIMS, 3)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_missing_modality_contributes_nothing(name):
    torch.manual_seed(0)
    model = build_fusion(name, DIMS, 4, hidden=16, modality_dropout=0.5).eval()
    embs = inputs()
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    out = model(embs, mask)
    changed = {**embs, "text": inputs(seed=1)["text"]}   # only rows where text is masked must not move
    out2 = model(changed, mask)
    missing = mask[:, 1] == 0
    assert torch.allclose(out[missing], out2[missing], atol=1e-5)
    assert not torch.allclose(out[~missing], out2[~missing])


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_all_missing_gives_finite_logits_and_gradients(name):
    model = build_fusion(name, DIMS, 3, hidden=16, modality_dropout=0.3).train()
    out = model(inputs(4), torch.zeros(4, 3))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["attention", "gated", "late"])
def test_modality_weights_are_exposed_and_masked(name):
    model = build_fusion(name, DIMS, 3, hidden=16).eval()
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.float32)
    model(inputs(3), mask)
    w = model.last_weights
    assert w.shape == (3, 3)
    assert torch.allclose(w[:2].sum(dim=1), torch.ones(2), atol=1e-5)
    assert w[1, 1] == 0 and (w[2] == 0).all()


def test_modality_dropout_never_drops_every_present_modality():
    torch.manual_seed(0)
    mask = (torch.rand(2000, 3) > 0.3).float()
    dropped = drop_modalities(mask, 0.9)
    assert ((dropped <= mask).all())                                        # never adds a modality
    assert (dropped.sum(1) > 0).equal(mask.sum(1) > 0)                      # keeps at least one
    assert dropped.sum() < mask.sum() * 0.6                                 # but does drop


def test_masked_softmax_all_missing_is_zero():
    w = masked_softmax(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(w, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
