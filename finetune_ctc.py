"""CTC fine-tuning of a wav2vec 2.0 encoder for speech recognition, with WER/CER evaluation.

    accelerate launch finetune_ctc.py [recipe.yaml] --model_name_or_path runs/home-pretrained \\
        --train_manifest labelled/train.tsv --eval_manifest labelled/dev.tsv --output_dir runs/home-ctc

    python finetune_ctc.py transcribe --model_name_or_path runs/home-ctc recording.flac other.wav

The encoder comes from `--model_name_or_path`: a pretrain.py output folder, any local or hub
wav2vec2 checkpoint (`facebook/wav2vec2-base`, `facebook/wav2vec2-large-robust`, ...), or a random
init from `--config_name`; a local folder is a model to start from, never mistaken for a checkpoint
to resume. A CTC head sized to the character vocabulary goes on top, its bias set so that the blank
starts out likely (`--initial_blank_probability`).

Data: TSV manifests with `path` and `text`, optionally `start` and `end` (seconds: the utterance is
a segment of a longer recording, read by seeking) and `participant`; relative paths are relative to
the manifest. With only `--train_manifest`, whole participants are split off for evaluation. Or a
Hugging Face dataset (`--dataset_name`), its audio decoded here with soundfile rather than by
datasets (which needs torchcodec). Any sample rate or channel count is read as 16 kHz mono.
Utterances longer than `--max_duration_seconds` are trained on in batches of their own (or left
out with `--long_utterances skip`), counted and reported either way; unreadable files are skipped
and counted, never fatal.

Batches group utterances of similar length (less padding) and are a pure function of (seed,
epoch), so a run resumed from a checkpoint continues exactly. The CTC loss is summed over the whole
update (all accumulation micro-steps on all processes) and divided by its number of target
characters. Every `--eval_steps` the dev set is decoded greedily and scored with jiwer; the model
with the lowest dev WER is the one left in OUTPUT_DIR, with its processor (vocab.json included),
eval_results.json, train_log.jsonl and a model card (README.md).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, Wav2Vec2Processor, get_scheduler
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from utils.audio import (
    TARGET_SAMPLE_RATE,
    conv_frames,
    conv_geometry,
    load_audio,
    normalize_waveform,
    read_resampled,
    target_length,
)
from utils.cards import format_number, hardware_description, hub_base_model, push_folder_to_hub, software_versions
from utils.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.manifests import DEFAULT_PARTICIPANT_REGEX, read_tsv, split_by_participant, write_tsv
from utils.training import (
    StopSignal,
    TrainingArguments,
    append_jsonl,
    end_processes,
    gather_unreadable,
    load_feature_extractor,
    make_accelerator,
    make_loader,
    optimizer_param_groups,
    parse_args_with_recipe,
    read_jsonl,
    start_train_log,
)

logger = logging.getLogger("finetune_ctc")

PAD, UNK, WORD_DELIMITER = "[PAD]", "[UNK]", "|"
# Punctuation that carries no sound. '|' is the tokenizer's word delimiter (and a common stand-in
# for the Devanagari danda), so it must not stay in a transcript.
DEFAULT_CHARS_TO_IGNORE = ',?.!-;:"“”«»%…¿¡()[]{}|।॥�'
# Typographic apostrophes are the same letter as the typed one: "don’t" and "don't" must not differ.
APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'"})
MANIFEST_COLUMNS = ["path", "text", "participant", "start", "end"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="facebook/wav2vec2-base",
        metadata={
            "help": "Encoder to fine-tune: a pretrain.py output folder, a hub id or any local wav2vec2 checkpoint."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Random init from this config folder instead (tests, benchmarks); model_name_or_path is then not read."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reuse this Wav2Vec2CTCTokenizer (e.g. an earlier fine-tuning output) instead of building the vocabulary from the training transcripts."
        },
    )
    new_ctc_head: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh CTC head even if the model already has one (for a model fine-tuned with another vocabulary)."
        },
    )
    freeze_feature_encoder: bool = field(
        default=True,
        metadata={"help": "Keep the CNN feature encoder fixed (the usual choice for a pretrained encoder)."},
    )
    attention_dropout: float = field(default=0.1)
    activation_dropout: float = field(default=0.0)
    hidden_dropout: float = field(default=0.1)
    feat_proj_dropout: float = field(default=0.0)
    final_dropout: float = field(default=0.0, metadata={"help": "Dropout before the CTC head."})
    layerdrop: float = field(
        default=0.05, metadata={"help": "Probability of skipping a whole transformer layer in a training step."}
    )
    mask_time_prob: float = field(
        default=0.05,
        metadata={"help": "SpecAugment: share of frames that start a masked span (only real frames, never padding)."},
    )
    mask_time_length: int = field(default=10)
    mask_feature_prob: float = field(default=0.0)
    mask_feature_length: int = field(default=10)
    initial_blank_probability: float = field(
        default=0.8,
        metadata={
            "help": "A new CTC head starts out giving the blank this probability (through its bias). "
            "Starting uniform, the encoder first collapses to all-blank output and can stay there for hundreds of steps. 0 keeps a zero bias."
        },
    )
    ctc_zero_infinity: bool = field(
        default=True,
        metadata={
            "help": "Zero the loss of utterances too short for their transcript instead of letting inf/nan into the gradients."
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2 or flex_attention."}
    )


@dataclass
class DataArguments:
    train_manifest: str | None = field(
        default=None, metadata={"help": "TSV with path and text (optional start, end, participant)."}
    )
    eval_manifest: str | None = field(
        default=None, metadata={"help": "Dev TSV; without it, whole participants of the train manifest are split off."}
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Without --eval_manifest: share of the train audio hours (whole participants) used for dev; 0 for no dev set."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Instead of manifests: a Hugging Face dataset (hub id or local folder)."}
    )
    dataset_config_name: str | None = field(default=None)
    train_split_name: str = field(default="train")
    eval_split_name: str = field(default="validation")
    audio_column_name: str = field(default="audio")
    text_column_name: str = field(default="text")
    chars_to_ignore: str = field(
        default=DEFAULT_CHARS_TO_IGNORE,
        metadata={"help": "Characters deleted from transcripts (all of the string's characters)."},
    )
    do_lower_case: bool = field(
        default=True,
        metadata={"help": "Lowercase transcripts (scripts without case, such as Devanagari, are unaffected)."},
    )
    max_duration_seconds: float = field(
        default=20.0,
        metadata={
            "help": "Training utterances longer than this are counted, reported and handled by --long_utterances."
        },
    )
    long_utterances: str = field(
        default="alone",
        metadata={
            "help": "'alone': train on them in batches of their own (memory of one long utterance); 'skip': leave them out of training. Dev keeps them either way."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch utterances of similar length (less padding); off gives plain shuffled batches."},
    )
    eval_examples_to_log: int = field(
        default=3, metadata={"help": "Reference/hypothesis pairs printed at each evaluation."}
    )


@dataclass
class CTCTrainingArguments(TrainingArguments):
    output_dir: str = field(
        default="runs/wav2vec2-ctc", metadata={"help": "Model, processor, checkpoints, logs and model card go here."}
    )
    max_train_steps: int = field(default=10000, metadata={"help": "Optimizer updates to run."})
    learning_rate: float = field(default=1e-4)
    warmup_steps: int = field(default=500)


# ----------------------------------------------------------------------------- text and vocabulary


def normalize_text(text: str, chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE, lowercase: bool = True) -> str:
    """NFC, lowercase, ignored characters deleted, whitespace folded to single spaces.

    NFC keeps Devanagari intact: vowel signs, virama and nukta stay as they are in composed text
    (precomposed nukta letters such as U+0958 become letter + nukta, their canonical NFC form).
    """
    text = unicodedata.normalize("NFC", text.lower() if lowercase else text).translate(APOSTROPHES)
    ignore = set(unicodedata.normalize("NFC", chars_to_ignore))
    if ignore:
        text = "".join(c for c in text if c not in ignore)
    return " ".join(text.split())


def build_vocabulary(texts) -> dict[str, int]:
    """Every character of the training transcripts, '|' for the space, plus [UNK] and [PAD].
    [PAD] is id 0 and doubles as the CTC blank."""
    characters = sorted(set("".join(texts)) - {" "})
    vocab = {PAD: 0, UNK: 1, WORD_DELIMITER: 2}
    for char in characters:
        vocab.setdefault(char, len(vocab))
    return vocab


def make_tokenizer(vocab: dict[str, int]) -> Wav2Vec2CTCTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=UNK,
            pad_token=PAD,
            word_delimiter_token=WORD_DELIMITER,
            bos_token=None,
            eos_token=None,
            do_lower_case=False,
        )


def uncovered_characters(tokenizer, texts) -> dict[str, int]:
    """Characters of `texts` the tokenizer would turn into [UNK], with their counts."""
    vocab = tokenizer.get_vocab()
    missing: dict[str, int] = {}
    for text in texts:
        for char in text:
            if char != " " and char not in vocab:
                missing[char] = missing.get(char, 0) + 1
    return missing


def describe_characters(counts: dict[str, int], limit: int = 20) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{c!r} (U+{ord(c):04X}, {n}x)" for c, n in items)


# ----------------------------------------------------------------------------- utterances


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


def check_transcripts(rows: list[dict], chars_to_ignore: str, lowercase: bool) -> None:
    """Normalise every transcript in place; an empty one is an error that names its line."""
    for row in rows:
        if not row["text"].strip():
            raise ValueError(f"{row['where']}: empty transcript for {row['path']}")
        normalized = normalize_text(row["text"], chars_to_ignore, lowercase)
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
    dev = read_utterance_manifest(data.eval_manifest) if data.eval_manifest else []
    if data.eval_manifest and not dev:
        raise ValueError(f"eval manifest {data.eval_manifest} has no rows")
    for rows in (train, dev):
        check_transcripts(rows, data.chars_to_ignore, data.do_lower_case)
    train, bad_train = measure_durations(train)
    dev, bad_dev = measure_durations(dev)
    how = f"--eval_manifest {data.eval_manifest}"
    if not data.eval_manifest and data.eval_fraction > 0:
        fill_participants(train)
        if len({r["participant"] for r in train}) < 2:
            raise ValueError(
                f"{data.train_manifest}: cannot split off a dev set by participant with a single participant; "
                "give --eval_manifest, or --eval_fraction 0 to train without one"
            )
        train, dev = split_by_participant(train, data.eval_fraction, seed)
        how = f"{len({r['participant'] for r in dev})} participant(s) of {data.train_manifest} ({data.eval_fraction:.0%} of the hours requested)"
    elif not data.eval_manifest:
        how = "none (--eval_fraction 0)"
    if not train:
        raise ValueError(
            f"no readable training utterance in {data.train_manifest}; first problem: {bad_train[0]['path']}: {bad_train[0]['reason']}"
        )
    return train, dev, bad_train + bad_dev, how


def dataset_utterances(data: DataArguments):
    """(train rows, dev rows, unreadable rows, how dev was chosen, {split: dataset}) from a HF dataset.

    The audio column is cast to undecoded bytes/paths: decoding happens here with soundfile
    (datasets' own decoding needs torchcodec, which pins torch versions).
    """
    from datasets import Audio, load_dataset

    splits = {}
    for name in (data.train_split_name, data.eval_split_name):
        try:
            split = load_dataset(data.dataset_name, data.dataset_config_name, split=name)
        except ValueError as error:
            raise ValueError(
                f"--dataset_name {data.dataset_name}: cannot load split {name!r} ({error}); set --train_split_name/--eval_split_name"
            ) from None
        for column, flag in (
            (data.audio_column_name, "--audio_column_name"),
            (data.text_column_name, "--text_column_name"),
        ):
            if column not in split.column_names:
                raise ValueError(
                    f"--dataset_name {data.dataset_name} split {name!r} has no column {column!r} ({flag}); it has {split.column_names}"
                )
        if isinstance(split.features[data.audio_column_name], Audio):
            split = split.cast_column(data.audio_column_name, Audio(decode=False))
        splits[name] = split
    rows_by_split, unreadable = {}, []
    for name, split in splits.items():
        rows = []
        texts = list(split[data.text_column_name])
        audio_only = split.select_columns([data.audio_column_name])
        splits[name] = audio_only  # what the DataLoader workers read from
        values = (value for chunk in audio_only.iter(batch_size=256) for value in chunk[data.audio_column_name])
        for index, audio in enumerate(values):
            where = f"--dataset_name {data.dataset_name} split {name!r}, row {index}"
            label = (audio.get("path") if isinstance(audio, dict) else audio) or f"{name}[{index}]"
            row = {
                "path": str(label),
                "where": where,
                "text": texts[index] or "",
                "start": None,
                "end": None,
                "participant": None,
                "split": name,
                "index": index,
            }
            try:
                with open_dataset_audio(audio) as f:
                    row["duration"] = f.frames / f.samplerate
                rows.append(row)
            except Exception as error:
                unreadable.append({**row, "reason": f"unreadable: {str(error).strip() or type(error).__name__}"})
        check_transcripts(rows, data.chars_to_ignore, data.do_lower_case)
        rows_by_split[name] = rows
    how = f"--dataset_name {data.dataset_name} split {data.eval_split_name!r}"
    return rows_by_split[data.train_split_name], rows_by_split[data.eval_split_name], unreadable, how, splits


def open_dataset_audio(audio) -> sf.SoundFile:
    """A datasets audio value ({'bytes', 'path'} or a path) as an open SoundFile."""
    if isinstance(audio, dict):
        if audio.get("bytes"):
            return sf.SoundFile(io.BytesIO(audio["bytes"]))
        audio = audio.get("path")
    if not audio:
        raise ValueError("no audio bytes and no path")
    return sf.SoundFile(str(audio))


def read_utterance(row: dict, dataset_splits: dict | None = None, audio_column: str = "audio") -> np.ndarray:
    """16 kHz mono float32 samples of one utterance: a seeking read of its region of the file."""
    if "index" in row:
        audio = dataset_splits[row["split"]][row["index"]][audio_column]
        with open_dataset_audio(audio) as f:
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


def plan_batches(
    durations,
    batch_size: int,
    seed: int,
    epoch: int,
    max_duration: float,
    group_by_length: bool = True,
    bucket_batches: int = 50,
) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch).

    Shuffled, then sorted by duration inside buckets of `bucket_batches` batches, so a batch holds
    utterances of similar length while the epoch order stays random. Utterances longer than
    `max_duration` get batches of their own. The batch with the longest utterance comes first: an
    out-of-memory error then shows in the first step, not hours in.
    """
    durations = np.asarray(durations, dtype=np.float64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(durations))
    long = order[durations[order] > max_duration]
    normal = order[durations[order] <= max_duration]
    batches = []
    bucket = batch_size * bucket_batches if group_by_length else batch_size
    for start in range(0, len(normal), bucket):
        chunk = normal[start : start + bucket]
        if group_by_length:
            chunk = chunk[np.argsort(-durations[chunk], kind="stable")]
        batches += [chunk[k : k + batch_size].tolist() for k in range(0, len(chunk), batch_size)]
    batches += [[int(i)] for i in long]
    batches = [batches[k] for k in rng.permutation(len(batches))]
    if batches:
        longest = max(range(len(batches)), key=lambda k: durations[batches[k]].max())
        batches.insert(0, batches.pop(longest))
    return batches


class BatchPlan:
    """This process's share of every epoch's batches (process r of R takes batches r, r+R, ...;
    the few batches that do not fill a round are left for the next epoch's shuffle)."""

    def __init__(self, durations, batch_size, seed, max_duration, group_by_length, rank=0, world_size=1):
        self.durations, self.batch_size, self.seed = durations, batch_size, seed
        self.max_duration, self.group_by_length = max_duration, group_by_length
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(self.local_batches(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set makes fewer batches ({len(durations)} utterances, batch size {batch_size}) than there are processes ({world_size})"
            )

    def local_batches(self, epoch: int) -> list[list[int]]:
        batches = plan_batches(
            self.durations, self.batch_size, self.seed, epoch, self.max_duration, self.group_by_length
        )
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def iterate(self, epoch: int = 0, batch: int = 0):
        """(epoch, batch in epoch, utterance indices) forever, from the given position on."""
        while True:
            for k, indices in enumerate(self.local_batches(epoch)[batch:], start=batch):
                yield epoch, k, indices
            epoch, batch = epoch + 1, 0


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan, epoch: int, batch: int):
        self.plan, self.epoch, self.batch = plan, epoch, batch

    def __iter__(self):
        for _, _, indices in self.plan.iterate(self.epoch, self.batch):
            yield indices


# ----------------------------------------------------------------------------- model helpers


def samples_for_frames(config, frames: int) -> int:
    """Fewest input samples for which the CNN feature encoder yields `frames` frames."""
    receptive_field, stride = conv_geometry(config)
    return receptive_field + stride * (max(frames, 1) - 1)


def ctc_loss_sum(logits, frame_lengths, labels, blank: int, zero_infinity: bool) -> torch.Tensor:
    """The CTC loss summed over the batch, over the real frames of each utterance only."""
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    target_mask = labels >= 0
    # cuDNN's CTC kernel only takes int32 targets on the CPU and short labels; the native one takes anything.
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(
            log_probs,
            labels.masked_select(target_mask),
            frame_lengths,
            target_mask.sum(-1),
            blank=blank,
            reduction="sum",
            zero_infinity=zero_infinity,
        )


def blank_bias(probability: float, vocab_size: int) -> float:
    """The blank's output bias (all others 0) that gives it `probability` when the rest of the
    logits are equal, as they are for a freshly initialised head."""
    return math.log(probability * (vocab_size - 1) / (1 - probability))


def min_frames_for(label_ids: list[int]) -> int:
    """CTC needs a frame per label plus a blank between two equal labels."""
    return len(label_ids) + sum(1 for a, b in zip(label_ids, label_ids[1:]) if a == b)


def greedy_decode(tokenizer, logits: torch.Tensor, frame_lengths) -> list[str]:
    """Argmax per frame, repeats merged, blanks removed, '|' as the space."""
    ids = logits.argmax(-1).cpu()
    texts = [tokenizer.decode(ids[row, : int(frame_lengths[row])].tolist()) for row in range(ids.shape[0])]
    return [" ".join(text.split()) for text in texts]


def check_ctc_head(source: str, config, tokenizer, new_ctc_head: bool) -> None:
    """A model that already has a CTC head must be trained on with the vocabulary of that head."""
    if new_ctc_head or not any("ForCTC" in a for a in (config.architectures or [])):
        return
    try:
        head_tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(source)
    except Exception:
        head_tokenizer = None
    ours = tokenizer.get_vocab()
    if head_tokenizer is not None and head_tokenizer.get_vocab() != ours:
        theirs = head_tokenizer.get_vocab()
        only_ours = sorted(set(ours) - set(theirs))
        only_theirs = sorted(set(theirs) - set(ours))
        raise ValueError(
            f"vocabulary mismatch: {source} has a CTC head trained with its own vocabulary ({len(theirs)} tokens) and the "
            f"vocabulary of this run differs ({len(ours)} tokens; only here: {only_ours[:20]}, only there: {only_theirs[:20]}"
            f"{', same tokens in another order' if not only_ours and not only_theirs else ''}). Reuse its vocabulary with "
            f"--tokenizer_name_or_path {source}, or train a new head with --new_ctc_head"
        )
    if head_tokenizer is None and config.vocab_size != len(ours):
        raise ValueError(
            f"vocabulary mismatch: {source} has a CTC head with {config.vocab_size} outputs and no tokenizer to say which "
            f"characters they are; this run's vocabulary has {len(ours)} tokens. Give its tokenizer with "
            f"--tokenizer_name_or_path, or train a new head with --new_ctc_head"
        )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_model_folder(folder: Path, model, processor, extra_files: dict[str, str] | None = None) -> None:
    """save_pretrained into a temporary sibling, then one rename: never half a model on disk."""
    tmp, old = folder.with_name(f".tmp-{folder.name}"), folder.with_name(f".old-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # preprocessor_config.json too: what pretrain.py, extract_features.py and older transformers read.
    processor.feature_extractor.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    model_args, data_args, train_args = parse_args_with_recipe(
        [ModelArguments, DataArguments, CTCTrainingArguments], argv
    )
    output_dir = Path(train_args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if data_args.long_utterances not in ("alone", "skip"):
        raise SystemExit(f"error: --long_utterances must be 'alone' or 'skip', not {data_args.long_utterances!r}")
    if not 0 <= model_args.initial_blank_probability < 1:
        raise SystemExit(
            f"error: --initial_blank_probability must be in [0, 1), not {model_args.initial_blank_probability}"
        )

    accelerator, trackers = make_accelerator(train_args, output_dir, model_args.layerdrop)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)  # one copy of the progress messages, from the main process
    set_seed(train_args.seed, device_specific=True)  # SpecAugment spans and dropout differ between processes

    # ------------------------------------------------------------------ data and vocabulary
    model_source = model_args.config_name or model_args.model_name_or_path
    dataset_splits = None
    try:
        if data_args.dataset_name:
            train_rows, dev_rows, unreadable_rows, dev_origin, dataset_splits = dataset_utterances(data_args)
        else:
            train_rows, dev_rows, unreadable_rows, dev_origin = manifest_utterances(data_args, train_args.seed)
        if model_args.tokenizer_name_or_path:
            try:
                tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
            except OSError as error:
                raise ValueError(
                    f"--tokenizer_name_or_path {model_args.tokenizer_name_or_path}: no CTC tokenizer there ({str(error).strip().splitlines()[0]})"
                ) from None
            missing = uncovered_characters(tokenizer, (r["text"] for r in train_rows + dev_rows))
            if missing:
                raise ValueError(
                    f"vocabulary mismatch: --tokenizer_name_or_path {model_args.tokenizer_name_or_path} lacks characters of the "
                    f"transcripts: {describe_characters(missing)}. Add them to --chars_to_ignore, or build a new vocabulary "
                    f"(leave out --tokenizer_name_or_path) and train with --new_ctc_head"
                )
        else:
            tokenizer = make_tokenizer(build_vocabulary(r["text"] for r in train_rows))
        try:
            config = Wav2Vec2Config.from_pretrained(model_source)
        except OSError as error:
            flag = "--config_name" if model_args.config_name else "--model_name_or_path"
            raise ValueError(
                f"{flag} {model_source}: no wav2vec2 config could be loaded ({str(error).strip().splitlines()[0]})"
            ) from None
        check_ctc_head(model_source, config, tokenizer, model_args.new_ctc_head)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    vocab = tokenizer.get_vocab()
    feature_extractor = load_feature_extractor(model_source)
    processor = Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    for row in train_rows + dev_rows:
        row["labels"] = tokenizer(row["text"]).input_ids

    for bad in unreadable_rows:
        logger.warning("leaving out %s (%s): %s", bad["path"], bad["where"], bad["reason"])
    unseen = uncovered_characters(tokenizer, (r["text"] for r in dev_rows))
    if unseen:
        logger.warning(
            "dev transcripts have characters the training transcripts lack (scored as errors): %s",
            describe_characters(unseen),
        )
    long_train = [r for r in train_rows if r["duration"] > data_args.max_duration_seconds]
    if long_train:
        logger.warning(
            "%d training utterance(s) (%.2f h) are longer than --max_duration_seconds %g; longest %.1f s: %s",
            len(long_train),
            sum(r["duration"] for r in long_train) / 3600,
            data_args.max_duration_seconds,
            max(r["duration"] for r in long_train),
            "each trained on in a batch of its own"
            if data_args.long_utterances == "alone"
            else "left out of training (--long_utterances skip)",
        )
        if data_args.long_utterances == "skip":
            train_rows = [r for r in train_rows if r["duration"] <= data_args.max_duration_seconds]
    # An utterance with fewer frames than its transcript needs cannot be aligned: its loss is
    # infinite. Training leaves them out (counted); dev keeps them, as errors.
    geometry = conv_geometry(config)
    fits = [
        conv_frames(round(r["duration"] * TARGET_SAMPLE_RATE), *geometry) >= min_frames_for(r["labels"])
        for r in train_rows
    ]
    too_short = [r for r, ok in zip(train_rows, fits) if not ok]
    if too_short:
        logger.warning(
            "%d training utterance(s) are too short for their transcript and are left out, e.g. %s (%s)",
            len(too_short),
            too_short[0]["path"],
            too_short[0]["where"],
        )
        train_rows = [r for r, ok in zip(train_rows, fits) if ok]
    if not train_rows:
        raise SystemExit("error: no training utterance left (see the warnings above)")
    if not dev_rows:
        logger.warning("no dev set: nothing is evaluated and the last model is saved")
    if accelerator.is_main_process and dev_rows and not data_args.eval_manifest and not data_args.dataset_name:
        # The participant split that was used, for the model card and for reruns.
        write_tsv(output_dir / "manifests" / "train.tsv", train_rows, MANIFEST_COLUMNS)
        write_tsv(output_dir / "manifests" / "dev.tsv", dev_rows, MANIFEST_COLUMNS)

    data_summary = {
        "train_utterances": len(train_rows),
        "train_hours": round(sum(r["duration"] for r in train_rows) / 3600, 4),
        "train_participants": len({r["participant"] for r in train_rows if r["participant"]}),
        "dev_utterances": len(dev_rows),
        "dev_hours": round(sum(r["duration"] for r in dev_rows) / 3600, 4),
        "dev_participants": len({r["participant"] for r in dev_rows if r["participant"]}),
        "dev_set": dev_origin,
        "long_train_utterances": len(long_train),
        "long_utterance_policy": data_args.long_utterances,
        "too_short_train_utterances": len(too_short),
        "unreadable_at_start": len(unreadable_rows),
        "vocab_size": len(vocab),
    }
    logger.info("data: %s", json.dumps(data_summary))

    # ------------------------------------------------------------------ model
    overrides = dict(
        vocab_size=len(vocab),
        pad_token_id=tokenizer.pad_token_id,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=model_args.ctc_zero_infinity,
        attention_dropout=model_args.attention_dropout,
        activation_dropout=model_args.activation_dropout,
        hidden_dropout=model_args.hidden_dropout,
        feat_proj_dropout=model_args.feat_proj_dropout,
        final_dropout=model_args.final_dropout,
        layerdrop=model_args.layerdrop,
        mask_time_prob=model_args.mask_time_prob,
        mask_time_length=model_args.mask_time_length,
        mask_feature_prob=model_args.mask_feature_prob,
        mask_feature_length=model_args.mask_feature_length,
    )
    if model_args.config_name:
        config = Wav2Vec2Config.from_pretrained(model_args.config_name, **overrides)
        model = Wav2Vec2ForCTC._from_config(config, attn_implementation=model_args.attn_implementation)
        base_model, loading = f"random init from {model_args.config_name}", {"missing_keys": []}
    else:
        # A plain from_pretrained: a local folder is a model to start from, never a checkpoint to
        # resume (resuming is --resume_from_checkpoint's job only).
        model, loading = Wav2Vec2ForCTC.from_pretrained(
            model_args.model_name_or_path,
            attn_implementation=model_args.attn_implementation,
            ignore_mismatched_sizes=model_args.new_ctc_head,
            output_loading_info=True,
            **overrides,
        )
        fresh_encoder = [k for k in loading["missing_keys"] if k.startswith("wav2vec2.")]
        if fresh_encoder:
            logger.warning(
                "%s lacks %d encoder weight(s) (e.g. %s): they start random",
                model_args.model_name_or_path,
                len(fresh_encoder),
                fresh_encoder[0],
            )
        if model_args.new_ctc_head:
            torch.nn.init.normal_(model.lm_head.weight, std=model.config.initializer_range)
            torch.nn.init.zeros_(model.lm_head.bias)
        base_model = model_args.model_name_or_path
    new_head = bool(model_args.config_name or model_args.new_ctc_head or "lm_head.weight" in loading["missing_keys"])
    if new_head and model_args.initial_blank_probability > 0:
        with torch.no_grad():
            model.lm_head.bias.zero_()
            model.lm_head.bias[tokenizer.pad_token_id] = blank_bias(model_args.initial_blank_probability, len(vocab))
    if model_args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    if model_args.mask_time_prob == 0 and getattr(model.wav2vec2, "masked_spec_embed", None) is not None:
        # Only time masking uses it (feature masking zeroes): a trained parameter without a gradient stops DDP.
        model.wav2vec2.masked_spec_embed.requires_grad_(False)
    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_attention_mask = bool(feature_extractor.return_attention_mask)
    logger.info(
        "model: %s, %.2f M parameters (%.2f M trained), attention mask: %s",
        base_model,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "yes" if use_attention_mask else "no (zero padding, as the model was pretrained)",
    )

    # ------------------------------------------------------------------ loaders
    collate = Collator(
        use_attention_mask, min_samples=samples_for_frames(model.config, max(model_args.mask_time_length, 2) + 1)
    )
    normalize = bool(feature_extractor.do_normalize)
    train_set = UtteranceDataset(train_rows, normalize, dataset_splits, data_args.audio_column_name)
    dev_set = UtteranceDataset(dev_rows, normalize, dataset_splits, data_args.audio_column_name)
    try:
        plan = BatchPlan(
            [r["duration"] for r in train_rows],
            train_args.per_device_train_batch_size,
            train_args.seed,
            data_args.max_duration_seconds,
            data_args.group_by_length,
            accelerator.process_index,
            accelerator.num_processes,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    def loader(dataset, batch_sampler):
        return make_loader(dataset, train_args.num_workers, batch_sampler=batch_sampler, collate_fn=collate)

    # Dev: fixed batches of similar length (long utterances alone), shared out over the processes.
    dev_order = sorted(range(len(dev_rows)), key=lambda i: -dev_rows[i]["duration"])
    dev_long = [[i] for i in dev_order if dev_rows[i]["duration"] > data_args.max_duration_seconds]
    dev_rest = [i for i in dev_order if dev_rows[i]["duration"] <= data_args.max_duration_seconds]
    dev_size = train_args.per_device_eval_batch_size
    dev_batches = dev_long + [dev_rest[k : k + dev_size] for k in range(0, len(dev_rest), dev_size)]
    dev_batches = dev_batches[accelerator.process_index :: accelerator.num_processes]

    # ------------------------------------------------------------------ optimizer, resume
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, train_args.weight_decay), lr=train_args.learning_rate)
    # Stepped by hand once per update: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(
        train_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=train_args.warmup_steps,
        num_training_steps=train_args.max_train_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)

    start_step, state = 0, {}
    checkpoint = resolve_checkpoint(output_dir, train_args.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, train_args)
        if state.get("vocab") != vocab:
            raise SystemExit(
                f"error: vocabulary mismatch: {checkpoint} was trained with another vocabulary "
                f"({len(state.get('vocab') or {})} tokens, this run builds {len(vocab)}): did the transcripts or --chars_to_ignore change?"
            )
        start_step = state["step"]
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            checkpoint,
            start_step,
            state["epoch"],
            state["batch_in_epoch"],
        )
    position = {"epoch": state.get("epoch", 0), "batch_in_epoch": state.get("batch_in_epoch", 0)}
    best = state.get("best") or {}  # the evaluation of the best model so far, kept in OUTPUT_DIR/best
    unreadable: set[str] = set(state.get("unreadable", []))
    log_path = start_train_log(
        accelerator,
        output_dir,
        start_step,
        {"model": model_args, "data": data_args, "training": train_args},
        trackers,
        "finetune_ctc",
        extra={"data_summary": data_summary},
    )

    # ------------------------------------------------------------------ evaluation
    def evaluate(step: int) -> dict:
        """Greedy decoding of the dev set; WER and CER over all of it (jiwer)."""
        unwrapped.eval()
        local, sums = [], torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss, target characters
        with torch.no_grad(), accelerator.autocast():
            for batch in loader(dev_set, dev_batches):
                unreadable.update(path for path, _ in batch["failed"])
                if not batch["indices"]:
                    continue
                inputs = batch["input_values"].to(accelerator.device)
                mask = batch["attention_mask"].to(accelerator.device) if use_attention_mask else None
                logits = unwrapped(inputs, attention_mask=mask).logits
                frames = unwrapped._get_feat_extract_output_lengths(batch["input_lengths"]).to(accelerator.device)
                labels = batch["labels"].to(accelerator.device)
                sums += torch.stack(
                    [
                        ctc_loss_sum(logits, frames, labels, tokenizer.pad_token_id, True).double(),
                        (labels >= 0).sum().double(),
                    ]
                )
                local += list(zip(batch["indices"], greedy_decode(tokenizer, logits, frames)))
        unwrapped.train()
        sums = accelerator.reduce(sums, reduction="sum")
        decoded = dict(gather_object(local))
        scored = [i for i in range(len(dev_rows)) if i in decoded]  # unreadable dev files are not scored
        if not scored:
            logger.warning("step %d: no dev utterance could be read, nothing evaluated", step)
            return None
        refs, hyps = [dev_rows[i]["text"] for i in scored], [decoded[i] for i in scored]
        words, chars = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
        result = {
            "step": step,
            "eval_loss": (sums[0] / sums[1].clamp(min=1)).item(),
            "eval_wer": words.wer,
            "eval_cer": chars.cer,
            "eval_utterances": len(scored),
            "eval_words": sum(len(r.split()) for r in refs),
            "eval_chars": sum(len(r) for r in refs),
            "eval_word_substitutions": words.substitutions,
            "eval_word_deletions": words.deletions,
            "eval_word_insertions": words.insertions,
            "examples": [
                {"ref": r, "hyp": h}
                for r, h in zip(refs[: data_args.eval_examples_to_log], hyps[: data_args.eval_examples_to_log])
            ],
        }
        logger.info(
            "step %d: dev WER %.4f, CER %.4f, loss %.4f (%d utterances)",
            step,
            result["eval_wer"],
            result["eval_cer"],
            result["eval_loss"],
            len(scored),
        )
        for example in result["examples"]:
            logger.info("  ref: %s\n  hyp: %s", example["ref"], example["hyp"])
        return result

    def save_if_best(result: dict | None) -> None:
        nonlocal best
        if result is None or best and (result["eval_wer"], result["eval_cer"]) >= (best["eval_wer"], best["eval_cer"]):
            return
        best = {k: v for k, v in result.items() if k != "examples"}
        if accelerator.is_main_process:
            save_model_folder(
                output_dir / "best", unwrapped, processor, {"eval_results.json": json.dumps(best, indent=2) + "\n"}
            )
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ training loop
    stop = StopSignal()
    accumulation = train_args.gradient_accumulation_steps
    positions = plan.iterate(position["epoch"], position["batch_in_epoch"])
    batches = iter(loader(train_set, _PlanSampler(plan, position["epoch"], position["batch_in_epoch"])))
    blank = tokenizer.pad_token_id
    window = torch.zeros(
        5, dtype=torch.float64, device=accelerator.device
    )  # loss, characters, audio samples, padded samples, utterances
    window_steps, window_start, grad_norm = 0, time.time(), None
    progress = tqdm(
        range(start_step, train_args.max_train_steps),
        initial=start_step,
        total=train_args.max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="finetune_ctc",
    )
    model.train()
    step, last_eval = start_step, None
    for step in range(start_step + 1, train_args.max_train_steps + 1):
        micro_batches = []
        for _ in range(accumulation):
            epoch, index, _ = next(positions)
            batch = next(batches)
            for path, reason in batch["failed"]:
                if path not in unreadable:
                    logger.warning("skipping unreadable utterance %s: %s", path, reason)
                unreadable.add(path)
            micro_batches.append(batch)
        position = {"epoch": epoch, "batch_in_epoch": index + 1}
        targets_here = sum(int((b["labels"] >= 0).sum()) for b in micro_batches)
        total_targets = accelerator.reduce(
            torch.tensor(float(targets_here), device=accelerator.device), reduction="sum"
        )
        # The summed loss divided by the target characters of the whole effective batch. DDP averages
        # gradients over processes and accelerator.backward divides by the accumulation steps: both
        # are undone so every character of the update weighs the same.
        loss_scale = accelerator.num_processes * accumulation / total_targets.clamp(min=1)
        for batch in micro_batches:
            empty = not batch["indices"]
            if empty:  # every file of this batch failed: a silent stand-in keeps the processes in step
                batch = collate(
                    [{"index": -1, "input_values": np.zeros(TARGET_SAMPLE_RATE, dtype=np.float32), "labels": []}]
                )
            inputs = batch["input_values"].to(accelerator.device, non_blocking=True)
            attention_mask = batch["attention_mask"].to(accelerator.device) if use_attention_mask else None
            frames = unwrapped._get_feat_extract_output_lengths(batch["input_lengths"])
            extra = {}
            if model_args.mask_time_prob > 0:
                # SpecAugment spans drawn over each utterance's real frames only (transformers would
                # put them in the padding too when the model takes no attention mask).
                num_frames = conv_frames(inputs.shape[1], *geometry)
                real = torch.arange(num_frames)[None] < frames[:, None]
                spans = _compute_mask_indices(
                    (inputs.shape[0], num_frames),
                    model_args.mask_time_prob,
                    model_args.mask_time_length,
                    attention_mask=real.long(),
                    min_masks=unwrapped.config.mask_time_min_masks,
                )
                extra["mask_time_indices"] = torch.from_numpy(spans).to(accelerator.device)
            with accelerator.accumulate(model):
                logits = model(inputs, attention_mask=attention_mask, **extra).logits
                labels = batch["labels"].to(accelerator.device)
                loss_sum = ctc_loss_sum(
                    logits, frames.to(accelerator.device), labels, blank, model_args.ctc_zero_infinity
                )
                if empty:
                    loss_sum = loss_sum * 0.0
                accelerator.backward(loss_sum * loss_scale)
                if accelerator.sync_gradients:  # --max_grad_norm 0: no clipping, the norm is still logged
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not empty:
                real_samples = float(batch["input_lengths"].sum())
                window += torch.stack(
                    [
                        loss_sum.detach().double(),
                        (labels >= 0).sum().double(),
                        torch.tensor(real_samples, device=accelerator.device),
                        torch.tensor(inputs.numel() - real_samples, device=accelerator.device),
                        torch.tensor(float(len(batch["indices"])), device=accelerator.device),
                    ]
                ).double()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule step
            scheduler.step()
        window_steps += 1
        progress.update(1)

        if step % train_args.logging_steps == 0 or step == train_args.max_train_steps:
            totals = accelerator.reduce(window, reduction="sum")
            unreadable = gather_unreadable(accelerator, unreadable)
            elapsed = time.time() - window_start
            record = {
                "step": step,
                "loss": (totals[0] / totals[1].clamp(min=1)).item(),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm)
                if grad_norm is not None and math.isfinite(grad_norm)
                else None,  # None: an fp16 overflow step
                "epoch": position["epoch"] + position["batch_in_epoch"] / plan.batches_per_epoch,
                "audio_seconds_per_second": (totals[2] / TARGET_SAMPLE_RATE / max(elapsed, 1e-9)).item(),
                "padding_fraction": (totals[3] / (totals[2] + totals[3]).clamp(min=1)).item(),
                "utterances_per_update": (totals[4] / window_steps).item(),
                "skipped_files": len(unreadable),
            }
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", skipped=record["skipped_files"]
            )
            window.zero_()
            window_steps, window_start = 0, time.time()

        if dev_rows and (
            (train_args.eval_steps and step % train_args.eval_steps == 0) or step == train_args.max_train_steps
        ):
            last_eval = evaluate(step)
            if last_eval is not None:
                if accelerator.is_main_process:
                    append_jsonl(log_path, last_eval)
                accelerator.log({k: v for k, v in last_eval.items() if k != "examples"}, step=step)
                save_if_best(last_eval)
            window_start = time.time()  # evaluation time is not training throughput

        preempted = stop.agreed(accelerator)
        if (train_args.save_steps and step % train_args.save_steps == 0) or preempted:
            unreadable = gather_unreadable(accelerator, unreadable)
            save_checkpoint(
                accelerator,
                output_dir,
                step,
                {**position, "best": best, "unreadable": sorted(unreadable), "vocab": vocab},
                train_args,
            )
        if preempted:
            logger.warning("SIGTERM: saved a checkpoint at step %d; resume with --resume_from_checkpoint latest", step)
            del model
            end_processes(accelerator)
            return None
    progress.close()

    # ------------------------------------------------------------------ save
    if dev_rows and last_eval is None:  # nothing trained (resumed at the end): still score the model
        last_eval = evaluate(step)
        save_if_best(last_eval)
    unreadable = gather_unreadable(accelerator, unreadable)
    if unreadable:
        logger.warning("%d unreadable file(s) were skipped: %s", len(unreadable), ", ".join(sorted(unreadable)[:10]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The model with the lowest dev WER is the result: its folder is moved into place. Without
        # one (no dev set, or a run resumed from another output folder) the last model is.
        # A finished run resumed again (a resubmitted job script) finds its best model already in
        # place, moved there at the end of the first completion: it stays.
        best_folder, earlier = output_dir / "best", read_json(output_dir / "eval_results.json")
        best_in_place = (
            bool(best)
            and not best_folder.is_dir()
            and earlier.get("model_step") == best["step"]
            and (output_dir / "model.safetensors").is_file()
        )
        kept = best if best and (best_folder.is_dir() or best_in_place) else last_eval
        source = None if best_in_place else best_folder if best and best_folder.is_dir() else output_dir / ".final"
        if source is not None:
            if source.name == ".final":
                save_model_folder(source, unwrapped, processor)
            for item in source.iterdir():
                if (output_dir / item.name).is_dir():
                    shutil.rmtree(output_dir / item.name)
                os.replace(item, output_dir / item.name)
            source.rmdir()
        results = {"wer": None, "cer": None, "model_step": step}
        if kept:
            results = {
                "wer": kept["eval_wer"],
                "cer": kept["eval_cer"],
                "model_step": kept["step"],
                **{k: v for k, v in kept.items() if k not in ("step", "eval_wer", "eval_cer", "examples")},
            }
        results.update({"train_steps": step, **data_summary, "unreadable_files_skipped": sorted(unreadable)})
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (output_dir / "README.md").write_text(
            model_card(
                unwrapped,
                base_model,
                results,
                model_args,
                data_args,
                train_args,
                read_jsonl(log_path),
                hardware_description(accelerator),
                accelerator.mixed_precision,
                accelerator.num_processes,
            ),
            encoding="utf-8",
        )
        if results["wer"] is not None:
            logger.info(
                "dev WER %.4f, CER %.4f (%d utterances), model of step %d saved in %s",
                results["wer"],
                results["cer"],
                results["eval_utterances"],
                results["model_step"],
                output_dir,
            )
        if train_args.push_to_hub:
            push_folder_to_hub(
                output_dir, train_args.hub_model_id or output_dir.name, commit_message=f"CTC fine-tuning, step {step}"
            )
    accelerator.wait_for_everyone()
    stop.release()
    del model
    end_processes(accelerator)
    return output_dir


# ----------------------------------------------------------------------------- model card


def model_card(
    model, base_model, results, model_args, data_args, train_args, log, hardware, precision, num_processes
) -> str:
    config = model.config
    versions = software_versions()
    evals = [r for r in log if "eval_wer" in r]
    effective_batch = f"{train_args.per_device_train_batch_size} utterances per device x {num_processes} processes x {train_args.gradient_accumulation_steps} accumulation"
    name = train_args.hub_model_id or train_args.output_dir
    curve = (
        "\n".join(
            f"| {r['step']:,} | {r['eval_wer']:.4f} | {r['eval_cer']:.4f} | {r['eval_loss']:.4f} |" for r in evals
        )
        or "| n/a | | | |"
    )
    data_source = (
        f"`{data_args.dataset_name}` ({data_args.train_split_name})"
        if data_args.dataset_name
        else f"`{data_args.train_manifest}`"
    )
    chosen = (
        f"The weights are those of step {results['model_step']:,} of {results['train_steps']:,}: the evaluation with the lowest dev WER."
        if results["wer"] is not None
        else f"The weights are those of the last step ({results['train_steps']:,}); there was no dev set."
    )
    # The Hub refuses a card whose model-index lacks a dataset or has empty metrics.
    model_index = (
        ""
        if results["wer"] is None
        else f"""model-index:
- name: {Path(train_args.output_dir).name}
  results:
  - task: {{type: automatic-speech-recognition, name: Speech Recognition}}
    dataset: {{type: {data_args.dataset_name or "local"}, name: {json.dumps(data_args.dataset_name or "dev set (local manifest)")}, split: {data_args.eval_split_name if data_args.dataset_name else "dev"}}}
    metrics:
    - {{type: wer, value: {results["wer"]:.4f}, name: Dev WER}}
    - {{type: cer, value: {results["cer"]:.4f}, name: Dev CER}}
"""
    )
    hub_id = hub_base_model(base_model)
    base_model_line = f"base_model: {hub_id}\n" if hub_id else ""  # the Hub takes a hub id here, or nothing
    return f"""---
library_name: transformers
pipeline_tag: automatic-speech-recognition
tags: [wav2vec2, audio, speech, automatic-speech-recognition, ctc]
{base_model_line}{model_index}---
# {Path(train_args.output_dir).name}: wav2vec 2.0 + CTC speech recognition

**{base_model}** fine-tuned with a character CTC head ({results["vocab_size"]} tokens) by `finetune_ctc.py`.
{chosen}

## Results

Greedy CTC decoding (no language model) on the dev set ({results["dev_set"]}); transcripts normalised
(NFC, {"lowercase, " if data_args.do_lower_case else ""}punctuation removed, whitespace folded).

| Dev set | WER | CER | Utterances | Words | Characters | Hours |
|---|---|---|---|---|---|---|
| {results["dev_set"]} | {format_number(results["wer"])} | {format_number(results["cer"])} | {format_number(results.get("eval_utterances"))} | {format_number(results.get("eval_words"))} | {format_number(results.get("eval_chars"))} | {results["dev_hours"]:.3f} |

| Step | Dev WER | Dev CER | Dev loss per character |
|---|---|---|---|
{curve}

## Training data

| Statistic | Value |
|---|---|
| Source | {data_source} |
| Train utterances | {results["train_utterances"]:,} ({results["train_hours"]:.3f} h, {results["train_participants"]} participants) |
| Dev utterances | {results["dev_utterances"]:,} ({results["dev_hours"]:.3f} h, {results["dev_participants"]} participants) |
| Longer than {data_args.max_duration_seconds:g} s (train) | {results["long_train_utterances"]} ({"trained alone" if data_args.long_utterances == "alone" else "left out"}) |
| Too short for their transcript (train, left out) | {results["too_short_train_utterances"]} |
| Unreadable files skipped | {results["unreadable_at_start"] + len(results["unreadable_files_skipped"])} |

## Training hyperparameters

| Hyperparameter | Value |
|---|---|
| Base model | {base_model} |
| Parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M ({config.num_hidden_layers} layers, hidden size {config.hidden_size}) |
| Feature encoder | {"frozen" if model_args.freeze_feature_encoder else "trained"} |
| Optimiser | AdamW (no weight decay on biases and norms), weight decay {train_args.weight_decay:g} |
| Learning rate | {train_args.learning_rate:g}, {train_args.lr_scheduler_type} schedule, {train_args.warmup_steps:,} warmup steps |
| Steps | {results["train_steps"]:,} |
| Batch | {effective_batch}, grouped by length: {data_args.group_by_length} |
| Loss | CTC summed over the update / its target characters; zero_infinity {model_args.ctc_zero_infinity} |
| Dropout | attention {model_args.attention_dropout:g}, activation {model_args.activation_dropout:g}, hidden {model_args.hidden_dropout:g}, feature projection {model_args.feat_proj_dropout:g}, final {model_args.final_dropout:g}, layerdrop {model_args.layerdrop:g} |
| SpecAugment | time mask {model_args.mask_time_prob:g} x {model_args.mask_time_length} frames, feature mask {model_args.mask_feature_prob:g} x {model_args.mask_feature_length} |
| Max gradient norm | {train_args.max_grad_norm:g} |
| Precision | {precision} |
| Gradient checkpointing | {"enabled" if train_args.gradient_checkpointing else "disabled"} |
| Hardware | {hardware} |
| Software | Python {versions["python"]}, PyTorch {versions["torch"]}, Transformers {versions["transformers"]}, Accelerate {versions["accelerate"]}, soundfile {versions["soundfile"]}, soxr {versions["soxr"]} |

## How to use

```bash
python finetune_ctc.py transcribe --model_name_or_path {name} recording.flac other.wav
```

```python
import soundfile as sf, soxr, torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

model = Wav2Vec2ForCTC.from_pretrained("{name}").eval()
processor = Wav2Vec2Processor.from_pretrained("{name}")
audio, rate = sf.read("utterance.wav", dtype="float32", always_2d=True)
audio = soxr.resample(audio.mean(axis=1), rate, 16000)
inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    ids = model(**inputs).logits.argmax(-1)
print(processor.batch_decode(ids)[0])
```

For recordings longer than a minute use the `transcribe` command (or `finetune_ctc.transcribe`),
which reads and decodes them in chunks.
"""


# ----------------------------------------------------------------------------- transcribe


def transcribe(
    paths, model, processor, chunk_seconds: float = 30.0, context_seconds: float = 2.0, device="cpu"
) -> list[str]:
    """Greedy CTC transcripts of audio files of any length, format, rate and channel count.

    Long files are read by seeking, `chunk_seconds` at a time, each chunk with `context_seconds` of
    audio on both sides so that words at a chunk edge are heard whole; only the frames of the chunk
    itself are kept, and the frame sequence of the whole file is decoded at once.
    """
    model = model.to(device).eval()
    tokenizer, feature_extractor = processor.tokenizer, processor.feature_extractor
    min_samples, samples_per_frame = conv_geometry(
        model.config
    )  # receptive field: the fewest samples that make a frame
    texts = []
    for path in paths:
        seconds = sf.info(str(path)).duration
        frame_ids = []
        for chunk_start in np.arange(0.0, max(seconds, 1e-9), chunk_seconds):
            chunk_end = min(seconds, chunk_start + chunk_seconds)
            read_start = max(0.0, chunk_start - context_seconds)
            audio = load_audio(path, read_start, min(seconds, chunk_end + context_seconds))
            if feature_extractor.do_normalize:
                audio = normalize_waveform(audio)
            if len(audio) < min_samples:
                audio = np.pad(audio, (0, min_samples - len(audio)))
            with torch.no_grad():
                logits = model(torch.from_numpy(audio)[None].to(device)).logits[0]
            first = int(round((chunk_start - read_start) * TARGET_SAMPLE_RATE / samples_per_frame))
            last = int(round((chunk_end - read_start) * TARGET_SAMPLE_RATE / samples_per_frame))
            frame_ids.append(logits[first:last].argmax(-1).cpu())
        ids = torch.cat(frame_ids).tolist() if frame_ids else []
        texts.append(" ".join(tokenizer.decode(ids).split()))
    return texts


def transcribe_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune_ctc.py transcribe",
        description="Print 'path<TAB>transcript' for each audio file (greedy CTC decoding).",
    )
    parser.add_argument(
        "files", nargs="+", help="audio files of any format soundfile reads, any rate and channel count"
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="a finetune_ctc.py output folder or a hub CTC model"
    )
    parser.add_argument(
        "--chunk_seconds", type=float, default=30.0, help="long files are decoded this many seconds at a time"
    )
    parser.add_argument("--context_seconds", type=float, default=2.0, help="extra audio on each side of a chunk")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = Wav2Vec2ForCTC.from_pretrained(args.model_name_or_path)
    processor = Wav2Vec2Processor.from_pretrained(args.model_name_or_path)
    failures = 0
    for path in args.files:
        try:
            (text,) = transcribe([path], model, processor, args.chunk_seconds, args.context_seconds, args.device)
        except Exception as error:  # one bad file must not stop a batch of transcriptions
            print(f"error: {path}: {str(error).strip() or type(error).__name__}", file=sys.stderr)
            failures += 1
            continue
        print(f"{path}\t{text}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "transcribe":
        sys.exit(transcribe_main(sys.argv[2:]))
    main()
