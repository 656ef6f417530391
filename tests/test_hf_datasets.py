"""Hugging Face `datasets` inputs without torchcodec: an audiofolder (train/, validation/,
metadata.csv), save_to_disk folders, streamed splits (local files), a dataset with only a train split
or with the train split named as the eval split, and datasets of long recordings for pretraining."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import chirp, flags, log_rows, write_signal

from utils.audio import load_audio, read_mono, target_length

SPEAKERS = ["spk1", "spk2", "spk3", "spk4"]
WORDS = ["ab", "ba", "abba", "baab", "aab", "bba"]


def write_audiofolder(root: Path, splits: dict[str, int]) -> dict[str, list[dict]]:
    """An audiofolder: a folder per split with audio files and metadata.csv (file_name,
    transcription, speaker_id); every transcript differs, so a decoded item names its file."""
    made, n = {}, 0
    for split, count in splits.items():
        rows = []
        for _ in range(count):
            rate, ext = (44100, "flac") if n % 3 == 2 else (16000, "wav")
            path = write_signal(root / split / f"u{n:02d}.{ext}", chirp(0.6 + 0.1 * (n % 4), rate, seed=n), rate)
            rows.append({"file": path, "text": f"{WORDS[n % 6]} {WORDS[n // 6 % 6]} {n}", "speaker": SPEAKERS[n % 4]})
            n += 1
        lines = ["file_name,transcription,speaker_id"] + [f"{r['file'].name},{r['text']},{r['speaker']}" for r in rows]
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
        made[split] = rows
    return made


def write_parquet(root: Path, made: dict[str, list[dict]], speakers: list[str] | None = None) -> Path:
    """The same utterances as a Hub dataset stores them: parquet files with the audio bytes in the rows."""
    from datasets import Audio, Dataset

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in made.items():
        columns = {
            "audio": [{"bytes": r["file"].read_bytes(), "path": r["file"].name} for r in rows],
            "transcription": [r["text"] for r in rows],
            "speaker_id": speakers or [r["speaker"] for r in rows],
        }
        Dataset.from_dict(columns).cast_column("audio", Audio(decode=False)).to_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet"
        )
    return root


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A fresh datasets cache per test: nothing is read from an earlier test's Arrow files."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path / "hf_cache"


def ctc_data(**options):
    from utils.ctc_arguments import DataArguments

    return DataArguments(text_column_name="transcription", **options)


def test_audiofolder_is_read_without_torchcodec(tmp_path, hf_home):
    """Before: datasets' audiofolder builder raised DatasetGenerationError (torchcodec missing)."""
    from utils.dataset_utterances import dataset_utterances
    from utils.utterances import read_utterance

    made = write_audiofolder(tmp_path / "af", {"train": 8, "validation": 4})
    data = ctc_data(dataset_name=str(tmp_path / "af"), participant_column_name="speaker_id")
    train, dev, unreadable, how, splits = dataset_utterances(data)
    assert (len(train), len(dev), unreadable) == (8, 4, [])
    assert how.endswith("split 'validation'")
    assert [r["path"] for r in train] == [str(r["file"]) for r in made["train"]]  # the local files themselves
    assert [r["participant"] for r in dev] == [r["speaker"] for r in made["validation"]]
    for row, source in zip(dev, made["validation"]):
        assert row["duration"] == pytest.approx(sf.info(str(source["file"])).duration)
        np.testing.assert_array_equal(read_utterance(row, splits), load_audio(source["file"]))


def test_save_to_disk_folders(tmp_path, hf_home):
    """Before: 'You are trying to load a dataset that was saved using save_to_disk' (a Dataset) and
    'Unknown split' for a DatasetDict's eval split that load_dataset did not see."""
    from datasets import Audio, Dataset, DatasetDict

    from utils.dataset_utterances import dataset_utterances
    from utils.utterances import read_utterance

    made = write_audiofolder(tmp_path / "files", {"train": 8, "validation": 3})

    def as_dataset(rows):
        audio = [{"bytes": r["file"].read_bytes(), "path": r["file"].name} for r in rows]
        columns = {"audio": audio, "transcription": [r["text"] for r in rows], "who": [r["speaker"] for r in rows]}
        return Dataset.from_dict(columns).cast_column("audio", Audio(decode=False))

    DatasetDict({s: as_dataset(rows) for s, rows in made.items()}).save_to_disk(str(tmp_path / "dict"))
    as_dataset(made["train"]).save_to_disk(str(tmp_path / "one"))
    train, dev, _, how, splits = dataset_utterances(ctc_data(dataset_name=str(tmp_path / "dict")))
    assert (len(train), len(dev), how[-12:]) == (8, 3, "'validation'")
    np.testing.assert_array_equal(read_utterance(dev[2], splits), load_audio(made["validation"][2]["file"]))
    data = ctc_data(dataset_name=str(tmp_path / "one"), participant_column_name="who", dev_fraction=0.25)
    train, dev, _, how, splits = dataset_utterances(data)
    assert len(train) + len(dev) == 8 and len(dev) == 2  # one participant's two utterances
    assert not {r["participant"] for r in train} & {r["participant"] for r in dev}
    assert "1 participant(s) of --dataset_name" in how
    row = dev[0]
    np.testing.assert_array_equal(read_utterance(row, splits), load_audio(made["train"][row["index"]]["file"]))


def test_a_dataset_with_only_a_train_split_splits_off_participants(tmp_path, hf_home):
    """Before: 'cannot load split 'validation'' stopped the run."""
    from utils.dataset_utterances import dataset_utterances

    made = write_audiofolder(tmp_path / "files", {"train": 12})
    name = str(write_parquet(tmp_path / "pq", made))
    data = ctc_data(dataset_name=name, participant_column_name="speaker_id", dev_fraction=0.5)
    train, dev, _, how, _ = dataset_utterances(data, seed=1)
    assert len(train) == len(dev) == 6 and "2 participant(s)" in how
    assert not {r["participant"] for r in train} & {r["participant"] for r in dev}
    assert dataset_utterances(ctc_data(dataset_name=name, dev_fraction=0))[1] == []
    one = str(write_parquet(tmp_path / "one", made, speakers=["spk1"] * 12))
    with pytest.raises(ValueError, match="single participant"):
        dataset_utterances(ctc_data(dataset_name=one, participant_column_name="speaker_id"))


def test_the_train_split_named_as_eval_split_is_never_dev_and_train(tmp_path, hf_home, caplog):
    """Before: --eval_split_name train gave dev == train, silently."""
    from utils.dataset_utterances import dataset_utterances

    name = str(write_parquet(tmp_path / "pq", write_audiofolder(tmp_path / "files", {"train": 12, "validation": 2})))
    data = ctc_data(
        dataset_name=name, eval_split_name="train", participant_column_name="speaker_id", dev_fraction=0.25
    )
    with caplog.at_level(logging.WARNING):
        train, dev, _, how, _ = dataset_utterances(data)
    assert not {r["path"] for r in train} & {r["path"] for r in dev}
    assert len(train) == 9 and len(dev) == 3 and "participant(s)" in how
    assert "is the train split: dev is split off it by participant" in caplog.text
    overlapping = ctc_data(dataset_name=name, train_split_name="train[:75%]", eval_split_name="train[50%:]")
    with pytest.raises(ValueError, match="share 3 example"):
        dataset_utterances(overlapping)
    disjoint = ctc_data(dataset_name=name, train_split_name="train[:75%]", eval_split_name="train[75%:]")
    assert [len(rows) for rows in dataset_utterances(disjoint)[:2]] == [9, 3]


@pytest.mark.parametrize("kind", ["audiofolder", "parquet"])
def test_streamed_splits_are_read_with_soundfile_and_resume_exactly(tmp_path, hf_home, kind, monkeypatch):
    """Before: a streamed audiofolder raised ImportError (torchcodec) at its first example, and
    there was no --dataset_streaming."""
    from utils.dataset_utterances import dataset_utterances
    from utils.hf_datasets import column_stream
    from utils.utterance_stream import UtteranceStream
    from utils.utterances import read_utterance
    from utils.vocabulary import load_tokenizer, normalize_text

    made = write_audiofolder(tmp_path / "af", {"train": 10, "validation": 3})
    name, dev_audio = tmp_path / "af", [load_audio(r["file"]) for r in made["validation"]]
    if kind == "parquet":  # as a Hub dataset is stored: the audio bytes in the rows
        monkeypatch.setattr("datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)  # 5 s per stream left early
        name = write_parquet(tmp_path / "pq", made)
        shutil.rmtree(tmp_path / "af" / "validation")  # the streamed dev rows hold their audio
    data = ctc_data(dataset_name=str(name), dataset_streaming=True, max_duration_seconds=0.75, stream_shuffle_buffer=4)
    projected = column_stream(data, "train", ["transcription", None])  # the transcripts alone, where possible
    assert list(projected.features) == ["transcription"] if kind == "parquet" else projected is None
    train, dev, unreadable, _, splits = dataset_utterances(data)
    assert train[0]["streamed"] == {"utterances": 10, "participants": 0} and train[0]["duration"] is None
    assert set(train[0]["text"]) == set("".join(normalize_text(r["text"]) for r in made["train"]))
    for row, source, audio in zip(dev, made["validation"], dev_audio, strict=True):
        assert row["text"] == normalize_text(source["text"])
        np.testing.assert_array_equal(read_utterance(row, splits), audio)

    tokenizer = load_tokenizer(None, train, dev)
    by_labels = {tuple(tokenizer(normalize_text(r["text"])).input_ids): r["file"] for r in made["train"]}
    monkeypatch.setattr("utils.utterance_stream.BUCKET_BATCHES", 5)  # a bucket of 10: one pass of the stream
    stream = UtteranceStream(splits["train"], data, tokenizer, (400, 320), False, batch_size=2, seed=3)
    batches = [b for _, b in zip(range(14), stream)]
    first_pass = [item for batch in batches[:7] for item in batch]  # 6 short utterances in pairs, 4 long alone
    assert sorted(len(b) for b in batches[:7]) == [1, 1, 1, 1, 2, 2, 2]
    assert sorted(by_labels[tuple(item["labels"])] for item in first_pass) == sorted(by_labels.values())
    for item in first_pass:  # a dataset's audio is read to floor(frames * 16000 / rate) samples
        source = by_labels[tuple(item["labels"])]
        np.testing.assert_array_equal(item["input_values"], load_audio(source)[: len(item["input_values"])])
        assert len(item["input_values"]) == target_length(sf.info(str(source)).frames, sf.info(str(source)).samplerate)
    assert [[i["labels"] for i in b] for b in batches[7:]] != [[i["labels"] for i in b] for b in batches[:7]]
    shares = []  # two processes: each reads its own half of the stream
    for rank in (0, 1):
        share = UtteranceStream(splits["train"], data, tokenizer, (400, 320), False, 2, 3, rank=rank, world_size=2)
        planned = [item for _, batch in zip(range(7), share.planned_batches()) for item in batch]
        shares.append({by_labels[tuple(item["labels"])] for item in planned})
    assert len(shares[0]) == len(shares[1]) == 5 and shares[0] | shares[1] == set(by_labels.values())
    stream.start_at(5)
    resumed = [b for _, b in zip(range(9), stream)]
    for expected, got in zip(batches[5:], resumed, strict=True):
        assert [i["labels"] for i in got] == [i["labels"] for i in expected]
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a["input_values"], b["input_values"])


# --------------------------------------------------------------------------------------------- pretraining


def write_recordings(folder: Path) -> list[Path]:
    return [
        write_signal(folder / "P01_a.wav", chirp(5, 16000, seed=1), 16000),
        write_signal(folder / "P02_b.flac", chirp(6, 44100, 2, seed=2), 44100),
        write_signal(folder / "P03_c.ogg", chirp(5.5, 48000, seed=3), 48000),
        write_signal(folder / "P03_d.wav", chirp(4.5, 22050, seed=4), 22050),
    ]


def test_recordings_kept_in_a_dataset_give_the_crops_of_their_files(tmp_path, hf_home):
    """A save_to_disk dataset with the bytes in it and an audiofolder of paths give the same crops
    as a manifest of the same files: the recordings are read in place, by seeking."""
    from datasets import Audio, Dataset

    from utils.crops import CropStream
    from utils.dataset_recordings import DatasetAudio, dataset_recordings
    from utils.manifests import scan_audio_folder
    from utils.pretrain_arguments import DataArguments

    files = write_recordings(tmp_path / "af" / "train")
    (tmp_path / "af" / "train" / "metadata.csv").write_text(
        "file_name,family\n" + "".join(f"{f.name},fam{f.name[2]}\n" for f in files)
    )
    manifest, _ = scan_audio_folder(tmp_path / "af" / "train")
    audio = [{"bytes": f.read_bytes(), "path": f.name} for f in files] + [{"bytes": b"no audio", "path": "x.wav"}]
    saved = Dataset.from_dict({"audio": audio}).cast_column("audio", Audio(decode=False))
    saved.save_to_disk(str(tmp_path / "saved"))

    by_path, invalid, _ = dataset_recordings(DataArguments(dataset_name=str(tmp_path / "af"), dev_fraction=0), 0)
    assert [r["path"] for r in by_path] == [str(f) for f in files] and "reader" not in by_path[0]
    assert [r["participant"] for r in by_path] == ["P01", "P02", "P03", "P03"] and invalid == []
    data = DataArguments(dataset_name=str(tmp_path / "saved"), dev_fraction=0)
    in_dataset, _, invalid = dataset_recordings(data, 0)
    assert [r["path"] for r in invalid] == ["train[4] x.wav"] and invalid[0]["reason"].startswith("unreadable")
    assert [r["path"] for r in in_dataset] == [f"train[{i}] {f.name}" for i, f in enumerate(files)]
    assert [r["num_frames"] for r in in_dataset] == [r["num_frames"] for r in manifest]
    options = dict(crop_seconds=1.0, seed=5, epoch_multiplier=6, min_rms=0.0)
    reference = [b["input_values"] for _, b in zip(range(12), CropStream([(manifest, 1.0)], 2, **options))]
    for rows in (by_path, in_dataset):
        crops = [b["input_values"] for _, b in zip(range(12), CropStream([(rows, 1.0)], 2, **options))]
        assert all(np.array_equal(a, b) for a, b in zip(reference, crops))

    # Vorbis from bytes: libsndfile's inexact seeks near the end are avoided as for files.
    full, _ = sf.read(str(files[2]), dtype="float32")
    ogg = DatasetAudio(saved, "audio").open(2)
    for start in range(len(full) - 19200, len(full) - 1000, 2011):
        assert np.array_equal(read_mono(ogg, start, 1000), full[start : start + 1000]), start


@pytest.mark.slow
def test_pretrain_reads_a_dataset_of_recordings(tmp_path, hf_home, tiny_base_dir):
    """pretrain.py --dataset_name: participants (a column) split off for dev, crops from the
    recordings kept in the dataset, a dev loss."""
    from datasets import Audio, Dataset

    import pretrain

    files = write_recordings(tmp_path / "files")
    audio = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    family = ["famA", "famB", "famC", "famC"]
    Dataset.from_dict({"recording": audio, "family": family}).cast_column(
        "recording", Audio(decode=False)
    ).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    pretrain.main(
        flags(
            config_name=tiny_base_dir,
            dataset_name=tmp_path / "saved",
            audio_column_name="recording",
            participant_column_name="family",
            dev_fraction=0.25,
            crop_seconds=1.0,
            epoch_multiplier=2,
            dev_crops_per_file=2,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            max_train_steps=2,
            eval_steps=2,
            num_negatives=5,
            logging_steps=1,
            num_workers=0,
            output_dir=out,
            report_to="none",
        )
    )
    train = (out / "manifests" / "train.tsv").read_text().splitlines()[1:]
    dev = (out / "manifests" / "dev.tsv").read_text().splitlines()[1:]
    assert len(train) + len(dev) == 4 and dev
    assert not {line.split("\t")[1] for line in train} & {line.split("\t")[1] for line in dev}
    rows = log_rows(out)
    assert [r["step"] for r in rows if "dev_loss" in r] == [0, 2]
    assert [r["skipped_files"] for r in rows if "loss" in r] == [0, 0]


@pytest.mark.slow
def test_finetune_ctc_on_an_audiofolder_with_only_a_train_split(tmp_path, hf_home, tiny_base_dir):
    import finetune_ctc

    write_audiofolder(tmp_path / "af", {"train": 16})
    out = tmp_path / "out"
    common = dict(config_name=tiny_base_dir, text_column_name="transcription", max_train_steps=2, save_steps=0)
    common.update(per_device_train_batch_size=4, num_workers=0, report_to="none", eval_steps=0)
    finetune_ctc.main(
        flags(dataset_name=tmp_path / "af", participant_column_name="speaker_id", output_dir=out, **common)
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["dev_utterances"] == results["eval_utterances"] == 4 and results["train_utterances"] == 12
    assert results["dev_set"].startswith("1 participant(s) of --dataset_name") and results["train_participants"] == 3


@pytest.mark.slow
def test_finetune_ctc_streams_and_resumes(tmp_path, hf_home, tiny_base_dir):
    """--dataset_streaming trains from a stream; a run resumed from its checkpoint continues with
    the same batches (the same losses) as the run that was not interrupted."""
    import finetune_ctc

    write_audiofolder(tmp_path / "af", {"train": 16, "validation": 4})
    common = dict(config_name=tiny_base_dir, dataset_name=tmp_path / "af", text_column_name="transcription")
    common.update(dataset_streaming=True, per_device_train_batch_size=2, logging_steps=1, eval_steps=0)
    common.update(num_workers=1, report_to="none", max_train_steps=4, layerdrop=0.0, mask_time_prob=0.0)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finetune_ctc.main(flags(output_dir=whole, save_steps=2, **common))
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    finetune_ctc.main(flags(output_dir=resumed, save_steps=0, resume_from_checkpoint="latest", **common))
    results = json.loads((whole / "eval_results.json").read_text())
    assert results["train_utterances"] == 16 and results["train_hours"] is None and results["eval_utterances"] == 4
    expected = {r["step"]: r["loss"] for r in log_rows(whole) if "loss" in r}
    got = {r["step"]: r["loss"] for r in log_rows(resumed) if "loss" in r}
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    assert got[3] == pytest.approx(expected[3], rel=1e-5) and got[4] == pytest.approx(expected[4], rel=1e-5)
