"""Extract wav2vec 2.0 features from long recordings: frame features or pooled vectors, per file or per segment.

    python extract_features.py --model_name_or_path facebook/wav2vec2-base --output_dir feats recordings/
    python extract_features.py --model_name_or_path runs/home-ssl --layers 6,12 --pooling meanstd \\
        --segments vtc_output.rttm --output_dir feats_chi recordings/
    accelerate launch extract_features.py ...    # several GPUs split the files between them

INPUT is any mix of audio files, folders (searched recursively) and manifest .tsv files with a `path`
column (as written by data/prepare_manifest.py). With a --segments TSV the INPUTs are left out.

Output. One file per input, at OUT/<path relative to its input folder>.npy (or .pt / .safetensors);
with --segments one file per segment at OUT/<path relative to its input folder, no extension>/
<start ms>-<end ms>[_<label>].npy. Each holds a float32 array (the tensor "features" in safetensors):
    --pooling none     (frames, dim) for one layer, (layers, frames, dim) for several or `all`;
    --pooling mean     (dim) or (layers, dim): the mean over the frames;
    --pooling meanstd  (2 dim) or (layers, 2 dim): the mean, then the standard deviation.
OUT/index.tsv has one row per output: source, output (relative to OUT), start and end (seconds in
the source), label, num_frames, shape (e.g. 13x180000x768), frame_rate (frames per second), layers
("last", or the hidden-state indices in array order, e.g. "6,12") and pooling. Frame i of an output
covers [start + i / frame_rate, start + i / frame_rate + 0.025) seconds of the source: the conv
stack's receptive field is 400 samples at 16 kHz with a stride of 320, so N samples give
floor((N - 400) / 320) + 1 frames, the count and grid of one pass of the model over them.
OUT/failures.tsv lists every file that could not be read (and segment that could not be extracted)
with the reason; the job goes on without them. OUT/extract_config.json records the flags the
features depend on.

Layers. `--layers all` saves hidden states 0..L (0: the input of the first transformer layer, i.e.
the projected conv features plus the positional convolution; i: the output of transformer layer i);
`--layers 6,12` saves the listed ones, and only the layers up to the highest one listed are run.
`--layers last` saves the model's last_hidden_state. For models without stable layer norm
(wav2vec2-base: each layer ends in a LayerNorm) this is hidden state L. For stable-layer-norm models
(wav2vec2-large-lv60, -large-robust, XLS-R) the layers are pre-norm and the encoder applies one more
LayerNorm after the last layer: `last` is that normalised output, while hidden state L (in `all` or
`--layers 24`) is the raw residual stream before it, on a much larger scale.

Long files. The output's frames are cut into chunks of --chunk_seconds; each chunk runs with up to
--context_seconds of audio on each side (taken from the surrounding file, also for segments), and
only the chunk's frames are kept. Chunk and context boundaries lie on the 320-sample frame grid, so
the kept frames are the very frames of a whole-file pass. Their values differ from it only because
the positional convolution, the attention and, in group-norm models such as wav2vec2-base, the
first conv layer's normalisation over time see the window instead of the whole file. In the tests
(random tiny models, 40 s of steady sound, 8 s chunks, 2 s context) the largest difference is 0.001
for a layer-norm model and 0.025 for a group-norm one, on features of unit scale (without context:
0.8 and 0.9). On sound whose character changes over the file, the first-layer statistics of a
window differ from those of the whole file, and so do a group-norm model's features (a 40 s sweep:
mean difference 0.26, largest 2.5; layer-norm model: 0.017 largest). Per-window statistics are
what such a model saw in training (crops of seconds), and the only ones a day-long recording allows
in bounded memory.
Every window has the same length (chunk + 2 x context; at a file's edges it shifts inwards and gets
more context on the other side), so full windows of many files batch together. A region that fits
in one window runs unchunked. --context_seconds 0 extracts each chunk, and each segment, on its own.
RAM is bounded by --batch_size windows, whatever the length of the recordings: frame features are
written to disk window by window (--format pt assembles them in a file and then saves it).

Normalisation. When the model's preprocessor_config.json sets do_normalize, each window (chunk with
its context, or the whole region with its context when that fits in one window) is normalised to
zero mean and unit variance before the model sees it. That is what the model saw in training (each
crop or utterance normalised on its own) and it keeps features local: normalising over a whole
day-long recording would make a segment's features depend on hours of unrelated audio. A file that
fits in one window (or a segment, with --context_seconds 0) gets exactly what
Wav2Vec2FeatureExtractor followed by the model gives for it.

Batching. Models with layer-norm conv features (feat_extract_norm="layer") take zero-padded batches
with an attention mask, which gives the same result as running each window alone. Group-norm models
would see the padding in their first layer's statistics: they batch only windows of equal length,
and a shorter window (a file or segment shorter than one window) runs alone.

Several processes (accelerate launch, torchrun) each take a share of the files, balanced by file
size, and write their own outputs; the main process merges the index at the end. --skip_existing
resumes an interrupted job: outputs already complete are kept (files are written under a
temporary name and renamed when complete, so a partial file is never taken for a finished one).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from safetensors.numpy import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, Wav2Vec2Model

from utils.audio import (
    TARGET_SAMPLE_RATE,
    conv_frames,
    conv_geometry,
    find_audio_files,
    normalize_waveform,
    read_mono,
    source_window,
    target_length,
)
from utils.manifests import read_tsv, write_tsv
from utils.training import load_feature_extractor

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_COLUMNS = ["source", "output", "start", "end", "label", "num_frames", "shape", "frame_rate", "layers", "pooling"]
FAILURE_COLUMNS = ["source", "start", "end", "label", "reason"]
# Flags the saved features depend on: --skip_existing refuses to mix outputs made with other values.
CONFIG_KEYS = ["model_name_or_path", "layers", "pooling", "format", "chunk_seconds", "context_seconds", "dtype"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files, folders or manifest .tsv files")
    parser.add_argument("--model_name_or_path", required=True, help="any wav2vec2 checkpoint: hub id or local folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--layers", default="last", help="'last', 'all', or hidden-state indices such as '6,12' (see above)"
    )
    parser.add_argument("--pooling", choices=["none", "mean", "meanstd"], default="none")
    parser.add_argument("--format", choices=["npy", "pt", "safetensors"], default="npy")
    parser.add_argument(
        "--segments", help="RTTM (file ids = input file names without extension) or TSV with path, start, end[, label]"
    )
    parser.add_argument("--chunk_seconds", type=float, default=30.0)
    parser.add_argument(
        "--context_seconds", type=float, default=5.0, help="audio on each side of a chunk, run and then dropped"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", help="default: the process's accelerator device, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument(
        "--num_workers", type=int, default=1, help="background processes reading audio; 0 reads in the main process"
    )
    parser.add_argument("--skip_existing", action="store_true", help="keep outputs that are already complete")
    args = parser.parse_args(argv)

    for item in args.inputs:
        if not os.path.exists(item):
            parser.error(f"INPUT {item} does not exist")
    if args.segments and not os.path.isfile(args.segments):
        parser.error(f"--segments {args.segments}: file not found")
    if not args.inputs and not (args.segments and not is_rttm(args.segments)):
        parser.error(
            "give at least one INPUT (audio file, folder or manifest .tsv), or a --segments TSV naming the files"
        )
    if args.inputs and args.segments and not is_rttm(args.segments):
        parser.error("a --segments TSV names its own files: give no INPUT with it")
    if not re.fullmatch(r"last|all|\d+(,\d+)*", args.layers):
        parser.error(
            f"--layers {args.layers!r}: expected 'last', 'all' or comma-separated layer indices such as '6,12'"
        )
    if args.chunk_seconds <= 0:
        parser.error(f"--chunk_seconds {args.chunk_seconds}: must be > 0")
    if args.context_seconds < 0:
        parser.error(f"--context_seconds {args.context_seconds}: must be >= 0")
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: must be >= 1")
    if args.num_workers < 0:
        parser.error(f"--num_workers {args.num_workers}: must be >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Data: which region of which file goes to which output file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One output file: a region of a source recording (the whole recording when end is None)."""

    source: str
    output: str  # relative to the output folder
    start: float = 0.0
    end: float | None = None
    label: str = ""


def list_sources(inputs: list[str]) -> dict[str, str]:
    """{absolute audio path: output name}, the name being the path relative to its input folder, without extension."""
    sources: dict[str, str] = {}
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".tsv":
            sources.update(name_files([Path(row["path"]) for row in read_tsv(path, ["path"])]))
        elif path.is_dir():
            files = find_audio_files(path)
            if not files:
                logger.warning("no audio files in %s", item)
            sources.update(name_files(files, path))
        else:
            sources.update(name_files([path], path.parent))
    return sources


def name_files(files: list[Path], root: Path | None = None) -> dict[str, str]:
    """Output names mirror the files' paths below `root` (default: their deepest common folder)."""
    if not files:
        return {}
    paths = [os.path.abspath(f) for f in files]
    root = os.path.abspath(root) if root is not None else os.path.commonpath([os.path.dirname(p) for p in paths])
    return {p: Path(os.path.relpath(p, root)).with_suffix("").as_posix() for p in paths}


def is_rttm(path: str) -> bool:
    if path.lower().endswith(".rttm"):
        return True
    with open(path, encoding="utf-8") as f:
        return f.readline().startswith("SPEAKER ")


def read_segments(path: str) -> list[tuple[str, float, float, str]]:
    """(key, start, end, label) per segment; the key is the RTTM file id or the TSV's absolute path."""
    segments = []
    if is_rttm(path):
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.split()) for n, line in enumerate(f, 1)]
        for n, fields in lines:
            if not fields or fields[0] != "SPEAKER":
                continue
            try:
                start, duration = float(fields[3]), float(fields[4])
                label = fields[7]
            except (IndexError, ValueError):
                raise ValueError(
                    f"--segments {path} line {n}: not an RTTM SPEAKER line: {' '.join(fields)!r}"
                ) from None
            segments.append((fields[1], start, start + duration, label, n))
    else:
        for n, row in enumerate(read_tsv(path, ["path", "start", "end"]), 2):
            try:
                start, end = float(row["start"]), float(row["end"])
            except ValueError:
                raise ValueError(
                    f"--segments {path} line {n}: start/end {row['start']!r}, {row['end']!r} are not numbers"
                ) from None
            segments.append((os.path.abspath(row["path"]), start, end, row.get("label") or "", n))
    for _, start, end, _, n in segments:
        if not 0 <= start < end or not math.isfinite(end):
            raise ValueError(f"--segments {path} line {n}: needs 0 <= start < end, got start {start}, end {end}")
    return [s[:4] for s in segments]


def make_jobs(sources: dict[str, str], segments: list | None, extension: str) -> list[Job]:
    if segments is None:
        jobs = [Job(source, f"{name}.{extension}") for source, name in sources.items()]
    else:
        by_key = {}
        for source, name in sources.items():
            by_key[source] = (source, name)
            stem = Path(source).stem
            by_key[stem] = None if stem in by_key else (source, name)  # an RTTM file id must name one file
        jobs, unmatched, ambiguous = [], set(), set()
        for key, start, end, label in segments:
            if key not in by_key:
                unmatched.add(key)
            elif by_key[key] is None:
                ambiguous.add(key)
            else:
                source, name = by_key[key]
                suffix = "_" + re.sub(r"[^A-Za-z0-9.-]", "_", label) if label else ""
                jobs.append(
                    Job(
                        source,
                        f"{name}/{round(start * 1000):09d}-{round(end * 1000):09d}{suffix}.{extension}",
                        start,
                        end,
                        label,
                    )
                )
        if ambiguous:
            raise ValueError(
                f"--segments file id(s) {sorted(ambiguous)[:5]} match several input files; give the inputs in separate runs"
            )
        if unmatched:
            logger.warning(
                "%d segment file id(s)/path(s) match no input, e.g. %s", len(unmatched), sorted(unmatched)[:3]
            )
        if segments and not jobs:
            raise ValueError(
                "no --segments entry matches an input file (RTTM file ids are matched to file names without extension)"
            )
        jobs = list(dict.fromkeys(jobs))  # the same segment listed twice is extracted once
    by_output: dict[str, Job] = {}
    for job in jobs:
        other = by_output.setdefault(job.output, job)
        if other.source != job.source:
            raise ValueError(
                f"{other.source} and {job.source} would both be written to {job.output}; extract them into separate output folders"
            )
        if other != job:  # times equal to the millisecond, or labels equal once made file-name safe
            raise ValueError(
                f"--segments: two segments of {job.source} ({other.start}-{other.end} {other.label!r} and "
                f"{job.start}-{job.end} {job.label!r}) would both be written to {job.output}"
            )
    return jobs


# --------------------------------------------------------------------------------------------
# The frame grid: which windows the model runs on, and which of their frames are kept
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: int  # first 16 kHz sample of the window in the file
    length: int  # samples fed to the model
    keep: int  # first window frame that belongs to the output...
    count: int  # ...and how many do
    dest: int  # output frame of window frame `keep`


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


def read_window(audio: sf.SoundFile, start: int, length: int) -> np.ndarray:
    """16 kHz mono samples [start, start + length), as utils.audio.read_resampled, except that a file
    holding fewer frames than its header says is an error rather than silently zero-padded."""
    window = source_window(audio.samplerate, audio.frames, start, length)
    wanted = window.src_stop - window.src_start
    source = read_mono(audio, window.src_start, wanted)
    if len(source) < wanted:
        raise OSError(f"truncated: read {len(source)} of {wanted} frames at frame {window.src_start}")
    return window.resample(source, audio.samplerate)


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
        chunk_frames: int,
        context_frames: int,
        geometry: tuple[int, int],
        normalize: bool,
        skip_existing: bool,
    ):
        self.files, self.output_dir = files, output_dir
        self.chunk_frames, self.context_frames, self.geometry = chunk_frames, context_frames, geometry
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
            self.chunk_frames,
            self.context_frames,
            *self.geometry,
        )
        if num_frames == 0:
            if file_length == 0:
                reason = "empty file (no samples)"
            elif region_start < file_length:
                reason = f"shorter than one frame ({self.geometry[0] / TARGET_SAMPLE_RATE * 1000:g} ms)"
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
            samples = read_window(audio, window.start, window.length)
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


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


class FeatureWriter:
    """One output file, filled window by window, in any order.

    Frame features go straight to disk at their frame offset, so memory holds one batch whatever
    the length of the recording; pooled features are running sums (float64). The file is written
    under a temporary name and appears under its own only when complete.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        pooling: str,
        layers_frames_dim: tuple[int, int, int],
        shape: tuple[int, ...],
        metadata: dict[str, str],
    ):
        self.path, self.tmp, self.fmt, self.pooling, self.shape, self.metadata = (
            path,
            path.with_name(path.name + ".partial"),
            fmt,
            pooling,
            shape,
            metadata,
        )
        self.num_layers, self.num_frames, self.dim = layers_frames_dim
        path.parent.mkdir(parents=True, exist_ok=True)
        if pooling == "none":
            header = self._header()
            self.data_offset = len(header)
            self.file = open(self.tmp, "wb")
            self.file.write(header)
            self.file.truncate(self.data_offset + 4 * math.prod(shape))
        else:
            self.sum = np.zeros((self.num_layers, self.dim), dtype=np.float64)
            self.sum_sq = np.zeros((self.num_layers, self.dim), dtype=np.float64)

    def _header(self) -> bytes:
        if self.fmt == "npy":
            buffer = io.BytesIO()
            np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
            return buffer.getvalue()
        if self.fmt == "safetensors":
            header = {
                "features": {
                    "dtype": "F32",
                    "shape": list(self.shape),
                    "data_offsets": [0, 4 * math.prod(self.shape)],
                },
                "__metadata__": self.metadata,
            }
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            return struct.pack("<Q", len(text)) + text
        return b""  # pt: raw float32 until complete, then torch.save

    def add(self, features: np.ndarray, dest: int) -> None:
        """features: (layers, frames, dim) float32 for output frames [dest, dest + frames)."""
        if self.pooling == "none":
            for layer in range(self.num_layers):
                self.file.seek(self.data_offset + 4 * (layer * self.num_frames + dest) * self.dim)
                self.file.write(np.ascontiguousarray(features[layer], dtype="<f4").tobytes())
        else:
            wide = features.astype(np.float64)
            self.sum += wide.sum(axis=1)
            self.sum_sq += np.square(wide).sum(axis=1)

    def close(self) -> None:
        if self.pooling == "none":
            self.file.close()
            if self.fmt == "pt":
                raw = self.tmp.with_name(self.tmp.name + ".raw")
                os.replace(self.tmp, raw)
                torch.save(
                    torch.from_file(str(raw), shared=True, size=math.prod(self.shape), dtype=torch.float32).view(
                        self.shape
                    ),
                    self.tmp,
                )
                raw.unlink()
        else:
            mean = self.sum / self.num_frames
            pooled = mean
            if self.pooling == "meanstd":
                pooled = np.concatenate(
                    [mean, np.sqrt(np.maximum(self.sum_sq / self.num_frames - mean**2, 0))], axis=-1
                )
            pooled = pooled.astype(np.float32).reshape(self.shape)
            if self.fmt == "npy":
                with open(self.tmp, "wb") as f:
                    np.save(f, pooled)
            elif self.fmt == "pt":
                torch.save(torch.from_numpy(pooled), self.tmp)
            else:
                save_file({"features": pooled}, str(self.tmp), metadata=self.metadata)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.pooling == "none":
            self.file.close()
        self.tmp.unlink(missing_ok=True)


class OutputFiles:
    """This process's open output files, index rows and failures."""

    def __init__(
        self,
        output_dir: Path,
        fmt: str,
        pooling: str,
        layers_column: str,
        layer_axis: bool,
        dim: int,
        frame_rate: float,
    ):
        self.output_dir, self.fmt, self.pooling, self.layers_column = output_dir, fmt, pooling, layers_column
        self.num_layers, self.layer_axis, self.dim, self.frame_rate = (
            len(layers_column.split(",")),
            layer_axis,
            dim,
            frame_rate,
        )
        self.writers: dict[int, FeatureWriter] = {}
        self.windows_left: dict[int, int] = {}
        self.failed_sources: set[str] = set()
        self.rows: list[dict] = []
        self.failures: list[dict] = []

    def shape(self, num_frames: int) -> tuple[int, ...]:
        per_layer = (
            (num_frames, self.dim) if self.pooling == "none" else ((2 if self.pooling == "meanstd" else 1) * self.dim,)
        )
        return (self.num_layers, *per_layer) if self.layer_axis else per_layer

    def add(self, item: dict, features: np.ndarray) -> None:
        job_id, job = item["job"]
        if job.source in self.failed_sources:
            return  # the file broke after this window was read
        if job_id not in self.writers:
            metadata = {
                "source": job.source,
                "start": f"{job.start:.3f}",
                "end": f"{item['end']:.3f}",
                "frame_rate": f"{self.frame_rate:g}",
                "layers": self.layers_column,
                "pooling": self.pooling,
            }
            dims = (self.num_layers, item["num_frames"], self.dim)
            self.writers[job_id] = FeatureWriter(
                self.output_dir / job.output, self.fmt, self.pooling, dims, self.shape(item["num_frames"]), metadata
            )
            self.windows_left[job_id] = item["num_windows"]
        self.writers[job_id].add(features, item["window"].dest)
        self.windows_left[job_id] -= 1
        if self.windows_left[job_id] == 0:
            self.writers.pop(job_id).close()
            self.done(item)

    def done(self, item: dict) -> None:
        job = item["job"][1]
        self.rows.append(
            {
                "source": job.source,
                "output": job.output,
                "start": f"{job.start:.3f}",
                "end": f"{item['end']:.3f}",
                "label": job.label,
                "num_frames": item["num_frames"],
                "shape": "x".join(map(str, self.shape(item["num_frames"]))),
                "frame_rate": f"{self.frame_rate:g}",
                "layers": self.layers_column,
                "pooling": self.pooling,
            }
        )

    def fail(self, item: dict) -> None:
        logger.warning("skipping %s: %s", item["source"], item["reason"])
        if item["job"] is not None:  # one segment
            job = item["job"][1]
            self.failures.append(
                {
                    "source": job.source,
                    "start": job.start,
                    "end": job.end,
                    "label": job.label,
                    "reason": item["reason"],
                }
            )
            return
        self.failures.append({"source": item["source"], "reason": item["reason"]})
        self.failed_sources.add(item["source"])  # outputs of it not complete yet are dropped
        for job_id in [j for j, writer in self.writers.items() if writer.metadata["source"] == item["source"]]:
            self.writers.pop(job_id).abort()

    def abort_all(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def merge_tables(output_dir: Path, name: str, columns: list[str], num_parts: int) -> int:
    """Join the per-process parts of a table into OUT/<name>.tsv, sorted by source and time."""
    rows = []
    for rank in range(num_parts):
        part = output_dir / f"{name}.rank{rank}.tsv"
        rows.extend(read_tsv(part, []))
        part.unlink()
    rows.sort(key=lambda r: (r["source"], float(r["start"] or 0), r.get("output", "")))
    write_tsv(output_dir / f"{name}.tsv", rows, columns)
    return len(rows)


def region_seconds(job: Job) -> float:
    """For the progress bar: the region's length, from the header for whole files (0 if unreadable)."""
    if job.end is not None:
        return job.end - job.start
    try:
        return sf.info(job.source).duration
    except Exception:
        return 0.0


def main(argv=None) -> dict:
    args = parse_args(argv)
    # accelerate forms a group of CPU processes (torchrun without GPUs) only when told it is on CPU.
    # Processes that finish their share early wait for the slowest at the end, which on a large
    # corpus can take hours: far past the process group's default timeout (10-30 minutes).
    state = PartialState(
        cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(days=7)
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != state.num_processes:
        raise SystemExit(
            f"error: launched as {os.environ['WORLD_SIZE']} processes, but accelerate sees {state.num_processes}; for CPU processes set ACCELERATE_USE_CPU=1"
        )
    device = torch.device(args.device) if args.device else state.device
    output_dir = Path(args.output_dir)

    # Data: the output files to make, and this process's share of the source files.
    try:
        segments = read_segments(args.segments) if args.segments else None
        if args.inputs:
            sources = list_sources(args.inputs)
        else:  # a --segments TSV names its files
            sources = name_files(sorted({Path(key) for key, *_ in segments}))
        jobs = make_jobs(sources, segments, args.format)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if not jobs:
        raise SystemExit(f"error: no audio files found in {', '.join(args.inputs)}")
    files: dict[str, list[tuple[int, Job]]] = {}
    for job_id, job in enumerate(jobs):
        files.setdefault(job.source, []).append((job_id, job))
    # Largest first, dealt out in turn: the processes get similar amounts of audio.
    by_size = sorted(files.items(), key=lambda kv: -os.path.getsize(kv[0]) if os.path.isfile(kv[0]) else 0)
    my_files = by_size[state.process_index :: state.num_processes]

    # Model
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path}: {error}") from None
    if config.model_type != "wav2vec2":
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path} is a {config.model_type} model, not wav2vec2"
        )
    if getattr(config, "add_adapter", False):
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path} has an adapter, which changes the frame rate; not supported"
        )
    if args.layers == "last":
        layers = None
    else:
        layers = (
            list(range(config.num_hidden_layers + 1))
            if args.layers == "all"
            else [int(i) for i in args.layers.split(",")]
        )
        if max(layers) > config.num_hidden_layers:
            raise SystemExit(
                f"error: --layers {args.layers}: the model has hidden states 0..{config.num_hidden_layers}"
            )
    feature_extractor = load_feature_extractor(args.model_name_or_path)
    if feature_extractor.sampling_rate != TARGET_SAMPLE_RATE:
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path} expects {feature_extractor.sampling_rate} Hz audio; only {TARGET_SAMPLE_RATE} Hz models are supported"
        )
    model = Wav2Vec2Model.from_pretrained(args.model_name_or_path, dtype=DTYPES[args.dtype])
    if layers is not None:  # layers above the highest one asked for are never run
        del model.encoder.layers[max(1, max(layers)) :]
    model.to(device).eval()
    receptive_field, stride = conv_geometry(config)
    frame_rate = TARGET_SAMPLE_RATE / stride
    chunk_frames = max(1, round(args.chunk_seconds * frame_rate))
    context_frames = round(args.context_seconds * frame_rate)
    full_window = stride * (chunk_frames + 2 * context_frames - 1) + receptive_field
    pad_with_mask = config.feat_extract_norm == "layer"

    # Never resume over outputs made with other flags.
    settings = {key: getattr(args, key) for key in CONFIG_KEYS}
    config_file = output_dir / "extract_config.json"
    if args.skip_existing and config_file.is_file():
        previous = json.loads(config_file.read_text())
        changed = {key: [previous.get(key), value] for key, value in settings.items() if previous.get(key) != value}
        if changed:
            raise SystemExit(
                f"error: --skip_existing: {output_dir} holds outputs made with other settings {changed} ([old, new]); use the same flags or another --output_dir"
            )
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(settings, indent=2) + "\n")

    # Loop
    reader = WindowReader(
        my_files,
        output_dir,
        chunk_frames,
        context_frames,
        (receptive_field, stride),
        feature_extractor.do_normalize,
        args.skip_existing,
    )
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=args.num_workers, collate_fn=as_is)
    layers_column = "last" if layers is None else ",".join(map(str, layers))
    layer_axis = args.layers == "all" or (layers is not None and len(layers) > 1)
    outputs = OutputFiles(
        output_dir, args.format, args.pooling, layers_column, layer_axis, config.hidden_size, frame_rate
    )
    total_hours = sum(region_seconds(job) for _, file_jobs in my_files for _, job in file_jobs) / 3600
    progress = tqdm(
        total=total_hours,
        unit="h",
        disable=not state.is_local_main_process,
        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio hours [{elapsed}<{remaining}{postfix}]",
    )
    audio_seconds, started, cpu_started = 0.0, time.perf_counter(), time.process_time()
    try:
        for kind, payload in batches(loader, args.batch_size, full_window, pad_with_mask):
            if kind == "batch":
                for item, features in zip(
                    payload, run_model(model, payload, layers, device, DTYPES[args.dtype], pad_with_mask)
                ):
                    outputs.add(item, features)
                batch_seconds = sum(item["window"].count for item in payload) / frame_rate
                audio_seconds += batch_seconds
                progress.set_postfix_str(
                    f"{audio_seconds / 3600 / (time.perf_counter() - started):.3g} audio h/s", refresh=False
                )
                progress.update(batch_seconds / 3600)
            elif "reason" in payload:
                outputs.fail(payload)
            else:
                outputs.done(payload)  # complete from an earlier run
                progress.update(payload["num_frames"] / frame_rate / 3600)
    finally:
        outputs.abort_all()  # whatever is still open was cut short
        progress.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    # Save the index and the failures: one part per process, merged by the main process.
    write_tsv(output_dir / f"index.rank{state.process_index}.tsv", outputs.rows, INDEX_COLUMNS)
    write_tsv(output_dir / f"failures.rank{state.process_index}.tsv", outputs.failures, FAILURE_COLUMNS)
    state.wait_for_everyone()
    if state.is_main_process:
        num_outputs = merge_tables(output_dir, "index", INDEX_COLUMNS, state.num_processes)
        num_failures = merge_tables(output_dir, "failures", FAILURE_COLUMNS, state.num_processes)
        logger.info(
            "%d outputs listed in %s, %d failures in %s",
            num_outputs,
            output_dir / "index.tsv",
            num_failures,
            output_dir / "failures.tsv",
        )
    state.wait_for_everyone()
    state.destroy_process_group()  # now, not in the interpreter's teardown, where gloo's threads can hang it
    return {
        "outputs": len(outputs.rows),
        "failures": len(outputs.failures),
        "audio_seconds": round(audio_seconds, 2),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "realtime_factor": round(audio_seconds / seconds, 1) if seconds else None,
    }


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    print(json.dumps(main()))
