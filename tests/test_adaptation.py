"""utils/adaptation.py (the adaptation experiment's figures) on made-up probe results, and
experiments/adaptation.py's report and work-folder checks without running any model."""

import json

import numpy as np
import pytest
from helpers import run_script
from sklearn.metrics import balanced_accuracy_score, f1_score

from utils.adaptation import read_seed_results, summarize
from utils.manifests import MANIFEST_COLUMNS, write_tsv
from utils.probes import scores

LABELS = ["adult", "child", "event", "silence"]
TRUTH = [0, 0, 1, 1, 2, 2, 3, 3]
ONE_MISS = [0, 1, 1, 1, 2, 2, 3, 3]  # one adult taken for a child: macro-F1 (2/3 + 4/5 + 1 + 1) / 4, UAR 0.875
TWO_MISSES = [1, 0, 1, 1, 2, 3, 3, 3]


def fake_probe_results(predictions: dict) -> dict:
    """probe.py's probe_results.json with the given predictions {model: {layer: [...]}}."""
    return {
        "task": "segment",
        "labels": LABELS,
        "train_participants": ["P01", "P02"],
        "test_participants": ["P03"],
        "num_train": 8,
        "num_test": len(TRUTH),
        "test_labels": TRUTH,
        "chance": {"accuracy": 0.25, "macro_f1": 0.25, "uar": 0.25},
        "models": {
            name: {
                "path": f"/runs/{name}",
                "dev": {"dev_contrastive_loss": 4.0 - i / 10, "dev_accuracy": 0.1},
                "best_layer": 0,
                "layers": {layer: {"predictions": p} for layer, p in by_layer.items()},
            }
            for i, (name, by_layer) in enumerate(predictions.items())
        },
    }


SEEDS = [
    fake_probe_results(
        {
            "S": {"0": TWO_MISSES, "1": TWO_MISSES},
            "S+": {"0": ONE_MISS, "1": TWO_MISSES},
            "T": {"0": TRUTH, "1": TWO_MISSES},
        }
    ),
    fake_probe_results(
        {
            "S": {"0": TWO_MISSES, "1": TWO_MISSES},
            "S+": {"0": TRUTH, "1": TWO_MISSES},
            "T": {"0": TRUTH, "1": TWO_MISSES},
        }
    ),
]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_scores_match_scikit_learn_over_the_classes_present():
    truth, predicted = np.array([0, 0, 1, 1, 3, 3]), np.array([0, 1, 1, 2, 3, 0])  # class 2 absent from truth
    found = scores(truth, predicted, 4)
    present = [0, 1, 3]
    assert found["macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=present, average="macro"))
    assert found["uar"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert found["accuracy"] == pytest.approx(0.5)
    one_miss = scores(np.array(TRUTH), np.array(ONE_MISS), 4)
    assert one_miss["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1 + 1) / 4) and one_miss["uar"] == 0.875


def test_gain_is_the_paired_mean_over_seeds_with_its_interval():
    summary = summarize(SEEDS, ["S", "S+", "T"], resamples=500)
    f1_one_miss = (2 / 3 + 4 / 5 + 1 + 1) / 4
    s_plus = summary["scores"]["S+"]["0"]["macro_f1"]
    assert s_plus["per_seed"] == pytest.approx([f1_one_miss, 1.0]) and s_plus["value"] == pytest.approx(
        (f1_one_miss + 1) / 2
    )
    layer0 = summary["gains"]["T - S+"]["layers"]["0"]
    assert layer0["macro_f1"]["value"] == pytest.approx((1 - f1_one_miss) / 2)
    assert layer0["uar"]["value"] == pytest.approx(0.125 / 2)
    # T is right wherever S+ is, so no draw gives a negative gain; a quarter of the draws take seed 1
    # twice (gain 0), so the 2.5 % end is exactly 0.
    assert layer0["macro_f1"]["low"] == 0 and layer0["macro_f1"]["value"] < layer0["macro_f1"]["high"] <= 0.5
    # Identical predictions: the paired gain is 0 in every draw.
    assert summary["gains"]["T - S+"]["layers"]["1"]["macro_f1"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    best = summary["gains"]["T - S+"]["best_layer"]["macro_f1"]["value"]
    assert best == pytest.approx(1.0 - (f1_one_miss + 1) / 2)  # each at its best layer, 0 for both
    assert summary["gains"]["T - S+"]["mean_over_layers"]["uar"]["value"] == pytest.approx(0.125 / 4)
    assert summary["best_layer"]["T"]["layer"] == 0 and summary["best_layer"]["T"]["macro_f1"]["value"] == 1.0
    assert set(summary["gains"]) == {"T - S+", "T - S", "S+ - S"}
    assert summary["dev"]["T"]["dev_contrastive_loss"] == pytest.approx(3.8)


def test_interval_width_matches_the_paired_standard_error():
    """One seed, 400 balanced segments: S+ right on 80 %, T on those and half the others. The bootstrap
    interval of the UAR gain is close to +-1.96 standard errors of the paired per-segment difference
    (0.017 here; unpaired, it would be 0.027)."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 100)
    right_s = rng.random(400) < 0.8
    right_t = right_s | (rng.random(400) < 0.5)
    wrong = (truth + 1) % 4
    results = fake_probe_results({"S+": {"0": []}, "T": {"0": []}})
    results["test_labels"] = truth.tolist()
    results["models"]["S+"]["layers"]["0"]["predictions"] = np.where(right_s, truth, wrong).tolist()
    results["models"]["T"]["layers"]["0"]["predictions"] = np.where(right_t, truth, wrong).tolist()
    gain = summarize([results], ["S+", "T"], resamples=2000)["gains"]["T - S+"]["layers"]["0"]["uar"]
    difference = right_t.astype(float) - right_s
    assert gain["value"] == pytest.approx(difference.mean())
    standard_error = difference.std() / np.sqrt(len(difference))
    assert (gain["high"] - gain["low"]) / 2 == pytest.approx(1.96 * standard_error, rel=0.15)


def test_seeds_must_share_the_test_segments(tmp_path):
    other = fake_probe_results({"S": {"0": TRUTH}})
    other["test_labels"] = TRUTH[::-1]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    paths[0].write_text(json.dumps(SEEDS[0]))
    paths[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="b.json: other labels or test segments"):
        read_seed_results(paths)


def test_report_from_probe_results_and_work_folder_checks(tmp_path):
    work = tmp_path / "work"
    settings = {"scale": 1.0, "seeds": [0, 1], "steps": 400, "test_participants": ["P03"], "exclude_test_audio": False}
    settings |= {"config": "configs/tiny-wav2vec2-base", "recipe": "configs/recipes/adaptation-tiny.yaml"}
    (work / "manifests").mkdir(parents=True)
    (work / "settings.json").write_text(json.dumps(settings))
    (work / "timings.json").write_text(json.dumps({"pretrain S seed 0": 90.0, "probe seed 0": 60.0}))
    row = {
        "path": "/a.wav",
        "participant": "P01",
        "duration": 120.0,
        "sample_rate": 16000,
        "num_channels": 1,
        "num_frames": 1,
    }
    for name in ("source_a/train.tsv", "source_b/train.tsv", "target_pretrain.tsv"):
        write_tsv(work / "manifests" / name, [row], MANIFEST_COLUMNS)
    for seed, results in enumerate(SEEDS):
        (work / f"seed{seed}" / "probes").mkdir(parents=True)
        (work / f"seed{seed}" / "probes" / "probe_results.json").write_text(json.dumps(results))
    out = run_script("experiments/adaptation.py", "--report_only", "--work_dir", work, "--resamples", 200)
    assert "adaptation_report.md" in out.stdout
    report = (work / "adaptation_report.md").read_text()
    saved = json.loads((work / "adaptation_results.json").read_text())
    gain = saved["gains"]["T - S+"]["layers"]["0"]["macro_f1"]["value"]
    assert gain == pytest.approx((1 - (2 / 3 + 4 / 5 + 1 + 1) / 4) / 2)
    assert "| 0 | " in report and f"{gain:+.3f}" in report and "includes the test participants" in report
    assert saved["runtime_seconds"]["total"] == 150.0 and saved["minutes_of_audio"] == {"S": 2.0, "S+": 2.0, "T": 2.0}
    assert (work / "adaptation_layers.png").stat().st_size > 10_000
    # Other settings in the same folder, or a folder that is not an experiment's, are refused.
    refused = run_script("experiments/adaptation.py", "--work_dir", work, "--seeds", "5", check=False)
    assert refused.returncode != 0 and "holds an experiment with other settings" in refused.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = run_script("experiments/adaptation.py", "--work_dir", tmp_path / "other", check=False)
    assert refused.returncode != 0 and "holds no experiment of this script" in refused.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
