"""The labelled data of a fine-tuning run once read and labelled: what is left out of training and
why (too long, too short for the transcript, unreadable), the participant split that was made, and
the figures that go into the log, eval_results.json and the model card."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2Processor

from utils.audio import TARGET_SAMPLE_RATE, conv_frames, conv_geometry
from utils.cards import public_name
from utils.ctc import min_frames_for
from utils.ctc_arguments import DataArguments
from utils.manifests import UTTERANCE_COLUMNS, write_tsv
from utils.vocabulary import describe_characters, uncovered_characters

logger = logging.getLogger(__name__)


@dataclass
class Corpus:
    """The utterances of a run (each with its `labels`), their tokenizer and processor, and the
    config of the model they are measured against."""

    train_rows: list[dict]
    dev_rows: list[dict]
    unreadable_rows: list[dict]  # left out from the start, each with its reason
    dev_origin: str  # how the dev set was chosen, for the log and the model card
    dataset_splits: dict | None  # {split: dataset} when the data is a Hugging Face dataset
    tokenizer: Wav2Vec2CTCTokenizer
    processor: Wav2Vec2Processor
    config: Wav2Vec2Config
    vocab: dict[str, int]

    @cached_property
    def train_files(self) -> set[str]:
        """The files the training utterances are in (asked once training starts, after the selection)."""
        return {row["path"] for row in self.train_rows}


def select_training_utterances(corpus: Corpus, data: DataArguments) -> tuple[list[dict], list[dict]]:
    """Report what the data holds and leave out of training what cannot or should not be trained on.

    Returns (long training utterances, training utterances too short for their transcript).
    """
    max_duration_seconds, long_utterances = data.max_duration_seconds, data.long_utterances
    for bad in corpus.unreadable_rows:
        logger.warning("leaving out %s (%s): %s", bad["path"], bad["where"], bad["reason"])
    unseen = uncovered_characters(corpus.tokenizer, (r["text"] for r in corpus.dev_rows))
    if unseen:
        logger.warning(
            "dev transcripts have characters the training transcripts lack (scored as errors): %s",
            describe_characters(unseen),
        )
    if not corpus.dev_rows:
        logger.warning("no dev set: nothing is evaluated and the last model is saved")
    if corpus.train_rows and "streamed" in corpus.train_rows[0]:
        return [], []  # utils.utterance_stream leaves out and counts as it reads
    long_train = [r for r in corpus.train_rows if r["duration"] > max_duration_seconds]
    if long_train:
        logger.warning(
            "%d training utterance(s) (%.2f h) are longer than --max_duration_seconds %g; longest %.1f s: %s",
            len(long_train),
            sum(r["duration"] for r in long_train) / 3600,
            max_duration_seconds,
            max(r["duration"] for r in long_train),
            "each trained on in a batch of its own"
            if long_utterances == "alone"
            else "left out of training (--long_utterances skip)",
        )
        if long_utterances == "skip":
            corpus.train_rows = [r for r in corpus.train_rows if r["duration"] <= max_duration_seconds]
    # An utterance with fewer frames than its transcript needs cannot be aligned: its loss is
    # infinite. Training leaves them out (counted); dev keeps them, as errors.
    geometry = conv_geometry(corpus.config)
    fits = [
        conv_frames(round(r["duration"] * TARGET_SAMPLE_RATE), *geometry) >= min_frames_for(r["labels"])
        for r in corpus.train_rows
    ]
    too_short = [r for r, ok in zip(corpus.train_rows, fits) if not ok]
    if too_short:
        logger.warning(
            "%d training utterance(s) are too short for their transcript and are left out, e.g. %s (%s)",
            len(too_short),
            too_short[0]["path"],
            too_short[0]["where"],
        )
        corpus.train_rows = [r for r, ok in zip(corpus.train_rows, fits) if ok]
    if not corpus.train_rows:
        raise SystemExit("error: no training utterance left (see the warnings above)")
    return long_train, too_short


def stop_if_all_unreadable(corpus: Corpus, unreadable: set[str]) -> None:
    """Once every training file has failed to read, the run would go on training on nothing and exit 0: stop it."""
    if corpus.train_files <= unreadable:
        raise SystemExit(
            f"error: none of the {len(corpus.train_files)} training file(s) could be read (see the warnings above)"
        )


def write_split(corpus: Corpus, folder: Path) -> None:
    """The participant split that was used, for the model card and for reruns."""
    write_tsv(folder / "train.tsv", corpus.train_rows, UTTERANCE_COLUMNS)
    write_tsv(folder / "dev.tsv", corpus.dev_rows, UTTERANCE_COLUMNS)


def summarize_data(corpus: Corpus, data: DataArguments, long_train: list[dict], too_short: list[dict]) -> dict:
    train_rows, dev_rows = corpus.train_rows, corpus.dev_rows
    # A streamed split: its hours and left-out utterances are not known ahead.
    streamed = train_rows and train_rows[0].get("streamed")
    return {
        "train_utterances": streamed["utterances"] if streamed else len(train_rows),
        "train_hours": None if streamed else round(sum(r["duration"] for r in train_rows) / 3600, 4),
        "train_participants": streamed["participants"]
        if streamed
        else len({r["participant"] for r in train_rows if r["participant"]}),
        "dev_utterances": len(dev_rows),
        "dev_hours": round(sum(r["duration"] for r in dev_rows) / 3600, 4),
        "dev_participants": len({r["participant"] for r in dev_rows if r["participant"]}),
        # The manifests by their names only: this goes into eval_results.json and the card, which may be published.
        "dev_set": public_name(corpus.dev_origin, [data.train_manifest, data.dev_manifest, data.dataset_name]),
        "long_train_utterances": None if streamed else len(long_train),
        "long_utterance_policy": data.long_utterances,
        "too_short_train_utterances": None if streamed else len(too_short),
        "unreadable_at_start": len(corpus.unreadable_rows),
        "vocab_size": len(corpus.vocab),
    }
