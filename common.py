"""Code shared by pretrain.py, finetune_ctc.py, extract_features.py and the tools in data/.

Four parts, in the order the scripts use them:
1. audio: read any region of a long file at 16 kHz mono by seeking, never decoding the whole file;
2. manifests: scan a folder, validate files from their headers and a few probe reads, split by
   participant, read and write the TSV manifests;
3. the crop stream: an IterableDataset of silence-filtered random crops for pretraining;
4. training plumbing: recipe + flag parsing, atomic checkpoints, JSONL logs, hub upload.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

logger = logging.getLogger(__name__)

TARGET_SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".rf64", ".caf"}
# A crop quieter than this everywhere we probe it is treated as digital silence, not as a quiet room.
DIGITAL_SILENCE_RMS = 1e-6
# Context read on each side of a region before resampling so the filter has real signal at the
# edges: the region then matches the same samples of a whole-file resample.
RESAMPLE_MARGIN_SECONDS = 0.02


# --------------------------------------------------------------------------------------------
# 1. Audio
# --------------------------------------------------------------------------------------------


def read_resampled(audio: sf.SoundFile, start: int, length: int, target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Return `length` float32 mono samples at `target_sr`, starting at target-rate sample `start`.

    Only the needed source frames (plus a short resampling margin) are read. The read boundaries sit
    on the grid where source and target sample times coincide, so sample k of the result is sample
    `start + k` of the whole file resampled in one pass. Past the end of the file the result is
    zero-padded, so the length is always exact.
    """
    window = source_window(audio.samplerate, audio.frames, start, length, target_sr)
    source = read_mono(audio, window.src_start, window.src_stop - window.src_start)
    return window.resample(source, audio.samplerate, target_sr)


@dataclass(frozen=True)
class SourceWindow:
    """Which source frames to read for a target-rate region, and where the region sits in them."""

    src_start: int
    src_stop: int
    offset: int  # target-rate samples from src_start to the region
    length: int

    def resample(self, source: np.ndarray, sr: int, target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
        if sr == target_sr:
            return _pad_to(source[self.offset :], self.length)
        if len(source) == 0:
            return np.zeros(self.length, dtype=np.float32)
        resampled = soxr.resample(source, sr, target_sr)
        return _pad_to(resampled[self.offset : self.offset + self.length], self.length)


def source_window(
    sr: int, total_frames: int, start: int, length: int, target_sr: int = TARGET_SAMPLE_RATE
) -> SourceWindow:
    if sr == target_sr:
        src_start = min(start, total_frames)
        return SourceWindow(src_start, min(total_frames, start + length), 0, length)
    g = math.gcd(sr, target_sr)
    step_out, step_src = target_sr // g, sr // g
    margin = int(RESAMPLE_MARGIN_SECONDS * target_sr)
    k0 = max(0, (start - margin) // step_out)
    k1 = -(-(start + length + margin) // step_out)
    src_start = min(k0 * step_src, total_frames)
    return SourceWindow(src_start, min(total_frames, k1 * step_src), start - k0 * step_out, length)


def read_mono(audio: sf.SoundFile, start: int, frames: int) -> np.ndarray:
    """Read frames as float32 mono. 16-bit files are read as integers and scaled here, which is
    several times faster than libsndfile's own float conversion and gives the same values."""
    if audio.subtype == "VORBIS":
        return _read_vorbis(audio, start, frames)
    audio.seek(start)
    if audio.subtype == "PCM_16":
        data = audio.read(frames, dtype="int16", always_2d=True)
        mono = data[:, 0] if data.shape[1] == 1 else _downmix(data)
        return np.multiply(mono, np.float32(1 / 32768), dtype=np.float32)
    return _to_mono(audio.read(frames, dtype="float32", always_2d=True))


# libsndfile (1.2.2; its issue #885) does not seek Vorbis exactly. Measured on files it wrote: a seek
# forward from a position it has already decoded lands up to a few thousand frames off (a quarter to
# a half of random seeks on a reused handle), and so does any seek into the last Ogg page (a
# constant shift of the file's end trim). A seek from frame 0 to a point before the last page is
# sample exact, and so is decoding on from there, so reads are done that way.
_OGG_MAX_PAGE_BYTES = 65_307
_VORBIS_MAX_LAP_FRAMES = 8_192  # the longest Vorbis block: a seek point this far before the last page is clear of it


def _read_vorbis(audio: sf.SoundFile, start: int, frames: int) -> np.ndarray:
    safe_stop = getattr(audio, "_vorbis_safe_stop", None)
    if safe_stop is None:
        safe_stop = _vorbis_last_page_start(audio)
        audio._vorbis_safe_stop = safe_stop
    seek_to = min(start, max(0, safe_stop - _VORBIS_MAX_LAP_FRAMES))
    audio.seek(0)
    audio.seek(seek_to)
    data = audio.read(start - seek_to + frames, dtype="float32", always_2d=True)
    return _to_mono(data[start - seek_to :])


def _vorbis_last_page_start(audio: sf.SoundFile) -> int:
    """Frame at which the last Ogg page's samples begin (the previous page's granule position),
    parsed from the file's tail; the file's length when it cannot be parsed (plain seeks then)."""
    try:
        with open(audio.name, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            n = min(size, 2 * _OGG_MAX_PAGE_BYTES + 27)
            f.seek(size - n)
            tail = f.read(n)
    except (OSError, TypeError):
        return audio.frames
    pages = {}  # end offset -> (start offset, granule position), for every well-formed page in the tail
    i = tail.find(b"OggS")
    while i >= 0:
        if i + 27 <= len(tail) and tail[i + 4] == 0 and i + 27 + tail[i + 26] <= len(tail):
            segments = tail[i + 27 : i + 27 + tail[i + 26]]
            pages[i + 27 + len(segments) + sum(segments)] = (
                i,
                int.from_bytes(tail[i + 6 : i + 14], "little", signed=True),
            )
        i = tail.find(b"OggS", i + 1)
    end, walked = len(tail), 0
    while end in pages:  # walk back from the end of the file, page by page
        end, granule = pages[end]
        walked += 1
        if walked > 1 and granule >= 0:
            return min(granule, audio.frames)
    return audio.frames


def _to_mono(frames: np.ndarray) -> np.ndarray:
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0])
    return _downmix(frames)


def _downmix(frames: np.ndarray) -> np.ndarray:
    """frames.mean(axis=1, dtype=float32), bit for bit, but over a few columns rather than along
    rows: numpy's mean across a 2-wide axis took 2/3 of the time of an 8 s 44.1 kHz stereo FLAC read."""
    if frames.shape[1] >= 8:  # numpy switches to pairwise summation there, which this loop would not match
        return frames.mean(axis=1, dtype=np.float32)
    mono = frames[:, 0].astype(np.float32)
    for channel in range(1, frames.shape[1]):
        mono += frames[:, channel]
    mono /= np.float32(frames.shape[1])
    return mono


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
    if len(x) >= length:
        return x[:length]
    return np.concatenate([x, np.zeros(length - len(x), dtype=np.float32)])


def load_audio(path: str | os.PathLike, start_seconds: float = 0.0, end_seconds: float | None = None) -> np.ndarray:
    """Read [start, end) seconds of a file (the whole file by default) as 16 kHz mono float32."""
    with sf.SoundFile(str(path)) as audio:
        duration = audio.frames / audio.samplerate
        end = duration if end_seconds is None else min(end_seconds, duration)
        start = round(start_seconds * TARGET_SAMPLE_RATE)
        length = max(0, round(end * TARGET_SAMPLE_RATE) - start)
        return read_resampled(audio, start, length)


def target_length(num_frames: int, sample_rate: int) -> int:
    """Number of 16 kHz samples a file of `num_frames` at `sample_rate` resamples to."""
    return num_frames * TARGET_SAMPLE_RATE // sample_rate


def conv_geometry(config) -> tuple[int, int]:
    """Receptive field and stride of the CNN feature encoder, in samples (400 and 320 for wav2vec2)."""
    receptive_field, stride = 1, 1
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        receptive_field += (kernel - 1) * stride
        stride *= step
    return receptive_field, stride


def conv_frames(num_samples: int, receptive_field: int = 400, stride: int = 320) -> int:
    """Frames the CNN feature encoder makes of `num_samples` samples: the model's own count."""
    return 0 if num_samples < receptive_field else (num_samples - receptive_field) // stride + 1


def normalize_waveform(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per waveform, as Wav2Vec2FeatureExtractor(do_normalize=True) does."""
    x = x.astype(np.float32, copy=False)
    return (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-7)


def find_audio_files(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


# --------------------------------------------------------------------------------------------
# 2. Manifests
# --------------------------------------------------------------------------------------------

MANIFEST_COLUMNS = ["path", "participant", "duration", "sample_rate", "num_channels", "num_frames"]
# The leading letters and digits of the file name, up to the first '_', '-' or '.':
# "P017_day2.flac" -> "P017", "cls04-morning.wav" -> "cls04".
DEFAULT_PARTICIPANT_REGEX = r"^([A-Za-z0-9]+)[_.-]"


def probe_audio_file(
    path: Path, min_seconds: float = 0.0, num_probes: int = 8, probe_seconds: float = 0.25
) -> tuple[dict | None, str | None]:
    """Validate a file from its header and a few short reads. Returns (row, None) or (None, reason)."""
    try:
        with sf.SoundFile(str(path)) as audio:
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
                sum_sq += float(np.square(block, dtype=np.float64).sum())
                count += block.size
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


# --------------------------------------------------------------------------------------------
# 3. The crop stream
# --------------------------------------------------------------------------------------------


class _HandleCache:
    """A few open SoundFile handles per worker, so a crop costs one seek and one read."""

    def __init__(self, capacity: int = 64):
        self.capacity, self.handles = capacity, OrderedDict()

    def get(self, path: str) -> sf.SoundFile:
        audio = self.handles.pop(path, None)
        if audio is None:
            audio = sf.SoundFile(path)
            if len(self.handles) >= self.capacity:
                self.handles.popitem(last=False)[1].close()
        self.handles[path] = audio
        return audio

    def drop(self, path: str) -> None:
        audio = self.handles.pop(path, None)
        if audio is not None:
            audio.close()


class CropStream(torch.utils.data.IterableDataset):
    """Random fixed-length crops from long recordings, yielded as ready batches.

    Every crop is a pure function of (seed, epoch, crop index): which file, where in it, and the
    silence retries all come from an RNG seeded with that triple. Hence the same seed gives the same
    crops whatever the number of workers or processes, every epoch draws fresh positions, and a run
    resumes exactly from (epoch, batches consumed).

    An epoch holds `epoch_multiplier` crops per file (or, with `crops_by_duration`, the same total
    shared out in proportion to file duration); with several manifests the epoch is drawn from them
    in proportion to their weights. Global batch g of an epoch holds crops [g*B, (g+1)*B); process r
    of R takes the batches g = r, r+R, ...; DataLoader worker w of W takes every W-th of those, so
    no crop is seen twice and DataLoader's round-robin returns them in order. Each process gets the
    same number of batches per epoch; the remainder of the shuffled epoch is dropped.

    Silence: a crop whose RMS (measured before resampling) is below `min_rms` is redrawn up to
    `max_crop_retries` times; if every try is silent the loudest try is used and counted as
    `all_silent`, so batches keep their size and a quiet file still contributes.
    Files shorter than one crop are left out of the stream (and counted in `short_files`).
    A file that fails to read is warned about once, counted and never read again; its crop is
    replaced by one from another file of the same manifest.

    `fixed=True` (evaluation) yields the same crops on every pass: one pass over epoch 0.
    `transform(batch)` runs in the worker on each batch (pretraining computes masks there).
    """

    def __init__(
        self,
        manifests: list[tuple[list[dict], float]],
        batch_size: int,
        crop_seconds: float = 8.0,
        min_rms: float = 0.001,
        max_crop_retries: int = 10,
        epoch_multiplier: int = 10,
        crops_by_duration: bool = False,
        seed: int = 0,
        fixed: bool = False,
        normalize: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform=None,
        names: list[str] | None = None,
    ):
        self.crop_length = int(round(crop_seconds * TARGET_SAMPLE_RATE))
        self.batch_size, self.min_rms, self.max_crop_retries = batch_size, min_rms, max_crop_retries
        self.seed, self.fixed, self.normalize = seed, fixed, normalize
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.start_epoch, self.start_batch = 0, 0
        self.short_files = 0
        self.files: list[list[dict]] = []
        names = names or [f"manifest {i}" for i in range(len(manifests))]
        for (rows, _), name in zip(manifests, names):
            usable = [
                r for r in rows if target_length(int(r["num_frames"]), int(r["sample_rate"])) >= self.crop_length
            ]
            self.short_files += len(rows) - len(usable)
            if not usable:
                raise ValueError(
                    f"{name}: no file is at least one crop long ({crop_seconds} s); {len(rows)} file(s) in it"
                )
            self.files.append(usable)
        weights = np.array([w for _, w in manifests], dtype=np.float64)
        self.crops_per_file = [self._crops_per_file(f, epoch_multiplier, crops_by_duration) for f in self.files]
        natural = np.array([c.sum() for c in self.crops_per_file])
        self.crops_per_manifest = (
            natural
            if len(natural) == 1
            else np.maximum(1, np.round(natural.sum() * weights / weights.sum())).astype(np.int64)
        )
        self.crops_per_epoch = int(self.crops_per_manifest.sum())
        self.batches_per_process = self.crops_per_epoch // (batch_size * world_size)
        if self.batches_per_process == 0:
            raise ValueError(
                f"an epoch has {self.crops_per_epoch} crops, fewer than one batch of {batch_size} on each of "
                f"{world_size} process(es): add files, raise epoch_multiplier or lower the batch size"
            )

    @staticmethod
    def _crops_per_file(files, multiplier, by_duration) -> np.ndarray:
        if not by_duration:
            return np.full(len(files), multiplier, dtype=np.int64)
        total = multiplier * len(files)
        durations = np.array([float(f["duration"]) for f in files])
        share = durations / durations.sum() * total
        counts = np.floor(share).astype(np.int64)
        counts[np.argsort(counts - share)[: total - counts.sum()]] += 1  # largest remainders
        return counts

    def __len__(self) -> int:
        return self.batches_per_process

    def start_at(self, epoch: int, batch: int) -> None:
        """Resume: the next batch yielded is local batch `batch` of `epoch`."""
        self.start_epoch, self.start_batch = epoch, batch

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """(manifest index, file index) of every crop of `epoch`, in the order they are served."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        parts = []
        for m, (counts, wanted) in enumerate(zip(self.crops_per_file, self.crops_per_manifest)):
            files = np.repeat(np.arange(len(counts)), counts)
            files = rng.permutation(files)
            files = np.resize(files, wanted)  # a heavier weight cycles through the files again
            parts.append(np.stack([np.full(len(files), m), files], axis=1))
        plan = np.concatenate(parts)
        return plan[rng.permutation(len(plan))]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        cache, stats = _HandleCache(), {"crops": 0, "retries": 0, "all_silent": 0, "unreadable_files": 0}
        bad: set[tuple[int, int]] = set()
        epoch = 0 if self.fixed else self.start_epoch
        first = 0 if self.fixed else self.start_batch
        # Workers take turns by position in this iteration's stream, not by batch number, because
        # DataLoader reads its workers round-robin: counting from the resume point and on across
        # epoch boundaries keeps batches in order after start_at() and when an epoch's batch
        # count is not a multiple of num_workers.
        position = 0
        while True:
            plan = self.epoch_plan(epoch)
            for local in range(first, self.batches_per_process):
                mine = position % num_workers == worker
                position += 1
                if not mine:
                    continue
                global_batch = local * self.world_size + self.rank
                indices = range(global_batch * self.batch_size, (global_batch + 1) * self.batch_size)
                waves, new_bad = [], []
                for index in indices:
                    waves.append(self._crop(plan[index], epoch, index, cache, stats, bad, new_bad))
                batch = {
                    "input_values": np.stack(waves),
                    "crop_keys": np.array([[self.seed, epoch, i] for i in indices], dtype=np.int64),
                    "epoch": epoch,
                    "batch_in_epoch": local,
                    "worker": worker,
                    "stream_stats": dict(stats),
                    "new_unreadable": new_bad,
                }
                yield self.transform(batch) if self.transform else batch
            if self.fixed:
                return
            epoch, first = epoch + 1, 0

    def _crop(self, slot, epoch, index, cache, stats, bad, new_bad) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, index, 2])
        manifest, file_index = int(slot[0]), int(slot[1])
        while True:
            if (manifest, file_index) in bad:
                good = [i for i in range(len(self.files[manifest])) if (manifest, i) not in bad]
                if not good:
                    raise RuntimeError(f"every file of manifest {manifest} failed to read; see the warnings above")
                file_index = good[int(rng.integers(len(good)))]
            row = self.files[manifest][file_index]
            try:
                crop = self._read_crop(row, rng, cache, stats)
                break
            except Exception as error:
                bad.add((manifest, file_index))
                cache.drop(row["path"])
                stats["unreadable_files"] += 1
                new_bad.append(row["path"])
                warnings.warn(f"skipping unreadable file {row['path']}: {error}", stacklevel=2)
        stats["crops"] += 1
        return normalize_waveform(crop) if self.normalize else crop

    def _read_crop(self, row, rng, cache, stats) -> np.ndarray:
        audio = cache.get(row["path"])
        sr, frames = int(row["sample_rate"]), int(row["num_frames"])
        span = target_length(frames, sr) - self.crop_length
        best, best_rms = None, -1.0
        for attempt in range(self.max_crop_retries + 1):
            window = source_window(sr, frames, int(rng.integers(span + 1)), self.crop_length)
            source = read_mono(audio, window.src_start, window.src_stop - window.src_start)
            if len(source) < window.src_stop - window.src_start:
                raise OSError(
                    f"read {len(source)} of {window.src_stop - window.src_start} frames at frame {window.src_start}"
                )
            # Loudness of the crop measured on the source samples, so a rejected try is never resampled.
            core = source[window.offset * sr // TARGET_SAMPLE_RATE :][: self.crop_length * sr // TARGET_SAMPLE_RATE]
            rms = math.sqrt(float(np.dot(core, core)) / max(len(core), 1))
            if rms > best_rms:
                best, best_rms, best_window = source, rms, window
            if rms >= self.min_rms:
                break
            if attempt < self.max_crop_retries:  # a redraw follows; the last silent try is not one
                stats["retries"] += 1
        else:
            stats["all_silent"] += 1
        return best_window.resample(best, sr)


def stream_totals(per_worker: dict[int, dict]) -> dict:
    """Sum the cumulative per-worker counters that CropStream attaches to its batches."""
    totals: dict[str, int] = {}
    for stats in per_worker.values():
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + int(value)
    return totals


# --------------------------------------------------------------------------------------------
# 4. Training plumbing
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingArguments:
    """The training-loop flags pretrain.py and finetune_ctc.py share (same names, same meaning)."""

    output_dir: str = field(
        default="runs/wav2vec2", metadata={"help": "Model, checkpoints, logs and model card go here."}
    )
    max_train_steps: int = field(default=1000, metadata={"help": "Optimizer updates to run."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Crops or utterances per process per micro-step."}
    )
    per_device_eval_batch_size: int = field(default=8)
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer update."})
    learning_rate: float = field(default=5e-5)
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "Any transformers scheduler name: linear, cosine, constant_with_warmup, ..."},
    )
    warmup_steps: int = field(default=0)
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay; never applied to biases and norms."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 turns it off."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    torch_compile: bool = field(default=False)
    seed: int = field(default=0)
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process."})
    logging_steps: int = field(default=10)
    eval_steps: int = field(default=500, metadata={"help": "Evaluate on dev every N updates; 0 turns it off."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N updates; 0 turns it off."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest in output_dir/checkpoints, if any) or a checkpoint path."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Accelerate trackers: tensorboard, wandb, all, none, or a comma list."},
    )
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id for --push_to_hub (default: output_dir's name)."}
    )


# Flags whose smaller values would crash a run hours in (or silently do nothing), checked at parse time.
ARGUMENT_MINIMUMS = {
    "max_train_steps": 1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "warmup_steps": 0,
    "eval_steps": 0,
    "save_steps": 0,
    "num_workers": 0,
    "save_total_limit": 1,
    "max_crop_retries": 0,
    "epoch_multiplier": 1,
    "dev_crops_per_file": 1,
    "num_negatives": 1,
    "max_grad_norm": 0,
}


def parse_args_with_recipe(dataclass_types, argv: list[str] | None = None):
    """HfArgumentParser, with an optional YAML recipe as the first argument; flags override it."""
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe_path = Path(argv.pop(0))
        if not recipe_path.is_file():
            parser.error(f"recipe file not found: {recipe_path}")
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"recipe {recipe_path} sets unknown option(s): {', '.join(unknown)}")
        parser.set_defaults(**recipe)
    *parsed, unknown_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown_flags:
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags)}")
    for group in parsed:
        for name, lowest in ARGUMENT_MINIMUMS.items():
            value = getattr(group, name, None)
            if value is not None and value < lowest:
                parser.error(f"--{name} must be at least {lowest}, not {value}")
    return parsed


def load_feature_extractor(source: str):
    """The model's preprocessor; without a preprocessor_config.json, wav2vec2's usual one, with an
    attention mask exactly for layer-norm models (large, robust, XLS-R), as their own configs have."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    try:
        return Wav2Vec2FeatureExtractor.from_pretrained(source)
    except OSError:
        attention_mask = Wav2Vec2Config.from_pretrained(source).feat_extract_norm == "layer"
        logger.warning(
            "no preprocessor_config.json in %s: using 16 kHz, normalised input, attention mask %s",
            source,
            attention_mask,
        )
        return Wav2Vec2FeatureExtractor(
            sampling_rate=TARGET_SAMPLE_RATE, do_normalize=True, return_attention_mask=attention_mask
        )


def hub_base_model(name: str) -> str:
    """`name` when it reads as a hub id (a model card's base_model must be one), else ''."""
    if name.startswith("random init") or Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return ""
    return name


def gather_unreadable(accelerator, local: set[str]) -> set[str]:
    """The union of every process's unreadable files (each process meets its own)."""
    if accelerator.num_processes == 1:
        return set(local)
    from accelerate.utils import gather_object

    return set().union(*gather_object([sorted(local)]))


def make_accelerator(train_args: TrainingArguments, output_dir: Path, layerdrop: float):
    """The Accelerator both training scripts use, and the trackers named by --report_to."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin

    trackers = [t for t in train_args.report_to.split(",") if t and t != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(output_dir),
        # LayerDrop skips whole layers, whose parameters then get no gradient in that step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=layerdrop > 0)],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if train_args.torch_compile else None,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator, trackers


def start_train_log(
    accelerator,
    output_dir: Path,
    start_step: int,
    arguments: dict,
    trackers: list[str],
    project: str,
    extra: dict | None = None,
) -> Path:
    """OUTPUT_DIR/train_log.jsonl cut back to start_step, training_args.json, and the trackers.

    A resumed run replaces the rows the interrupted run wrote after its last checkpoint.
    `arguments` maps a group name to its argument dataclass.
    """
    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        kept = [row for row in read_jsonl(log_path) if row.get("step", 0) <= start_step]
        log_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        record = {name: asdict(group) for name, group in arguments.items()} | (extra or {})
        (output_dir / "training_args.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    if trackers:
        flat = {
            k: v
            for group in arguments.values()
            for k, v in asdict(group).items()
            if isinstance(v, (int, float, str, bool))
        }
        accelerator.init_trackers(project, config=flat)
    return log_path


def make_loader(dataset, num_workers: int, **options) -> torch.utils.data.DataLoader:
    """A DataLoader with a private generator: creating its iterator must not draw from the global
    torch RNG, or a resumed run (RNG restored from the checkpoint) would diverge from an
    uninterrupted one."""
    return torch.utils.data.DataLoader(
        dataset, num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator(), **options
    )


def format_number(value, digits: int = 4) -> str:
    """A figure for a model card: thousands separated, floats to `digits` places, None as n/a."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def append_jsonl(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norm parameters and other vectors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # original0 is the magnitude of the positional convolution's weight norm, a norm parameter too.
        (no_decay if param.ndim < 2 or "norm" in name.lower() or name.endswith("original0") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(CHECKPOINT_PREFIX + r"\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint of output_dir (None if none yet); a path -> that path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no training_state.json)")
    return path


def save_checkpoint(accelerator, output_dir, step: int, training_state: dict, train_args: TrainingArguments) -> Path:
    """accelerator.save_state into a temporary folder, then an atomic rename; prune the oldest.

    A crash at any moment leaves either the previous checkpoints or the new one complete; the
    folder name only appears once training_state.json is written.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_file = tmp / "training_state.json"
        state_file.write_text(
            json.dumps({**training_state, "step": step, "run_shape": run_shape(accelerator, train_args)}, indent=2)
            + "\n"
        )
        _fsync_file(state_file)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if train_args.save_total_limit:
            for old in list_checkpoints(output_dir)[: -train_args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, train_args: TrainingArguments) -> dict:
    """Restore the checkpoint; warn loudly when the run resumes with another process count, batch
    size, accumulation or seed: its data position then points at other data."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / "training_state.json").read_text())
    saved, current = state.get("run_shape"), run_shape(accelerator, train_args)
    if saved and saved != current:
        changed = ", ".join(
            f"{key} {saved.get(key)} -> {value}" for key, value in current.items() if saved.get(key) != value
        )
        logger.warning(
            "%s\nresuming %s with %s: the run continues, but not exactly where it stopped (other crops or "
            "batches from here on)\n%s",
            "!" * 80,
            path,
            changed,
            "!" * 80,
        )
    return state


def run_shape(accelerator, train_args: TrainingArguments) -> dict:
    """What the data position in a checkpoint depends on."""
    return {
        "num_processes": accelerator.num_processes,
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "seed": train_args.seed,
    }


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def end_processes(accelerator) -> None:
    """Closes the trackers and destroys the process group. Call it after dropping the script's own
    reference to the prepared (DDP-wrapped) model.

    A DDP wrapper freed after the process group is the group's last owner: its destructor then
    joins gloo's worker threads while holding the GIL, and a worker that needs the GIL to free a
    tensor of the last collective never finishes (torch 2.13: about 1 exit in 10 hung in
    two-process CPU runs on a loaded machine). Freed first, the group dies in
    destroy_process_group, which lets go of the GIL.
    """
    accelerator.free_memory()  # the accelerator's own references to the wrapped model
    gc.collect()
    if any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
        logger.warning(
            "a DistributedDataParallel model outlives the process group: its exit may hang (drop every reference before end_processes)"
        )
    accelerator.end_training()


class StopSignal:
    """Turns SIGTERM (cluster preemption) into a flag the training loop polls between steps."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def release(self) -> None:
        """SIGTERM ends the process again, once the results are saved: a launcher stopping a stuck exit must be able to."""
        signal.signal(signal.SIGTERM, self.previous)

    def agreed(self, accelerator) -> bool:
        """True on every process if any process got the signal, so all of them save together."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def software_versions() -> dict:
    import accelerate
    import transformers

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "soundfile": sf.__version__,
        "soxr": soxr.__version__,
    }
    return versions


def hardware_description(accelerator) -> str:
    if torch.cuda.is_available():
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(0)}"
    return f"{accelerator.num_processes} x CPU process ({os.cpu_count()} cores)"


def push_folder_to_hub(folder, repo_id: str, commit_message: str = "Upload model") -> bool:
    """Upload a finished output folder. The local folder is complete before this is called and a
    failed upload (offline server, bad token) only logs an error: the run's result is never lost."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        # Manifests and the run's arguments hold participant ids and local paths of sensitive recordings.
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message,
            ignore_patterns=["checkpoints/*", "*.tmp", "manifests/*", "training_args.json", "best/*", ".final/*"],
        )
    except Exception as error:
        logger.error(
            "push to the hub failed (%s); the model is complete in %s, push it later with `hf upload %s %s`",
            error,
            folder,
            repo_id,
            folder,
        )
        return False
    return True
