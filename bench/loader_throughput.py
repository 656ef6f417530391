"""Crop-loading throughput: the CropStream against decoding whole files, in one run.

    python bench/loader_throughput.py --manifest M [--num_workers W] [--num_crops N]
        [--crop_seconds 8] [--batch_size 8] [--baseline_crops 8] [--seed 0]

M is a manifest from data/prepare_manifest.py, or several as 'a.tsv:0.7,b.tsv:0.3'.

1. Per format (rows grouped by file extension, sample rate and channels): the stream over that
   group's files alone, in this process (one core), with the time per crop split into seek,
   read+downmix, resample and the rest, and the reads per crop (1 + silence retries). Then the
   naive baseline on the same files: decode the whole file with soundfile, downmix, resample it
   with soxr, slice a random crop. The ratio is stream / baseline crops per second.
2. The whole manifest through a torch DataLoader (batch_size=None, --num_workers), with the
   stream's counters (retries, all_silent, unreadable_files).

Time to the first batch (opening files, starting workers) is left out of every rate. CPU rates
(crops per CPU second of this process) are printed next to wall-clock ones for the in-process
runs, because on a shared machine the wall clock also measures the neighbours. The last line is
`crops/s: X`, the DataLoader run's wall-clock rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils.audio  # noqa: E402
import utils.crops  # noqa: E402
from utils.audio import TARGET_SAMPLE_RATE  # noqa: E402
from utils.crops import CropStream, stream_totals  # noqa: E402
from utils.manifests import parse_weighted_manifests, read_manifest  # noqa: E402

# Issue 2's targets, per worker process on one core, for 8 s crops.
TARGETS = {("wav", 16000, 1): 1000.0, ("flac", 44100, 2): 100.0}


def format_key(row: dict) -> tuple[str, int, int]:
    return Path(row["path"]).suffix.lower().lstrip("."), int(row["sample_rate"]), int(row["num_channels"])


def format_label(key) -> str:
    ext, sr, channels = key
    return f"{ext} {sr / 1000:g} kHz {'mono' if channels == 1 else 'stereo' if channels == 2 else f'{channels} ch'}"


class Timers:
    """Wraps the stream's read path with timers; in this process only (workers would not report)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self._saved = []

    def _wrap(self, owner, name, key):
        original = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start
                calls[key] += 1

        self._saved.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self):
        self._wrap(utils.crops, "read_mono", "read")
        self._wrap(utils.audio.SourceWindow, "resample", "resample")
        self._wrap(sf.SoundFile, "seek", "seek")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def reset(self):
        self.seconds.clear()
        self.calls.clear()


def make_stream(manifests, args, **overrides) -> CropStream:
    options = dict(
        batch_size=args.batch_size,
        crop_seconds=args.crop_seconds,
        min_rms=args.min_rms,
        max_crop_retries=args.max_crop_retries,
        epoch_multiplier=args.epoch_multiplier,
        seed=args.seed,
    )
    return CropStream(manifests, **{**options, **overrides})


def time_batches(loader_iter, num_batches: int, after_warm_up=None, min_seconds: float = 0.0):
    """Consume one warm-up batch, then time `num_batches`, or more until `min_seconds` have passed.
    Returns (batches, wall s, cpu s, last batch per worker)."""
    first = next(loader_iter)
    last = {int(first["worker"]): first}
    if after_warm_up:
        after_warm_up()
    wall, cpu = time.perf_counter(), time.process_time()
    done = 0
    while done < num_batches or time.perf_counter() - wall < min_seconds:
        batch = next(loader_iter)
        last[int(batch["worker"])] = batch
        done += 1
    return done, time.perf_counter() - wall, time.process_time() - cpu, last


def baseline(rows: list[dict], crops: int, crop_seconds: float, seed: int) -> float:
    """Naive loading: whole-file decode, downmix, resample, random slice. Returns wall seconds per crop."""
    rng = np.random.default_rng([seed, 99])
    crop_length = int(round(crop_seconds * TARGET_SAMPLE_RATE))
    wall = time.perf_counter()
    for _ in range(crops):
        row = rows[int(rng.integers(len(rows)))]
        data, sr = sf.read(row["path"], dtype="float32", always_2d=True)
        mono = data.mean(axis=1, dtype=np.float32)
        audio = mono if sr == TARGET_SAMPLE_RATE else soxr.resample(mono, sr, TARGET_SAMPLE_RATE)
        start = int(rng.integers(max(1, len(audio) - crop_length + 1)))
        crop = audio[start : start + crop_length]
        assert len(crop) == crop_length or len(audio) < crop_length
    return (time.perf_counter() - wall) / crops


def per_format(manifests, args) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rows, _ in manifests:
        for row in rows:
            groups[format_key(row)].append(row)
    crops_each = max(2 * args.batch_size, args.num_crops // len(groups))
    results = []
    for key in sorted(groups):
        rows = groups[key]
        try:
            stream = make_stream([(rows, 1.0)], args)
        except ValueError as error:  # e.g. every file of this format is shorter than a crop
            print(f"{format_label(key)}: skipped ({error})")
            continue
        with Timers() as timers:
            # A time floor as well as a count: a fast format's count alone passes in a blink,
            # too short to measure on a shared machine.
            batches, wall, cpu, last = time_batches(
                iter(stream), max(1, crops_each // args.batch_size), timers.reset, args.min_seconds
            )
        crops = batches * args.batch_size
        stats = last[0]["stream_stats"]  # cumulative, warm-up batch included
        base_wall = baseline(rows, args.baseline_crops, args.crop_seconds, args.seed)
        read_ms = 1000 * timers.seconds["read"] / crops
        seek_ms = 1000 * timers.seconds["seek"] / crops
        resample_ms = 1000 * timers.seconds["resample"] / crops
        results.append(
            {
                "key": key,
                "files": len(rows),
                "wall": crops / wall,
                "cpu": crops / cpu,
                "seek_ms": seek_ms,
                "decode_ms": read_ms - seek_ms,
                "resample_ms": resample_ms,
                "other_ms": 1000 * wall / crops - read_ms - resample_ms,
                "reads_per_crop": timers.calls["read"] / crops,
                "all_silent": stats["all_silent"],
                "baseline_wall": 1 / base_wall,
            }
        )
    return results


def print_per_format(results, args) -> None:
    print(
        f"\nper format, one process, {args.crop_seconds:g} s crops (rates in crops/s; times in ms per crop, wall clock):"
    )
    header = f"{'format':<22}{'files':>6}{'stream':>9}{'cpu':>9}{'seek':>7}{'decode':>8}{'resamp':>8}{'other':>7}{'reads':>7}{'silent':>7}{'naive':>8}{'ratio':>7}  target"
    print(header)
    for r in results:
        target = TARGETS.get(r["key"])
        verdict = "" if target is None else f">= {target:g}: {'met' if r['cpu'] >= target else 'NOT met'} (cpu rate)"
        print(
            f"{format_label(r['key']):<22}{r['files']:>6}{r['wall']:>9.1f}{r['cpu']:>9.1f}{r['seek_ms']:>7.2f}{r['decode_ms']:>8.2f}"
            f"{r['resample_ms']:>8.2f}{r['other_ms']:>7.2f}{r['reads_per_crop']:>7.2f}{r['all_silent']:>7}{r['baseline_wall']:>8.2f}"
            f"{r['wall'] / r['baseline_wall']:>7.0f}x  {verdict}"
        )
    print("  seek: SoundFile.seek (incl. soundfile's own position queries); decode: the rest of the read, downmix")
    print("  included; reads: reads per crop, 1 + silence retries; silent: all-silent crops (loudest try kept);")
    print("  naive: whole-file decode + downmix + resample + slice, crops/s; ratio: stream / naive.")


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="train.tsv, or 'a.tsv:0.7,b.tsv:0.3'")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument(
        "--num_crops", type=int, default=400, help="crops timed in the DataLoader run, and shared out over the formats"
    )
    parser.add_argument("--crop_seconds", type=float, default=8.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--baseline_crops", type=int, default=8, help="naive crops per format (each decodes a whole file)"
    )
    parser.add_argument("--min_seconds", type=float, default=2.0, help="shortest timed run per format")
    parser.add_argument("--min_rms", type=float, default=0.001)
    parser.add_argument("--max_crop_retries", type=int, default=10)
    parser.add_argument("--epoch_multiplier", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    specs = parse_weighted_manifests(args.manifest)
    manifests = [(read_manifest(path), weight) for path, weight in specs]
    rows = [row for rows, _ in manifests for row in rows]
    hours = sum(float(r["duration"]) for r in rows) / 3600
    print(
        f"manifest: {args.manifest}: {len(rows)} files, {hours:.2f} h; soundfile {sf.__version__} (libsndfile {sf.__libsndfile_version__}), soxr {soxr.__version__}"
    )

    results = per_format(manifests, args)
    print_per_format(results, args)

    stream = make_stream(manifests, args, names=[path for path, _ in specs])
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers)
    batches, wall, cpu, last = time_batches(iter(loader), max(1, args.num_crops // args.batch_size))
    crops = batches * args.batch_size
    rate = crops / wall
    totals = stream_totals({w: b["stream_stats"] for w, b in last.items()})
    # The naive loader's rate on this mix: files are drawn per file, so weight each format's time
    # per crop by its share of the files.
    files = sum(r["files"] for r in results)
    naive = files / sum(r["files"] / r["baseline_wall"] for r in results) if results else float("nan")
    workers = max(1, args.num_workers)
    print(
        f"\nwhole manifest through DataLoader(batch_size=None, num_workers={args.num_workers}), batches of {args.batch_size}:"
    )
    print(
        f"  {crops} crops of {args.crop_seconds:g} s in {wall:.2f} s: {rate:.1f} crops/s ({rate / workers:.1f} per worker process)"
        + (f"; main-process cpu {crops / cpu:.1f} crops/s" if args.num_workers == 0 else "")
    )
    print(
        f"  stream stats (including the warm-up batch): crops {totals.get('crops', 0)}, retries {totals.get('retries', 0)}, "
        f"all_silent {totals.get('all_silent', 0)}, unreadable_files {totals.get('unreadable_files', 0)}, short files left out {stream.short_files}"
    )
    print(f"  naive baseline on this mix: {naive:.2f} crops/s; ratio {rate / naive:.0f}x")
    print(f"crops/s: {rate:.1f}")
    return rate


if __name__ == "__main__":
    main()
