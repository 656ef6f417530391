"""Inputs that lie (issue 10): strict TSV manifests, folders and corpora that shrink silently, and
flags and files that used to end in a traceback instead of a line naming them."""

import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO, chirp, flags, write_signal

from data import prepare_manifest
from utils.manifests import (
    MANIFEST_COLUMNS,
    prepare_manifests,
    read_manifest,
    read_tsv,
    scan_audio_folder,
    write_tsv,
)

TINY = REPO / "configs" / "tiny-wav2vec2-base"


def by_name(rows):
    return {os.path.basename(r["path"]): r for r in rows}


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    """Three 3 s recordings of three participants and their manifests (no dev)."""
    root = tmp_path_factory.mktemp("recordings")
    for i in range(3):
        write_signal(root / "audio" / f"S{i}_rec.wav", chirp(3.0, 16000, seed=i), 16000)
    prepare_manifests(root / "audio", root / "manifests", dev_fraction=0.0)
    return root


def pretrain_args(train_manifest, output_dir, **overrides) -> list[str]:
    options = {
        "config_name": TINY,
        "train_manifest": train_manifest,
        "output_dir": output_dir,
        "crop_seconds": 1.0,
        "per_device_train_batch_size": 2,
        "num_negatives": 5,
        "max_train_steps": 2,
        "logging_steps": 1,
        "save_steps": 0,
        "num_workers": 0,
        "report_to": "none",
    }
    return flags(**(options | overrides))


def labelled_files(root: Path, count: int = 4) -> Path:
    """`count` 1 s utterances of different speakers and a train manifest of them."""
    for i in range(count):
        write_signal(root / f"S{i}_utt.flac", chirp(1.0, 16000, seed=i), 16000)
    (root / "train.tsv").write_text("path\ttext\n" + "".join(f"S{i}_utt.flac\tab ba\n" for i in range(count)))
    return root / "train.tsv"


# --------------------------------------------------------------------------------------------- 1. strict TSV


def test_a_stray_quote_no_longer_swallows_the_rest_of_the_manifest(tmp_path):
    """csv quoting merged 49 of 51 lines into one transcript: fine-tuning saw 2 utterances and its
    vocabulary gained the characters of the swallowed paths."""
    from utils.ctc_arguments import DataArguments
    from utils.utterances import manifest_utterances
    from utils.vocabulary import load_tokenizer

    for i in range(3):
        write_signal(tmp_path / f"S{i}_utt.wav", chirp(0.5, 16000, seed=i), 16000)
    lines = [f"S{i % 3}_utt.wav\tword {'abc'[i % 3]}" for i in range(51)]
    lines[1] = 'S1_utt.wav\t"stray quote'
    (tmp_path / "train.tsv").write_text("path\ttext\n" + "\n".join(lines) + "\n")
    train, dev, bad, _ = manifest_utterances(
        DataArguments(train_manifest=str(tmp_path / "train.tsv"), dev_fraction=0), 0
    )
    assert (len(train), dev, bad) == (51, [], [])
    assert [r["text"] for r in train[:3]] == ["word a", "stray quote", "word c"]  # '"' is in --chars_to_ignore
    vocab = load_tokenizer(None, train, dev).get_vocab()
    assert set(vocab) == set("wordabcstrayquote") | {"|", "[UNK]", "[PAD]"}


def test_tsv_fields_keep_their_quotes_and_a_line_with_the_wrong_field_count_is_named(tmp_path):
    rows = [{"path": "/a/x.wav", "text": '"ok" she said'}, {"path": "/a/y.wav", "text": 'say "hi'}]
    write_tsv(tmp_path / "m.tsv", rows, ["path", "text"])
    assert (tmp_path / "m.tsv").read_text() == 'path\ttext\n/a/x.wav\t"ok" she said\n/a/y.wav\tsay "hi\n'
    assert read_tsv(tmp_path / "m.tsv", ["path", "text"]) == rows
    (tmp_path / "crlf.tsv").write_bytes(b'path\ttext\r\n/a/x.wav\t"ok" she said\r\n/a/y.wav\tsay "hi\r\n\r\n')
    assert read_tsv(tmp_path / "crlf.tsv", ["path", "text"]) == rows
    (tmp_path / "gap.tsv").write_text("path\ttext\n/a/x.wav\tone\n\n/a/y.wav\ttwo\n")
    with pytest.raises(ValueError, match=r"gap.tsv, line 3: 1 tab-separated field\(s\), the header has 2"):
        read_tsv(tmp_path / "gap.tsv", ["path", "text"])
    (tmp_path / "extra.tsv").write_text("path\ttext\n/a/x.wav\tone\n/a/y.wav\ttwo\tthree\n")
    with pytest.raises(ValueError, match=r"extra.tsv, line 3: 3 tab-separated field\(s\), the header has 2"):
        read_tsv(tmp_path / "extra.tsv", ["path", "text"])
    (tmp_path / "short.tsv").write_text("path\ttext\tstart\n/a/x.wav\tone\t\n/a/y.wav\ttwo\n")
    with pytest.raises(ValueError, match=r"short.tsv, line 3: 2 tab-separated field\(s\), the header has 3"):
        read_tsv(tmp_path / "short.tsv", ["path"])
    with pytest.raises(ValueError, match=r"row 1, text 'two\\nlines' holds a tab or line break"):
        write_tsv(tmp_path / "no.tsv", [{"path": "/a/x.wav", "text": "two\nlines"}], ["path", "text"])
    assert not (tmp_path / "no.tsv").exists()


def test_a_manifest_with_a_utf8_bom_is_read(tmp_path):
    rows = [{"path": "/a/P01_x.wav", "participant": "P01", "duration": 1.5, "sample_rate": 16000}]
    rows[0] |= {"num_channels": 1, "num_frames": 24000}
    write_tsv(tmp_path / "m.tsv", rows, MANIFEST_COLUMNS)
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "m.tsv").read_bytes().replace(b"\n", b"\r\n"))
    assert read_manifest(tmp_path / "bom.tsv") == rows
    from utils.segments import is_rttm, read_segments

    (tmp_path / "vtc.rttm.txt").write_bytes(b"\xef\xbb\xbfSPEAKER P01_x 1 0.5 1.0 <NA> <NA> CHI <NA> <NA>\n")
    assert is_rttm(str(tmp_path / "vtc.rttm.txt"))
    assert read_segments(str(tmp_path / "vtc.rttm.txt")) == [("P01_x", 0.5, 1.5, "CHI")]


def test_paths_with_a_tab_or_line_break_are_listed_invalid_and_shown_escaped(tmp_path):
    audio = tmp_path / "audio"
    for name in ["P01_tab\there.wav", "P02_line\nbreak.wav", "P03_ok.wav", "P04_ok.wav"]:
        write_signal(audio / name, chirp(1.0, 16000), 16000)
    summary = prepare_manifest.main([str(audio), "--output_dir", str(tmp_path / "m"), "--dev_fraction", "0.3"])
    valid = read_manifest(tmp_path / "m" / "train.tsv") + read_manifest(tmp_path / "m" / "dev.tsv")
    assert sorted(by_name(valid)) == ["P03_ok.wav", "P04_ok.wav"]
    invalid = read_tsv(tmp_path / "m" / "invalid.tsv", ["path", "reason"])
    assert sorted(r["path"] for r in invalid) == [
        str(audio / "P01_tab\\there.wav"),
        str(audio / "P02_line\\nbreak.wav"),
    ]
    assert all(r["reason"].startswith("path holds a tab or line break (shown escaped)") for r in invalid)
    assert summary["invalid"]["by_reason"] == {"path holds a tab or line break": 2}
    from utils.segments import list_sources

    with pytest.raises(ValueError, match=r"2 input path\(s\) hold a tab or line break, which index.tsv cannot list"):
        list_sources([str(audio)])


@pytest.mark.slow
def test_transcribe_prints_one_line_per_file_whatever_its_name(tmp_path, capsys):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    import transcribe
    from utils.vocabulary import build_vocabulary, make_tokenizer

    tokenizer = make_tokenizer(build_vocabulary(["ab ba"]))
    torch.manual_seed(0)
    Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(TINY, vocab_size=len(tokenizer))).save_pretrained(tmp_path / "m")
    Wav2Vec2Processor(Wav2Vec2FeatureExtractor.from_pretrained(TINY), tokenizer).save_pretrained(tmp_path / "m")
    files = [write_signal(tmp_path / name, chirp(1.0, 16000), 16000) for name in ["a\nb.wav", "c\td.wav", "e.wav"]]
    broken = tmp_path / "f\ng.wav"
    broken.write_bytes(b"not audio")
    status = transcribe.main(
        ["--model_name_or_path", str(tmp_path / "m"), "--device", "cpu", *map(str, files), str(broken)]
    )
    out, err = capsys.readouterr()
    assert status == 1
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(f).replace("\n", "\\n").replace("\t", "\\t") for f in files]
    assert all(len(line.split("\t")) == 2 for line in lines)
    (error,) = [line for line in err.splitlines() if "g.wav" in line]  # the name's line break is escaped too
    assert error.startswith(f"error: {tmp_path}/f\\ng.wav: Error opening")


# --------------------------------------------------------------------------------------------- 3. silent shrinkage


def test_a_folder_without_valid_audio_is_an_error_and_leaves_the_manifests_alone(tmp_path, capsys):
    good, bad, out = tmp_path / "good", tmp_path / "bad", tmp_path / "manifests"
    for i in range(2):
        write_signal(good / f"P0{i}_x.wav", chirp(1.0, 16000, seed=i), 16000)
    prepare_manifest.main([str(good), "--output_dir", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (bad / "sub").mkdir(parents=True)
    (bad / "P01_garbage.wav").write_bytes(b"garbage" * 100)
    (bad / "sub" / "P02_empty.flac").write_bytes(b"")
    (bad / "notes.txt").write_text("no audio extension")
    with pytest.raises(SystemExit) as exit_info:
        prepare_manifest.main([str(bad), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert f"no valid audio in {bad}: 2 invalid file(s) or folder(s) {{'unreadable': 2}}" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit):
        prepare_manifest.main([str(tmp_path / "none"), "--output_dir", str(out)])
    assert f"no audio files in {tmp_path / 'none'} (extensions " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_symlinked_folders_are_followed_once_and_a_link_loop_ends(tmp_path):
    root, elsewhere = tmp_path / "audio", tmp_path / "elsewhere"
    write_signal(root / "P01_a.wav", chirp(1.0, 16000, seed=1), 16000)
    write_signal(elsewhere / "deeper" / "P02_b.wav", chirp(1.0, 16000, seed=2), 16000)
    os.symlink(elsewhere, root / "linked")
    os.symlink(elsewhere, root / "linked_again")
    os.symlink(root, root / "linked" / "back_up")  # a loop: audio/linked/back_up/linked/back_up/...
    os.symlink(root / "P01_a.wav", root / "P03_alias.wav")  # the same recording under another participant
    valid, invalid = scan_audio_folder(root)
    assert sorted((os.path.basename(r["path"]), r["participant"]) for r in valid) == [
        ("P01_a.wav", "P01"),
        ("P02_b.wav", "P02"),
    ]
    assert by_name(valid)["P02_b.wav"]["path"] == str(elsewhere / "deeper" / "P02_b.wav")
    assert invalid == [{"path": str(root / "P03_alias.wav"), "reason": f"same file as {root / 'P01_a.wav'}"}]


def test_an_unreadable_folder_is_reported_in_invalid_tsv(tmp_path, monkeypatch):
    root = tmp_path / "audio"
    write_signal(root / "P01_a.wav", chirp(1.0, 16000), 16000)
    write_signal(root / "locked" / "P02_b.wav", chirp(1.0, 16000), 16000)
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root, so the refusal is made here
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = prepare_manifests(root, tmp_path / "m", dev_fraction=0.0)
    assert [os.path.basename(r["path"]) for r in read_manifest(tmp_path / "m" / "train.tsv")] == ["P01_a.wav"]
    invalid = read_tsv(tmp_path / "m" / "invalid.tsv", ["path", "reason"])
    assert invalid == [{"path": str(root / "locked"), "reason": "unreadable folder: Permission denied"}]
    assert summary["invalid"] == {"files": 1, "by_reason": {"unreadable folder": 1}}


def test_a_participant_regex_that_gives_every_file_one_id_is_an_error_when_dev_is_asked_for(tmp_path, capsys):
    for i in range(3):
        write_signal(tmp_path / "audio" / f"P0{i}_x.wav", chirp(1.0, 16000, seed=i), 16000)
    args = [str(tmp_path / "audio"), "--output_dir", str(tmp_path / "m"), "--participant_regex", "(P)"]
    with pytest.raises(SystemExit):
        prepare_manifest.main(args + ["--dev_fraction", "0.2"])
    assert "every file has participant id 'P', so no participant is left for a dev set" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert prepare_manifest.main(args + ["--dev_fraction", "0"])["train"]["files"] == 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_crop_stream_whose_files_all_fail_ends_in_one_line(recordings, tmp_path, num_workers):
    from utils.crops import CropStream, exit_on_unreadable
    from utils.training import make_loader

    rows = read_manifest(recordings / "manifests" / "train.tsv")
    for row in rows:  # the manifest was right when written; the files broke since
        row["path"] = str(tmp_path / os.path.basename(row["path"]))
        Path(row["path"]).write_bytes(b"garbage" * 100)
    stream = CropStream([(rows, 1.0)], batch_size=2, crop_seconds=0.5, names=["train manifest t.tsv"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("ignore")  # one per file, tested in test_crop_stream.py
        next(exit_on_unreadable(make_loader(stream, num_workers, batch_size=None)))
    message = str(exit_info.value.code)
    assert message.startswith("error: train manifest t.tsv: none of its 3 file(s) could be read (e.g. ")
    assert "\n" not in message and "Format not recognised" in message


@pytest.mark.parametrize("broken", ["train", "dev"])
def test_pretraining_on_a_manifest_whose_files_all_fail_ends_in_one_line(recordings, tmp_path, broken):
    import pretrain

    rows = read_manifest(recordings / "manifests" / "train.tsv")
    write_tsv(tmp_path / "train.tsv", rows, MANIFEST_COLUMNS)
    write_tsv(tmp_path / "dev.tsv", rows, MANIFEST_COLUMNS)
    for row in rows:  # the manifest was right when written; the files broke since
        row["path"] = str(tmp_path / os.path.basename(row["path"]))
        Path(row["path"]).write_bytes(b"garbage" * 100)
    bad = tmp_path / f"{broken}.tsv"
    write_tsv(bad, rows, MANIFEST_COLUMNS)
    args = pretrain_args(tmp_path / "train.tsv", tmp_path / "out", dev_manifest=tmp_path / "dev.tsv", eval_steps=1)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(args)
    name = str(bad) if broken == "train" else f"dev manifest {tmp_path / 'dev.tsv'}"
    assert str(exit_info.value.code).startswith(f"error: {name}: none of its 3 file(s) could be read")


def test_fine_tuning_on_files_that_all_fail_to_read_stops_with_one_line(tmp_path):
    """The headers read, the audio does not: each batch was skipped and the run trained on nothing, exit 0."""
    import finetune_ctc

    train = labelled_files(tmp_path)
    for path in tmp_path.glob("*.flac"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    args = flags(config_name=TINY, train_manifest=train, dev_fraction=0, output_dir=tmp_path / "out")
    args += flags(max_train_steps=3, per_device_train_batch_size=2, num_workers=0, report_to="none")
    with pytest.raises(SystemExit) as exit_info:
        finetune_ctc.main(args)
    assert exit_info.value.code == "error: none of the 4 training file(s) could be read (see the warnings above)"
    assert not (tmp_path / "out" / "model.safetensors").exists()


class OneProcess:
    """What train_row and start_train_log ask of an Accelerator, for one process."""

    num_processes, is_main_process, device = 1, True, "cpu"

    def reduce(self, tensor, reduction="sum"):
        return tensor


def test_a_mostly_silent_corpus_is_warned_about_once_with_its_share(caplog):
    from utils.pretrain_log import LogWindow, train_row

    window = LogWindow(torch.ones(7), 1, 8.0, steps=1)
    caplog.set_level(logging.WARNING)
    for crops, all_silent in [(10, 5), (20, 13), (40, 30)]:
        window.worker_stats = {0: {"crops": crops // 2, "all_silent": all_silent // 2}, 1: {"crops": crops // 2}}
        window.worker_stats[1]["all_silent"] = all_silent - all_silent // 2
        record, _ = train_row(OneProcess(), window, 1, 2.0, 1e-4, 1.0, 0, set())
        assert (record["crops_all_silent"], math.isfinite(record["loss"])) == (all_silent, True)
    warnings = [r.getMessage() for r in caplog.records if "silent on every try" in r.getMessage()]
    assert warnings == [
        "65 % of the training crops so far (13 of 20) were silent on every try (RMS below --min_rms): the corpus "
        "is mostly silence (or --min_rms is too high), and each such crop is the loudest of its tries"
    ]


# --------------------------------------------------------------------------------------------- 4. tracebacks


@pytest.mark.parametrize(
    "crop_seconds, message",
    [
        ("0", "--crop_seconds must be a positive number of seconds, not 0.0"),
        ("-1", "--crop_seconds must be a positive number of seconds, not -1.0"),
        ("nan", "--crop_seconds must be a positive number of seconds, not nan"),
        ("0.01", "--crop_seconds 0.01 gives 0 frame(s) (the model's receptive field is 400 samples"),
        ("0.2", "--mask_time_length 10 needs more frames than that, at least 0.225 s of crop"),
    ],
)
def test_crops_too_short_for_the_model_are_named(recordings, tmp_path, crop_seconds, message):
    import pretrain

    args = pretrain_args(recordings / "manifests" / "train.tsv", tmp_path / "out", crop_seconds=crop_seconds)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(args)
    assert message in str(exit_info.value.code)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 0.1\nmax_train_steps: [1\nseed: 3\n", "r.yaml, line 3: not valid YAML: expected ',' or ']'"),
        ("# a list\n- learning_rate: 0.1\n", "r.yaml, line 2: the top level is a list, not a mapping"),
        ("just words\n", "r.yaml, line 1: the top level is a str, not a mapping"),
        ("seed: 1\n7: 2\n", "r.yaml: 7 is not an option name"),
        (
            "seed: !!python/object/apply:os.system ['touch {marker}']\n",
            "r.yaml, line 1: could not determine a constructor for the tag '!!python/object/apply:os.system': refused",
        ),
    ],
)
def test_a_broken_recipe_is_named_with_its_line(tmp_path, text, message):
    from utils.training import TrainingArguments, parse_args_with_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.format(marker=tmp_path / "ran"))
    with pytest.raises(SystemExit) as exit_info:
        parse_args_with_recipe([TrainingArguments], [str(recipe)])
    assert str(exit_info.value.code).startswith(f"error: recipe {tmp_path}/{message}")
    assert "\n" not in str(exit_info.value.code) and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("script", ["finetune_ctc", "pretrain"])
def test_a_model_folder_without_weights_points_to_config_name(recordings, tmp_path, script):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    if script == "finetune_ctc":
        import finetune_ctc as module

        args = flags(train_manifest=labelled_files(tmp_path), dev_fraction=0, output_dir=tmp_path / "out")
        args += flags(model_name_or_path=folder, num_workers=0, report_to="none")
    else:
        import pretrain as module

        args = pretrain_args(recordings / "manifests" / "train.tsv", tmp_path / "out")
        args[args.index("--config_name")] = "--model_name_or_path"
        args[args.index("--model_name_or_path") + 1] = str(folder)
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == (
        f"error: --model_name_or_path {folder} holds no weights (model.safetensors or pytorch_model.bin); "
        f"to start from random weights with its config, use --config_name {folder}"
    )


def test_a_cut_off_last_train_log_line_is_dropped_on_resume_with_a_warning(tmp_path, caplog):
    from utils.training import TrainingArguments, read_jsonl, start_train_log

    log = tmp_path / "train_log.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "dev_loss": 2.9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    caplog.set_level(logging.WARNING)
    path = start_train_log(OneProcess(), tmp_path, 2, {"training": TrainingArguments()}, [], "test")
    assert read_jsonl(path) == rows and log.read_text().endswith('"dev_loss": 2.9}\n')
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{log}: dropping its last line 4, cut off (Unterminated string")
    log.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(SystemExit, match=r"train_log.jsonl, line 2 is not JSON"):
        read_jsonl(log)
