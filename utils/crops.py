"""The pretraining data: an IterableDataset of silence-filtered random crops of long recordings."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np
import soundfile as sf
import torch

from utils.audio import TARGET_SAMPLE_RATE, normalize_waveform, read_mono, source_window, target_length
from utils.numerics import require_finite_samples


class UnreadableManifest(RuntimeError):
    """No file of a manifest could be read. Raised in a DataLoader worker, it reaches the main process
    with the worker's traceback in its message; exit_on_unreadable turns it into one line."""


def exit_on_unreadable(loader):
    """The loader's batches; a manifest none of whose files reads ends the run with a one-line error."""
    try:
        yield from loader
    except UnreadableManifest as error:
        message = str(error).strip()
        if "Traceback" in message:  # from a worker: its last line is "utils.crops.UnreadableManifest: <message>"
            message = message.splitlines()[-1].split(": ", 1)[-1]
        raise SystemExit(f"error: {message}") from None


class _HandleCache:
    """A few open SoundFile handles per worker, so a crop costs one seek and one read."""

    def __init__(self, capacity: int = 64):
        self.capacity, self.handles = capacity, OrderedDict()

    def get(self, row: dict) -> sf.SoundFile:
        """The open recording of a manifest row: its file, or (a row with a `reader`, utils.dataset_recordings)
        a recording kept in a dataset."""
        path = row["path"]
        audio = self.handles.pop(path, None)
        if audio is None:
            audio = row["reader"].open(row["index"]) if "reader" in row else sf.SoundFile(path)
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

    `fixed=True` (evaluation) yields the same crops on every pass: one pass over epoch 0, every crop
    of it (the last global batch may be short, and a process may have one batch fewer than another),
    so a dev figure does not depend on the batch size or the number of processes.
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
        self.names = names = names or [f"manifest {i}" for i in range(len(manifests))]
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
        if fixed:  # every crop: global batches 0..ceil(crops / batch_size) - 1, taken in turn by the processes
            self.batches_per_process = len(range(rank, math.ceil(self.crops_per_epoch / batch_size), world_size))
        elif self.batches_per_process == 0:
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
        bad: dict[tuple[int, int], str] = {}  # (manifest, file) -> why it failed
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
                indices = range(
                    global_batch * self.batch_size, min((global_batch + 1) * self.batch_size, self.crops_per_epoch)
                )
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
                    raise UnreadableManifest(
                        f"{self.names[manifest]}: none of its {len(self.files[manifest])} file(s) could be read "
                        f"(e.g. {self.files[manifest][file_index]['path']}: {bad[manifest, file_index]})"
                    )
                file_index = good[int(rng.integers(len(good)))]
            row = self.files[manifest][file_index]
            try:
                crop = self._read_crop(row, rng, cache, stats)
                # Normalising huge but finite samples can overflow too: check what the model gets.
                crop = require_finite_samples(normalize_waveform(crop) if self.normalize else crop)
                break
            except Exception as error:
                bad[manifest, file_index] = " ".join(str(error).split()) or type(error).__name__
                cache.drop(row["path"])
                stats["unreadable_files"] += 1
                new_bad.append(row["path"])
                warnings.warn(f"skipping unreadable file {row['path']}: {error}", stacklevel=2)
        stats["crops"] += 1
        return crop

    def _read_crop(self, row, rng, cache, stats) -> np.ndarray:
        audio = cache.get(row)
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
            require_finite_samples(source, window.src_start / sr, sr)  # NaN or Inf: the file is skipped
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
