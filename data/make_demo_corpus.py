"""Build a small synthetic corpus that looks like day-long home recordings, offline, in seconds.

    python data/make_demo_corpus.py demo_data/audio [--participants 6] [--minutes 3] [--seed 0]
        [--domain target|source] [--segments_tsv segments.tsv]

Each participant gets one or two recordings of a few minutes. `--domain target` (the default, the
home recordings): far-field, mostly room noise and silence, with speech-like voiced stretches in
adult and child/infant pitch ranges and household noises (clatter, hum), under room reverberation.
`--domain source`: clean close-talk speech of one adult per participant over about 75 % of the
time, a faint noise floor, no reverberation and no household events (a read-speech corpus).
Files rotate through the formats users bring: 16 kHz mono WAV, 44.1 kHz stereo FLAC and 48 kHz
OGG Vorbis. File names start with the participant id (`P03_rec1.flac`), which the default
`--participant_regex` of data/prepare_manifest.py picks up. The same seed gives the same files.

`--segments_tsv` also writes what the generator placed where, one row per stretch: path (relative
to the TSV's folder), start, end (seconds in the written file; the reverberation tail runs ~0.1 s
past the end), label (`adult`, `child` for child and infant voices, `event` for household noise,
`silence` for a stretch of room noise drawn from a gap between the others), participant, and kind
(adult_male, adult_female, child, infant, hum, clatter, silence). It is what probe.py --segments reads.

    python data/make_demo_corpus.py --labelled_dir demo_data/labelled [--utterances 600]

writes a labelled set for finetune_ctc.py instead (or as well, with both arguments): a synthetic
alphabet where each character is a short sound of its own, spoken in short words by six "speakers"
with noise and varied speed, and `train.tsv` / `dev.tsv` (path, text, participant, start, end;
the dev speaker is not in train). A tiny model learns it on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.manifests import write_tsv  # noqa: E402

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


def household_noise(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, str]:
    n = int(seconds * BASE_RATE)
    t = np.arange(n) / BASE_RATE
    if rng.random() < 0.5:  # appliance hum
        return 0.2 * np.sin(2 * np.pi * rng.choice([50, 60]) * t) * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t)), "hum"
    clatter = rng.standard_normal(n) * np.exp(-t * rng.uniform(5, 30))  # a dish, a door
    return 0.8 * clatter, "clatter"


def audible_length(sound: np.ndarray) -> int:
    """Samples up to the end of the last 10 ms block louder than 5 % of the loudest block (RMS): a
    clatter dies away long before its stretch ends, and its segment should end with it."""
    blocks = np.sqrt(np.mean(np.pad(sound, (0, -len(sound) % 160)).reshape(-1, 160) ** 2, axis=1))
    loud = np.flatnonzero(blocks > 0.05 * blocks.max()) if len(blocks) else []
    return min(len(sound), 160 * (int(loud[-1]) + 1)) if len(loud) else 0


def recording(rng: np.random.Generator, minutes: float) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Room noise with speech and household events scattered over about 30 % of the time; returns the
    audio and the placed stretches (start sample, end sample, kind). The target domain: its random
    draws must stay as they are, or the same seed stops giving the same files."""
    n = int(minutes * 60 * BASE_RATE)
    brown = np.cumsum(rng.standard_normal(n)) * 1e-4
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # keep the rumble, drop the drift
    audio = brown + rng.standard_normal(n) * 10 ** rng.uniform(-4.0, -3.0)
    position, placed = int(rng.uniform(0, 10) * BASE_RATE), []
    while position < n:
        kind = rng.random()
        seconds = rng.uniform(0.5, 6.0)
        if kind < 0.75:
            speaker = rng.choice(list(PITCH_RANGES))
            event = voiced_stretch(rng, seconds, PITCH_RANGES[speaker]) * rng.uniform(0.05, 0.4)
        else:
            event, speaker = household_noise(rng, seconds)
            event = event * rng.uniform(0.05, 0.3)
        end = min(n, position + len(event))
        audio[position:end] += event[: end - position]
        placed.append((position, position + audible_length(event[: end - position]), str(speaker)))
        position = end + int(rng.exponential(8.0) * BASE_RATE)
    # Reverberation: a short decaying noise tail, as in a furnished room.
    tail = rng.standard_normal(int(0.08 * BASE_RATE)) * np.exp(-np.arange(int(0.08 * BASE_RATE)) / (0.02 * BASE_RATE))
    tail[0] = 1.0
    audio = np.convolve(audio, tail * 0.3, mode="full")[:n]
    return np.clip(audio / max(1.0, np.abs(audio).max() / 0.9), -1, 1).astype(np.float32), placed


def source_recording(rng: np.random.Generator, minutes: float) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Close-talk read speech: one adult (the participant) speaking over about 75 % of the time, short
    pauses, a faint microphone noise floor, no room, no household events. Returns audio and placements."""
    n = int(minutes * 60 * BASE_RATE)
    speaker = str(rng.choice(["adult_male", "adult_female"]))
    audio = rng.standard_normal(n) * 10 ** rng.uniform(-4.5, -3.5)
    position, placed = int(rng.uniform(0.2, 1.0) * BASE_RATE), []
    while position < n:
        stretch = voiced_stretch(rng, rng.uniform(1.5, 6.0), PITCH_RANGES[speaker]) * rng.uniform(0.3, 0.6)
        end = min(n, position + len(stretch))
        audio[position:end] += stretch[: end - position]
        placed.append((position, position + audible_length(stretch[: end - position]), speaker))
        position = end + int((0.2 + rng.exponential(0.8)) * BASE_RATE)
    return np.clip(audio / max(1.0, np.abs(audio).max() / 0.9), -1, 1).astype(np.float32), placed


DOMAINS = {"target": recording, "source": source_recording}
LABELS = {"adult_male": "adult", "adult_female": "adult", "child": "child", "infant": "child"}
LABELS |= {"hum": "event", "clatter": "event", "silence": "silence"}
SEGMENT_COLUMNS = ["path", "start", "end", "label", "participant", "kind"]
# Room noise just after a stretch still holds its reverberation tail (80 ms); a silence stretch keeps clear.
SILENCE_MARGIN = 0.15
MIN_SEGMENT_SECONDS = 0.2


def silence_stretches(rng: np.random.Generator, placed: list, n: int) -> list[tuple[int, int, str]]:
    """One stretch of 0.5-4 s of room noise (no placed sound) inside each gap long enough to hold it."""
    margin, out = int(SILENCE_MARGIN * BASE_RATE), []
    edges = [(-margin, -margin)] + sorted(placed) + [(n + margin, n + margin)]
    for (_, gap_start, *_), (gap_end, *_) in zip(edges[:-1], edges[1:]):
        first, last = gap_start + margin, gap_end - margin
        if last - first < 0.5 * BASE_RATE:
            continue
        length = int(rng.uniform(0.5, min(4.0, (last - first) / BASE_RATE)) * BASE_RATE)
        start = int(rng.integers(first, last - length + 1))
        out.append((start, start + length, "silence"))
    return out


def segment_rows(path: Path, tsv_dir: Path, participant: str, stretches: list) -> list[dict]:
    relative = os.path.relpath(path.resolve(), tsv_dir.resolve())
    return [
        {
            "path": relative,
            "start": f"{start / BASE_RATE:.3f}",
            "end": f"{end / BASE_RATE:.3f}",
            "label": LABELS[kind],
            "participant": participant,
            "kind": kind,
        }
        for start, end, kind in sorted(stretches)
        if end - start >= MIN_SEGMENT_SECONDS * BASE_RATE
    ]


def write_audio(
    path: Path, audio16k: np.ndarray, sample_rate: int, channels: int, subtype: str, rng: np.random.Generator
) -> None:
    audio = audio16k if sample_rate == BASE_RATE else soxr.resample(audio16k, BASE_RATE, sample_rate)
    if channels == 2:  # the second microphone hears the room slightly differently
        audio = np.stack([audio, 0.8 * audio + 1e-4 * rng.standard_normal(len(audio)).astype(np.float32)], axis=1)
    audio = np.clip(audio, -1, 1)
    # Written in blocks: libsndfile's Vorbis encoder crashes on one very large write.
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype=subtype) as f:
        for start in range(0, len(audio), 32768):
            f.write(audio[start : start + 32768])


def make_corpus(
    output_dir,
    participants: int = 6,
    minutes: float = 3.0,
    seed: int = 0,
    formats=FORMATS,
    domain: str = "target",
    segments_tsv=None,
) -> list[Path]:
    """Write the corpus (and with `segments_tsv`, its segments); returns the file paths. Durations
    vary +-30 % around `minutes`."""
    if domain not in DOMAINS:
        raise ValueError(f"--domain must be one of {sorted(DOMAINS)}, not {domain!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Silence stretches are drawn from a generator of their own so the audio does not depend on them.
    silence_rng = np.random.default_rng([seed, 1])
    tsv_dir = Path(segments_tsv).parent if segments_tsv else output_dir
    paths, file_number, rows = [], 0, []
    for p in range(1, participants + 1):
        for r in range(1, 1 + int(rng.integers(1, 3))):
            extension, sample_rate, channels, subtype = formats[file_number % len(formats)]
            file_number += 1
            path = output_dir / f"P{p:02d}_rec{r}.{extension}"
            audio, placed = DOMAINS[domain](rng, minutes * rng.uniform(0.7, 1.3))
            write_audio(path, audio, sample_rate, channels, subtype, rng)
            paths.append(path)
            stretches = placed + silence_stretches(silence_rng, placed, len(audio))
            rows += segment_rows(path, tsv_dir, f"P{p:02d}", stretches)
    if segments_tsv:
        write_tsv(segments_tsv, rows, SEGMENT_COLUMNS)
    return paths


# The labelled set's "alphabet": every character is a ~90 ms sound of its own (4-5 frames of a
# wav2vec2 model): low, middle and high tones, steady or pulsed, a rising and a falling chirp, and
# a band of hiss, so that they differ across the whole band. (start Hz, end Hz, pulses per second);
# None is the hiss.
CHARACTER_SOUNDS = {
    "a": (400, 400, 0),
    "e": (2000, 2000, 0),
    "i": (5000, 5000, 0),
    "o": (400, 400, 50),
    "k": (5000, 5000, 50),
    "m": (400, 5000, 0),
    "d": (5000, 400, 0),
    "s": None,
}
LABELLED_FORMATS = [("wav", 16_000, 1, "PCM_16"), ("flac", 44_100, 2, "PCM_16"), ("wav", 22_050, 1, "PCM_16")]
LABELLED_COLUMNS = ["path", "text", "participant", "start", "end"]


def character_sound(rng: np.random.Generator, char: str, speed: float, pitch: float) -> np.ndarray:
    n = int(0.09 / speed * BASE_RATE * rng.uniform(0.9, 1.1))
    t = np.arange(n) / BASE_RATE
    if CHARACTER_SOUNDS[char] is None:
        hiss = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / BASE_RATE)
        hiss[(freqs < 3000) | (freqs > 6000)] = 0
        sound = np.fft.irfft(hiss, n)
        sound /= np.abs(sound).max() + 1e-9
    else:
        start_hz, end_hz, pulses = CHARACTER_SOUNDS[char]
        f0, f1 = (f * pitch * rng.uniform(0.97, 1.03) for f in (start_hz, end_hz))
        frequency = f0 + (f1 - f0) * t / t[-1]
        sound = np.sin(2 * np.pi * np.cumsum(frequency) / BASE_RATE + rng.uniform(0, 2 * np.pi))
        if pulses:
            sound *= np.sin(np.pi * pulses * t) ** 2
    ramp = min(n // 4, int(0.01 * BASE_RATE))
    envelope = np.ones(n)
    envelope[:ramp], envelope[n - ramp :] = np.linspace(0, 1, ramp), np.linspace(1, 0, ramp)
    return sound * envelope * rng.uniform(0.5, 1.0)


def random_transcript(rng: np.random.Generator, alphabet: str) -> str:
    """One or two words of one to three characters, no character twice in a row."""
    words = []
    for _ in range(int(rng.integers(1, 3))):
        target = int(rng.integers(1, 4))
        word = str(rng.choice(list(alphabet)))
        while len(word) < target:
            word += str(rng.choice([c for c in alphabet if c != word[-1]]))
        words.append(word)
    return " ".join(words)


def speak(rng: np.random.Generator, text: str, pitch: float, noise_level: float) -> np.ndarray:
    """The utterance of `text` with a speaking rate of its own, pauses between words and room noise."""
    speed = rng.uniform(0.8, 1.25)
    parts = [np.zeros(int(rng.uniform(0.03, 0.08) * BASE_RATE))]
    for i, char in enumerate(text):
        if char == " ":
            parts.append(np.zeros(int(rng.uniform(0.12, 0.18) / speed * BASE_RATE)))
            continue
        if i and text[i - 1] != " ":
            parts.append(np.zeros(int(rng.uniform(0.03, 0.05) * BASE_RATE)))
        parts.append(character_sound(rng, char, speed, pitch))
    parts.append(np.zeros(int(rng.uniform(0.03, 0.08) * BASE_RATE)))
    audio = 0.3 * np.concatenate(parts)
    return audio + noise_level * rng.standard_normal(len(audio))


def make_labelled_set(
    output_dir,
    num_utterances: int = 600,
    seed: int = 0,
    num_speakers: int = 6,
    alphabet: str = "".join(CHARACTER_SOUNDS),
) -> dict:
    """Write the labelled set: audio in output_dir/audio, output_dir/train.tsv and dev.tsv.

    Six speakers (`S01`...) with pitches of their own; the last one is the dev set. About two in
    three utterances are files of their own (16 kHz WAV, 44.1 kHz stereo FLAC, 22.05 kHz WAV), the
    rest are segments (`start`, `end` in seconds) of one long recording per speaker. Returns the
    number of utterances per split.
    """
    unknown = set(alphabet) - set(CHARACTER_SOUNDS)
    if unknown:
        raise ValueError(f"alphabet characters without a sound: {sorted(unknown)}")
    output_dir = Path(output_dir)
    (output_dir / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {"train": [], "dev": []}
    per_speaker = np.diff(np.linspace(0, num_utterances, num_speakers + 1).round().astype(int))
    for s, count in enumerate(per_speaker, start=1):
        speaker, split = f"S{s:02d}", "dev" if s == num_speakers else "train"
        pitch, noise_level = rng.uniform(0.92, 1.08), 10 ** rng.uniform(-2.5, -1.7)
        session, session_rows, position = [], [], 0.0
        for u in range(int(count)):
            text = random_transcript(rng, alphabet)
            audio = speak(rng, text, pitch, noise_level).astype(np.float32)
            if rng.random() < 2 / 3:
                extension, sample_rate, channels, subtype = LABELLED_FORMATS[u % len(LABELLED_FORMATS)]
                name = f"audio/{speaker}_utt{u:03d}.{extension}"
                write_audio(output_dir / name, audio, sample_rate, channels, subtype, rng)
                rows[split].append({"path": name, "text": text, "participant": speaker, "start": "", "end": ""})
            else:  # a segment of the speaker's long recording, with room noise in between
                gap = noise_level * rng.standard_normal(int(rng.uniform(0.5, 1.5) * BASE_RATE))
                session += [gap, audio]
                start = position + len(gap) / BASE_RATE
                position = start + len(audio) / BASE_RATE
                session_rows.append(
                    {"text": text, "participant": speaker, "start": f"{start:.4f}", "end": f"{position:.4f}"}
                )
        if session_rows:
            name = f"audio/{speaker}_session.flac"
            session.append(noise_level * rng.standard_normal(BASE_RATE))
            write_audio(output_dir / name, np.concatenate(session).astype(np.float32), BASE_RATE, 1, "PCM_16", rng)
            rows[split] += [{"path": name, **row} for row in session_rows]
    for split, split_rows in rows.items():
        write_tsv(output_dir / f"{split}.tsv", split_rows, LABELLED_COLUMNS)
    return {split: len(split_rows) for split, split_rows in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", help="where the unlabelled long recordings go")
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=3.0, help="typical length of one recording")
    parser.add_argument("--labelled_dir", help="also (or only) write the labelled set for finetune_ctc.py here")
    parser.add_argument("--utterances", type=int, default=600, help="utterances in the labelled set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="target", help="home recordings or clean speech")
    parser.add_argument("--segments_tsv", help="also write the placed segments (adult, child, event, silence) here")
    args = parser.parse_args()
    if not args.output_dir and not args.labelled_dir:
        parser.error("give an output_dir (unlabelled recordings), --labelled_dir (labelled set), or both")
    if args.segments_tsv and not args.output_dir:
        parser.error("--segments_tsv describes the recordings of output_dir: give an output_dir")
    if args.output_dir:
        paths = make_corpus(
            args.output_dir,
            args.participants,
            args.minutes,
            args.seed,
            domain=args.domain,
            segments_tsv=args.segments_tsv,
        )
        print(
            f"wrote {len(paths)} {args.domain}-domain recordings of {args.participants} participants to {args.output_dir}"
        )
        if args.segments_tsv:
            print(f"wrote their segments to {args.segments_tsv}")
    if args.labelled_dir:
        counts = make_labelled_set(args.labelled_dir, args.utterances, args.seed)
        print(
            f"wrote a labelled set of {counts['train']} train and {counts['dev']} dev utterances to {args.labelled_dir}"
        )


if __name__ == "__main__":
    main()
