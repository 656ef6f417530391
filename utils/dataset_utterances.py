"""Labelled utterances from a Hugging Face dataset (utils.hf_datasets reads it): rows like those of
a manifest (utils.utterances), with their split and index; the dev set from the eval split or split
off the train split by participant; a streamed train split stands for itself in one row.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from utils.hf_datasets import (
    check_distinct_splits,
    column_stream,
    examples,
    is_stream,
    load_undecoded,
    open_audio_value,
    resident_audio,
    value_label,
)
from utils.manifests import split_by_participant
from utils.utterances import check_transcripts, fill_participants
from utils.vocabulary import normalize_text

if TYPE_CHECKING:
    from utils.ctc_arguments import DataArguments

logger = logging.getLogger(__name__)


def dataset_utterances(data: DataArguments, seed: int = 0):
    """(train rows, dev rows, unreadable rows, how dev was chosen, {split: dataset}) from a HF dataset.

    Audio stays undecoded and is read here with soundfile (utils.hf_datasets). Without an eval
    split, or with the train split named again as the eval split, whole participants of the train
    split are split off for dev (--dev_fraction). A streamed train split (--dataset_streaming) is
    read while training (utils.utterance_stream); here one row stands for it: its transcripts'
    characters (for the vocabulary) and counts.
    """
    columns = [data.audio_column_name, data.text_column_name, data.participant_column_name]
    train = load_undecoded(data, data.train_split_name, columns, data.dataset_streaming)
    if train is None:
        raise ValueError(
            f"--dataset_name {data.dataset_name} has no split {data.train_split_name!r} (--train_split_name)"
        )
    dev = load_undecoded(data, data.eval_split_name, columns, data.dataset_streaming)
    apart = check_distinct_splits(data, train, dev) and dev is not None
    splits = {data.train_split_name: train, **({data.eval_split_name: dev} if apart else {})}
    if is_stream(train) and not apart and data.dev_fraction > 0:
        raise ValueError(
            f"--dataset_streaming: --dataset_name {data.dataset_name} has no eval split {data.eval_split_name!r} apart from "
            "the train split, and a stream cannot be split by participant: give --eval_split_name, or --dev_fraction 0"
        )
    rows_by_split, unreadable = {}, []
    for name, split in splits.items():
        if is_stream(split) and name == data.train_split_name:
            rows_by_split[name] = [streamed_transcripts(data, split)]
            continue
        rows, bad = dataset_rows(data, name, split, keep_audio=is_stream(split))
        check_transcripts(rows, data.chars_to_ignore, data.do_lower_case, data.word_separators)
        rows_by_split[name], unreadable = rows, unreadable + bad
        if not is_stream(split):  # what the DataLoader workers read from
            splits[name] = split.select_columns([data.audio_column_name])
    train_rows = rows_by_split[data.train_split_name]
    if apart:
        how = f"--dataset_name {data.dataset_name} split {data.eval_split_name!r}"
        return train_rows, rows_by_split[data.eval_split_name], unreadable, how, splits
    if dev is not None:
        logger.warning(
            "--eval_split_name %r is the train split: dev is split off it by participant instead (--dev_fraction %g)",
            data.eval_split_name,
            data.dev_fraction,
        )
    else:
        logger.info("%s has no split %r: dev is split off the train split", data.dataset_name, data.eval_split_name)
    train_rows, dev_rows, how = split_off_dev(data, train_rows, seed)
    return train_rows, dev_rows, unreadable, how, splits


def dataset_rows(data: DataArguments, name: str, split, keep_audio: bool) -> tuple[list[dict], list[dict]]:
    """(rows, unreadable rows) of a split, each duration from its audio header. A streamed split's
    rows keep their audio (bytes, or a local path), as a stream cannot be read by index later."""
    rows, unreadable = [], []
    columns = [data.audio_column_name, data.text_column_name, data.participant_column_name]
    for index, example in examples(split, columns):
        audio, participant = example[data.audio_column_name], example.get(data.participant_column_name)
        row = {
            "path": value_label(audio, f"{name}[{index}]"),
            "where": f"--dataset_name {data.dataset_name} split {name!r}, row {index}",
            "text": example[data.text_column_name] or "",
            "start": None,
            "end": None,
            "participant": None if participant is None else str(participant),
            "split": name,
            "index": index,
        }
        try:
            if keep_audio:
                row["audio"] = audio = resident_audio(audio)
            with open_audio_value(audio) as f:
                row["duration"] = f.frames / f.samplerate
            rows.append(row)
        except Exception as error:
            unreadable.append({**row, "reason": f"unreadable: {str(error).strip() or type(error).__name__}"})
    return rows, unreadable


def streamed_transcripts(data: DataArguments, split) -> dict:
    """The row that stands for a streamed train split: every character of its transcripts (what
    the vocabulary is built from), the number of utterances and participants. Reads the
    transcripts once (and the audio too, in formats that cannot read a column alone)."""
    logger.info("reading the transcripts of the streamed split %r once, for the vocabulary", data.train_split_name)
    columns = [data.text_column_name, data.participant_column_name]
    characters, participants, count = set(), set(), 0
    for index, example in examples(column_stream(data, data.train_split_name, columns) or split, columns):
        row = {"text": example[data.text_column_name] or "", "path": f"{data.train_split_name}[{index}]"}
        check_transcripts(
            [{**row, "where": f"--dataset_name {data.dataset_name} split {data.train_split_name!r}, example {index}"}],
            data.chars_to_ignore,
            data.do_lower_case,
            data.word_separators,
        )
        characters.update(normalize_text(row["text"], data.chars_to_ignore, data.do_lower_case, data.word_separators))
        participants.add(example.get(data.participant_column_name))
        count += 1
    if not count:
        raise ValueError(f"--dataset_name {data.dataset_name} split {data.train_split_name!r} is empty")
    return {
        "path": f"{data.dataset_name} split {data.train_split_name!r} (streamed)",
        "where": f"--dataset_name {data.dataset_name} split {data.train_split_name!r}",
        "text": "".join(sorted(characters)),
        "start": None,
        "end": None,
        "participant": None,
        "duration": None,
        "streamed": {"utterances": count, "participants": len(participants - {None})},
    }


def split_off_dev(data: DataArguments, rows: list[dict], seed: int) -> tuple[list[dict], list[dict], str]:
    """Whole participants of the only split, close to --dev_fraction of its hours, for dev."""
    if data.dev_fraction <= 0:
        return rows, [], "none (--dev_fraction 0)"
    where = f"--dataset_name {data.dataset_name} split {data.train_split_name!r}"
    if not data.participant_column_name:
        logger.warning(
            "%s: no --participant_column_name: participants are taken from file names, so a speaker may be in both train and dev",
            where,
        )
    fill_participants(rows)
    if len({r["participant"] for r in rows}) < 2:
        raise ValueError(
            f"{where}: cannot split off a dev set by participant with a single participant; "
            "give --eval_split_name, --participant_column_name, or --dev_fraction 0 to train without one"
        )
    train, dev = split_by_participant(rows, data.dev_fraction, seed)
    how = f"{len({r['participant'] for r in dev})} participant(s) of {where} ({data.dev_fraction:.0%} of the hours requested)"
    return train, dev, how
