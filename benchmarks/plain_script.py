"""What a user would write instead of mmpipe: one process, OpenCV + soundfile + librosa + lxml +
scikit-learn called directly, one Parquet file out. It imports nothing from mmpipe.

The same job as ``configs/demo.yaml`` without augmentation, done the plain way:
- image: decode (OpenCV), reject if undecodable, smaller than 32 px, blank or blurry (variance of the
  Laplacian < 20), shrink to at most 256 px, then a 64x64 gradient-orientation histogram (2x2 cells,
  9 bins) and an 8x3x3 HSV colour histogram;
- audio: decode (soundfile), mono, resample to 16 kHz (librosa), trim silence (librosa, 40 dB),
  reject if silent or under 0.3 s, peak-normalise, then 64 log-mel bands and 20 MFCCs (librosa),
  their mean and std over time, and deltas of the MFCCs;
- text: strip HTML where there is markup (lxml), collapse whitespace, reject under 3 characters,
  hashed word and character n-grams (scikit-learn's HashingVectorizer, 512 + 512);
- exact duplicates (the same image, text and audio bytes) dropped; a random 80/10/10 split.

Run: python benchmarks/plain_script.py MANIFEST OUT.parquet   (prints one JSON line: rows, wall
seconds from before its imports, and the seconds spent in each operation)
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

START = time.perf_counter()   # before the heavy imports: a user's script pays for them too

import cv2                     # noqa: E402
import librosa                 # noqa: E402
import lxml.html               # noqa: E402
import numpy as np             # noqa: E402
import pyarrow as pa           # noqa: E402
import pyarrow.parquet as pq   # noqa: E402
import soundfile as sf         # noqa: E402
from sklearn.feature_extraction.text import HashingVectorizer   # noqa: E402

SR = 16000
WORDS = HashingVectorizer(n_features=512, ngram_range=(1, 2), alternate_sign=False, norm="l2")
CHARS = HashingVectorizer(n_features=512, analyzer="char_wb", ngram_range=(2, 4), alternate_sign=False, norm="l2")


def image_features(data: bytes) -> np.ndarray | None:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or min(img.shape[:2]) < 32:
        return None
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if grey.std() < 3 or cv2.Laplacian(grey, cv2.CV_64F).var() < 20:
        return None
    scale = 256 / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    g = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
    mag, ang = cv2.cartToPolar(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1), angleInDegrees=True)
    bins = (np.mod(ang, 180) / 20).astype(int) % 9
    cell = (np.arange(64)[:, None] // 32) * 2 + np.arange(64)[None, :] // 32
    grad = np.bincount((cell * 9 + bins).ravel(), weights=mag.ravel(), minlength=36)
    hsv = cv2.calcHist([cv2.cvtColor(small, cv2.COLOR_BGR2HSV)], [0, 1, 2], None, [8, 3, 3], [0, 180, 0, 256, 0, 256]).ravel()
    return np.concatenate([grad / max(np.linalg.norm(grad), 1e-12), np.sqrt(hsv / max(hsv.sum(), 1))]).astype(np.float32)


def audio_features(path: str) -> np.ndarray | None:
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception:   # noqa: BLE001 (a user's script skips what it cannot read)
        return None
    wave = wave.mean(axis=1)
    if sr != SR:
        wave = librosa.resample(wave, orig_sr=sr, target_sr=SR)
    if not np.any(wave):
        return None
    wave, _ = librosa.effects.trim(wave, top_db=40)
    if len(wave) < 0.3 * SR or np.sqrt(np.mean(wave ** 2)) < 10 ** (-50 / 20):
        return None
    wave = wave * (10 ** (-1 / 20) / np.max(np.abs(wave)))
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=wave, sr=SR, n_fft=512, hop_length=160, n_mels=64))
    mfcc = librosa.feature.mfcc(S=mel, n_mfcc=20)
    blocks = [mel / 10, mfcc / 10, librosa.feature.delta(mfcc) / 10]
    return np.concatenate([np.concatenate([b.mean(axis=1), b.std(axis=1)]) for b in blocks]).astype(np.float32)


def clean_text(raw: str) -> str | None:
    if "<" in raw and ">" in raw:
        try:
            root = lxml.html.fromstring(raw)
            for bad in root.xpath("//script|//style|//nav|//footer|//head"):
                bad.drop_tree()
            raw = root.text_content()
        except Exception:   # noqa: BLE001
            return None
    text = " ".join(raw.split())
    return text if len(text) >= 3 else None


OPS: dict[str, float] = defaultdict(float)   # operation -> seconds (the benchmark's per-row table)


def timed(name: str, fn, *args):
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        OPS[name] += time.perf_counter() - start


def main() -> None:
    imports_s = time.perf_counter() - START
    manifest, out = Path(sys.argv[1]), Path(sys.argv[2])
    root = manifest.parent
    seen: set[bytes] = set()
    rows: dict[str, list] = {"id": [], "label": [], "split": [], "image": [], "audio": [], "text": []}
    rng = np.random.default_rng(0)
    rejected = 0
    for line in manifest.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rejected += 1
            continue
        image = audio = None
        try:
            img_bytes = (root / rec["image"]).read_bytes() if rec.get("image") else b""
        except OSError:
            rejected += 1
            continue
        key = hashlib.sha1(img_bytes + (rec.get("text") or "").encode() + (rec.get("audio") or "").encode()).digest()
        if key in seen:
            rejected += 1
            continue
        seen.add(key)
        text = timed("text", clean_text, rec["text"]) if rec.get("text") else None
        if img_bytes:
            image = timed("image", image_features, img_bytes)
        if rec.get("audio"):
            audio = timed("audio", audio_features, str(root / rec["audio"]))
        if (rec.get("image") and image is None) or (rec.get("audio") and audio is None) or (rec.get("text") and text is None) \
                or (image is None and audio is None and text is None):
            rejected += 1
            continue
        rows["id"].append(rec["id"])
        rows["label"].append(rec.get("label"))
        rows["split"].append(str(rng.choice(["train", "val", "test"], p=[0.8, 0.1, 0.1])))
        rows["image"].append(None if image is None else image.tolist())
        rows["audio"].append(None if audio is None else audio.tolist())
        rows["text"].append(text)
    start = time.perf_counter()
    texts = [t or "" for t in rows.pop("text")]
    hashed = np.hstack([WORDS.transform(texts).toarray(), CHARS.transform(texts).toarray()]).astype(np.float32)
    rows["text"] = [list(h) if t else None for h, t in zip(hashed, texts)]
    OPS["text"] += time.perf_counter() - start
    start = time.perf_counter()
    pq.write_table(pa.table(rows), out)
    OPS["write"] += time.perf_counter() - start
    print(json.dumps({"rows": len(rows["id"]), "rejected": rejected, "wall_s": round(time.perf_counter() - START, 3),
                      "imports_s": round(imports_s, 3), "ops_s": {k: round(v, 3) for k, v in OPS.items()}}))


if __name__ == "__main__":
    main()
