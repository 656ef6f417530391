"""The figures of the adaptation experiment (experiments/adaptation.py) from probe.py's results of
several seeds: each model's per-layer macro-F1 and UAR as the mean over seeds, the paired gains
(T - S+ and the others), at each layer, at each model's best layer and over all layers, with 95 %
intervals from one bootstrap that redraws both the seeds and the test segments (the same draw for
every model, so a gain is paired); then the markdown report and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.probe_report import show
from utils.probes import interval, scores

METRICS = ("macro_f1", "uar")
METRIC_NAMES = {"macro_f1": "macro-F1", "uar": "UAR"}
GAINS = (("T", "S+"), ("T", "S"), ("S+", "S"))


def read_seed_results(paths: list) -> list[dict]:
    """probe_results.json of each seed; they must share labels, test segments and layers."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable probe_results.json ({error})") from None
        for key in ("labels", "test_labels", "models"):
            if key not in results[-1]:
                raise ValueError(f"{path}: no {key!r}; is it probe.py's probe_results.json?")
        if results[-1]["labels"] != results[0]["labels"] or results[-1]["test_labels"] != results[0]["test_labels"]:
            raise ValueError(f"{path}: other labels or test segments than {paths[0]}: the seeds must share them")
    return results


def prediction_array(results: list[dict], names: list[str]) -> tuple[np.ndarray, list[int]]:
    """Test predictions as an array [model, layer, seed, segment] over the layers every model has."""
    layers = None
    for seed_results in results:
        for name in names:
            if name not in seed_results["models"]:
                raise ValueError(f"probe results without model {name!r} (it has {sorted(seed_results['models'])})")
            found = {int(layer) for layer in seed_results["models"][name]["layers"]}
            layers = found if layers is None else layers & found
    layers = sorted(layers)
    array = np.array(
        [
            [
                [seed_results["models"][name]["layers"][str(layer)]["predictions"] for seed_results in results]
                for layer in layers
            ]
            for name in names
        ],
        dtype=np.int64,
    )
    return array, layers


def figures_of(truth: np.ndarray, predictions: np.ndarray, num_classes: int, seeds: np.ndarray) -> np.ndarray:
    """[model, layer, metric] means over the given seeds (repeats count) of each metric."""
    models, layers = predictions.shape[:2]
    out = np.zeros((models, layers, len(METRICS)))
    for m in range(models):
        for layer in range(layers):
            for s in seeds:
                found = scores(truth, predictions[m, layer, s], num_classes)
                out[m, layer] += [found[metric] for metric in METRICS]
    return out / len(seeds)


def summarize(results: list[dict], names=("S", "S+", "T"), resamples: int = 1000, seed: int = 0) -> dict:
    """Scores per model and layer (mean over seeds), best layer, mean over layers, and the GAINS among
    `names`, each with a 95 % percentile interval from `resamples` draws of seeds and test segments."""
    names = list(names)
    truth = np.asarray(results[0]["test_labels"], dtype=np.int64)
    num_classes = len(results[0]["labels"])
    predictions, layers = prediction_array(results, names)
    every_seed = np.arange(len(results))
    point = figures_of(truth, predictions, num_classes, every_seed)
    per_seed = np.stack([figures_of(truth, predictions, num_classes, np.array([s])) for s in every_seed], axis=-1)
    rng = np.random.default_rng(seed)
    draws = np.zeros((resamples, *point.shape))
    for b in range(resamples):
        seeds = rng.integers(0, len(results), len(results))
        items = rng.integers(0, len(truth), len(truth))
        draws[b] = figures_of(truth[items], predictions[..., items], num_classes, seeds)
    summary = {
        "labels": results[0]["labels"],
        "num_test": len(truth),
        "num_seeds": len(results),
        "layers": layers,
        "test_participants": results[0].get("test_participants"),
        "chance": results[0].get("chance"),
        "bootstrap": {"resamples": resamples, "redraws": "seeds and test segments, the same draw for every model"},
        "scores": {},
        "best_layer": {},
        "mean_over_layers": {},
        "gains": {},
        "dev": {},
    }
    for m, name in enumerate(names):
        summary["scores"][name] = {
            str(layer): {
                metric: {**interval(point[m, i, k], draws[:, m, i, k]), "per_seed": per_seed[m, i, k].tolist()}
                for k, metric in enumerate(METRICS)
            }
            for i, layer in enumerate(layers)
        }
        best = int(np.argmax(point[m, :, 0]))  # by macro-F1, on the test segments as probe.py chooses it
        summary["best_layer"][name] = {"layer": layers[best]} | {
            metric: interval(point[m, best, k], draws[:, m, best, k]) for k, metric in enumerate(METRICS)
        }
        summary["mean_over_layers"][name] = {
            metric: interval(point[m, :, k].mean(), draws[:, m, :, k].mean(axis=1)) for k, metric in enumerate(METRICS)
        }
        dev = [r["models"][name].get("dev") for r in results]
        if all(dev):
            losses = [d["dev_contrastive_loss"] for d in dev]
            summary["dev"][name] = {"dev_contrastive_loss": float(np.mean(losses)), "per_seed": losses}
    for a, b in GAINS:
        if a in names and b in names:
            summary["gains"][f"{a} - {b}"] = gain(point, draws, names.index(a), names.index(b), layers)
    return summary


def gain(point: np.ndarray, draws: np.ndarray, a: int, b: int, layers: list[int]) -> dict:
    """Model a minus model b: per layer; each at its own best layer (chosen again inside every draw,
    so the choice's luck is in the interval); and the mean over layers."""
    return {
        "layers": {
            str(layer): {
                metric: interval(point[a, i, k] - point[b, i, k], draws[:, a, i, k] - draws[:, b, i, k])
                for k, metric in enumerate(METRICS)
            }
            for i, layer in enumerate(layers)
        },
        "best_layer": {
            metric: interval(
                point[a, :, k].max() - point[b, :, k].max(), draws[:, a, :, k].max(1) - draws[:, b, :, k].max(1)
            )
            for k, metric in enumerate(METRICS)
        },
        "mean_over_layers": {
            metric: interval(
                point[a, :, k].mean() - point[b, :, k].mean(), draws[:, a, :, k].mean(1) - draws[:, b, :, k].mean(1)
            )
            for k, metric in enumerate(METRICS)
        },
    }


def report_tables(summary: dict) -> list[str]:
    """Markdown: per-layer scores of each model, best layer and mean over layers, gains, dev loss."""
    names = list(summary["scores"])
    lines = []
    for metric in METRICS:
        lines += [f"### {METRIC_NAMES[metric]} per layer (mean over seeds, 95 % interval)", ""]
        lines += ["| layer | " + " | ".join(names) + " | T - S+ |", "|---|" + "---|" * (len(names) + 1)]
        for layer in summary["layers"]:
            cells = [show(summary["scores"][name][str(layer)][metric]) for name in names]
            gain_cell = summary["gains"].get("T - S+", {}).get("layers", {}).get(str(layer), {}).get(metric)
            lines.append(f"| {layer} | " + " | ".join(cells) + f" | {show(gain_cell, True) if gain_cell else ''} |")
        best = [f"{show(summary['best_layer'][n][metric])} (layer {summary['best_layer'][n]['layer']})" for n in names]
        mean = [show(summary["mean_over_layers"][n][metric]) for n in names]
        pair = summary["gains"].get("T - S+")
        lines.append("| best | " + " | ".join(best) + f" | {show(pair['best_layer'][metric], True) if pair else ''} |")
        lines.append(
            "| mean | " + " | ".join(mean) + f" | {show(pair['mean_over_layers'][metric], True) if pair else ''} |"
        )
        lines.append("")
    lines += ["### Gains (macro-F1 / UAR; best = each model at its own best layer)", ""]
    lines += ["| gain | best layer | mean over layers |", "|---|---|---|"]
    for pair, figures in summary["gains"].items():
        cells = [
            " / ".join(show(figures[where][m], True) for m in METRICS) for where in ("best_layer", "mean_over_layers")
        ]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    if summary["dev"]:
        lines += ["", "Contrastive loss on fixed crops of the target dev audio (mean over seeds; lower is better): "]
        lines[-1] += ", ".join(f"{n} {d['dev_contrastive_loss']:.3f}" for n, d in summary["dev"].items()) + "."
    return lines


def plot_layers(summary: dict, path) -> None:
    """Score against layer for each model (interval shaded), one panel per metric, and the gain T - S+."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = summary["layers"]
    figure, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4.2 * (len(METRICS) + 1), 3.6))
    for axis, metric in zip(axes, METRICS):
        for name, by_layer in summary["scores"].items():
            figures = [by_layer[str(layer)][metric] for layer in layers]
            axis.plot(layers, [f["value"] for f in figures], marker="o", label=name)
            axis.fill_between(layers, [f["low"] for f in figures], [f["high"] for f in figures], alpha=0.2)
        if summary.get("chance"):
            axis.axhline(summary["chance"][metric], color="grey", linestyle=":", label="chance")
        axis.set(xlabel="layer (hidden state)", ylabel=METRIC_NAMES[metric], xticks=layers)
        axis.legend(fontsize=8)
    pair = summary["gains"].get("T - S+")
    if pair:
        for metric in METRICS:
            figures = [pair["layers"][str(layer)][metric] for layer in layers]
            axes[-1].plot(layers, [f["value"] for f in figures], marker="o", label=METRIC_NAMES[metric])
            axes[-1].fill_between(layers, [f["low"] for f in figures], [f["high"] for f in figures], alpha=0.2)
        axes[-1].axhline(0, color="grey", linewidth=0.8)
        axes[-1].set(xlabel="layer (hidden state)", ylabel="T - S+", xticks=layers)
        axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
