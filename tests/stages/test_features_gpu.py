"""On a CUDA GPU: bf16 / fp16 autocast gives the fp32 features within tolerance (make test-gpu)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.features import get_encoder
from stages.media import encode_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    words = [f"w{i}" for i in range(200)]
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=205, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=256)).save_pretrained(path)
    return str(path)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(modality: str, name: str, options: dict, values: list) -> np.ndarray:
    enc = get_encoder(modality, name)(options)
    assert enc.device.type == "cuda" and next(enc.model.parameters()).is_cuda
    out = enc.embed(enc.preprocess(values))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_text_autocast_matches_fp32(bert_dir, precision):
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{k}" for k in rng.integers(0, 200, n)) for n in (3, 40, 17, 120)]
    opts = {"model": bert_dir, "max_length": 128}
    ref = run("text", "hf_text", opts | {"precision": "fp32"}, texts)
    low = run("text", "hf_text", opts | {"precision": precision}, texts)
    assert cosine(ref, low).min() > 0.99
    np.testing.assert_allclose(low, ref, atol=0.1, rtol=0.1)


def test_image_autocast_matches_fp32(resnet_pth):
    rng = np.random.default_rng(1)
    images = [encode_image(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), "png") for _ in range(6)]
    opts = {"arch": "resnet18", "weights": resnet_pth}
    ref = run("image", "torchvision", opts | {"precision": "fp32"}, images)
    low = run("image", "torchvision", opts | {"precision": "bf16"}, images)
    assert cosine(ref, low).min() > 0.99
