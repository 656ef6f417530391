"""Small audio writers for tests: known signals in any format, rate and channel count."""

from pathlib import Path

import numpy as np
import soundfile as sf

SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}


def write_signal(path, signal: np.ndarray, sample_rate: int, subtype: str | None = None) -> Path:
    """Write float samples (frames or frames x channels) in blocks (libsndfile's Vorbis encoder
    crashes on one very large write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = subtype or SUBTYPES[path.suffix[1:]]
    channels = 1 if signal.ndim == 1 else signal.shape[1]
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype=subtype) as f:
        for start in range(0, len(signal), 65536):
            f.write(signal[start : start + 65536])
    return path


def chirp(seconds: float, sample_rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A slow sweep plus noise: every region differs from every other, so a wrong seek shows."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (100 * t + 20 * t**2)) + 0.05 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
