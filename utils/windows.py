"""The frame grid of long recordings: the windows the model runs on and which of their frames are
kept, reading them (a DataLoader dataset), grouping them into batches and running the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from utils.audio import (
    TARGET_SAMPLE_RATE,
    conv_frames,
    conv_geometry,
    normalize_waveform,
    read_resampled,
    target_length,
)
from utils.numerics import nonfinite_samples
from utils.segments import Job


@dataclass(frozen=True)
class Window:
    start: int  # first 16 kHz sample of the window in the file
    length: int  # samples fed to the model
    keep: int  # first window frame that belongs to the output...
    count: int  # ...and how many do
    dest: int  # output frame of window frame `keep`


@dataclass(frozen=True)
class WindowGeometry:
    """How a model's frames are computed in windows: the conv encoder's receptive field and stride
    (samples), the output frames per chunk and the context frames on each side of it, and whether
    shorter windows may be zero-padded with an attention mask (layer-norm conv features)."""

    receptive_field: int
    stride: int
    chunk_frames: int
    context_frames: int
    pad_with_mask: bool

    @property
    def frame_rate(self) -> float:
        return TARGET_SAMPLE_RATE / self.stride

    @property
    def full_window(self) -> int:
        """Samples of a window of chunk + 2 x context frames."""
        return self.stride * (self.chunk_frames + 2 * self.context_frames - 1) + self.receptive_field


def window_geometry(config, chunk_seconds: float, context_seconds: float) -> WindowGeometry:
    receptive_field, stride = conv_geometry(config)
    frame_rate = TARGET_SAMPLE_RATE / stride
    return WindowGeometry(
        receptive_field,
        stride,
        max(1, round(chunk_seconds * frame_rate)),
        round(context_seconds * frame_rate),
        config.feat_extract_norm == "layer",
    )


def plan_windows(
    region_start: int,
    region_length: int,
    file_length: int,
    chunk_frames: int,
    context_frames: int,
    receptive_field: int = 400,
    stride: int = 320,
) -> tuple[int, list[Window]]:
    """Frames of a region, and the windows that compute them.

    Frame i of the region covers samples region_start + stride * i + [0, receptive_field). The
    grid extends into the file on both sides by up to `context_frames`; each chunk of
    `chunk_frames` output frames runs in a window of exactly chunk + 2 x context frames, shifted
    inwards at the file's edges. A region whose extended grid fits into one window runs whole.
    """
    num_frames = conv_frames(region_length, receptive_field, stride)
    if num_frames == 0:
        return 0, []
    frames_to_file_end = conv_frames(file_length - region_start, receptive_field, stride)
    first = max(-(region_start // stride), -context_frames)
    last = min(frames_to_file_end, num_frames + context_frames)
    window_frames = chunk_frames + 2 * context_frames
    if last - first <= window_frames:
        start = region_start + stride * first
        stop = start + stride * (last - first - 1) + receptive_field
        # Samples past the last frame change no frame count, but they are part of a plain pass over
        # the file (or, without right context, over the region), and the normalisation sees them.
        if last == frames_to_file_end:
            stop = file_length
        elif last == num_frames:
            stop = region_start + region_length
        return num_frames, [Window(start, stop - start, -first, num_frames, 0)]
    windows = []
    for chunk_start in range(0, num_frames, chunk_frames):
        count = min(chunk_frames, num_frames - chunk_start)
        window_first = min(max(chunk_start - context_frames, first), last - window_frames)
        length = stride * (window_frames - 1) + receptive_field
        windows.append(
            Window(region_start + stride * window_first, length, chunk_start - window_first, count, chunk_start)
        )
    return num_frames, windows


class WindowReader(torch.utils.data.IterableDataset):
    """Reads every window of the given files, in order, as dicts:
    {"job", "window", "num_frames", "num_windows", "samples"} for a window to run,
    {"job", "num_frames", "exists": True} for an output that is already complete (--skip_existing),
    {"source", "job" (or None: the whole file), "reason"} for a file or segment that cannot be extracted.
    DataLoader workers take every n-th file."""

    def __init__(
        self,
        files: list[tuple[str, list[tuple[int, Job]]]],
        output_dir: Path,
        geometry: WindowGeometry,
        normalize: bool,
        skip_existing: bool,
    ):
        self.files, self.output_dir, self.geometry = files, output_dir, geometry
        self.normalize, self.skip_existing = normalize, skip_existing

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for source, jobs in self.files[worker::num_workers]:
            try:
                with sf.SoundFile(source) as audio:
                    file_length = target_length(audio.frames, audio.samplerate)
                    for job_id, job in jobs:
                        yield from self._read_job(audio, file_length, job_id, job)
            except Exception as error:  # libsndfile raises several types; any of them means unreadable
                yield {"source": source, "job": None, "reason": f"{type(error).__name__}: {str(error).strip()}"}

    def _read_job(self, audio, file_length, job_id, job):
        region_start = round(job.start * TARGET_SAMPLE_RATE)
        region_stop = file_length if job.end is None else min(file_length, round(job.end * TARGET_SAMPLE_RATE))
        num_frames, windows = plan_windows(
            region_start,
            region_stop - region_start,
            file_length,
            self.geometry.chunk_frames,
            self.geometry.context_frames,
            self.geometry.receptive_field,
            self.geometry.stride,
        )
        if num_frames == 0:
            if file_length == 0:
                reason = "empty file (no samples)"
            elif region_start < file_length:
                reason = f"shorter than one frame ({self.geometry.receptive_field / TARGET_SAMPLE_RATE * 1000:g} ms)"
            else:
                reason = "starts after the end of the file"
            yield {"source": job.source, "job": (job_id, job), "reason": reason}
            return
        if self.skip_existing and (self.output_dir / job.output).exists():
            yield {
                "job": (job_id, job),
                "num_frames": num_frames,
                "end": region_stop / TARGET_SAMPLE_RATE,
                "exists": True,
            }
            return
        for window in windows:
            samples = read_resampled(audio, window.start, window.length, strict=True)
            nonfinite = nonfinite_samples(samples, window.start / TARGET_SAMPLE_RATE)
            if nonfinite:  # the features would all be NaN: this output fails, the file's others go on
                yield {"source": job.source, "job": (job_id, job), "reason": nonfinite}
                return
            if self.normalize:
                samples = normalize_waveform(samples)
            yield {
                "job": (job_id, job),
                "window": window,
                "num_frames": num_frames,
                "num_windows": len(windows),
                "end": region_stop / TARGET_SAMPLE_RATE,
                "samples": torch.from_numpy(samples),
            }


def as_is(item):
    """The DataLoader only moves the reader's items between processes; they arrive as they were made."""
    return item


def batches(items, batch_size: int, full_window: int, pad_with_mask: bool):
    """Group the reader's windows into forward passes: ("batch", windows), or ("note", item) for an
    item without audio (an output that exists, a failure), passed on at once.

    Full-length windows of any files share batches. Shorter ones are zero-padded with an attention
    mask where the model supports it (layer-norm conv features), and otherwise run alone: the first
    conv layer of group-norm models normalises over time, so padding would change its output.
    """
    full, ragged = [], []
    for item in items:
        if "samples" not in item:
            yield "note", item
            continue
        batch = full if len(item["samples"]) == full_window else ragged
        batch.append(item)
        if len(batch) == batch_size or (batch is ragged and not pad_with_mask):
            yield "batch", batch[:]
            batch.clear()
    for batch in (full, ragged):
        if batch:
            yield "batch", batch


def run_model(
    model, items: list[dict], layers: list[int] | None, device, dtype, pad_with_mask: bool
) -> list[np.ndarray]:
    """The kept frames of each window, as (layers, frames, dim) float32 arrays."""
    lengths = [len(item["samples"]) for item in items]
    inputs = torch.zeros(len(items), max(lengths))
    for row, item in enumerate(items):
        inputs[row, : lengths[row]] = item["samples"]
    attention_mask = None
    if pad_with_mask and min(lengths) < max(lengths):
        attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long().to(device)
    with torch.inference_mode():
        output = model(
            inputs.to(device, dtype), attention_mask=attention_mask, output_hidden_states=layers is not None
        )
        stacked = (
            output.last_hidden_state[None]
            if layers is None
            else torch.stack([output.hidden_states[i] for i in layers])
        )
        kept = [
            stacked[:, row, item["window"].keep : item["window"].keep + item["window"].count]
            for row, item in enumerate(items)
        ]
        return [features.float().cpu().numpy() for features in kept]
