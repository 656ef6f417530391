"""The long recordings of a Hugging Face dataset as pretraining manifest rows (pretrain.py
--dataset_name), validated as data/prepare_manifest.py validates files, for utils.crops.CropStream.

A recording with a local path (an audiofolder, a dataset of paths) is read from that file, like any
manifest row. One whose bytes are kept in the dataset (parquet from the Hub, save_to_disk) is read
in place, from the memory-mapped Arrow file the dataset already is: a crop costs one seek there as
in a file, and the recording is neither copied into memory nor written out again (no second copy of
participants' audio in a cache folder).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import soundfile as sf

from utils.hf_datasets import check_distinct_splits, load_undecoded
from utils.manifests import probe_audio_file, split_by_participant

logger = logging.getLogger(__name__)


class DatasetAudio:
    """Opens the recordings of one dataset split by index, reading their bytes where they lie
    (a view of the Arrow buffer: no copy). Picklable, for DataLoader workers."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset.select_columns([column]).with_format("arrow"), column

    def open(self, index: int) -> sf.SoundFile:
        import pyarrow as pa

        value = self.dataset[index].column(self.column)[0]
        if isinstance(value, pa.StructScalar):
            value = value["bytes"] if value["bytes"].is_valid else value["path"]
        if isinstance(value, (pa.BinaryScalar, pa.LargeBinaryScalar)) and value.is_valid:
            return sf.SoundFile(pa.BufferReader(value.as_buffer()))
        if value.is_valid:
            return sf.SoundFile(value.as_py())
        raise ValueError(f"row {index} has no audio")


def audio_sources(chunk, column: str) -> tuple[list[str | None], list[bool]]:
    """(paths, whether the bytes are there) of an Arrow chunk's audio column: a struct of bytes and
    path (datasets' Audio), plain paths or plain bytes."""
    import pyarrow as pa

    values = chunk.column(column).combine_chunks()
    if pa.types.is_struct(values.type):
        return values.field("path").to_pylist(), values.field("bytes").is_valid().to_pylist()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.to_pylist(), [False] * len(values)
    return [None] * len(values), values.is_valid().to_pylist()


def recording_rows(data, name: str, split) -> tuple[list[dict], list[dict]]:
    """(valid manifest rows, invalid rows with a reason) of a split. The participant is the
    --participant_column_name value, else --participant_regex's match in the file name, else the
    file name (or the row) itself."""
    reader, pattern = DatasetAudio(split, data.audio_column_name), re.compile(data.participant_regex)
    columns = [c for c in (data.audio_column_name, data.participant_column_name) if c]
    valid, invalid, index = [], [], 0
    for chunk in split.select_columns(columns).with_format("arrow").iter(batch_size=64):
        paths, in_dataset = audio_sources(chunk, data.audio_column_name)
        participants = chunk.column(data.participant_column_name).to_pylist() if data.participant_column_name else None
        for k, (path, has_bytes) in enumerate(zip(paths, in_dataset)):
            label = path if path and not has_bytes else f"{name}[{index}]" + (f" {path}" if path else "")
            opener = (lambda i=index: reader.open(i)) if has_bytes else None
            if not has_bytes and not (path and os.path.isfile(path)):
                row, reason = None, f"no audio bytes in the dataset and no local file {path!r}"
            else:
                row, reason = probe_audio_file(label, opener=opener)
            if row is None:
                invalid.append({"path": label, "reason": reason})
            else:
                match = pattern.search(Path(path or label).name)
                participant = participants[k] if participants else match.group(1) if match else None
                row["participant"] = str(participant or Path(path or label).name)
                valid.append({**row, **({"reader": reader, "index": index} if has_bytes else {})})
            index += 1
    return valid, invalid


def dataset_recordings(data, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows, dev rows, invalid rows) of --dataset_name: dev is the eval split, or (without
    one, or with the train split named again) whole participants split off by --dev_fraction."""
    columns = [data.audio_column_name, None, data.participant_column_name]
    train = load_undecoded(data, data.train_split_name, columns)
    if train is None:
        raise ValueError(
            f"--dataset_name {data.dataset_name} has no split {data.train_split_name!r} (--train_split_name)"
        )
    dev = load_undecoded(data, data.eval_split_name, columns)
    apart = check_distinct_splits(data, train, dev) and dev is not None
    train_rows, invalid = recording_rows(data, data.train_split_name, train)
    if apart:
        dev_rows, invalid_dev = recording_rows(data, data.eval_split_name, dev)
        return train_rows, dev_rows, invalid + invalid_dev
    if dev is not None:
        logger.warning(
            "--eval_split_name %r is the train split: dev is split off it by participant instead (--dev_fraction %g)",
            data.eval_split_name,
            data.dev_fraction,
        )
    if not data.participant_column_name:
        logger.warning("no --participant_column_name: participants are found in file names by --participant_regex")
    train_rows, dev_rows = split_by_participant(train_rows, data.dev_fraction, seed)
    return train_rows, dev_rows, invalid
