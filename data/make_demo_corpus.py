"""Build a small synthetic corpus that looks like day-long home recordings, offline, in seconds.

    python data/make_demo_corpus.py demo_data/audio [--participants 6] [--minutes 3] [--seed 0]

Each participant gets one or two recordings of a few minutes: mostly room noise and silence, with
speech-like voiced stretches in adult and child pitch ranges and household noises (clatter, hum).
Files rotate through the formats users bring: 16 kHz mono WAV, 44.1 kHz stereo FLAC and 48 kHz
OGG Vorbis. File names start with the participant id (`P03_rec1.flac`), which the default
`--participant_regex` of data/prepare_manifest.py picks up. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

BASE_RATE = 16_000
# (extension, sample rate, channels, soundfile subtype)
FORMATS = [("wav", 16_000, 1, "PCM_16"), ("flac", 44_100, 2, "PCM_16"), ("ogg", 48_000, 1, "VORBIS")]
PITCH_RANGES = {"adult_male": (85, 155), "adult_female": (165, 255), "child": (250, 400), "infant": (300, 600)}


def voiced_stretch(rng: np.random.Generator, seconds: float, pitch_range: tuple[float, float]) -> np.ndarray:
    """A run of syllables: harmonic series with a moving pitch, shaped by two formant peaks."""
    out = []
    while sum(len(s) for s in out) < seconds * BASE_RATE:
        n = int(rng.uniform(0.08, 0.3) * BASE_RATE)
        t = np.arange(n) / BASE_RATE
        f0 = rng.uniform(*pitch_range) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6)))
        phase = 2 * np.pi * np.cumsum(f0) / BASE_RATE
        formants = rng.uniform([300, 900], [900, 2600])
        syllable = np.zeros(n)
        for h in range(1, int(4000 / f0.max()) + 1):
            freq = h * f0.mean()
            gain = sum(np.exp(-(((freq - f) / 150.0) ** 2)) for f in formants) + 0.05 / h
            syllable += gain * np.sin(h * phase)
        syllable *= np.hanning(n) * rng.uniform(0.3, 1.0)
        out += [syllable, np.zeros(int(rng.uniform(0.02, 0.15) * BASE_RATE))]
    return np.concatenate(out)[: int(seconds * BASE_RATE)]


def household_noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * BASE_RATE)
    t = np.arange(n) / BASE_RATE
    if rng.random() < 0.5:  # appliance hum
        return 0.2 * np.sin(2 * np.pi * rng.choice([50, 60]) * t) * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t))
    clatter = rng.standard_normal(n) * np.exp(-t * rng.uniform(5, 30))  # a dish, a door
    return 0.8 * clatter


def recording(rng: np.random.Generator, minutes: float) -> np.ndarray:
    """Room noise with speech and household events scattered over about 30 % of the time."""
    n = int(minutes * 60 * BASE_RATE)
    brown = np.cumsum(rng.standard_normal(n)) * 1e-4
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # keep the rumble, drop the drift
    audio = brown + rng.standard_normal(n) * 10 ** rng.uniform(-4.0, -3.0)
    position = int(rng.uniform(0, 10) * BASE_RATE)
    while position < n:
        kind = rng.random()
        seconds = rng.uniform(0.5, 6.0)
        if kind < 0.75:
            speaker = rng.choice(list(PITCH_RANGES))
            event = voiced_stretch(rng, seconds, PITCH_RANGES[speaker]) * rng.uniform(0.05, 0.4)
        else:
            event = household_noise(rng, seconds) * rng.uniform(0.05, 0.3)
        end = min(n, position + len(event))
        audio[position:end] += event[: end - position]
        position = end + int(rng.exponential(8.0) * BASE_RATE)
    # Reverberation: a short decaying noise tail, as in a furnished room.
    tail = rng.standard_normal(int(0.08 * BASE_RATE)) * np.exp(-np.arange(int(0.08 * BASE_RATE)) / (0.02 * BASE_RATE))
    tail[0] = 1.0
    audio = np.convolve(audio, tail * 0.3, mode="full")[:n]
    return np.clip(audio / max(1.0, np.abs(audio).max() / 0.9), -1, 1).astype(np.float32)


def write_audio(path: Path, audio16k: np.ndarray, sample_rate: int, channels: int, subtype: str, rng: np.random.Generator) -> None:
    audio = audio16k if sample_rate == BASE_RATE else soxr.resample(audio16k, BASE_RATE, sample_rate)
    if channels == 2:  # the second microphone hears the room slightly differently
        audio = np.stack([audio, 0.8 * audio + 1e-4 * rng.standard_normal(len(audio)).astype(np.float32)], axis=1)
    audio = np.clip(audio, -1, 1)
    # Written in blocks: libsndfile's Vorbis encoder crashes on one very large write.
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype=subtype) as f:
        for start in range(0, len(audio), 32768):
            f.write(audio[start : start + 32768])


def make_corpus(output_dir, participants: int = 6, minutes: float = 3.0, seed: int = 0, formats=FORMATS) -> list[Path]:
    """Write the corpus; returns the file paths. Durations vary +-30 % around `minutes`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, file_number = [], 0
    for p in range(1, participants + 1):
        for r in range(1, 1 + int(rng.integers(1, 3))):
            extension, sample_rate, channels, subtype = formats[file_number % len(formats)]
            file_number += 1
            path = output_dir / f"P{p:02d}_rec{r}.{extension}"
            write_audio(path, recording(rng, minutes * rng.uniform(0.7, 1.3)), sample_rate, channels, subtype, rng)
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=3.0, help="typical length of one recording")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = make_corpus(args.output_dir, args.participants, args.minutes, args.seed)
    print(f"wrote {len(paths)} recordings of {args.participants} participants to {args.output_dir}")


if __name__ == "__main__":
    main()
