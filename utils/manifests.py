"""Manifests of unlabelled recordings: scan a folder, validate each file from its header and a few
short probe reads, split by participant, and read and write the TSV files."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from utils.audio import find_audio_files
from utils.numerics import nonfinite_samples, scan_float_file

# A crop quieter than this everywhere we probe it is treated as digital silence, not as a quiet room.
DIGITAL_SILENCE_RMS = 1e-6
# Unlabelled recordings (data/prepare_manifest.py, pretraining, extraction) ...
MANIFEST_COLUMNS = ["path", "participant", "duration", "sample_rate", "num_channels", "num_frames"]
# ... and labelled utterances (CTC fine-tuning; start and end in seconds, empty for a whole file).
UTTERANCE_COLUMNS = ["path", "text", "participant", "start", "end"]
# The leading letters and digits of the file name, up to the first '_', '-' or '.':
# "P017_day2.flac" -> "P017", "cls04-morning.wav" -> "cls04".
DEFAULT_PARTICIPANT_REGEX = r"^([A-Za-z0-9]+)[_.-]"


def probe_audio_file(
    path: Path, min_seconds: float = 0.0, num_probes: int = 8, probe_seconds: float = 0.25, opener=None
) -> tuple[dict | None, str | None]:
    """Validate a file from its header and a few short reads. Returns (row, None) or (None, reason).
    `opener()`, if given, opens the recording (one kept in a dataset); `path` then only names it."""
    try:
        with opener() if opener else sf.SoundFile(str(path)) as audio:
            sr, frames, channels = audio.samplerate, audio.frames, audio.channels
            if frames <= 0:
                return None, "zero length"
            duration = frames / sr
            if duration < min_seconds:
                return None, f"shorter than min_seconds ({duration:.2f} s < {min_seconds} s)"
            probe = max(1, min(frames, int(probe_seconds * sr)))
            starts = np.linspace(0, frames - probe, num_probes).astype(np.int64)
            sum_sq, count = 0.0, 0
            for start in starts:
                audio.seek(int(start))
                block = audio.read(probe, dtype="float32", always_2d=True)
                if len(block) < probe:
                    return None, f"truncated: read {len(block)} of {probe} frames at frame {start}"
                nonfinite = nonfinite_samples(block, start / sr, sr)
                if nonfinite:
                    return None, nonfinite
                sum_sq += float(np.square(block, dtype=np.float64).sum())
                count += block.size
            nonfinite = scan_float_file(audio)  # a few NaN or Inf samples anywhere would poison training
            if nonfinite:
                return None, nonfinite
    except Exception as error:  # libsndfile raises several types; any of them means unreadable
        return None, f"unreadable: {str(error).strip() or type(error).__name__}"
    if math.sqrt(sum_sq / count) < DIGITAL_SILENCE_RMS:
        return None, "digital silence"
    row = {
        "path": str(path),
        "duration": round(duration, 3),
        "sample_rate": sr,
        "num_channels": channels,
        "num_frames": frames,
    }
    return row, None


def scan_audio_folder(audio_dir, participant_regex: str = DEFAULT_PARTICIPANT_REGEX, min_seconds: float = 0.0):
    """Probe every audio file under `audio_dir`. Returns (valid rows, invalid rows with reasons)."""
    try:
        pattern = re.compile(participant_regex)
    except re.error as error:
        raise ValueError(f"--participant_regex {participant_regex!r} is not a valid regex: {error}") from None
    if pattern.groups < 1:
        raise ValueError(f"--participant_regex {participant_regex!r} needs a group for the participant id")
    valid, invalid = [], []
    for path in find_audio_files(audio_dir):
        match = pattern.search(path.name)
        if not match or not match.group(1):
            invalid.append(
                {"path": str(path.resolve()), "reason": f"participant id not found by regex {participant_regex!r}"}
            )
            continue
        row, reason = probe_audio_file(path.resolve(), min_seconds)
        if row is None:
            invalid.append({"path": str(path.resolve()), "reason": reason})
        else:
            valid.append({**row, "participant": match.group(1)})
    return valid, invalid


def split_by_participant(rows: list[dict], dev_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Put whole participants into dev until dev holds close to `dev_fraction` of the audio hours."""
    hours: dict[str, float] = {}
    for row in rows:
        hours[row["participant"]] = hours.get(row["participant"], 0.0) + float(row["duration"])
    participants = sorted(hours)
    random.Random(seed).shuffle(participants)
    target = dev_fraction * sum(hours.values())
    dev_ids, dev_hours = set(), 0.0
    if dev_fraction > 0 and len(participants) > 1:
        for pid in participants:
            if len(dev_ids) == len(participants) - 1:
                break
            if abs(dev_hours + hours[pid] - target) < abs(dev_hours - target):
                dev_ids.add(pid)
                dev_hours += hours[pid]
        if not dev_ids:  # each participant alone overshoots by more than the target: take the closest one
            pid = min(participants, key=lambda p: abs(hours[p] - target))
            dev_ids.add(pid)
            dev_hours += hours[pid]
    train = [r for r in rows if r["participant"] not in dev_ids]
    dev = [r for r in rows if r["participant"] in dev_ids]
    assert not {r["participant"] for r in train} & {r["participant"] for r in dev}, "participant leakage"
    return train, dev


def write_tsv(path, rows: list[dict], columns: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_tsv(path, required: list[str]) -> list[dict]:
    """Read a TSV with a header line; relative `path` entries are taken relative to the TSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"manifest {path} lacks column(s) {missing}; it has {reader.fieldnames}")
        rows = list(reader)
    for row in rows:
        if "path" in row and not os.path.isabs(row["path"]):
            row["path"] = str(path.parent / row["path"])
    return rows


def read_manifest(path) -> list[dict]:
    """Read a manifest written by data/prepare_manifest.py, with numeric columns converted."""
    rows = read_tsv(path, MANIFEST_COLUMNS)
    for row in rows:
        row["duration"] = float(row["duration"])
        row["sample_rate"], row["num_channels"], row["num_frames"] = (
            int(row["sample_rate"]),
            int(row["num_channels"]),
            int(row["num_frames"]),
        )
    return rows


def parse_weighted_manifests(spec: str) -> list[tuple[str, float]]:
    """'home.tsv:0.7,read.tsv:0.3' -> [('home.tsv', 0.7), ('read.tsv', 0.3)]; weights default to 1."""
    parts = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, sep, weight = item.rpartition(":")
        if sep and path:
            try:
                parts.append((path, float(weight)))
                continue
            except ValueError:
                pass
        parts.append((item, 1.0))
    if not parts or any(w <= 0 for _, w in parts):
        raise ValueError(f"bad manifest list {spec!r}: expected 'a.tsv[:weight],b.tsv[:weight]' with weights > 0")
    return parts


def summarize(train: list[dict], dev: list[dict], invalid: list[dict]) -> dict:
    def stats(rows):
        return {
            "files": len(rows),
            "hours": round(sum(float(r["duration"]) for r in rows) / 3600, 4),
            "participants": len({r["participant"] for r in rows}),
        }

    reasons: dict[str, int] = {}
    for row in invalid:
        key = row["reason"].split(":")[0].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"train": stats(train), "dev": stats(dev), "invalid": {"files": len(invalid), "by_reason": reasons}}


def prepare_manifests(
    audio_dir, output_dir, participant_regex=DEFAULT_PARTICIPANT_REGEX, dev_fraction=0.1, min_seconds=0.0, seed=0
) -> dict:
    """Scan, validate, split by participant and write train.tsv, dev.tsv, invalid.tsv, summary.json."""
    valid, invalid = scan_audio_folder(audio_dir, participant_regex, min_seconds)
    train, dev = split_by_participant(valid, dev_fraction, seed)
    return write_manifests(output_dir, train, dev, invalid)


def write_manifests(output_dir, train: list[dict], dev: list[dict], invalid: list[dict]) -> dict:
    output_dir = Path(output_dir)
    write_tsv(output_dir / "train.tsv", train, MANIFEST_COLUMNS)
    write_tsv(output_dir / "dev.tsv", dev, MANIFEST_COLUMNS)
    write_tsv(output_dir / "invalid.tsv", invalid, ["path", "reason"])
    summary = summarize(train, dev, invalid)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
