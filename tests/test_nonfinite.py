"""Non-finite numbers: audio with NaN or Inf samples is reported and left out (manifests, crops,
utterances, extraction); updates with a NaN or Inf loss or gradient norm, or an fp16 overflow, are
skipped and counted without advancing the step, the schedules or the step budget; too many in a row
stop the run keeping the last good checkpoint; NaN weights are never saved; dev metrics computed from
NaN are null."""

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import chirp, flags, log_rows, write_signal
from safetensors.torch import load_file

SR = 16000


def float_wav(path: Path, seconds: float = 6.0, fault: str | None = None, seed: int = 0) -> Path:
    """A float WAV (the only kind that can hold NaN or Inf): clean, with Inf samples every 0.25 s
    (so every crop of it has some), or all NaN."""
    x = chirp(seconds, SR, seed=seed)
    if fault == "inf":
        x[SR // 8 :: SR // 4] = np.inf
    elif fault == "nan":
        x[:] = np.nan
    return write_signal(path, x, SR, subtype="FLOAT")


def manifest(path: Path, files: list[Path]) -> Path:
    from utils.manifests import MANIFEST_COLUMNS, write_tsv

    rows = []
    for index, file in enumerate(files):
        info = sf.info(str(file))
        rows.append(
            {
                "path": str(file),
                "participant": f"P{index}",
                "duration": info.duration,
                "sample_rate": info.samplerate,
                "num_channels": info.channels,
                "num_frames": info.frames,
            }
        )
    write_tsv(path, rows, MANIFEST_COLUMNS)
    return path


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


# --------------------------------------------------------------------------------------------- data


def test_manifest_probes_flag_nonfinite_samples(tmp_path):
    from utils.manifests import prepare_manifests

    audio = tmp_path / "audio"
    float_wav(audio / "A1_clean.wav", 4.0)
    few = chirp(4.0, SR)
    few[[4800, 22400]] = [np.inf, -np.inf]  # between the probes: only a full read of the file finds them
    write_signal(audio / "A2_few.wav", few, SR, subtype="FLOAT")
    float_wav(audio / "A3_nan.wav", 4.0, "nan")
    summary = prepare_manifests(audio, tmp_path / "manifests", dev_fraction=0)
    invalid = dict(line.split("\t") for line in (tmp_path / "manifests" / "invalid.tsv").read_text().splitlines()[1:])
    assert {Path(p).name: r for p, r in invalid.items()} == {
        "A2_few.wav": "non-finite samples (NaN or Inf at 0.300 s)",
        "A3_nan.wav": "non-finite samples (NaN or Inf at 0.000 s)",
    }
    assert summary["invalid"]["by_reason"] == {"non-finite samples": 2} and summary["train"]["files"] == 1


def test_crops_with_nonfinite_samples_are_skipped_and_counted(tmp_path):
    from utils.crops import CropStream
    from utils.manifests import read_manifest

    files = [float_wav(tmp_path / "inf.wav", fault="inf"), float_wav(tmp_path / "nan.wav", fault="nan")]
    files.append(float_wav(tmp_path / "good.wav"))
    rows = read_manifest(manifest(tmp_path / "m.tsv", files))
    stream = CropStream([(rows, 1.0)], batch_size=4, crop_seconds=1.0, epoch_multiplier=4, normalize=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [batch for batch, _ in zip(stream, range(3))]
    assert all(np.isfinite(b["input_values"]).all() for b in batches)
    assert sorted(Path(p).name for b in batches for p in b["new_unreadable"]) == ["inf.wav", "nan.wav"]
    assert batches[-1]["stream_stats"]["unreadable_files"] == 2
    messages = [str(w.message) for w in caught if "skipping unreadable file" in str(w.message)]
    assert len(messages) == 2 and all("non-finite samples (NaN or Inf at" in m for m in messages), messages


def test_utterances_with_nonfinite_samples_are_skipped_and_counted(tmp_path):
    from utils.utterances import Collator, UtteranceDataset

    rows = [
        {"path": str(float_wav(tmp_path / name, 1.0, fault)), "start": None, "end": None, "labels": [3, 4]}
        for name, fault in (("good.wav", None), ("inf.wav", "inf"), ("nan.wav", "nan"))
    ]
    dataset = UtteranceDataset(rows, normalize=True)
    batch = Collator(use_attention_mask=False, min_samples=400)([dataset[i] for i in range(3)])
    assert batch["indices"] == [0] and torch.isfinite(batch["input_values"]).all()
    assert [(Path(p).name, reason.split(" (")[0]) for p, reason in batch["failed"]] == [
        ("inf.wav", "non-finite samples"),
        ("nan.wav", "non-finite samples"),
    ]


def test_extraction_fails_outputs_with_nonfinite_audio_or_features(tmp_path, tiny_base_dir):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    import extract_features

    audio = tmp_path / "audio"
    float_wav(audio / "good.wav", 3.0)
    float_wav(audio / "bad.wav", 3.0, "inf")
    models = {}
    for name in ("finite", "nan"):
        torch.manual_seed(0)
        model = Wav2Vec2Model(Wav2Vec2Config.from_pretrained(tiny_base_dir))
        if name == "nan":  # as a NaN pretraining run left it
            model.encoder.layer_norm.weight.data.fill_(float("nan"))
        model.save_pretrained(tmp_path / name)
        Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir).save_pretrained(tmp_path / name)
        models[name] = tmp_path / name

    def run(model, out):
        argv = flags(model_name_or_path=model, output_dir=out, num_workers=0, chunk_seconds=1, context_seconds=0.5)
        result = extract_features.main([*argv, str(audio)])
        failures = (out / "failures.tsv").read_text().splitlines()[1:]
        index = (out / "index.tsv").read_text().splitlines()[1:]
        return result, {Path(line.split("\t")[0]).name: line.split("\t")[-1] for line in failures}, index

    result, failures, index = run(models["finite"], tmp_path / "feats")
    assert result["outputs"] == 1 and [Path(line.split("\t")[0]).name for line in index] == ["good.wav"]
    assert list(failures) == ["bad.wav"] and failures["bad.wav"].startswith("non-finite samples (NaN or Inf at")
    assert np.isfinite(np.load(tmp_path / "feats" / "good.npy")).all()
    assert not (tmp_path / "feats" / "bad.npy").exists()

    result, failures, index = run(models["nan"], tmp_path / "nan-feats")
    assert result["outputs"] == 0 and index == [] and not list((tmp_path / "nan-feats").glob("*.npy*"))
    assert failures["good.wav"].startswith("non-finite features (NaN or Inf) from the model")


# --------------------------------------------------------------------------------------------- the guard


def test_guard_skips_an_fp16_overflow_through_the_grad_scaler():
    """The fp16 path with accelerate's optimizer wrapper and a real GradScaler (on the CPU, where
    accelerate would make none): skipped, no weight or optimizer change, the scale lowered, and the
    scaler ready for the next update."""
    from accelerate import Accelerator

    from utils.numerics import UpdateGuard

    accelerator = Accelerator()
    accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = torch.nn.Linear(3, 1)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1))
    guard = UpdateGuard(max_consecutive=2)
    weights = model.weight.detach().clone()

    def attempt(factor):
        sums, before = torch.zeros(2), torch.zeros(2)
        loss = model(torch.ones(1, 3)).sum() * factor
        sums += torch.stack([loss.detach(), torch.tensor(1.0)])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer.optimizer)  # what accelerator.clip_grad_norm_ does in fp16
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return guard.step(accelerator, optimizer, norm, sums, before, step=7), sums

    applied, sums = attempt(float("inf"))
    assert not applied and guard.skipped == 1 and not guard.stopped
    assert torch.equal(model.weight, weights) and not optimizer.state and scaler.get_scale() == 2.0**15
    assert sums.tolist() == [0.0, 0.0]  # out of the log window
    applied, _ = attempt(1.0)
    assert applied and guard.consecutive == 0 and not torch.equal(model.weight, weights)
    attempt(float("nan"))
    attempt(float("nan"))
    assert guard.stopped and guard.skipped == 3 and "2 updates in a row skipped after step 7" in guard.message
    accelerator.free_memory()


def pretrain_args(tmp_path: Path, config_dir, **overrides) -> list[str]:
    good = [float_wav(tmp_path / "audio" / f"S{i}.wav", seed=i) for i in range(4)]
    options = {
        "config_name": config_dir,
        "train_manifest": manifest(tmp_path / "train.tsv", good[:3]),
        "dev_manifest": manifest(tmp_path / "dev.tsv", good[3:]),
        "output_dir": tmp_path / "run",
        "crop_seconds": 1.0,
        "epoch_multiplier": 16,
        "per_device_train_batch_size": 4,
        "num_negatives": 10,
        "learning_rate": 2e-3,
        "warmup_steps": 2,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 0,
        "num_workers": 0,
        "report_to": "none",
        "max_train_steps": 6,
        "gumbel_temperature_decay": 0.99,
    }
    options.update(overrides)
    return flags(**options)


def nan_output_on(monkeypatch, model_class, calls_to_spoil, output: str, mode: str = "train"):
    """Make `output` of the model NaN on the forward calls n (1-based, counted in `mode`: train or
    eval) for which calls_to_spoil(n) is true. Returns the list the calls are counted in."""
    original, calls = model_class.forward, []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training == (mode == "train"):
            calls.append(1)
            if calls_to_spoil(len(calls)):
                setattr(out, output, getattr(out, output) * float("nan"))
        return out

    monkeypatch.setattr(model_class, "forward", forward)
    return calls


@pytest.mark.slow
def test_pretraining_skips_a_file_with_inf_samples(tmp_path, tiny_base_dir):
    """The reproduction: a float WAV with Inf samples gave NaN losses from step 0, a model of NaN
    tensors, dev accuracy 1.0 and exit 0."""
    import pretrain

    args = pretrain_args(tmp_path, tiny_base_dir, max_train_steps=4, eval_steps=4)
    bad = float_wav(tmp_path / "audio" / "inf.wav", fault="inf")
    good = [tmp_path / "audio" / f"S{i}.wav" for i in range(3)]
    manifest(tmp_path / "train.tsv", [bad, *good])
    pretrain.main(args)
    rows = log_rows(tmp_path / "run")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["skipped_files"] == 1 and train[-1]["skipped_updates"] == 0
    dev = [r for r in rows if "dev_loss" in r]
    assert [r["step"] for r in dev] == [0, 4] and all(0 < r["dev_accuracy"] < 0.5 for r in dev)
    assert all_finite(tmp_path / "run" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["nan_loss", "fp16_overflow"])
def test_skipped_updates_do_not_advance_step_schedules_or_budget(fault, tmp_path, tiny_base_dir, monkeypatch):
    """Updates 2 and 3 of 8 are skipped: six applied updates make steps 1-6, the LR schedule ends at
    0 and the Gumbel temperature of step k is the schedule's k-th, as fairseq counts updates."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import Wav2Vec2ForPreTraining

    import pretrain

    skipped = {2, 3}
    if fault == "nan_loss":
        calls = nan_output_on(monkeypatch, Wav2Vec2ForPreTraining, lambda n: n in skipped, "projected_states")
    else:  # what accelerate's GradScaler path does on an overflow: no optimizer step, step_was_skipped set
        original, calls = AcceleratedOptimizer.step, []

        def step(self, closure=None):
            calls.append(1)
            self._is_overflow = len(calls) in skipped
            return None if self._is_overflow else original(self, closure)

        monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    pretrain.main(pretrain_args(tmp_path, tiny_base_dir, save_steps=6))
    train = [r for r in log_rows(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in train)
    assert [r["lr"] for r in train] == pytest.approx([1e-3, 2e-3, 1.5e-3, 1e-3, 5e-4, 0.0])
    assert [r["gumbel_temperature"] for r in train] == pytest.approx([2.0 * 0.99**k for k in range(6)])
    assert [r["skipped_updates"] for r in train] == [0, 2, 2, 2, 2, 2]
    assert len(calls) == 8
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-6" / "training_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["skipped_updates"]) == (6, 0, 8, 2)
    assert all_finite(tmp_path / "run" / "model.safetensors")


@pytest.mark.slow
def test_consecutive_nonfinite_updates_stop_the_run_keeping_the_last_good_checkpoint(
    tmp_path, tiny_base_dir, monkeypatch
):
    from transformers import Wav2Vec2ForPreTraining

    import pretrain

    nan_output_on(monkeypatch, Wav2Vec2ForPreTraining, lambda n: n >= 3, "projected_states")
    with pytest.raises(SystemExit) as stopped:
        pretrain.main(pretrain_args(tmp_path, tiny_base_dir, save_steps=2, max_consecutive_nonfinite=3))
    run = tmp_path / "run"
    message = str(stopped.value)
    assert message.startswith("error: 3 updates in a row skipped after step 2") and "checkpoint-2" in message
    assert not (run / "model.safetensors").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert all_finite(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert [r["step"] for r in log_rows(run) if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_a_nan_model_gets_null_dev_metrics_and_is_never_saved(tmp_path, tiny_base_dir):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    import pretrain

    start = tmp_path / "nan-model"  # what a NaN run saved before this guard
    model = Wav2Vec2ForPreTraining(Wav2Vec2Config.from_pretrained(tiny_base_dir))
    for param in model.parameters():
        param.data.fill_(float("nan"))
    model.save_pretrained(start)
    Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir).save_pretrained(start)
    args = pretrain_args(tmp_path, tiny_base_dir, eval_steps=1, max_consecutive_nonfinite=2)
    args[args.index("--config_name") : args.index("--config_name") + 2] = ["--model_name_or_path", str(start)]
    with pytest.raises(SystemExit, match="2 updates in a row skipped after step 0"):
        pretrain.main(args)
    rows = log_rows(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["step"] == 0
    figures = ["dev_loss", "dev_contrastive_loss", "dev_accuracy", "dev_diversity_loss", "dev_codevector_perplexity"]
    assert {name: rows[0][name] for name in figures} == dict.fromkeys(figures)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_checkpoints_and_model_folders_refuse_nan_weights(tmp_path):
    from accelerate import Accelerator

    from utils.checkpoints import list_checkpoints, save_checkpoint, save_model_folder

    accelerator = Accelerator()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    objects = accelerator.prepare(model, optimizer, scheduler)
    model = objects[0]
    train_args = SimpleNamespace(
        save_total_limit=1, per_device_train_batch_size=1, gradient_accumulation_steps=1, seed=0
    )
    save_checkpoint(accelerator, objects, tmp_path, 1, {}, train_args)
    model.weight.data[0, 0] = float("inf")
    with pytest.raises(SystemExit, match="step 2: 1 weight tensor.*weight.*no checkpoint written"):
        save_checkpoint(accelerator, objects, tmp_path, 2, {}, train_args)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]  # not pruned by a NaN one
    with pytest.raises(SystemExit, match="not written"):
        save_model_folder(tmp_path / "final", model, processor=None)
    assert not (tmp_path / "final").exists()
    accelerator.free_memory()


# --------------------------------------------------------------------------------------------- fine-tuning


def finetune_args(tmp_path: Path, config_dir, **overrides) -> list[str]:
    texts = ["ab", "ba", "abba", "baab", "aab", "bba"]
    lines = ["path\ttext"]
    for i, text in enumerate(texts):
        lines.append(f"{float_wav(tmp_path / 'utts' / f'u{i}.wav', 1.0, seed=i)}\t{text}")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(lines[:3]) + "\n")
    options = {
        "config_name": config_dir,
        "train_manifest": tmp_path / "train.tsv",
        "dev_manifest": tmp_path / "dev.tsv",
        "output_dir": tmp_path / "ctc",
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_train_steps": 4,
        "logging_steps": 1,
        "eval_steps": 4,
        "save_steps": 0,
        "num_workers": 0,
        "report_to": "none",
        "mask_time_prob": 0,
    }
    options.update(overrides)
    return flags(**options)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["one_update", "every_update", "dev_outputs"])
def test_finetuning_guards(fault, tmp_path, tiny_base_dir, monkeypatch):
    """A NaN update is skipped (the step, LR and budget hold); NaN from the second update on stops the
    run without a model; NaN dev outputs give null WER and CER, never a real-looking score."""
    from transformers import Wav2Vec2ForCTC

    import finetune_ctc

    args = finetune_args(tmp_path, tiny_base_dir, max_consecutive_nonfinite=3)
    out = tmp_path / "ctc"
    if fault == "every_update":
        nan_output_on(monkeypatch, Wav2Vec2ForCTC, lambda n: n >= 2, "logits")
        with pytest.raises(SystemExit, match="3 updates in a row skipped after step 1.*no checkpoint had been saved"):
            finetune_ctc.main(args)
        assert not (out / "model.safetensors").exists() and not (out / "eval_results.json").exists()
        return
    if fault == "one_update":
        calls = nan_output_on(monkeypatch, Wav2Vec2ForCTC, lambda n: n == 2, "logits")
    else:
        calls = nan_output_on(monkeypatch, Wav2Vec2ForCTC, lambda n: True, "logits", mode="eval")
    finetune_ctc.main(args)
    log = log_rows(out)
    train, evals = [r for r in log if "loss" in r], [r for r in log if "eval_wer" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["lr"] == 0.0  # the linear schedule ran to its end on applied updates
    assert all_finite(out / "model.safetensors")
    results = json.loads((out / "eval_results.json").read_text())
    if fault == "one_update":
        assert [r["skipped_updates"] for r in train] == [0, 1, 1, 1] and len(calls) == 5
        assert evals[-1]["eval_wer"] is not None and results["wer"] == evals[-1]["eval_wer"]
    else:
        assert len(evals) == 1 and evals[0]["eval_utterances"] == 2
        assert evals[0]["eval_wer"] is None and evals[0]["eval_cer"] is None and evals[0]["eval_loss"] is None
        assert results["wer"] is None and "no evaluation had finite outputs" in (out / "README.md").read_text()
        assert [r["skipped_updates"] for r in train] == [0, 0, 0, 0]
