"""The labelled utterances of CTC fine-tuning: manifests (path, text, optional start/end and
participant; rows of a Hugging Face dataset come from utils.dataset_utterances), their durations
from file headers, normalised transcripts, the dev split by participant, and the Dataset and
Collator that read and pad them.

An utterance is a dict: path, text, start/end in seconds (None for a whole file), participant,
where (the manifest line, for error messages), duration; rows of a dataset also carry split and
index (and, from a streamed split, their audio). Unreadable files are returned apart (with a reason) or, during training, reported by the
Dataset instead of raised: they are skipped and counted, never fatal.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from utils.audio import load_audio, normalize_waveform, read_resampled, target_length
from utils.hf_datasets import open_audio_value
from utils.manifests import DEFAULT_PARTICIPANT_REGEX, read_tsv, split_by_participant
from utils.numerics import nonfinite_samples
from utils.vocabulary import normalize_text

if TYPE_CHECKING:
    from utils.ctc_arguments import DataArguments


def read_utterance_manifest(path) -> list[dict]:
    """Rows of a manifest: path, text, start/end in seconds (None for a whole file), participant."""
    rows = read_tsv(path, ["path", "text"])
    for line, row in enumerate(rows, start=2):
        row["where"] = f"{path}, line {line}"
        for key in ("start", "end"):
            value = (row.get(key) or "").strip()
            try:
                row[key] = float(value) if value else None
            except ValueError:
                raise ValueError(f"{row['where']}: {key} {value!r} is not a number of seconds") from None
        if row["end"] is not None and row["end"] <= (row["start"] or 0.0):
            raise ValueError(
                f"{row['where']}: end {row['end']} is not after start {row['start'] or 0.0} ({row['path']})"
            )
        row["participant"] = (row.get("participant") or "").strip() or None
        row["text"] = row["text"] or ""
    return rows


def measure_durations(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Attach each utterance's duration from the file header (one header read per file).

    Returns (readable rows, unreadable rows with a reason). A segment that starts past the end
    of its file is a manifest error, not a bad file, and raises.
    """
    headers: dict[str, tuple[float, str | None]] = {}
    readable, unreadable = [], []
    for row in rows:
        if row["path"] not in headers:
            try:
                info = sf.info(row["path"])
                headers[row["path"]] = (info.frames / info.samplerate, None if info.frames > 0 else "zero length")
            except Exception as error:  # libsndfile raises several types; all mean the same here
                headers[row["path"]] = (0.0, f"unreadable: {str(error).strip() or type(error).__name__}")
        file_seconds, problem = headers[row["path"]]
        if problem:
            unreadable.append({**row, "reason": problem})
            continue
        start = row["start"] or 0.0
        if start >= file_seconds:
            raise ValueError(
                f"{row['where']}: start {start} s is past the end of {row['path']} ({file_seconds:.3f} s)"
            )
        end = file_seconds if row["end"] is None else min(row["end"], file_seconds)
        readable.append({**row, "duration": end - start})
    return readable, unreadable


def check_transcripts(rows: list[dict], chars_to_ignore: str, lowercase: bool, word_separators: str) -> None:
    """Normalise every transcript in place; an empty one is an error that names its line."""
    for row in rows:
        if not row["text"].strip():
            raise ValueError(f"{row['where']}: empty transcript for {row['path']}")
        normalized = normalize_text(row["text"], chars_to_ignore, lowercase, word_separators)
        if not normalized:
            raise ValueError(
                f"{row['where']}: transcript {row['text']!r} of {row['path']} is empty once --chars_to_ignore is removed"
            )
        row["text"] = normalized


def fill_participants(rows: list[dict]) -> None:
    """Rows without a participant get one from the file name (as data/prepare_manifest.py does),
    or the file name itself, so that segments of one recording never straddle the split."""
    pattern = re.compile(DEFAULT_PARTICIPANT_REGEX)
    for row in rows:
        if not row["participant"]:
            match = pattern.search(Path(row["path"]).name)
            row["participant"] = match.group(1) if match else Path(row["path"]).name


def manifest_utterances(data: DataArguments, seed: int) -> tuple[list[dict], list[dict], list[dict], str]:
    """(train rows, dev rows, unreadable rows, how dev was chosen) from the manifests."""
    if not data.train_manifest:
        raise ValueError("give --train_manifest (TSV with path and text) or --dataset_name")
    train = read_utterance_manifest(data.train_manifest)
    if not train:
        raise ValueError(f"train manifest {data.train_manifest} has no rows")
    dev = read_utterance_manifest(data.dev_manifest) if data.dev_manifest else []
    if data.dev_manifest and not dev:
        raise ValueError(f"dev manifest {data.dev_manifest} has no rows")
    for rows in (train, dev):
        check_transcripts(rows, data.chars_to_ignore, data.do_lower_case, data.word_separators)
    train, bad_train = measure_durations(train)
    dev, bad_dev = measure_durations(dev)
    how = f"--dev_manifest {data.dev_manifest}"
    if not data.dev_manifest and data.dev_fraction > 0:
        fill_participants(train)
        if len({r["participant"] for r in train}) < 2:
            raise ValueError(
                f"{data.train_manifest}: cannot split off a dev set by participant with a single participant; "
                "give --dev_manifest, or --dev_fraction 0 to train without one"
            )
        train, dev = split_by_participant(train, data.dev_fraction, seed)
        how = f"{len({r['participant'] for r in dev})} participant(s) of {data.train_manifest} ({data.dev_fraction:.0%} of the hours requested)"
    elif not data.dev_manifest:
        how = "none (--dev_fraction 0)"
    if not train:
        raise ValueError(
            f"no readable training utterance in {data.train_manifest}; first problem: {bad_train[0]['path']}: {bad_train[0]['reason']}"
        )
    return train, dev, bad_train + bad_dev, how


def read_utterance(row: dict, dataset_splits: dict | None = None, audio_column: str = "audio") -> np.ndarray:
    """16 kHz mono float32 samples of one utterance: a seeking read of its region of the file."""
    if "index" in row:
        audio = row["audio"] if "audio" in row else dataset_splits[row["split"]][row["index"]][audio_column]
        with open_audio_value(audio) as f:
            return read_resampled(f, 0, target_length(f.frames, f.samplerate))
    return load_audio(row["path"], row["start"] or 0.0, row["end"])


class UtteranceDataset(torch.utils.data.Dataset):
    """Utterances read on demand. A read that fails returns the error instead of raising, so the
    training run skips and counts the file rather than dying hours in."""

    def __init__(
        self, rows: list[dict], normalize: bool, dataset_splits: dict | None = None, audio_column: str = "audio"
    ):
        self.rows, self.normalize = rows, normalize
        self.dataset_splits, self.audio_column = dataset_splits, audio_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        try:
            audio = read_utterance(row, self.dataset_splits, self.audio_column)
        except Exception as error:
            return {"index": index, "error": (row["path"], str(error).strip() or type(error).__name__)}
        nonfinite = nonfinite_samples(audio, row.get("start") or 0.0)  # skipped and counted like an unreadable file
        if nonfinite:
            return {"index": index, "error": (row["path"], nonfinite)}
        if self.normalize:
            audio = normalize_waveform(audio)
        return {"index": index, "input_values": audio, "labels": row["labels"]}


class Collator:
    """Pads a batch with zeros. An attention mask goes with it only for models whose feature
    extractor asks for one (wav2vec2-base style models were pretrained on zero padding without a
    mask; large-lv60/robust style models need the mask). `input_lengths` always goes along: the CTC
    loss, masks and decoding use the real lengths either way."""

    def __init__(self, use_attention_mask: bool, min_samples: int):
        self.use_attention_mask, self.min_samples = use_attention_mask, min_samples

    def __call__(self, items: list[dict]) -> dict:
        failed = [item["error"] for item in items if "error" in item]
        items = [item for item in items if "error" not in item]
        lengths = [len(item["input_values"]) for item in items]
        width = max([self.min_samples, *lengths])
        input_values = torch.zeros(len(items), width)
        labels = torch.full((len(items), max([1, *(len(item["labels"]) for item in items)])), -100, dtype=torch.long)
        for row, item in enumerate(items):
            input_values[row, : lengths[row]] = torch.from_numpy(item["input_values"])
            labels[row, : len(item["labels"])] = torch.tensor(item["labels"], dtype=torch.long)
        batch = {
            "input_values": input_values,
            "input_lengths": torch.tensor(lengths, dtype=torch.long),
            "labels": labels,
            "indices": [item["index"] for item in items],
            "failed": failed,
        }
        if self.use_attention_mask:
            batch["attention_mask"] = (torch.arange(width)[None] < batch["input_lengths"][:, None]).long()
        return batch
