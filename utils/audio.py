"""Reading audio: any region of a long file at 16 kHz mono, by seeking, never decoding the whole file.

Also the conv encoder's geometry (samples -> frames), which every script needs to line up audio and frames.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

TARGET_SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".rf64", ".caf"}
# Context read on each side of a region before resampling so the filter has real signal at the
# edges: the region then matches the same samples of a whole-file resample.
RESAMPLE_MARGIN_SECONDS = 0.02


def read_resampled(
    audio: sf.SoundFile, start: int, length: int, target_sr: int = TARGET_SAMPLE_RATE, *, strict: bool = False
) -> np.ndarray:
    """Return `length` float32 mono samples at `target_sr`, starting at target-rate sample `start`.

    Only the needed source frames (plus a short resampling margin) are read. The read boundaries sit
    on the grid where source and target sample times coincide, so sample k of the result is sample
    `start + k` of the whole file resampled in one pass. Past the end of the file the result is
    zero-padded, so the length is always exact. With `strict`, a file holding fewer frames than its
    header says is an error (OSError) rather than silently zero-padded.
    """
    window = source_window(audio.samplerate, audio.frames, start, length, target_sr)
    wanted = window.src_stop - window.src_start
    source = read_mono(audio, window.src_start, wanted)
    if strict and len(source) < wanted:
        raise OSError(f"truncated: read {len(source)} of {wanted} frames at frame {window.src_start}")
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
        tail = _file_tail(audio.name, 2 * _OGG_MAX_PAGE_BYTES + 27)
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


def _file_tail(source, n: int) -> bytes:
    """The last `n` bytes (or all) of a file: a path, or a file object libsndfile reads from (a
    recording kept in a dataset's Arrow file), which is put back where it was."""
    if not hasattr(source, "seek"):
        with open(source, "rb") as f:
            return _file_tail(f, n)
    position = source.tell()
    try:
        size = source.seek(0, os.SEEK_END)
        source.seek(size - min(size, n))
        return source.read(n)
    finally:
        source.seek(position)


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


def find_audio_files(root: str | os.PathLike, problems: list[dict] | None = None) -> list[Path]:
    """The audio files under `root` (or `root` itself, a file), sorted. Symbolic links to folders are
    followed, each real folder once, so a link back up the tree is no loop. A folder that cannot be
    listed goes to `problems` as {path, reason} (without a list: a warning); it is never skipped silently."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")

    def unlistable(error: OSError) -> None:
        row = {"path": str(error.filename or root), "reason": f"unreadable folder: {error.strerror or error}"}
        if problems is None:
            logger.warning("skipping %s: %s", row["path"], row["reason"])
        else:
            problems.append(row)

    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, onerror=unlistable, followlinks=True):
        try:
            status = os.stat(folder)
        except OSError as error:
            unlistable(error)
            subfolders[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:  # reached again through a link: already scanned
            subfolders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        # Within a folder, real subfolders before links: a folder reached both ways is listed where it lies.
        subfolders.sort(key=lambda name: (os.path.islink(os.path.join(folder, name)), name))
        files += [Path(folder, name) for name in names if Path(name).suffix.lower() in AUDIO_EXTENSIONS]
    return sorted(files)
