"""Video rows through cleanup + features: ``mmpipe``'s pipeline (cleanup.video, features.video
"framestats", Ray Data actors on every CPU) vs a plain single-process PyAV loop doing the same
work the way a user would write it (no mmpipe import): decode, scale to 64 px, resample to 8 fps,
black / frozen checks, 8 uniformly sampled frames, H.264 re-encode, per-frame colour and gradient
histograms pooled over time plus frame-difference motion statistics, one Parquet file.

Clips: the demo's generator (a shape moving a class's way over noise, 2 s, 64 px, 8 fps, an AAC
track); the audio track is left out on both sides (``audio_track: false``) so the work matches.

Timers: the pipeline's ``run()`` in a warm driver (Ray up with Ray Data's service actors, one
small run made before; Ray start-up not timed), the plain loop in this process, in ``--rounds``
alternating rounds (Ray shut down while the plain loop runs); ratios are taken within a round.

Run: .venv/bin/python benchmarks/bench_video.py [--clips 400] [--rounds 2]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common import Report, Timer, cpu_count, pipeline_config, ratio, start_ray, work_dir, WORK

SIDE, FPS, FRAMES = 64, 8.0, 8
STAGES = {
    "cleanup": {"video": {"params": {"max_side": SIDE, "fps": FPS, "frames": FRAMES, "min_duration_s": 0.5,
                                     "audio_track": False}}},
    "features": {"video": {"encoder": "framestats"}},
}


def clips(n: int) -> Path:
    """``n`` demo clips and a manifest of them, cached by count."""
    from pipeline.demo import CLASSES, _clip

    folder = WORK / f"video-{n}"
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        label = CLASSES[k % len(CLASSES)]
        (folder / "media" / f"c{k:05d}.mp4").write_bytes(_clip(label, rng))
        rows.append({"id": f"c{k:05d}", "label": label, "video": f"media/c{k:05d}.mp4"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# -- the plain loop: what a user writes with PyAV, OpenCV and numpy ------------------------------
def plain(manifest: Path, out: Path) -> int:
    import av
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    ids, labels, feats, kept = [], [], [], 0
    for r in rows:
        data = (manifest.parent / r["video"]).read_bytes()
        frames = []
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            scale = min(1.0, SIDE / max(stream.codec_context.width, stream.codec_context.height))
            w, h = int(stream.codec_context.width * scale) // 2 * 2, int(stream.codec_context.height * scale) // 2 * 2
            tick = 0.0
            for frame in container.decode(stream):
                while frame.time + 1e-6 >= tick:
                    frames.append(frame.reformat(width=w, height=h, format="rgb24").to_ndarray())
                    tick += 1.0 / FPS
        video = np.stack(frames)
        gray = video.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
        if gray.mean() < 0.03 or np.abs(np.diff(gray, axis=0)).mean() < 0.001:
            continue
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(FPS))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "28", "preset": "veryfast"}
            for picture in video:
                for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        sampled = video[np.linspace(0, len(video) - 1, FRAMES).round().astype(int)]
        per_frame = []
        for picture in sampled:
            small = cv2.resize(picture, (64, 64), interpolation=cv2.INTER_AREA)
            hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
            colour = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
            g = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
            gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)
            grad, _ = np.histogram(np.arctan2(gy, gx), bins=8, weights=np.hypot(gx, gy))
            per_frame.append(np.concatenate([np.sqrt(colour / max(colour.sum(), 1)), np.sqrt(grad / max(grad.sum(), 1e-9))]))
        per_frame = np.stack(per_frame)
        diffs = np.abs(np.diff(gray[:, ::2, ::2], axis=0))
        motion = [diffs.mean(), diffs.mean(axis=(1, 2)).std(), diffs.mean(axis=(1, 2)).max()]
        feats.append(np.concatenate([per_frame.mean(0), per_frame.std(0), motion]).astype(np.float32))
        ids.append(r["id"])
        labels.append(r["label"])
        kept += 1
    pq.write_table(pa.table({"id": ids, "label": labels, "video_emb": [f.tolist() for f in feats]}), out)
    return kept


def pipeline(manifest: Path, cpus: int, label: str) -> tuple[float, dict]:
    from pipeline.runner import run

    cfg = pipeline_config(manifest, work_dir(f"video-store-{label}"), num_cpus=cpus,
                          extra={"execution.local_max_rows": 0})
    cfg = cfg.model_copy(update={"stages": STAGES})
    with Timer() as t:
        result = run(cfg, log=lambda _: None)
    return t.seconds, result.record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import ray

    manifest = clips(args.clips)
    warm = clips(16)
    cpus = cpu_count()
    report = Report(f"Video: cleanup + features, {args.clips} clips (2 s, 64 px), {cpus} CPUs vs a plain PyAV loop",
                    ["round", "plain loop s", "plain clips/s", "mmpipe s", "mmpipe clips/s", "ratio"])
    ratios = []
    for k in range(args.rounds):
        ray.shutdown()
        with Timer() as t:
            kept = plain(manifest, work_dir("video-plain") / "features.parquet")
        start_ray(cpus)
        pipeline(warm, cpus, "warm")
        wall, rec = pipeline(manifest, cpus, "run")
        assert rec["counts"]["accepted"] == kept == args.clips, (rec["counts"], kept)
        ratios.append(ratio(t.seconds, wall))
        report.add(k + 1, t.seconds, args.clips / t.seconds, wall, args.clips / wall, ratios[-1])
        stages = {s: round(v["seconds"], 2) for s, v in rec["stages"].items() if v.get("seconds")} \
            if isinstance(rec.get("stages"), dict) else {}
        if stages:
            report.note(f"round {k + 1}: stage CPU seconds {stages}")
    report.note(f"median ratio {statistics.median(ratios):.2f}x (pipeline clips/s over the plain loop's); "
                f"the machine's ceiling with {cpus} CPUs is {cpus}x")
    report.print()
    ray.shutdown()


if __name__ == "__main__":
    main()
