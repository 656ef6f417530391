"""Whose output folder is it: a training run never writes over another run (refused unless
--resume_from_checkpoint or --overwrite_output_dir, which removes the old run first), and one
extraction at a time writes to a features folder (a lock naming its pid), never over the outputs of
other flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import chirp, flags, log_rows, write_signal
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, Wav2Vec2Model

import extract_features
import finetune_ctc
import pretrain
from utils.manifests import read_tsv

SR = 16_000


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recordings")
    for index in range(4):
        write_signal(root / "audio" / f"R{index}_day.wav", chirp(6, SR, seed=index), SR)
    from utils.manifests import prepare_manifests

    prepare_manifests(root / "audio", root / "manifests", dev_fraction=0.25, seed=0)
    return root


def pretrain_args(recordings: Path, output_dir: Path, tiny_base_dir: Path, **overrides) -> list[str]:
    options = dict(
        config_name=tiny_base_dir,
        train_manifest=recordings / "manifests" / "train.tsv",
        output_dir=output_dir,
        crop_seconds=1.0,
        per_device_train_batch_size=2,
        num_negatives=5,
        logging_steps=1,
        eval_steps=0,
        save_steps=2,
        num_workers=0,
        report_to="none",
        max_train_steps=4,
    )
    return flags(**{**options, **overrides})


@pytest.mark.slow
def test_a_finished_pretraining_run_is_never_written_over(recordings, tmp_path, tiny_base_dir):
    """Re-running pretraining without resume used to replace the model and keep the old run's later
    checkpoint, which --resume_from_checkpoint latest then resumed from."""
    out = tmp_path / "run"
    pretrain.main(pretrain_args(recordings, out, tiny_base_dir))
    first_model = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a pretrain.py run .*--overwrite_output_dir"):
        pretrain.main(pretrain_args(recordings, out, tiny_base_dir, max_train_steps=2))
    assert (out / "model.safetensors").read_bytes() == first_model
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    (out / "my_notes.txt").write_text("not the run's")  # a user's file: left alone
    pretrain.main(pretrain_args(recordings, out, tiny_base_dir, max_train_steps=2) + ["--overwrite_output_dir"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # checkpoint-4 is gone
    assert [r["step"] for r in log_rows(out)] == [1, 2] and (out / "my_notes.txt").is_file()
    assert json.loads((out / "training_args.json").read_text())["script"] == "pretrain.py"


@pytest.mark.slow
def test_fine_tuning_into_a_pretraining_folder_is_refused(recordings, tmp_path, tiny_base_dir):
    out = tmp_path / "pretrained"
    pretrain.main(pretrain_args(recordings, out, tiny_base_dir, max_train_steps=2))
    model = (out / "model.safetensors").read_bytes()
    (tmp_path / "train.tsv").write_text(
        "path\ttext\n" + "".join(f"{recordings / 'audio' / f'R{i}_day.wav'}\tab c\n" for i in range(4))
    )
    ctc = flags(model_name_or_path=out, train_manifest=tmp_path / "train.tsv", output_dir=out, max_train_steps=1)
    with pytest.raises(SystemExit, match="holds a pretrain.py run .*finetune_ctc.py would replace its model"):
        finetune_ctc.main(ctc + ["--resume_from_checkpoint", "latest"])  # a job script that always resumes
    with pytest.raises(SystemExit, match="already holds a pretrain.py run"):
        finetune_ctc.main(ctc)
    with pytest.raises(SystemExit, match="--overwrite_output_dir would delete --model_name_or_path"):
        finetune_ctc.main(ctc + ["--overwrite_output_dir"])
    assert (out / "model.safetensors").read_bytes() == model


@pytest.mark.slow
def test_resume_latest_without_a_checkpoint_does_not_replace_a_finished_model(recordings, tmp_path, tiny_base_dir):
    out = tmp_path / "run"
    pretrain.main(pretrain_args(recordings, out, tiny_base_dir, max_train_steps=2, save_steps=0))
    with pytest.raises(SystemExit, match="no checkpoint: --resume_from_checkpoint latest would start over"):
        pretrain.main(pretrain_args(recordings, out, tiny_base_dir, save_steps=0, resume_from_checkpoint="latest"))
    # A run stopped before its first checkpoint (no model yet) starts again, as a requeued job must.
    (out / "model.safetensors").unlink()
    pretrain.main(pretrain_args(recordings, out, tiny_base_dir, max_train_steps=2, resume_from_checkpoint="latest"))
    assert [r["step"] for r in log_rows(out)] == [1, 2]


def test_claims_of_a_fresh_folder_and_of_user_files_only(tmp_path):
    from utils.pretrain_arguments import DataArguments
    from utils.run_folder import claim_output_dir, run_entries, script_of_run
    from utils.training import TrainingArguments

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    out = tmp_path / "run"
    out.mkdir()
    (out / "slurm-123.out").write_text("a cluster log")
    claim_output_dir(OneProcess(), "pretrain.py", [TrainingArguments(output_dir=str(out))])  # nothing of a run
    (out / "config.json").write_text(json.dumps({"architectures": ["Wav2Vec2ForCTC"]}))
    (out / "best").mkdir()
    assert [p.name for p in run_entries(out)] == ["best", "config.json"] and script_of_run(out) == "finetune_ctc.py"
    with pytest.raises(SystemExit, match="holds a finetune_ctc.py run"):
        claim_output_dir(OneProcess(), "pretrain.py", [TrainingArguments(output_dir=str(out))])
    (out / "best" / "train.tsv").write_text("path\tparticipant\n")  # a manifest kept in the run's folder
    data = DataArguments(train_manifest=f"{tmp_path}/elsewhere.tsv:0.5,{out}/best/train.tsv:0.5")
    with pytest.raises(SystemExit, match=f"--overwrite_output_dir would delete --train_manifest {out}/best/train.tsv"):
        claim_output_dir(
            OneProcess(), "pretrain.py", [data, TrainingArguments(output_dir=str(out), overwrite_output_dir=True)]
        )
    (out / "best" / "train.tsv").unlink()
    claim_output_dir(OneProcess(), "pretrain.py", [TrainingArguments(output_dir=str(out), overwrite_output_dir=True)])
    assert sorted(p.name for p in out.iterdir()) == ["slurm-123.out"]


# --------------------------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_base_dir) -> str:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config.from_pretrained(tiny_base_dir)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir).save_pretrained(folder)
    return str(folder)


def extract(model_dir, output_dir, *inputs, **options):
    argv = flags(model_name_or_path=model_dir, output_dir=output_dir, num_workers=0, chunk_seconds=2)
    return extract_features.main([*argv, *map(str, inputs), *flags(**options)])


def test_a_second_extraction_with_other_flags_is_refused_or_replaces_the_first(model_dir, tmp_path, recordings):
    """A run over some of the files with other flags, then --skip_existing over all of them, used to
    keep the first run's outputs under the second run's labels."""
    audio, out = recordings / "audio", tmp_path / "feats"
    extract(model_dir, out, audio, layers="last")
    last = {r["output"]: np.load(out / r["output"]) for r in read_tsv(out / "index.tsv", [])}
    with pytest.raises(SystemExit, match="holds the outputs of an earlier extraction.*--skip_existing"):
        extract(model_dir, out, audio / "R0_day.wav", layers="0")
    with pytest.raises(SystemExit, match=r"--skip_existing: .*'layers': \['last', '0'\]"):
        extract(model_dir, out, audio, layers="0", skip_existing=True)
    assert {r["output"]: np.load(out / r["output"]) for r in read_tsv(out / "index.tsv", [])}.keys() == last.keys()

    (out / "R1_day.npy.partial").write_bytes(b"left by a killed run")
    extract(model_dir, out, audio / "R0_day.wav", layers="0", overwrite_output_dir=True)
    assert sorted(p.name for p in out.iterdir()) == ["R0_day.npy", "extract_config.json", "failures.tsv", "index.tsv"]
    assert json.loads((out / "extract_config.json").read_text())["layers"] == "0"
    result = extract(model_dir, out, audio, layers="0", skip_existing=True)
    index = read_tsv(out / "index.tsv", [])
    assert result["outputs"] == 4 and {r["layers"] for r in index} == {"0"}
    assert not any(np.allclose(np.load(out / name), features) for name, features in last.items())


def test_a_model_trained_again_in_place_is_not_taken_for_the_old_one(model_dir, tmp_path, recordings, tiny_base_dir):
    model = tmp_path / "model"
    Wav2Vec2ForPreTraining(Wav2Vec2Config.from_pretrained(tiny_base_dir)).save_pretrained(model)
    Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir).save_pretrained(model)
    out = tmp_path / "feats"
    extract(model, out, recordings / "audio" / "R0_day.wav")
    Wav2Vec2ForPreTraining(Wav2Vec2Config.from_pretrained(tiny_base_dir)).save_pretrained(model)
    os.utime(model / "model.safetensors", ns=(1, 1))  # another time, whatever the clock's resolution
    with pytest.raises(SystemExit, match="--skip_existing: .*model_fingerprint"):
        extract(model, out, recordings / "audio", skip_existing=True)


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from utils.extraction_folder import ExtractionLock
lock = ExtractionLock(Path({out!r}))
assert lock.acquire() is None
print("held", flush=True)
time.sleep(60)
"""


def test_a_running_extraction_locks_its_folder_and_a_dead_ones_lock_is_taken_over(
    model_dir, tmp_path, recordings, repo_dir, caplog
):
    """Two runs into one folder at once used to write one index.tsv with the other's labels."""
    out, audio = tmp_path / "feats", recordings / "audio" / "R0_day.wav"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK.format(repo=str(repo_dir), out=str(out))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"in use by another extraction \\(pid {holder.pid} on "):
            extract(model_dir, out, audio)
        assert not (out / "extract_config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Killed: the kernel dropped its flock, and its pid is dead; its lock file is still there.
    assert json.loads((out / ".extract.lock").read_text())["pid"] == holder.pid
    extract(model_dir, out, audio)
    assert f"pid {holder.pid} ended without releasing it" in caplog.text
    assert len(read_tsv(out / "index.tsv", [])) == 1 and not (out / ".extract.lock").exists()


def test_without_flock_the_lock_checks_whether_its_pid_lives(tmp_path, monkeypatch):
    import fcntl

    from utils.extraction_folder import ExtractionLock

    def no_flock(fd, operation):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        first = ExtractionLock(tmp_path)
        assert first.acquire() is None
        record = json.loads((tmp_path / ".extract.lock").read_text())
        (tmp_path / ".extract.lock").write_text(json.dumps({**record, "pid": sleeper.pid, "started": None}))
        assert f"pid {sleeper.pid} on" in ExtractionLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ExtractionLock(tmp_path).acquire() is None  # its pid is dead now
