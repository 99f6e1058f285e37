"""Pretrained encoders, loaded offline through the user's path, with tiny random models saved in the test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.base import object_column
from stages.features import MissingWeights, feature_dim, get_encoder, plan_feature_stages
from stages.media import encode_flac, encode_image
from stages.registry import get_stage

WORDS = "the a cat dog sat on mat ran fast slow red blue big small and with".split()


def make_batch(modality: str, values: list) -> dict[str, np.ndarray]:
    n = len(values)
    batch = {m: object_column(values if m == modality else [None] * n) for m in ("image", "text", "audio")}
    batch["redo"] = np.array(["image,text,audio"] * n, dtype=object)
    for col in ("reject_stage", "reject_reason", "reject_detail"):
        batch[col] = np.array([""] * n, dtype=object)
    return batch


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # transformers 5 takes the WordPiece vocabulary as ``vocab`` (``vocab_file`` is silently ignored).
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> str:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=37)
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def _wav2vec2(path, norm: str) -> str:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, feat_extract_norm=norm,
                            do_stable_layer_norm=norm == "layer")
    Wav2Vec2Model(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True,
                             return_attention_mask=norm == "layer").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def wav2vec2_dir(tmp_path_factory) -> str:
    return _wav2vec2(tmp_path_factory.mktemp("w2v"), "layer")


def texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS + ["zebra"], int(n))) for n in (1, 9, 4, 17, 2, 30)]


def images(sizes=((40, 50), (64, 64), (33, 90), (80, 41))) -> list[bytes]:
    rng = np.random.default_rng(1)
    return [encode_image(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "png") for h, w in sizes]


def clips(lengths=(2000, 8000, 3650, 6000, 2000)) -> list[bytes]:
    rng = np.random.default_rng(2)
    return [encode_flac(rng.uniform(-0.5, 0.5, n).astype(np.float32), 16000) for n in lengths]


CASES = {
    "hf_text": ("text", texts, lambda d: {"model": d["bert"], "max_length": 16}, 32),
    "hf_vision": ("image", images, lambda d: {"model": d["vit"]}, 24),
    "hf_audio": ("audio", clips, lambda d: {"model": d["w2v"]}, 32),
    "torchvision": ("image", images, lambda d: {"arch": "resnet18", "weights": d["tv"], "crop_size": 32,
                                                "resize_size": 36}, 512),
}


@pytest.fixture(scope="module")
def dirs(bert_dir, vit_dir, wav2vec2_dir, resnet_pth) -> dict[str, str]:
    return {"bert": bert_dir, "vit": vit_dir, "w2v": wav2vec2_dir, "tv": resnet_pth}


@pytest.mark.parametrize("name", list(CASES))
def test_batch_equals_one_by_one_and_instances_agree(name, dirs):
    modality, make_values, make_options, dim = CASES[name]
    options = make_options(dirs) | {"precision": "fp32"}
    values = make_values()
    enc = get_encoder(modality, name)(options)
    assert enc.dim == dim == feature_dim(modality, name, options)
    together = enc.embed(enc.preprocess(values))
    assert together.shape == (len(values), dim) and together.dtype == np.float32
    alone = np.concatenate([enc.embed(enc.preprocess([v])) for v in values])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    again = get_encoder(modality, name)(options)
    np.testing.assert_array_equal(again.embed(again.preprocess(values)), together)
    assert np.abs(together - together[:1]).max() > 1e-4          # not a constant output


def test_group_norm_audio_model_never_sees_padding(tmp_path):
    """wav2vec2-base style (group norm over time, no attention mask): clips are only batched with equal lengths."""
    enc = get_encoder("audio", "hf_audio")({"model": _wav2vec2(tmp_path, "group")})
    assert not enc.use_mask
    prepped = enc.preprocess(clips())
    together = enc.embed(prepped)
    alone = np.concatenate([enc.embed([p]) for p in prepped])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_two_tower_model_gives_projected_features(tmp_path):
    """CLIP through hf_vision: ``get_image_features``, width = projection_dim."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=50,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=30, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = get_encoder("image", "hf_vision")({"model": str(tmp_path), "precision": "fp32"})
    assert enc.dual and enc.dim == feature_dim("image", "hf_vision", {"model": str(tmp_path)}) == 12
    prepped = enc.preprocess(images())
    np.testing.assert_allclose(enc.embed(prepped), np.concatenate([enc.embed([p]) for p in prepped]), atol=1e-5)


def test_truncation_and_cls_pooling(bert_dir):
    enc = get_encoder("text", "hf_text")({"model": bert_dir, "max_length": 5, "pooling": "cls"})
    prepped = enc.preprocess(["cat " * 40])
    assert len(prepped[0]) == 5
    assert enc.embed(prepped).shape == (1, 32)


def test_stage_split_matches_single_stage(bert_dir):
    options = {"model": bert_dir, "batch_size": 2}
    plan = plan_feature_stages("text", "hf_text", options)
    assert [name for name, _ in plan] == ["features.text.prep", "features.text"]
    values = texts() + [None]
    prep_stage = get_stage(plan[0][0])(plan[0][1])
    assert prep_stage.encoder.model is None                     # CPU actor: tokenizer only
    split = get_stage(plan[1][0])(plan[1][1])(prep_stage(make_batch("text", values)))
    direct = get_stage("features.text")(plan[1][1])(make_batch("text", values))
    assert "text_prep" not in split
    np.testing.assert_allclose(split["text_emb"], direct["text_emb"], rtol=1e-4, atol=1e-5)
    assert split["has_text"].tolist() == [True] * 6 + [False]
    assert not split["text_emb"][6].any()


def test_missing_model_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MissingWeights, match=str(missing)) as err:
        get_encoder("text", "hf_text")({"model": str(missing)})
    assert "stages.features.text.params.model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MissingWeights, match=str(missing)):
        feature_dim("audio", "hf_audio", {"model": str(missing)})
    params = {"encoder": "hf_text", "options": {"model": str(missing)}}
    with pytest.raises(ValueError, match=str(missing)):   # plan building reports ValueErrors as config errors
        get_stage("features.text").fingerprint(params)
    with pytest.raises(MissingWeights, match="Hugging Face cache"):
        get_encoder("image", "hf_vision")({"model": "org/not-cached-model"})


def test_model_dir_without_weights_or_tokenizer(tmp_path, bert_dir):
    import shutil

    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    shutil.copy(f"{bert_dir}/config.json", no_weights)
    with pytest.raises(MissingWeights, match="no weights in .*config-only"):
        get_encoder("text", "hf_text")({"model": str(no_weights)})
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{bert_dir}/{f}", no_tokenizer)
    with pytest.raises(MissingWeights, match="no tokenizer in .*no-tokenizer"):
        get_encoder("text", "hf_text")({"model": str(no_tokenizer)})


def test_torchvision_missing_weights(tmp_path, monkeypatch, resnet_pth):
    with pytest.raises(MissingWeights, match=str(tmp_path / "nope.pth")):
        get_encoder("image", "torchvision")({"arch": "resnet18", "weights": str(tmp_path / "nope.pth")})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeights, match=str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-")):
        feature_dim("image", "torchvision", {"arch": "resnet18", "weights": "ResNet18_Weights.IMAGENET1K_V1"})
    with pytest.raises(ValueError, match="does not hold resnet50 weights"):
        get_encoder("image", "torchvision")({"arch": "resnet50", "weights": resnet_pth})


def test_torchvision_enum_weights_found_in_hub_cache(tmp_path, monkeypatch, resnet_pth):
    import shutil

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(resnet_pth, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    enc = get_encoder("image", "torchvision")({"arch": "resnet18", "weights": "IMAGENET1K_V1", "crop_size": 32})
    assert enc.embed(enc.preprocess(images()[:1])).shape == (1, 512)


def _last_hidden(enc, **inputs) -> np.ndarray:
    with torch.no_grad():
        return enc.model(**{k: torch.as_tensor(v)[None] for k, v in inputs.items()}).last_hidden_state[0].numpy()


def test_hf_text_sequence_is_the_first_tokens_last_hidden_states(bert_dir):
    options = {"model": bert_dir, "max_length": 16, "precision": "fp32"}
    plain, enc = (get_encoder("text", "hf_text")(options | extra) for extra in ({}, {"sequence": 6}))
    values = texts()
    prepped = enc.preprocess(values)
    emb = enc.embed(prepped)
    seq, lengths = enc.sequences(prepped)
    np.testing.assert_array_equal(emb, plain.embed(plain.preprocess(values)))   # the pooled vector as before
    assert enc.sequence_dim(enc.params) == 32 and seq.shape == (6, 6, 32)
    assert lengths.tolist() == [3, 6, 6, 6, 4, 6] == [min(len(p), 6) for p in prepped]   # [CLS] words [SEP], up to 6
    for ids, s, n in zip(prepped, seq, lengths):
        np.testing.assert_allclose(s[:n], _last_hidden(enc, input_ids=ids)[:n], atol=1e-5)   # padding never seen
        assert not s[n:].any()
    whole = get_encoder("text", "hf_text")(options | {"sequence": 16})   # every real token: its mean is the pooled vector
    seq16, lengths16 = whole.sequences(prepped)
    assert lengths16.tolist() == [len(p) for p in prepped]
    np.testing.assert_allclose([s[:n].mean(axis=0) for s, n in zip(seq16, lengths16)], emb, atol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_hf_audio_sequence_pools_the_frames_into_equal_stretches(norm, wav2vec2_dir, tmp_path):
    """A clip's frames averaged into N stretches; a clip with N frames or fewer keeps its own."""
    options = {"model": wav2vec2_dir if norm == "layer" else _wav2vec2(tmp_path, "group"), "precision": "fp32"}
    plain, enc = (get_encoder("audio", "hf_audio")(options | extra) for extra in ({}, {"sequence": 128}))
    prepped = enc.preprocess(clips())
    emb = enc.embed(prepped)
    seq, lengths = enc.sequences(prepped)
    np.testing.assert_array_equal(emb, plain.embed(plain.preprocess(clips())))
    assert seq.shape == (5, 128, 32) and lengths.tolist() == [98, 128, 128, 128, 98]
    for wave, s, n in zip(prepped, seq, lengths):
        frames = _last_hidden(enc, input_values=wave)
        expected = frames if len(frames) <= 128 else np.stack([c.mean(axis=0) for c in np.array_split(frames, 128)])
        np.testing.assert_allclose(s[:n], expected, rtol=1e-4, atol=1e-5)
        assert not s[n:].any()


def test_hf_sequences_through_the_prep_split_stages(bert_dir, tmp_path):
    options = {"model": bert_dir, "batch_size": 2, "sequence": 4}
    plan = plan_feature_stages("text", "hf_text", options)
    values = texts() + [None]
    prep_stage = get_stage(plan[0][0])(plan[0][1])
    split = get_stage(plan[1][0])(plan[1][1])(prep_stage(make_batch("text", values)))
    direct = get_stage("features.text")(plan[1][1])(make_batch("text", values))
    assert split["text_seq"].shape == (7, 4, 32) and split["text_seq_len"].tolist() == [3, 4, 4, 4, 4, 4, 0]
    assert not split["text_seq"][6].any() and not split["text_seq"][0, 3:].any()
    np.testing.assert_allclose(split["text_seq"], direct["text_seq"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(split["text_emb"], direct["text_emb"], rtol=1e-4, atol=1e-5)

    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=50)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, image_size=16,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path)
    assert feature_dim("text", "hf_text", {"model": str(tmp_path)}) == 8
    with pytest.raises(ValueError, match="two-tower model"):   # its features are a projection, not frames
        feature_dim("text", "hf_text", {"model": str(tmp_path), "sequence": 4})
