"""probe.py: layer-wise linear probes on held-out participants, from TSV or RTTM segments, at segment
or frame level; the metrics and intervals; bad segments and splits."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, Wav2Vec2Model

import probe
from tests.helpers import write_signal
from utils.manifests import write_tsv
from utils.probe_data import BACKGROUND, frame_labels, split_participants
from utils.probes import Bootstrap, chance_scores, paired_difference, scores

SR = 16_000
CLASSES = ("tone", "noise", "voiced")


def sound(rng, label: str) -> np.ndarray:
    """Tones, hiss and harmonic (voiced) stretches: separable by any sensible features."""
    t = np.arange(int(rng.uniform(0.5, 0.9) * SR)) / SR
    if label == "tone":
        x = np.sin(2 * np.pi * rng.uniform(300, 3000) * t)
    elif label == "noise":
        x = rng.standard_normal(len(t))
    else:
        f0 = rng.uniform(100, 300)
        x = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 15))
    return 0.3 * x / np.abs(x).max()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_base_dir):
    """4 participants, one recording each of 12 labelled sounds with quiet gaps; a TSV and RTTM files
    of the same segments; a random-init tiny model with pretraining heads and its bare encoder."""
    root = tmp_path_factory.mktemp("probe")
    rows, rttm = [], {}
    for p in range(1, 5):
        rng = np.random.default_rng(p)
        parts, position = [], 0.0
        for k in range(12):
            label = CLASSES[k % 3]
            gap, x = rng.standard_normal(int(0.4 * SR)) * 1e-3, sound(rng, label)
            start = position + len(gap) / SR
            position = start + len(x) / SR
            parts += [gap, x]
            rows.append({"path": f"audio/P{p:02d}_rec.wav", "start": f"{start:.3f}", "end": f"{position:.3f}"})
            rows[-1]["label"] = label
            rttm.setdefault(p, []).append(
                f"SPEAKER P{p:02d}_rec 1 {start:.3f} {position - start:.3f} <NA> <NA> {label} <NA> <NA>"
            )
        write_signal(root / "audio" / f"P{p:02d}_rec.wav", np.concatenate(parts + [gap]).astype(np.float32), SR)
    write_tsv(root / "segments.tsv", rows, ["path", "start", "end", "label"])
    for p, lines in rttm.items():
        (root / f"P{p:02d}.rttm").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    config = Wav2Vec2Config.from_pretrained(tiny_base_dir)
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(tiny_base_dir)
    Wav2Vec2ForPreTraining(config).save_pretrained(root / "heads")
    Wav2Vec2Model(config).save_pretrained(root / "bare")
    for name in ("heads", "bare"):
        feature_extractor.save_pretrained(root / name)
    write_tsv(
        root / "dev.tsv",
        [
            {"path": f"audio/P0{p}_rec.wav", "participant": f"P0{p}", "duration": 14.0, "sample_rate": SR}
            | {"num_channels": 1, "num_frames": 14 * SR}
            for p in (3, 4)
        ],
        ["path", "participant", "duration", "sample_rate", "num_channels", "num_frames"],
    )
    return root


def run(corpus, out, *extra, segments=None):
    return probe.main(
        ["--models", str(corpus / "heads"), str(corpus / "bare"), "--names", "heads,bare"]
        + ["--segments", *(segments or [str(corpus / "segments.tsv")])]
        + ["--output_dir", str(out), "--test_participants", "P04", "--bootstrap", "200", *extra]
    )


@pytest.fixture(scope="module")
def segment_results(corpus):
    return run(corpus, corpus / "out_tsv", "--dev_manifest", str(corpus / "dev.tsv"), "--dev_crop_seconds", "2")


def test_best_layer_beats_chance_on_held_out_participants(segment_results, corpus):
    results = segment_results
    assert results["train_participants"] == ["P01", "P02", "P03"] and results["test_participants"] == ["P04"]
    assert (results["num_train"], results["num_test"]) == (36, 12)  # every segment, each in its own split
    assert results["labels"] == sorted(CLASSES)
    assert results["chance"]["uar"] == pytest.approx(1 / 3, abs=0.03)
    for name in ("heads", "bare"):
        model = results["models"][name]
        assert set(model["layers"]) == {"0", "1", "2"}  # the tiny config: 2 layers
        best = model["layers"][str(model["best_layer"])]
        assert best["macro_f1"]["value"] >= results["chance"]["macro_f1"] + 0.4
        assert best["macro_f1"]["low"] <= best["macro_f1"]["value"] <= best["macro_f1"]["high"]
        assert len(best["predictions"]) == 12
    # Same weights with and without pretraining heads: the same features, the same probes.
    assert results["models"]["heads"]["layers"] == results["models"]["bare"]["layers"]
    assert all(d["value"] == 0 for d in results["differences"]["bare"].values())
    saved = json.loads((corpus / "out_tsv" / "probe_results.json").read_text())
    assert saved["models"]["heads"]["best_layer"] == results["models"]["heads"]["best_layer"]
    report = (corpus / "out_tsv" / "probe_report.md").read_text()
    assert "| layer | heads | bare |" in report and "P04" not in report and str(corpus) not in report
    assert (corpus / "out_tsv" / "probe_layers.png").stat().st_size > 10_000


def test_dev_figures_for_models_with_pretraining_heads(segment_results):
    dev = segment_results["models"]["heads"]["dev"]
    assert dev["dev_crops"] == 16 and 0 <= dev["dev_accuracy"] <= 1
    assert dev["dev_contrastive_loss"] > 0.95 * np.log(101) and dev["dev_accuracy"] < 0.1  # random init: chance
    assert segment_results["models"]["bare"]["dev"] is None


def test_rttm_and_tsv_give_the_same_result(corpus, segment_results):
    rttm = run(
        corpus,
        corpus / "out_rttm",
        "--audio_dir",
        str(corpus / "audio"),
        segments=[str(corpus / f"P0{p}.rttm") for p in range(1, 5)],
    )
    assert rttm["test_labels"] == segment_results["test_labels"]
    assert rttm["models"]["heads"]["layers"] == segment_results["models"]["heads"]["layers"]


def test_probes_never_see_a_test_participant(corpus, monkeypatch):
    """The probe is trained on the train participants' items only, whatever their labels."""
    import utils.probes

    seen = []
    real = utils.probes.fit_and_predict

    def spy(train_x, train_y, test_x, regularization, seed):
        seen.append((len(train_x), len(test_x)))
        return real(train_x, train_y, test_x, regularization, seed)

    monkeypatch.setattr(utils.probes, "fit_and_predict", spy)
    results = run(corpus, corpus / "out_split", "--layers", "0", "--test_participants", "P02,P03")
    assert results["test_participants"] == ["P02", "P03"] and seen == [(24, 24), (24, 24)]


def test_frame_level_probes(corpus):
    results = run(corpus, corpus / "out_frames", "--frame_level", "--layers", "0,2")
    assert results["task"] == "frame" and BACKGROUND in results["labels"]
    counts = np.bincount(results["test_labels"], minlength=4)
    assert counts.min() > 20  # every class, background too, among the held-out frames
    best = results["models"]["heads"]["layers"][str(results["models"]["heads"]["best_layer"])]
    assert best["uar"]["value"] >= results["chance"]["uar"] + 0.3


def test_frame_labels_by_frame_centre():
    from utils.probe_data import Segment

    segments = [Segment("f", 0.1, 0.2, "a", "P"), Segment("f", 0.15, 0.3, "b", "P")]
    labels = frame_labels(segments, ["a", "b", BACKGROUND], 20, 320, 400)
    centres = (np.arange(20) * 320 + 200) / SR
    expected = np.where((centres >= 0.1) & (centres < 0.15), 0, 2)
    expected[(centres >= 0.15) & (centres < 0.2)] = -1  # a and b overlap: no single truth
    expected[(centres >= 0.2) & (centres < 0.3)] = 1
    assert labels.tolist() == expected.tolist()


def test_bad_segments_and_splits(corpus, tmp_path, capsys):
    rows = [
        {"path": str(corpus / "audio" / f"P0{p}_rec.wav"), "start": "1.0", "end": "1.5", "label": label}
        for p in (1, 2, 3)
        for label in ("tone", "noise")
    ]
    unseen = rows + [{"path": str(corpus / "audio" / "P04_rec.wav"), "start": "1", "end": "2", "label": "cry"}]
    write_tsv(tmp_path / "unseen.tsv", unseen, ["path", "start", "end", "label"])
    with pytest.raises(SystemExit, match=r"\['cry'\] occur in the test participants' segments"):
        run(corpus, tmp_path / "o", segments=[str(tmp_path / "unseen.tsv")])
    with pytest.raises(SystemExit, match="--test_participants P09: not among"):
        run(corpus, tmp_path / "o", "--test_participants", "P09")
    one = [row for row in rows if "P01" in row["path"]]
    write_tsv(tmp_path / "one.tsv", one, ["path", "start", "end", "label"])
    with pytest.raises(SystemExit, match=r"one participant \(P01\)"):
        run(corpus, tmp_path / "o", "--test_participants", "P01", segments=[str(tmp_path / "one.tsv")])
    (tmp_path / "P05_broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    outside = rows + [
        {"path": str(corpus / "audio" / "P04_rec.wav"), "start": "1", "end": "2", "label": "tone"},
        {"path": str(corpus / "audio" / "P04_rec.wav"), "start": "200", "end": "201", "label": "tone"},
        {"path": str(tmp_path / "P05_broken.wav"), "start": "0", "end": "1", "label": "noise"},
    ]
    write_tsv(tmp_path / "outside.tsv", outside, ["path", "start", "end", "label"])
    results = run(corpus, tmp_path / "o", "--layers", "0", segments=[str(tmp_path / "outside.tsv")])
    reasons = sorted(skip["reason"].split(" (")[0] for skip in results["skipped_segments"])
    assert reasons == ["outside the file", "unreadable file"] and results["num_test"] == 1
    assert sorted(results["train_participants"]) == ["P01", "P02", "P03"]  # P05: all its segments skipped
    with pytest.raises(SystemExit):
        run(corpus, tmp_path / "o", "--names", "same,same")
    assert "--names same,same: give one distinct name per model" in capsys.readouterr().err


def test_split_by_fraction_is_seeded_and_disjoint():
    people = [f"P{i}" for i in range(10)]
    train, test = split_participants(people, None, 0.3, seed=3)
    assert len(test) == 3 and not set(train) & set(test) and sorted(train + test) == sorted(people)
    assert split_participants(people, None, 0.3, seed=3) == (train, test)
    assert split_participants(people, None, 0.3, seed=4) != (train, test)


def test_metrics_match_scikit_learn_and_intervals_are_paired():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.6, truth, rng.integers(0, 4, 300))
    figures = scores(truth, predicted, 4)
    assert figures["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert figures["uar"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert figures["accuracy"] == pytest.approx(np.mean(truth == predicted))
    resamples = Bootstrap(300, 300, seed=0)
    same = paired_difference(truth, predicted, predicted, 4, resamples)
    assert same == {"value": 0.0, "low": 0.0, "high": 0.0}
    better = np.where(rng.random(300) < 0.5, truth, predicted)
    gain = paired_difference(truth, predicted, better, 4, resamples)
    assert 0 < gain["low"] < gain["value"] < gain["high"]
    chance = chance_scores(truth, truth, 4, seed=0)
    assert chance["uar"] == pytest.approx(0.25, abs=0.01) and chance["accuracy"] == pytest.approx(0.25, abs=0.01)


def tiny_pretraining(corpus, tmp_path, tiny_base_dir, **overrides) -> dict:
    """pretrain.py options for a few updates of the tiny model on the probe corpus's recordings."""
    from utils.manifests import prepare_manifests

    prepare_manifests(corpus / "audio", tmp_path / "manifests", dev_fraction=0.0, seed=0)
    return dict(
        config_name=tiny_base_dir, train_manifest=tmp_path / "manifests" / "train.tsv", crop_seconds=1.0,
        epoch_multiplier=4, num_negatives=10, learning_rate=2e-3, warmup_steps=1, logging_steps=1, eval_steps=0,
        save_steps=0, num_workers=0, report_to="none",
    ) | overrides  # fmt: skip


def test_pretrain_probes_the_start_and_final_model_without_changing_training(corpus, tmp_path, tiny_base_dir):
    from helpers import flags, log_rows

    import pretrain

    options = tiny_pretraining(corpus, tmp_path, tiny_base_dir, per_device_train_batch_size=4, max_train_steps=3)
    pretrain.main(flags(**options, output_dir=tmp_path / "plain"))
    probed = pretrain.main(flags(**options, output_dir=tmp_path / "probed", probe_segments=corpus / "segments.tsv"))
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in log_rows(probed)]
    assert len(losses) == 3 and losses == [
        (r["step"], r["loss"], r["grad_norm"]) for r in log_rows(tmp_path / "plain")
    ]
    results = json.loads((probed / "probes" / "probe_results.json").read_text())
    assert list(results["models"]) == ["start", "final"] and results["num_train"] + results["num_test"] == 48
    assert not set(results["train_participants"]) & set(results["test_participants"])
    card = (probed / "README.md").read_text()
    assert "## Linear probes" in card and "| layer | start | final |" in card and "final - start" in card
    assert not any(p in card for p in results["test_participants"] + results["train_participants"])
    start = results["models"]["start"]["layers"]["0"]["macro_f1"]["value"]
    assert f"{start:.3f}" in card


def test_hourglass_model_is_probed_on_every_layer(corpus, repo_dir):
    from utils.hourglass import model_class, read_config

    config = read_config(repo_dir / "configs" / "tiny-wav2vec2-hourglass")  # [1,(2,4),1]: 4 layers
    torch.manual_seed(0)
    model_class(config, Wav2Vec2ForPreTraining)(config).save_pretrained(corpus / "hourglass")
    Wav2Vec2FeatureExtractor.from_pretrained(repo_dir / "configs" / "tiny-wav2vec2-hourglass").save_pretrained(
        corpus / "hourglass"
    )
    results = probe.main(
        ["--models", str(corpus / "hourglass"), "--segments", str(corpus / "segments.tsv"), "--bootstrap", "50"]
        + ["--output_dir", str(corpus / "out_hourglass"), "--test_participants", "P04"]
    )
    layers = results["models"]["hourglass"]["layers"]
    assert sorted(layers, key=int) == ["0", "1", "2", "3", "4"]
    assert max(layer["macro_f1"]["value"] for layer in layers.values()) >= results["chance"]["macro_f1"] + 0.4


@pytest.mark.slow
def test_pretrain_probes_under_two_processes(corpus, tmp_path, tiny_base_dir):
    """Only the main process probes; the other waits for it (a longer process-group timeout) and trains on."""
    import sys

    from helpers import flags, log_rows, run_script

    out = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    options = tiny_pretraining(corpus, tmp_path, tiny_base_dir, per_device_train_batch_size=2, max_train_steps=2)
    options |= dict(output_dir=out, probe_segments=corpus / "segments.tsv")
    run_script(
        "pretrain.py",
        *flags(**options),
        env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        launcher=torchrun,
    )
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    results = json.loads((out / "probes" / "probe_results.json").read_text())
    assert list(results["models"]) == ["start", "final"]
    assert "| layer | start | final |" in (out / "README.md").read_text()


def test_a_segment_time_that_is_not_a_number_names_the_file_and_line(corpus, tmp_path):
    rows = [{"path": str(corpus / "audio" / "P01_rec.wav"), "start": "1.0", "end": "abc", "label": "tone"}]
    write_tsv(tmp_path / "bad.tsv", [row | {"participant": "P01"} for row in rows], [*rows[0], "participant"])
    with pytest.raises(SystemExit, match=r"bad.tsv line 2: start/end '1.0', 'abc' are not numbers"):
        run(corpus, tmp_path / "o", segments=[str(tmp_path / "bad.tsv")])


def test_a_final_probe_that_fails_leaves_the_saved_run_alone(tmp_path, monkeypatch, caplog):
    import utils.pretrain_probes as pretrain_probes

    def unreadable(*args):
        raise ValueError("no readable test item is left (3 failure(s))")

    monkeypatch.setattr(pretrain_probes, "probe_in_place", unreadable)
    section = pretrain_probes.probe_final(None, None, None, tmp_path)
    assert section == "The final model could not be probed (the training log says why).\n"
    assert "no readable test item" in caplog.text and not (tmp_path / "probes").exists()
