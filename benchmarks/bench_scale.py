"""Scale (issue #27): the pipeline at 100k and 1M rows on one machine, as a shell user runs it.

For each size, on a fresh store, four fresh ``mmpipe`` processes: (1) a full run, (2) a no-op rerun,
(3) a rerun with 1 % of the manifest's texts changed, (4) ``mmpipe train`` (few epochs). For each:
wall time, rows/s, the run record's phases and counts, and the peak RSS of the driver and of every
other process in its tree (Ray GCS, raylet, workers, actors: read from /proc every ``--interval``
seconds), and each other process's peak of private memory (RSS counts the object-store pages a Ray
worker has touched, which the store holds once for all). A step past ``--timeout`` seconds, or whose tree's summed RSS passes ``--rss-cap-gb``, is
killed (the whole tree) and reported as such. After each run the accounting is checked by counts:
features (aug = 0) + rejects = input ids.

The manifests are text-only (short unique texts, 4 labels, unique ids), plus ``--media N`` rows of
image + text + audio from the demo generator; the config is configs/demo.yaml without augmentation.
Not part of ``make bench``: ``make bench-scale``.

Targets: rows/s at the largest size / at the smallest >= 0.9; driver peak < 1.5 GB; largest peak of
any other process < 2 GB; no-op rerun < 20 s at the largest size; 1 %-changed / full < 5 %; train
driver peak < 2 GB.

Run: .venv/bin/python benchmarks/bench_scale.py [--sizes 100000,1000000] [--media 0] [--epochs 2]
     [--timeout 3600] [--rss-cap-gb 18] [--steps full,noop,changed,train] [--out results.json] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bench_memory import process_tree
from common import ROOT, Report, demo_data, load_avg, pipeline_config, ratio, verdict, work_dir

GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")
MMPIPE = str(Path(sys.executable).parent / "mmpipe")
LABELS = ("animal", "city", "music", "sport")
STEPS = ("full", "noop", "changed", "train")
TARGETS = {"rows_per_s_ratio": 0.9, "driver_peak_gb": 1.5, "other_peak_gb": 2.0, "other_private_gb": 2.0, "noop_s": 20.0,
           "changed_over_full": 0.05, "train_driver_peak_gb": 2.0}


# ------------------------------------------------------------------ data


def _vocab(label: str, size: int = 300) -> list[str]:
    return [f"{label[:3]}{k:03d}" for k in range(size)]


COMMON = [f"w{k:04d}" for k in range(2000)]


def text_rows(n: int, seed: int = 0):
    """``n`` short unique texts: words shared by all labels plus a few of the row's label's own."""
    rng = random.Random(seed)
    vocabs = {label: _vocab(label) for label in LABELS}
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.choices(COMMON, k=7) + rng.choices(vocabs[label], k=3)
        rng.shuffle(words)
        yield {"id": f"t{i:08d}", "label": label, "text": " ".join(words) + f" n{i}"}


def write_manifest(folder: Path, n: int, media: int) -> tuple[Path, int]:
    """``folder/manifest.jsonl``: ``n`` text rows, then the demo's ``media`` good rows and its 8 bad
    ones (media hard-linked beside it). Returns the path and its number of lines (= input ids)."""
    path, lines = folder / "manifest.jsonl", 0
    with path.open("w") as f:
        for row in text_rows(n):
            f.write(json.dumps(row) + "\n")
            lines += 1
        if media:
            demo = demo_data(media)
            shutil.copytree(demo.parent / "media", folder / "media", copy_function=_link)
            for line in demo.read_text().splitlines():
                if line.strip():
                    f.write(line + "\n")
                    lines += 1
    return path, lines


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:   # another filesystem
        shutil.copy2(src, dst)


def change_texts(path: Path, fraction: float) -> int:
    """Rewrite ``path`` in place with the text of every ``1/fraction``-th line that has one changed."""
    step = max(1, round(1 / fraction))
    tmp, changed = path.with_suffix(".tmp"), 0
    with path.open() as src, tmp.open("w") as dst:
        for k, line in enumerate(src):
            row = json.loads(line)
            if k % step == 0 and row.get("text"):
                row["text"] += " (edited)"
                changed += 1
            dst.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return changed


def write_config(folder: Path, manifest: Path, store: Path, media: int, epochs: int) -> Path:
    cfg = pipeline_config(manifest, store).model_dump(mode="json")   # demo stages, no augmentation
    cfg["ray"]["dashboard"] = False
    cfg["training"]["epochs"] = epochs
    if not media:   # no image or audio anywhere: train on text alone
        cfg["training"]["modalities"] = ["text"]
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------ processes and memory


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def _private(pid: int) -> int:
    """Memory only this process maps (Private_Clean + Private_Dirty of smaps_rollup): not the
    libraries it shares, nor the pages of Ray's object store it has read or written, which RSS counts
    in every process that touched them."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _label(pid: int) -> str:
    """What a process is, from its command line: gcs_server, raylet, ray::<worker title>, or the
    script a Python helper runs (Ray's dashboard agent, log monitor)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    first = argv[0].strip()
    if not first:   # exiting, or between exec and setting its title
        return "?"
    if first.startswith("ray::"):
        return first.split(" ")[0][:60]
    name = os.path.basename(first.split(" ")[0])
    if name.startswith("python"):
        script = next((a for a in argv[1:] if a.endswith(".py")), "")
        return f"python {os.path.basename(script)}" if script else "python"
    return name


# What a Ray worker is called before it has a title, or while it has no work.
PLACEHOLDERS = {"?", "ray::IDLE", "python setup_worker.py", "python default_worker.py"}


def kind(label: str) -> str:
    if label.startswith("ray::") or label in PLACEHOLDERS - {"?"}:
        return "ray worker"
    return label if label in ("gcs_server", "raylet", "?") else "ray service"


@dataclass
class ProcPeak:
    label: str
    rss: int = 0
    private: int = 0


@dataclass
class TreeWatch:
    """Peak RSS per process of a process tree (the root is the driver) and of the tree's sum."""

    root: int
    procs: dict[tuple[int, str], ProcPeak] = field(default_factory=dict)   # (pid, start time) -> peak
    tree_peak: int = 0
    tree_now: int = 0

    def sample(self) -> None:
        total = 0
        for pid in process_tree(self.root):
            try:
                key, rss = (pid, _start_time(pid)), _rss(pid)
                label = "driver" if pid == self.root else _label(pid)
                private = 0 if pid == self.root else _private(pid)
            except (OSError, IndexError, ValueError):   # exited meanwhile
                continue
            total += rss
            peak = self.procs.setdefault(key, ProcPeak(label))
            peak.rss, peak.private = max(peak.rss, rss), max(peak.private, private)
            # A worker's title is set after it starts, and goes back to ray::IDLE after its work: keep the work's.
            if label != "?" and (label not in PLACEHOLDERS or peak.label in PLACEHOLDERS):
                peak.label = label
        self.tree_now, self.tree_peak = total, max(self.tree_peak, total)

    def driver_peak(self) -> int:
        return max((p.rss for (pid, _), p in self.procs.items() if pid == self.root), default=0)

    def others(self) -> list[ProcPeak]:
        return sorted((p for (pid, _), p in self.procs.items() if pid != self.root), key=lambda p: -p.rss)

    def alive(self) -> list[int]:
        """Processes of this tree still running (the same process: pid and start time match)."""
        out = []
        for pid, start in self.procs:
            try:
                if _start_time(pid) == start:
                    out.append(pid)
            except (OSError, IndexError):
                pass
        return out


@dataclass
class StepResult:
    step: str
    argv: list[str]
    status: str = "ok"
    rc: int | None = None
    wall_s: float = 0.0
    driver_peak_gb: float = 0.0
    other_peak_gb: float = 0.0
    other_peak_process: str = ""
    other_private_gb: float = 0.0          # the largest private (unshared) peak of the others
    other_private_process: str = ""
    tree_peak_gb: float = 0.0
    peak_by_kind_gb: dict[str, float] = field(default_factory=dict)
    top_processes: list[tuple[str, float]] = field(default_factory=list)   # the 8 largest others: (process, GB)
    processes: int = 0
    record: dict | None = None   # the run record's phases_s, counts, wall_s, execution
    log: str = ""
    log_tail: list[str] = field(default_factory=list)   # a step that did not succeed: its last lines

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_step(step: str, argv: list[str], log: Path, timeout: float, cap_gb: float, interval: float) -> StepResult:
    """``argv`` as a fresh process in its own session, its tree sampled until it exits; killed
    (the whole tree) past ``timeout`` seconds or ``cap_gb`` of summed RSS."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    result = StepResult(step, argv, log=str(log))
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        watch, killed = TreeWatch(proc.pid), None
        while proc.poll() is None:
            watch.sample()
            elapsed = time.perf_counter() - start
            if watch.tree_now > cap_gb * GB:
                killed = f"killed at {watch.tree_now / GB:.1f} GB (tree RSS over the {cap_gb:g} GB cap) after {elapsed:.0f} s"
            elif elapsed > timeout:
                killed = f"killed at the {timeout:g} s timeout (tree RSS {watch.tree_now / GB:.1f} GB)"
            if killed:
                _kill_tree(proc, watch)
                break
            time.sleep(interval)
        proc.wait()
        result.wall_s = time.perf_counter() - start
    _reap(watch)
    result.rc = proc.returncode
    result.status = killed or ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    _fill_memory(result, watch)
    return result


def _kill_tree(proc: subprocess.Popen, watch: TreeWatch) -> None:
    """SIGKILL the step's session and every process seen in its tree (Ray's daemons leave the
    session's process group on some versions; collected before the driver dies and they re-parent)."""
    watch.sample()
    pids = watch.alive()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reap(watch: TreeWatch, grace_s: float = 15.0) -> None:
    """Wait for the tree's processes to exit after the driver (Ray shuts its daemons down at
    exit); kill those still there after ``grace_s``, so that no step leaves memory behind."""
    deadline = time.time() + grace_s
    while watch.alive() and time.time() < deadline:
        time.sleep(0.5)
    for pid in watch.alive():
        print(f"  killing leftover process {pid} of the step's tree", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _fill_memory(result: StepResult, watch: TreeWatch) -> None:
    others = watch.others()
    result.driver_peak_gb = watch.driver_peak() / GB
    result.tree_peak_gb = watch.tree_peak / GB
    result.processes = len(watch.procs)
    if others:
        result.other_peak_gb, result.other_peak_process = others[0].rss / GB, others[0].label
        result.top_processes = [(p.label, round(p.rss / GB, 3)) for p in others[:8]]
        top = max(others, key=lambda p: p.private)
        result.other_private_gb, result.other_private_process = top.private / GB, top.label
    for p in others:
        k = kind(p.label)
        result.peak_by_kind_gb[k] = max(result.peak_by_kind_gb.get(k, 0.0), p.rss / GB)


# ------------------------------------------------------------------ one size


def new_record(store: Path, before: set[str]) -> dict | None:
    """The run record a step wrote (the one file new under runs/)."""
    new = sorted(set(p.name for p in (store / "runs").glob("*.json")) - before)
    if not new:
        return None
    rec = json.loads((store / "runs" / new[-1]).read_text())
    return {k: rec.get(k) for k in ("run_id", "wall_s", "phases_s", "counts", "execution")}


def accounting(store: Path, n_input: int) -> dict:
    """Counts only, read by the Delta/Parquet readers (no table is loaded whole)."""
    import pyarrow.compute as pc

    from core.store import Store

    s = Store(str(store))
    accepted, rejected = s.count("features", pc.field("aug") == 0), s.count("rejects")
    return {"input": n_input, "accepted": accepted, "rejected": rejected, "ok": accepted + rejected == n_input}


@dataclass
class SizeResult:
    rows: int
    input_ids: int
    changed_texts: int = 0
    steps: dict[str, StepResult] = field(default_factory=dict)
    accounting: dict[str, dict] = field(default_factory=dict)
    data_s: float = 0.0


def bench_size(n: int, args: argparse.Namespace, base: Path) -> SizeResult:
    folder = base / f"rows-{n}"
    folder.mkdir(parents=True)
    start = time.perf_counter()
    manifest, n_input = write_manifest(folder, n, args.media)
    result = SizeResult(rows=n, input_ids=n_input, data_s=time.perf_counter() - start)
    store = folder / "store"
    config = write_config(folder, manifest, store, args.media, args.epochs)
    run_argv = [MMPIPE, "run", str(config), "--input", str(manifest), "--store", str(store)]
    for step in args.steps:
        if step == "changed":
            result.changed_texts = change_texts(manifest, args.changed)
        argv = [MMPIPE, "train", str(config), "--store", str(store)] if step == "train" else run_argv
        before = {p.name for p in (store / "runs").glob("*.json")}
        print(f"[{n} rows] {step}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
        res = run_step(step, argv, folder / f"{step}.log", args.timeout, args.rss_cap_gb, args.interval)
        if step != "train":
            res.record = new_record(store, before)
            if res.ok:
                result.accounting[step] = accounting(store, n_input)
        result.steps[step] = res
        print(f"[{n} rows] {step}: {res.status}, {res.wall_s:.1f} s, driver {res.driver_peak_gb:.2f} GB, "
              f"largest other {res.other_peak_gb:.2f} GB ({res.other_peak_process}), private {res.other_private_gb:.2f} GB "
              f"({res.other_private_process})", file=sys.stderr, flush=True)
        if not res.ok:
            res.log_tail = Path(res.log).read_text(errors="replace").strip().splitlines()[-20:]
            print("\n".join("    " + line for line in res.log_tail[-8:]), file=sys.stderr)
            if step == "full":   # nothing to rerun on
                break
    return result


# ------------------------------------------------------------------ report


def phases(rec: dict | None) -> str:
    if not rec or not rec.get("phases_s"):
        return ""
    return " / ".join(f"{k} {v:.1f}" for k, v in rec["phases_s"].items())


def table(results: list[SizeResult], load_start: str) -> Report:
    header = ["rows", "step", "status", "wall s", "rows/s", "processed", "phases s", "driver peak GB",
              "largest other GB (process)", "largest other, private GB (process)", "tree peak GB", "accounting"]
    report = Report("Scale: fresh `mmpipe` processes per step (run, no-op rerun, 1 %-changed rerun, train)",
                    header, load_start=load_start)
    for r in results:
        for step, s in r.steps.items():
            counts = (s.record or {}).get("counts") or {}
            acc = r.accounting.get(step)
            report.add(r.input_ids, step, s.status, s.wall_s, r.input_ids / s.wall_s if s.ok and step != "train" else "",
                       counts.get("processed", ""), phases(s.record), f"{s.driver_peak_gb:.2f}",
                       f"{s.other_peak_gb:.2f} ({s.other_peak_process})" if s.other_peak_process else "- (none)",
                       f"{s.other_private_gb:.2f} ({s.other_private_process})" if s.other_private_process else "- (none)",
                       f"{s.tree_peak_gb:.2f}",
                       "" if acc is None else ("ok" if acc["ok"] else f"MISMATCH {acc['accepted']}+{acc['rejected']}"))
    return report


def ratios(results: list[SizeResult]) -> dict[str, float | None]:
    """The issue's target figures; None where a step they need did not finish."""
    def step(r: SizeResult, name: str) -> StepResult | None:
        s = r.steps.get(name)
        return s if s is not None and s.ok else None

    small, big = results[0], results[-1]
    f_small, f_big = step(small, "full"), step(big, "full")
    run_steps = [s for name in ("full", "noop", "changed") if (s := step(big, name))]
    every = [s for s in big.steps.values() if s.ok]
    noop, changed, train = step(big, "noop"), step(big, "changed"), step(big, "train")
    return {
        "rows_per_s_ratio": (ratio(big.input_ids / f_big.wall_s, small.input_ids / f_small.wall_s)
                             if f_small and f_big and big is not small else None),
        "driver_peak_gb": max((s.driver_peak_gb for s in run_steps), default=None),
        "other_peak_gb": max((s.other_peak_gb for s in every), default=None),
        "other_private_gb": max((s.other_private_gb for s in every), default=None),
        "noop_s": noop.wall_s if noop else None,
        "changed_over_full": ratio(changed.wall_s, f_big.wall_s) if changed and f_big else None,
        "train_driver_peak_gb": train.driver_peak_gb if train else None,
    }


def notes(report: Report, results: list[SizeResult], r: dict[str, float | None]) -> None:
    small, big = results[0].input_ids, results[-1].input_ids
    lines = {
        "rows_per_s_ratio": (f"full-run rows/s at {big} / at {small} rows", True),
        "driver_peak_gb": (f"driver peak RSS over the three runs at {big} rows, GB", False),
        "other_peak_gb": (f"largest peak RSS of any other process (GCS, raylet, workers, actors) at {big} rows, GB", False),
        "other_private_gb": (f"largest peak of private memory (not shared: no library, no object-store page) of any "
                             f"other process at {big} rows, GB", False),
        "noop_s": (f"no-op rerun at {big} rows, s", False),
        "changed_over_full": (f"1 %-changed rerun / full run at {big} rows", False),
        "train_driver_peak_gb": (f"`mmpipe train` driver peak RSS at {big} rows, GB", False),
    }
    for key, (text, higher) in lines.items():
        value = r[key]
        shown = "n/a (step did not finish or one size only)" if value is None else \
            f"**{value:.3g}** — {verdict(value, TARGETS[key], higher_is_better=higher)}"
        report.note(f"{text}: {shown}")
    kinds: dict[str, float] = {}
    for s in results[-1].steps.values():
        for k, v in s.peak_by_kind_gb.items():
            kinds[k] = max(kinds.get(k, 0.0), v)
    if kinds:
        report.note(f"peak RSS by kind of process at {big} rows, all steps: "
                    + ", ".join(f"{k} {v:.2f} GB" for k, v in sorted(kinds.items())))
    for res in results:
        if res.changed_texts:
            report.note(f"{res.input_ids} rows: {res.changed_texts} texts changed for the rerun; manifest written in "
                        f"{res.data_s:.1f} s")
    report.note("RSS counts shared pages (libraries, Ray's object store) in every process that maps them; the tree "
                "peak is the sum over processes at one sample, so it over-counts shared pages")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="text rows per manifest, comma-separated")
    ap.add_argument("--media", type=int, default=0, help="add this many demo rows with image + text + audio")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of texts changed for the third step")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs for the train step")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"which steps, in this order (of {', '.join(STEPS)})")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step before it is killed")
    ap.add_argument("--rss-cap-gb", type=float, default=18, help="kill a step whose process tree's RSS passes this")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period, seconds")
    ap.add_argument("--out", type=Path, help="write the raw numbers to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (benchmarks/_work/scale)")
    args = ap.parse_args()
    args.steps = [s for s in STEPS if s in args.steps.split(",")]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    base, load_start = work_dir("scale"), load_avg()
    results = []
    try:
        for n in sizes:
            results.append(bench_size(n, args, base))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report = table(results, load_start)
    r = ratios(results)
    notes(report, results, r)
    report.print()
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                        "targets": TARGETS, "ratios": r,
                                        "sizes": [asdict(res) for res in results]}, indent=2))
        print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
