"""Hugging Face `datasets` inputs, read without datasets' own audio decoding (it needs torchcodec,
which pins torch versions): hub names, local folders (audiofolder with metadata.csv, parquet, ...),
`save_to_disk` folders and streamed splits. Audio columns stay undecoded ({'bytes', 'path'}) and are
read here with soundfile, from the bytes, a local path, or a remote path of a streamed split.
Which split is dev: the eval split, or whole participants split off the train split.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import soundfile as sf

MISSING_SPLIT = re.compile(r"^(Unknown split|Bad split)")


def allow_undecoded_audio() -> None:
    """datasets >= 4 imports torchcodec even to store a file path or a file's bytes (an
    audiofolder's builder, every example of a streamed audiofolder), so without it such a dataset
    cannot even be loaded. Storing a path or bytes needs no codec: those values pass through as
    datasets stores them; anything else (a decoded array) still goes to datasets' own encoder."""
    from datasets import Audio, config

    if config.TORCHCODEC_AVAILABLE or getattr(Audio.encode_example, "stores_without_codec", False):
        return
    encode_with_codec = Audio.encode_example

    def encode_example(self, value):
        if isinstance(value, str):
            return {"bytes": None, "path": value}
        if isinstance(value, os.PathLike):
            return {"bytes": None, "path": str(Path(value).absolute())}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value), "path": None}
        if isinstance(value, dict) and "array" not in value and (value.get("bytes") or value.get("path")):
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return encode_with_codec(self, value)

    encode_example.stores_without_codec = True
    Audio.encode_example = encode_example


def is_saved_dataset(name) -> bool:
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    folder = Path(str(name))
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def is_stream(dataset) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def load_undecoded(data, split: str, columns: list[str], streaming: bool = False):
    """One split of `--dataset_name` (`data` holds the flags), its audio column undecoded; None if
    the dataset has no such split. A save_to_disk folder is read in place (memory-mapped), never
    streamed; a plain saved Dataset is its only split, whatever its name."""
    from datasets import Audio, DatasetDict, load_dataset, load_from_disk
    from datasets.exceptions import DatasetGenerationError

    name, flag = data.dataset_name, f"--dataset_name {data.dataset_name}"
    allow_undecoded_audio()
    try:
        if is_saved_dataset(name):
            saved = load_from_disk(str(name))
            if isinstance(saved, DatasetDict) and split not in saved:
                return None
            dataset = saved[split] if isinstance(saved, DatasetDict) else saved
            if not isinstance(saved, DatasetDict) and split != data.train_split_name:
                return None
        else:
            dataset = load_dataset(name, data.dataset_config_name, split=split, streaming=streaming)
    except ValueError as error:
        if MISSING_SPLIT.match(str(error)):
            return None
        raise ValueError(f"{flag}: cannot load split {split!r}: {first_line(error)}") from None
    except (DatasetGenerationError, FileNotFoundError, ConnectionError, OSError) as error:
        cause = error.__cause__ or error
        raise ValueError(f"{flag}: cannot load split {split!r}: {type(cause).__name__}: {first_line(cause)}") from None
    names = dataset.column_names
    for column, option in zip(columns, ("--audio_column_name", "--text_column_name", "--participant_column_name")):
        if column and names is not None and column not in names:
            raise ValueError(f"{flag} split {split!r} has no column {column!r} ({option}); it has {names}")
    if isinstance((dataset.features or {}).get(columns[0]), Audio):
        dataset = dataset.cast_column(columns[0], Audio(decode=False))
    return dataset


def column_stream(data, split: str, columns: list[str]):
    """A streamed split that reads only `columns`, where its format can (parquet: the audio is
    then not downloaded); None where it cannot."""
    from datasets import load_dataset

    try:
        return load_dataset(
            data.dataset_name, data.dataset_config_name, split=split, streaming=True, columns=[c for c in columns if c]
        )
    except ValueError as error:
        if "'columns'" in str(error):  # "BuilderConfig ... doesn't have a 'columns' key"
            return None
        raise


def first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def open_audio_value(value) -> sf.SoundFile:
    """An undecoded audio value ({'bytes', 'path'}, a path, or bytes) as an open SoundFile: the
    bytes if there are any, else the local file, else the remote file of a streamed split."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return sf.SoundFile(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return sf.SoundFile(io.BytesIO(value))
    if not value:
        raise ValueError("no audio bytes and no path")
    if "://" in str(value) and not os.path.exists(str(value)):  # hf://, https://, zip://...::hf://
        return open_audio_value(resident_audio(value))
    return sf.SoundFile(str(value))


def resident_audio(value):
    """The value itself if it can be read again later (bytes, a local path); a remote file of a
    streamed split is fetched now, as {'bytes', 'path'}."""
    path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
    if isinstance(path, str) and "://" in path and not os.path.exists(path):
        import fsspec

        with fsspec.open(path, "rb") as remote:
            return {"bytes": remote.read(), "path": path}
    return value


def value_label(value, fallback: str) -> str:
    """The name a row goes by in messages: its file name or path, else `fallback`."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return str(path) if path else fallback


def examples(dataset, columns: list[str], batch_size: int = 256):
    """(position, {column: value}) of every example, reading only `columns` (undecoded audio)."""
    selected = dataset.select_columns([c for c in dict.fromkeys(columns) if c])
    position = 0
    for chunk in selected.iter(batch_size=batch_size):
        for row in zip(*(chunk[c] for c in selected.column_names)):
            yield position, dict(zip(selected.column_names, row))
            position += 1


def split_base_names(spec: str) -> list[str]:
    """'train[:90%]+validation' -> ['train', 'validation']."""
    return [part.split("[")[0].strip() for part in spec.split("+")]


def check_distinct_splits(data, train, dev) -> bool:
    """Whether the eval split is a dev set apart from the train split. The same split named twice
    (the same data) is False: the caller splits it by participant instead. Slices of one split that
    overlap (train[:90%] and train[85%:]) are an error: dev would score training data."""
    if data.eval_split_name == data.train_split_name:
        return False
    shared = set(split_base_names(data.train_split_name)) & set(split_base_names(data.eval_split_name))
    if not shared or dev is None or is_stream(train):
        return True
    from datasets import ReadInstruction

    sizes = {name: len(load_undecoded(data, name, [None])) for name in shared}

    def spans(spec):  # the [from, to) example ranges a spec takes of the shared splits
        parts = "+".join(p for p in spec.split("+") if split_base_names(p)[0] in shared)
        return [(a.splitname, a.from_, a.to) for a in ReadInstruction.from_spec(parts).to_absolute(sizes)]

    both = sum(
        max(0, min(a_to, b_to) - max(a_from, b_from))
        for a_name, a_from, a_to in spans(data.train_split_name)
        for b_name, b_from, b_to in spans(data.eval_split_name)
        if a_name == b_name
    )
    if both:
        raise ValueError(
            f"--train_split_name {data.train_split_name!r} and --eval_split_name {data.eval_split_name!r} share "
            f"{both} example(s): dev would score training data; give disjoint splits"
        )
    return True
