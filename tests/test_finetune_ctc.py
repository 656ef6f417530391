"""finetune_ctc.py and transcribe.py on CPU with the tiny configs: learning the synthetic alphabet,
text and vocabulary, segment reads, length-grouped batches, resume, Hugging Face datasets,
transcription, the flag names, and clear errors."""

import json
import logging
import os
import signal
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from helpers import REPO, chirp, flags, log_rows, logged_steps, losses, run_script, sigterm_group_when, write_signal


def subset(manifest: Path, target: Path, rows: int) -> Path:
    """The first `rows` rows of a manifest, written elsewhere with absolute paths."""
    lines = manifest.read_text().splitlines()
    absolute = [str(manifest.parent / line.split("\t")[0]) + line[line.index("\t") :] for line in lines[1 : rows + 1]]
    target.write_text("\n".join(lines[:1] + absolute) + "\n")
    return target


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    from data.make_demo_corpus import make_labelled_set

    root = tmp_path_factory.mktemp("labelled")
    counts = make_labelled_set(root, num_utterances=600, seed=0)
    assert counts == {"train": 500, "dev": 100}
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_base_dir) -> Path:
    """What pretrain.py writes: Wav2Vec2ForPreTraining.save_pretrained plus preprocessor_config.json."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    Wav2Vec2ForPreTraining(Wav2Vec2Config.from_pretrained(tiny_base_dir)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(labelled, pretrained, tmp_path_factory) -> Path:
    """The demo recipe on the synthetic alphabet, from a (random) local pretraining output."""
    out = tmp_path_factory.mktemp("ctc")
    run_script(
        "finetune_ctc.py",
        REPO / "configs" / "recipes" / "demo-ctc-tiny.yaml",
        *flags(
            model_name_or_path=pretrained,
            train_manifest=labelled / "train.tsv",
            dev_manifest=labelled / "dev.tsv",
            output_dir=out,
            eval_steps=150,
            save_steps=0,
            logging_steps=50,
            num_workers=1,
            max_train_steps=300,
        ),
    )
    return out


@pytest.mark.slow
def test_tiny_model_learns_the_synthetic_alphabet(trained):
    results = json.loads((trained / "eval_results.json").read_text())
    assert results["cer"] < 0.3, results
    assert results["wer"] < 0.6, results
    assert results["eval_utterances"] == results["dev_utterances"] == 100
    assert results["train_utterances"] == 500 and results["unreadable_files_skipped"] == 0
    log = log_rows(trained)
    train_rows, eval_rows = [r for r in log if "loss" in r], [r for r in log if "eval_wer" in r]
    assert [r["step"] for r in eval_rows] == [150, 300]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] / 3
    assert all(0 <= r["padding_fraction"] < 0.5 for r in train_rows)
    assert eval_rows[-1]["examples"] and all(set(e) == {"ref", "hyp"} for e in eval_rows[-1]["examples"])
    best = min(eval_rows, key=lambda r: (r["eval_wer"], r["eval_cer"]))
    assert (results["model_step"], results["cer"]) == (best["step"], best["eval_cer"])
    card = (trained / "README.md").read_text()
    assert f"| {results['wer']:.4f} | {results['cer']:.4f} | 100 |" in card
    assert "Wav2Vec2ForCTC.from_pretrained" in card and "transformers" in card.lower()
    from huggingface_hub import ModelCard  # the Hub's own parser: it refuses cards whose model-index it cannot read

    metadata = ModelCard.load(trained / "README.md").data
    assert [(r.metric_type, r.metric_value) for r in metadata.eval_results] == [
        ("wer", round(results["wer"], 4)),
        ("cer", round(results["cer"], 4)),
    ]
    assert all(r.dataset_name and r.task_type == "automatic-speech-recognition" for r in metadata.eval_results)
    assert not metadata.base_model  # a local folder is no hub id
    assert not (trained / "best").exists()


@pytest.mark.slow
def test_output_loads_as_ctc_model_and_processor(trained, labelled):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    model = Wav2Vec2ForCTC.from_pretrained(trained)
    processor = Wav2Vec2Processor.from_pretrained(trained)
    vocab = json.loads((trained / "vocab.json").read_text())
    assert (vocab["[PAD]"], vocab["[UNK]"], vocab["|"]) == (0, 1, 2) and set(vocab) - {"[PAD]", "[UNK]", "|"} == set(
        "adeikmos"
    )
    assert model.config.vocab_size == len(vocab) and model.config.pad_token_id == vocab["[PAD]"] == 0
    assert (trained / "preprocessor_config.json").is_file()
    assert processor.tokenizer.decode([vocab["k"], vocab["k"], 0, vocab["o"], vocab["|"], vocab["a"]]) == "ko a"


@pytest.mark.slow
def test_transcribe_function_and_command_line(trained, labelled, tmp_path):
    from jiwer import cer
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from utils.audio import load_audio
    from utils.ctc import transcribe
    from utils.manifests import read_tsv
    from utils.vocabulary import normalize_text

    dev = [r for r in read_tsv(labelled / "dev.tsv", ["path", "text"]) if not r["start"]][:12]
    # A long recording made of dev utterances, decoded 2 s at a time: words at chunk edges survive.
    parts = []
    for row in dev:
        parts += [load_audio(row["path"]), np.zeros(4000, dtype=np.float32)]
    long_file = write_signal(tmp_path / "long.wav", np.concatenate(parts), 16000)
    model, processor = Wav2Vec2ForCTC.from_pretrained(trained), Wav2Vec2Processor.from_pretrained(trained)
    (chunked,) = transcribe([long_file], model, processor, chunk_seconds=2.0, context_seconds=0.5)
    (whole,) = transcribe([long_file], model, processor, chunk_seconds=600.0)
    reference = " ".join(normalize_text(r["text"]) for r in dev)
    assert sf.info(str(long_file)).duration > 3 * 2.0
    assert cer(reference, whole) < 0.3 and cer(reference, chunked) < 0.3, (reference, whole, chunked)

    result = run_script(
        "transcribe.py",
        "--model_name_or_path",
        trained,
        dev[0]["path"],
        tmp_path / "missing.wav",
        dev[1]["path"],
        check=False,
        timeout=300,
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1 and "missing.wav" in result.stderr  # a bad file is reported, the others still done
    assert [line.split("\t")[0] for line in lines] == [dev[0]["path"], dev[1]["path"]]
    hypotheses = transcribe([dev[0]["path"], dev[1]["path"]], model, processor)
    assert [line.split("\t")[1] for line in lines] == hypotheses


def test_the_old_transcribe_subcommand_names_transcribe_py(tmp_path):
    result = run_script(
        "finetune_ctc.py", "transcribe", "--model_name_or_path", "runs/ctc", tmp_path / "a.flac", check=False
    )
    assert result.returncode != 0 and not result.stdout
    assert (
        f"error: transcription moved to transcribe.py: python transcribe.py --model_name_or_path runs/ctc {tmp_path / 'a.flac'}"
        in result.stderr
    )


# --------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_local_pretraining_output_then_exact_resume(labelled, pretrained, tmp_path):
    """Fine-tuning starts from a pretrain.py folder (the encoder weights are loaded, not random), and a
    run resumed from its step-3 checkpoint logs the same losses as the uninterrupted run."""
    from safetensors.torch import load_file

    train = subset(labelled / "train.tsv", tmp_path / "train.tsv", 48)
    dev = subset(labelled / "dev.tsv", tmp_path / "dev.tsv", 16)
    common_flags = flags(
        model_name_or_path=pretrained,
        train_manifest=train,
        dev_manifest=dev,
        max_train_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        warmup_steps=2,
        logging_steps=1,
        eval_steps=0,
        save_steps=3,
        mask_time_prob=0.2,
        mask_time_length=3,
        layerdrop=0.2,
        num_workers=1,
        report_to="none",
    )
    first, second = tmp_path / "first", tmp_path / "second"
    run_script("finetune_ctc.py", *common_flags, "--output_dir", first)
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    run_script(
        "finetune_ctc.py",
        *common_flags,
        "--output_dir",
        second,
        "--resume_from_checkpoint",
        first / "checkpoints" / "checkpoint-3",
    )

    uninterrupted, resumed = losses(first), losses(second)
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(uninterrupted[step] - resumed[step]) < 1e-5, (step, uninterrupted[step], resumed[step])
    state = json.loads((first / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 6 and "[PAD]" in state["vocab"]

    # The frozen CNN feature encoder is exactly the pretraining output's; the transformer moved from it.
    source, tuned = load_file(pretrained / "model.safetensors"), load_file(first / "model.safetensors")
    conv = "wav2vec2.feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(source[conv], tuned[conv])
    layer = "wav2vec2.encoder.layers.0.attention.k_proj.weight"
    assert 0 < (source[layer] - tuned[layer]).abs().max() < 0.05
    assert json.loads((first / "config.json").read_text())["architectures"] == ["Wav2Vec2ForCTC"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "regularisation",
    [dict(layerdrop=0.5), dict(layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.2)],
    ids=["layerdrop", "feature-masks-only"],
)
def test_two_processes_shard_the_batches_and_score_every_dev_utterance_once(
    labelled, pretrained, tmp_path, regularisation
):
    """torchrun with 2 CPU processes (gloo): an odd dev set is split unevenly and gathered whole.
    LayerDrop skips layers, and feature masks alone leave the time-mask embedding unused: DDP must
    get through both."""
    train = subset(labelled / "train.tsv", tmp_path / "train.tsv", 32)
    dev = subset(labelled / "dev.tsv", tmp_path / "dev.tsv", 9)
    out = tmp_path / "ddp"
    result = run_script(
        "finetune_ctc.py",
        *flags(
            model_name_or_path=pretrained,
            train_manifest=train,
            dev_manifest=dev,
            max_train_steps=3,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=2,
            eval_steps=3,
            save_steps=0,
            logging_steps=1,
            num_workers=0,
            report_to="none",
            **regularisation,
        ),
        "--output_dir",
        out,
        launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"],
        env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "outlives the process group" not in result.stderr  # the DDP wrapper is freed first, or the exit can hang
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_utterances"] == results["dev_utterances"] == 9
    assert results["eval_chars"] == sum(len(line.split("\t")[1]) for line in dev.read_text().splitlines()[1:])
    log = log_rows(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all(r["utterances_per_update"] == 8 for r in log if "loss" in r)  # 2 processes x 4


@pytest.mark.slow
def test_rerunning_a_finished_run_keeps_its_best_model(labelled, pretrained, tmp_path):
    """A job script that always passes --resume_from_checkpoint latest runs again after the run has
    finished: the best model already in OUTPUT_DIR must not be replaced by the last checkpoint's."""
    from safetensors.torch import load_file, save_file

    train = subset(labelled / "train.tsv", tmp_path / "train.tsv", 24)
    dev = subset(labelled / "dev.tsv", tmp_path / "dev.tsv", 8)
    out = tmp_path / "run"
    args = [
        *flags(
            model_name_or_path=pretrained,
            train_manifest=train,
            dev_manifest=dev,
            max_train_steps=2,
            per_device_train_batch_size=4,
            eval_steps=1,
            save_steps=2,
            logging_steps=1,
            num_workers=0,
            report_to="none",
        ),
        "--output_dir",
        out,
        "--resume_from_checkpoint",
        "latest",
    ]
    run_script("finetune_ctc.py", *args)
    results = json.loads((out / "eval_results.json").read_text())
    weights = load_file(out / "model.safetensors")
    marked = {k: v + 1.0 if k == "lm_head.bias" else v for k, v in weights.items()}  # tells this file from any re-save
    save_file(marked, out / "model.safetensors", metadata={"format": "pt"})
    run_script("finetune_ctc.py", *args)
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.bias"], marked["lm_head.bias"])
    assert json.loads((out / "eval_results.json").read_text())["model_step"] == results["model_step"]


def small_run(labelled, pretrained, tmp_path, **options) -> list[str]:
    train = subset(labelled / "train.tsv", tmp_path / "train.tsv", 48)
    dev = subset(labelled / "dev.tsv", tmp_path / "dev.tsv", 8)
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, eval_steps=0, save_steps=0)
    return flags(
        model_name_or_path=pretrained, train_manifest=train, dev_manifest=dev, report_to="none", **settings, **options
    )


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_two_workers_then_resume_matches_the_uninterrupted_run(
    labelled, pretrained, tmp_path
):
    """SIGTERM to every process of the job, DataLoader workers included: a checkpoint, status 0, and
    the resumed run logs the uninterrupted run's losses."""
    args = small_run(labelled, pretrained, tmp_path, max_train_steps=12, num_workers=2)
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    run_script("finetune_ctc.py", *args, "--output_dir", straight)
    args += ["--output_dir", preempted]
    result = sigterm_group_when(
        "finetune_ctc.py", *args, ready=lambda: logged_steps(preempted) >= 3, log_file=tmp_path / "preempted.log"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "killed by signal" not in result.stdout and "SIGTERM: saved a checkpoint" in result.stdout
    (checkpoint,) = (preempted / "checkpoints").glob("checkpoint-*")
    assert 3 <= int(checkpoint.name.split("-")[1]) < 16, (
        "the run must be stopped mid-way for this test to mean anything"
    )
    run_script("finetune_ctc.py", *args, "--resume_from_checkpoint", "latest")
    expected, resumed = losses(straight), losses(preempted)
    assert sorted(resumed) == list(range(1, 13)) == sorted(expected)
    assert all(abs(expected[step] - resumed[step]) < 1e-5 for step in expected), (expected, resumed)


@pytest.mark.slow
def test_sigterm_handler_is_handed_back_after_a_preempted_run(labelled, pretrained, tmp_path, monkeypatch):
    import accelerate

    import finetune_ctc

    original_backward, calls = accelerate.Accelerator.backward, []

    def backward(self, loss, **kwargs):  # the signal arrives during the second update
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_backward(self, loss, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)
    out = tmp_path / "run"
    sigterm = signal.getsignal(signal.SIGTERM)
    args = small_run(labelled, pretrained, tmp_path, max_train_steps=5, num_workers=0)
    assert finetune_ctc.main([*args, "--output_dir", str(out)]) is None
    assert signal.getsignal(signal.SIGTERM) is sigterm  # a launcher can stop a stuck exit
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"] and len(calls) == 2


# --------------------------------------------------------------------------------------------- datasets


@pytest.mark.slow
def test_hf_dataset_with_stereo_44k_file_and_attention_mask_model(labelled, tmp_path, tiny_robust_dir, caplog):
    """A local Hugging Face dataset (parquet, as on the hub), decoded with soundfile: a stereo 44.1 kHz
    FLAC is evaluated at 16 kHz mono; an undecodable row is skipped and counted; the robust-style
    config gets attention masks."""
    from datasets import Audio, Dataset

    import finetune_ctc
    from utils.audio import load_audio
    from utils.ctc_arguments import DataArguments
    from utils.dataset_utterances import dataset_utterances
    from utils.manifests import read_tsv
    from utils.utterances import read_utterance

    rows = [r for r in read_tsv(labelled / "train.tsv", ["path", "text"]) if not r["start"]]
    stereo = [r for r in rows if r["path"].endswith(".flac")]
    assert sf.info(stereo[0]["path"]).samplerate == 44100 and sf.info(stereo[0]["path"]).channels == 2

    def audio_value(path):
        return {"bytes": Path(path).read_bytes(), "path": Path(path).name}

    train = {
        "audio": [audio_value(r["path"]) for r in rows[:24]] + [{"bytes": b"not audio at all", "path": "broken.wav"}],
        "sentence": [r["text"] for r in rows[:24]] + ["ka"],
    }
    dev = {
        "audio": [audio_value(r["path"]) for r in stereo[:3] + rows[30:33]],
        "sentence": [r["text"] for r in stereo[:3] + rows[30:33]],
    }
    for split, columns in (("train", train), ("validation", dev)):
        (tmp_path / "ds" / "data").mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(columns).cast_column("audio", Audio(decode=False)).to_parquet(
            tmp_path / "ds" / "data" / f"{split}-00000-of-00001.parquet"
        )

    data_args = DataArguments(dataset_name=str(tmp_path / "ds"), text_column_name="sentence")
    train_rows, dev_rows, unreadable, _, splits = dataset_utterances(data_args)
    assert len(train_rows) == 24 and len(dev_rows) == 6 and [r["path"] for r in unreadable] == ["broken.wav"]
    assert dev_rows[0]["duration"] == pytest.approx(sf.info(stereo[0]["path"]).duration)
    decoded = read_utterance(dev_rows[0], splits)
    np.testing.assert_allclose(decoded, load_audio(stereo[0]["path"]), atol=1e-6)

    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="finetune_ctc")
    sigterm = signal.getsignal(signal.SIGTERM)
    finetune_ctc.main(
        flags(
            config_name=tiny_robust_dir,
            dataset_name=tmp_path / "ds",
            text_column_name="sentence",
            output_dir=out,
            max_train_steps=2,
            per_device_train_batch_size=4,
            max_duration_seconds=0.8,
            eval_steps=0,
            save_steps=0,
            num_workers=0,
            report_to="none",
            learning_rate=1e-3,
        )
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_utterances"] == 6 and results["unreadable_at_start"] == 1
    assert results["long_train_utterances"] == sum(r["duration"] > 0.8 for r in train_rows) > 0
    assert "attention mask: yes" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is sigterm  # handed back: a launcher can stop the exit


# --------------------------------------------------------------------------------------------- text


def test_normalisation_and_tokenizer_round_trip_hindi_and_english(tmp_path, tiny_base_dir):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    from utils.vocabulary import build_vocabulary, make_tokenizer, normalize_text

    hindi_raw = "नमस्ते,  दुनिया! \u0958िला और ज़रूर। प्रेम   कृष्ण"
    english_raw = "Hello, World!\tIt's   the END."
    hindi, english = normalize_text(hindi_raw), normalize_text(english_raw)
    assert english == "hello world it's the end"
    assert normalize_text("Don’t ‘stop’") == normalize_text("Don't 'stop'") == "don't 'stop'"
    assert hindi == unicodedata.normalize("NFC", "नमस्ते दुनिया \u0915\u093cिला और ज़रूर प्रेम कृष्ण")
    for sign in ("\u094d", "\u093c", "\u0947", "\u093e", "\u0943"):  # virama, nukta, vowel signs e, aa, vocalic r
        assert sign in hindi

    tokenizer = make_tokenizer(build_vocabulary([hindi, english]))
    vocab = tokenizer.get_vocab()
    assert {"\u094d", "\u093c", "\u0947"} <= set(vocab) and vocab["[PAD]"] == 0 and "[UNK]" in vocab
    folder = tmp_path / "processor"
    Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir), tokenizer=tokenizer
    ).save_pretrained(folder)
    reloaded = Wav2Vec2Processor.from_pretrained(folder).tokenizer
    for text in (hindi, english):
        for tok in (tokenizer, reloaded):
            ids = tok(text).input_ids
            assert vocab["[UNK]"] not in ids
            assert tok.decode(ids, group_tokens=False) == text
            # As CTC emits them: every token repeated, with blanks between, decodes to the text.
            ctc_ids = [i for token in ids for i in (token, token, vocab["[PAD]"])]
            assert tok.decode(ctc_ids) == text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("well—maybe not–yet", "well maybe not yet"),  # em and en dash
        ("one|two | three", "one two three"),
        ("राम आया।सीता गई॥फिर", "राम आया सीता गई फिर"),  # danda and double danda
        ("a ‒ b ― c", "a b c"),  # figure dash, horizontal bar
    ],
)
def test_dashes_bars_and_dandas_separate_words(raw, expected):
    from utils.vocabulary import normalize_text

    assert normalize_text(raw) == expected


def test_word_separators_flag_reaches_the_transcripts(tmp_path):
    from utils.ctc_arguments import DataArguments
    from utils.utterances import check_transcripts

    rows = lambda: [{"where": "m.tsv:2", "path": "a.wav", "text": "well—maybe। Then|now"}]  # noqa: E731
    defaults, kept = rows(), rows()
    check_transcripts(defaults, DataArguments.chars_to_ignore, True, DataArguments.word_separators)
    check_transcripts(kept, DataArguments.chars_to_ignore, True, "")
    assert defaults[0]["text"] == "well maybe then now"
    assert kept[0]["text"] == "well—maybe thennow"  # the former behaviour, on request


def test_transcripts_are_the_hugging_face_pipelines_double_spaces_included(tmp_path, tiny_base_dir):
    """transcribe() and the dev-set decoding give the text the ASR pipeline gives for the same frames,
    also where the model emits '| [PAD] |' (two spaces): neither folds them."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
        pipeline,
    )
    from transformers.modeling_outputs import CausalLMOutput

    from utils.ctc import greedy_decode, transcribe
    from utils.vocabulary import make_tokenizer

    tokenizer = make_tokenizer({"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4})
    processor = Wav2Vec2Processor(Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir), tokenizer)
    model = Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(tiny_base_dir, vocab_size=5)).eval()
    pattern = torch.tensor([3, 3, 2, 0, 2, 4, 0, 4, 2, 2, 0, 0, 2, 3])  # a, '|', blank, '|', b, blank, b, ...

    def scripted_forward(input_values, attention_mask=None, **kwargs):
        frames = int(model._get_feat_extract_output_lengths(torch.tensor(input_values.shape[-1])))
        ids = pattern[torch.arange(frames) % len(pattern)]
        return CausalLMOutput(logits=torch.nn.functional.one_hot(ids, 5).float()[None] * 10)

    model.forward = scripted_forward
    audio = chirp(1.5, 16000)
    path = write_signal(tmp_path / "utt.wav", audio, 16000)
    asr = pipeline(
        "automatic-speech-recognition", model=model, tokenizer=tokenizer, feature_extractor=processor.feature_extractor
    )
    expected = asr({"raw": audio, "sampling_rate": 16000})["text"]
    assert "  " in expected  # the case in question: the pipeline keeps double spaces
    (ours,) = transcribe([path], model, processor, chunk_seconds=30.0)
    logits = scripted_forward(torch.from_numpy(audio)[None]).logits
    assert ours == expected == greedy_decode(tokenizer, logits, [logits.shape[1]])[0]


# --------------------------------------------------------------------------------------------- audio


def test_start_end_segments_read_the_right_samples(tmp_path):
    from utils.utterances import UtteranceDataset, measure_durations, read_utterance_manifest

    wav = write_signal(tmp_path / "audio" / "A01_day.wav", chirp(8.0, 16000, seed=1), 16000)
    flac = write_signal(tmp_path / "audio" / "A02_day.flac", chirp(8.0, 44100, channels=2, seed=2), 44100)
    (tmp_path / "m.tsv").write_text(
        "path\ttext\tstart\tend\tparticipant\n"
        "audio/A01_day.wav\tone\t1.25\t2.5\tA01\n"
        "audio/A02_day.flac\ttwo\t3.0\t4.5\tA02\n"
        "audio/A02_day.flac\tthree\t\t\tA02\n"
    )
    rows, bad = measure_durations(read_utterance_manifest(tmp_path / "m.tsv"))
    assert not bad and [r["duration"] for r in rows] == pytest.approx([1.25, 1.5, 8.0])
    for row in rows:
        row["labels"] = [3]
    dataset = UtteranceDataset(rows, normalize=False)

    exact, _ = sf.read(str(wav), dtype="float32")
    np.testing.assert_array_equal(dataset[0]["input_values"], exact[20000:40000])  # 16 kHz: the very samples

    whole, _ = sf.read(str(flac), dtype="float32", always_2d=True)
    whole16k = soxr.resample(whole.mean(axis=1), 44100, 16000)
    segment = dataset[1]["input_values"]
    assert segment.shape == (24000,)
    np.testing.assert_allclose(segment, whole16k[48000:72000], atol=2e-3)
    assert np.corrcoef(segment, whole16k[48000:72000])[0, 1] > 0.999
    assert dataset[2]["input_values"].shape == (128000,)


def test_length_grouped_batches_are_deterministic_and_cut_padding():
    from utils.batches import BatchPlan, plan_batches

    rng = np.random.default_rng(0)
    durations = np.concatenate([rng.uniform(0.5, 15.0, 997), [25.0, 30.0, 40.0]])
    first = plan_batches(durations, 8, seed=3, epoch=0, max_duration=20.0)
    assert first == plan_batches(durations, 8, seed=3, epoch=0, max_duration=20.0)
    assert first != plan_batches(durations, 8, seed=3, epoch=1, max_duration=20.0)
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    assert sorted(batch for batch in first if len(batch) == 1 and durations[batch[0]] > 20) == [[997], [998], [999]]
    assert first[0] == [999]  # the longest first: out of memory in step 1, not hours in

    def padding(batches):
        real = sum(durations[b].sum() for b in batches)
        return 1 - real / sum(durations[b].max() * len(b) for b in batches)

    shuffled = plan_batches(durations, 8, seed=3, epoch=0, max_duration=20.0, group_by_length=False)
    assert padding(first) < 0.05 < 0.3 < padding(shuffled)

    shards = [BatchPlan(list(durations), 8, 3, 20.0, True, rank, 2) for rank in (0, 1)]
    epoch0 = [shard.local_batches(0) for shard in shards]
    assert len(epoch0[0]) == len(epoch0[1]) == shards[0].batches_per_epoch
    assert not {i for b in epoch0[0] for i in b} & {i for b in epoch0[1] for i in b}
    positions = shards[0].iterate(epoch=0, batch=len(epoch0[0]) - 1)
    assert [next(positions)[:2] for _ in range(2)] == [(0, len(epoch0[0]) - 1), (1, 0)]


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    from utils.utterances import Collator, UtteranceDataset, measure_durations, read_utterance_manifest

    write_signal(tmp_path / "good.wav", chirp(1.0, 16000), 16000)
    later_bad = write_signal(tmp_path / "later.wav", chirp(1.0, 16000), 16000)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really")
    (tmp_path / "m.tsv").write_text("path\ttext\ngood.wav\ta\ngarbage.wav\tb\nmissing.flac\tc\nlater.wav\td\n")
    rows, bad = measure_durations(read_utterance_manifest(tmp_path / "m.tsv"))
    assert [Path(r["path"]).name for r in rows] == ["good.wav", "later.wav"]
    assert [Path(r["path"]).name for r in bad] == ["garbage.wav", "missing.flac"] and all(r["reason"] for r in bad)

    later_bad.write_bytes(b"truncated after the scan")  # a disk or network failure during training
    for row in rows:
        row["labels"] = [3, 4]
    dataset = UtteranceDataset(rows, normalize=True)
    batch = Collator(use_attention_mask=False, min_samples=400)([dataset[0], dataset[1]])
    assert batch["indices"] == [0] and [Path(p).name for p, _ in batch["failed"]] == ["later.wav"]
    assert batch["input_values"].shape == (1, 16000) and "attention_mask" not in batch
    assert abs(float(batch["input_values"].mean())) < 1e-4 and float(batch["input_values"].std()) == pytest.approx(
        1.0, abs=1e-3
    )


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "case",
    [
        "no_text_column",
        "empty_transcript",
        "punctuation_only",
        "end_before_start",
        "tokenizer_lacks_characters",
        "ctc_head_vocabulary",
        "single_participant",
    ],
)
def test_clear_errors(case, labelled, tmp_path, tiny_base_dir, capsys):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    import finetune_ctc
    from utils.vocabulary import build_vocabulary, make_tokenizer

    train = subset(labelled / "train.tsv", tmp_path / "train.tsv", 12)
    lines = train.read_text().splitlines()
    args = flags(
        config_name=tiny_base_dir,
        train_manifest=train,
        dev_manifest=subset(labelled / "dev.tsv", tmp_path / "dev.tsv", 4),
        output_dir=tmp_path / "out",
        max_train_steps=1,
        num_workers=0,
        report_to="none",
    )
    if case == "no_text_column":
        train.write_text(
            "\n".join(["path\ttranscript\tparticipant"] + [line.split("\t")[0] + "\tab\tS01" for line in lines[1:]])
            + "\n"
        )
        expected = f"manifest {train} lacks column(s) ['text']"
    elif case in ("empty_transcript", "punctuation_only"):
        cells = lines[3].split("\t")
        cells[1] = " " if case == "empty_transcript" else "?!।"
        train.write_text("\n".join(lines[:3] + ["\t".join(cells)] + lines[4:]) + "\n")
        expected = f"{train}, line 4: " + ("empty transcript" if case == "empty_transcript" else "transcript '?!।'")
    elif case == "end_before_start":
        train.write_text("\n".join(lines + [f"{lines[1].split(chr(9))[0]}\tab\tS01\t2.0\t1.5"]) + "\n")
        expected = f"{train}, line {len(lines) + 1}: end 1.5 is not after start 2.0"
    elif case == "tokenizer_lacks_characters":
        small = make_tokenizer(build_vocabulary(["a d e"]))
        small.save_pretrained(tmp_path / "small_tokenizer")
        args += flags(tokenizer_name_or_path=tmp_path / "small_tokenizer")
        expected = "vocabulary mismatch: --tokenizer_name_or_path"
    elif case == "ctc_head_vocabulary":  # a model fine-tuned on another alphabet
        other = tmp_path / "other_ctc"
        tokenizer = make_tokenizer(build_vocabulary(["xyz w"]))
        Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(tiny_base_dir, vocab_size=len(tokenizer))).save_pretrained(other)
        tokenizer.save_pretrained(other)
        args = [a if a != str(tiny_base_dir) else str(other) for a in args]
        args[args.index("--config_name")] = "--model_name_or_path"
        expected = f"vocabulary mismatch: {other} has a CTC head"
    else:
        train.write_text(
            "\n".join([lines[0]] + [line.replace("S02", "S01").replace("S03", "S01") for line in lines[1:]]) + "\n"
        )
        args[args.index("--dev_manifest") : args.index("--dev_manifest") + 2] = []
        expected = "cannot split off a dev set by participant with a single participant"
    with pytest.raises(SystemExit) as error:
        finetune_ctc.main(args)
    message = str(error.value.code) + capsys.readouterr().err
    assert expected in message
    if case == "tokenizer_lacks_characters":  # every character the tokenizer lacks is named
        texts = [
            line.split("\t")[1] for path in (train, tmp_path / "dev.tsv") for line in path.read_text().splitlines()[1:]
        ]
        missing = set("".join(texts)) - set("ade ")
        assert missing and all(f"{char!r} (U+{ord(char):04X}" in message for char in missing)


def test_ctc_recipe_parses():
    from utils.ctc_arguments import CTCTrainingArguments, DataArguments, ModelArguments
    from utils.training import parse_args_with_recipe

    model, data, training = parse_args_with_recipe(
        [ModelArguments, DataArguments, CTCTrainingArguments],
        [str(REPO / "configs" / "recipes" / "demo-ctc-tiny.yaml"), "--seed", "7"],
    )
    assert training.seed == 7 and model.model_name_or_path == "demo_data/pretrained"
    assert data.train_manifest == "demo_data/labelled/train.tsv" and model.freeze_feature_encoder is False
    defaults = parse_args_with_recipe([ModelArguments, DataArguments, CTCTrainingArguments], [])
    assert defaults[0].model_name_or_path == "facebook/wav2vec2-base" and defaults[0].freeze_feature_encoder is True
    assert data.dev_manifest == "demo_data/labelled/dev.tsv"


def test_eval_flag_names_still_parse_as_the_dev_flags(tmp_path):
    """Fine-tuning says dev like pretraining and prepare_manifest.py; the old eval_* names still work, with a warning."""
    from utils.ctc_arguments import CTCTrainingArguments, DataArguments, ModelArguments
    from utils.training import parse_args_with_recipe

    groups = [ModelArguments, DataArguments, CTCTrainingArguments]
    expected = parse_args_with_recipe(groups, ["--dev_manifest", "X", "--dev_fraction", "0.2"])
    assert (expected[1].dev_manifest, expected[1].dev_fraction) == ("X", 0.2)
    old_flags = ["--eval_manifest", "X", "--eval_fraction", "0.2"]
    with pytest.warns(FutureWarning, match="--eval_fraction is deprecated: use --dev_fraction"):
        with pytest.warns(FutureWarning, match="--eval_manifest is deprecated"):
            assert parse_args_with_recipe(groups, old_flags) == expected
    recipe = tmp_path / "old.yaml"
    recipe.write_text("eval_manifest: X\neval_fraction: 0.2\n")
    with pytest.warns(FutureWarning, match="eval_fraction is deprecated: use dev_fraction"):
        with pytest.warns(FutureWarning, match="eval_manifest is deprecated: use dev_manifest"):
            assert parse_args_with_recipe(groups, [str(recipe)]) == expected
