"""Manifests of unlabelled recordings: scan a folder, validate each file from its header and a few
short probe reads, split by participant, and read and write the TSV files."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from utils.audio import AUDIO_EXTENSIONS, find_audio_files
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
# What separates fields and rows of a TSV (a lone \r too: CRLF files are read), so no field may hold one.
TSV_SEPARATORS = ("\t", "\n", "\r")


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
    """Probe every audio file under `audio_dir`. Returns (valid rows, invalid rows with reasons);
    a ValueError if no file is valid, so that no caller writes or trains on an empty manifest."""
    try:
        pattern = re.compile(participant_regex)
    except re.error as error:
        raise ValueError(f"--participant_regex {participant_regex!r} is not a valid regex: {error}") from None
    if pattern.groups < 1:
        raise ValueError(f"--participant_regex {participant_regex!r} needs a group for the participant id")
    valid, folders, first_path = [], [], {}
    files = find_audio_files(audio_dir, problems=folders)
    invalid = [{**row, "path": escape_tsv(row["path"])} for row in folders]
    for path in files:
        resolved = path.resolve()
        match = pattern.search(path.name)
        unsafe = [name for name in (str(resolved), str(path)) if tsv_unsafe(name)]
        if unsafe:
            reason = "path holds a tab or line break (shown escaped): no TSV can list it; rename the file"
            invalid.append({"path": escape_tsv(unsafe[0]), "reason": reason})
        elif str(resolved) in first_path:  # a link to a file already listed: once is enough
            invalid.append({"path": str(path), "reason": f"same file as {first_path[str(resolved)]}"})
        elif not match or not match.group(1):
            invalid.append(
                {"path": str(resolved), "reason": f"participant id not found by regex {participant_regex!r}"}
            )
        else:
            first_path[str(resolved)] = str(path)
            row, reason = probe_audio_file(resolved, min_seconds)
            if row is None:
                invalid.append({"path": str(resolved), "reason": reason})
            else:
                valid.append({**row, "participant": match.group(1)})
    if not valid and not invalid:
        raise ValueError(f"no audio files in {audio_dir} (extensions {', '.join(sorted(AUDIO_EXTENSIONS))})")
    if not valid:
        reasons = summarize([], [], invalid)["invalid"]["by_reason"]
        raise ValueError(
            f"no valid audio in {audio_dir}: {len(invalid)} invalid file(s) or folder(s) {reasons}; "
            f"the first: {invalid[0]['path']}: {invalid[0]['reason']}"
        )
    return valid, invalid


def split_by_participant(rows: list[dict], dev_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Put whole participants into dev until dev holds close to `dev_fraction` of the audio hours."""
    hours: dict[str, float] = {}
    for row in rows:
        hours[row["participant"]] = hours.get(row["participant"], 0.0) + float(row["duration"])
    participants = sorted(hours)
    if dev_fraction > 0 and len(participants) == 1:
        raise ValueError(
            f"every file has participant id {participants[0]!r}, so no participant is left for a dev set "
            f"(--dev_fraction {dev_fraction}): check --participant_regex, or give --dev_fraction 0"
        )
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


def escape_tsv(text: str) -> str:
    """`text` unchanged if a TSV field can hold it; else with backslash, tab and line breaks written as
    two-character escapes (\\t, \\n, ...): how a path that no TSV can list is shown."""
    if not tsv_unsafe(text):
        return text
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def tsv_unsafe(text: str) -> bool:
    """Whether `text` holds a tab or a line break: a TSV field cannot (there is no quoting)."""
    return any(char in text for char in TSV_SEPARATORS)


def write_tsv(path, rows: list[dict], columns: list[str]) -> None:
    """One line per row, fields joined by tabs, no quoting; written to a temporary file, then renamed.
    A field holding a tab or line break is a ValueError (it would split its row)."""
    path = Path(path)
    lines = ["\t".join(columns)]
    for number, row in enumerate(rows, start=1):
        fields = ["" if row.get(column) is None else str(row[column]) for column in columns]
        for column, field in zip(columns, fields):
            if tsv_unsafe(field):
                raise ValueError(
                    f"{path}: row {number}, {column} {field!r} holds a tab or line break, which no TSV field can"
                )
        lines.append("\t".join(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_tsv(path, required: list[str]) -> list[dict]:
    """Read a TSV with a header line: one line is one row, fields split on tabs, no quoting (a `"` is
    just a character). A UTF-8 BOM and CRLF line ends are accepted, and blank lines at the end; a line
    (an empty one too) with another number of fields than the header is a ValueError naming the file
    and line. Relative `path` entries are taken relative to the TSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # newline="": a lone \r stays inside its field
            lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    except UnicodeDecodeError as error:
        raise ValueError(f"manifest {path} is not UTF-8 text: {error}") from None
    header = lines[0].split("\t") if lines[0] else []
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {missing}; it has {header}")
    if len(set(header)) < len(header):
        raise ValueError(f"manifest {path}: a column name appears twice in its header {header}")
    while len(lines) > 1 and not lines[-1]:  # the final line break, and any blank lines after the last row
        lines.pop()
    rows = []
    for number, line in enumerate(lines[1:], start=2):  # row i is line i + 2: messages can name the line
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(
                f"{path}, line {number}: {len(fields)} tab-separated field(s), the header has {len(header)} "
                f"({line[:80]!r})"
            )
        rows.append(dict(zip(header, fields)))
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
