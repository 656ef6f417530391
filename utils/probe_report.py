"""probe.py's outputs: probe_results.json (every figure, with the test predictions for paired
comparisons), probe_report.md (tables a user can paste into a model card: no participant ids or
paths) and probe_layers.png (score against layer, one line per model, intervals shaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.probes import HEADLINE, METRICS, Bootstrap, chance_scores, paired_difference

NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "uar": "UAR"}


def results_of(data, models: dict, train_targets, test_targets, frame_level: bool, num_resamples: int) -> dict:
    """probe_results.json's content: the task, the split (utils.probe_data.ProbeData `data`), chance, each
    model's results and the differences between models (bootstrap seeded by the split's seed)."""
    num_classes = len(data.labels)
    results = {
        "task": "frame" if frame_level else "segment",
        "labels": data.labels,
        "train_participants": data.train_participants,
        "test_participants": data.test_participants,
        "num_train": len(train_targets),
        "num_test": len(test_targets),
        "test_labels": np.asarray(test_targets).tolist(),
        "chance": chance_scores(np.asarray(train_targets), np.asarray(test_targets), num_classes, data.seed),
        "skipped_segments": data.skipped,
        "models": models,
    }
    results["differences"] = differences(results, num_classes, Bootstrap(len(test_targets), num_resamples, data.seed))
    return results


def differences(results: dict, num_classes: int, resamples: Bootstrap) -> dict:
    """Per layer, each model's headline score minus the first model's, paired over the test items."""
    truth = np.asarray(results["test_labels"])
    names = list(results["models"])
    first = results["models"][names[0]]["layers"]
    out = {}
    for name in names[1:]:
        layers = results["models"][name]["layers"]
        out[name] = {
            layer: paired_difference(
                truth, first[layer]["predictions"], layers[layer]["predictions"], num_classes, resamples
            )
            for layer in layers
            if layer in first
        }
    return out


def show(figure: dict, signed: bool = False) -> str:
    """'value [low, high]' of a figure with its interval; signed: '+' on positive numbers (a gain)."""
    number = "{:+.3f}" if signed else "{:.3f}"
    return f"{number.format(figure['value'])} [{number.format(figure['low'])}, {number.format(figure['high'])}]"


def report_tables(results: dict) -> str:
    """The markdown tables: headline score per layer and model, best layers, differences, dev figures."""
    names = list(results["models"])
    label = NAMES[HEADLINE]
    lines = [
        f"{results['task'].capitalize()}-level linear probes, {len(results['labels'])} classes "
        f"({', '.join(results['labels'])}): trained on {results['num_train']} items of "
        f"{len(results['train_participants'])} participants, scored on {results['num_test']} items of "
        f"{len(results['test_participants'])} other participants. {label} with bootstrap 95 % intervals over "
        f"the test items; chance (guessing with the train label frequencies): "
        + ", ".join(f"{NAMES[m]} {results['chance'][m]:.3f}" for m in METRICS)
        + ".",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    all_layers = sorted({int(k) for name in names for k in results["models"][name]["layers"]})
    for layer in all_layers:
        cells = [
            show(results["models"][n]["layers"][str(layer)][HEADLINE])
            if str(layer) in results["models"][n]["layers"]
            else ""
            for n in names
        ]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "| model | best layer | " + " | ".join(NAMES[m] for m in METRICS) + " |", "|---|---|" + "---|" * 3]
    for n in names:
        model = results["models"][n]
        best = model["layers"][str(model["best_layer"])]
        lines.append(f"| {n} | {model['best_layer']} | " + " | ".join(show(best[m]) for m in METRICS) + " |")
    lines += [
        "",
        f"The best layer is the one with the highest test {label}: picked on the test participants, it "
        "flatters every model alike; compare whole curves, or the differences below, layer by layer.",
    ]
    if results.get("differences"):
        lines += ["", f"{label} difference to {names[0]}, same layer, paired bootstrap 95 % interval:", ""]
        lines += ["| layer | " + " | ".join(f"{n} - {names[0]}" for n in results["differences"]) + " |"]
        lines += ["|---|" + "---|" * len(results["differences"])]
        for layer in all_layers:
            cells = [show(d[str(layer)]) if str(layer) in d else "" for d in results["differences"].values()]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if any(results["models"][n].get("dev") for n in names):
        lines += ["", "| model | dev contrastive loss | dev accuracy |", "|---|---|---|"]
        for n in names:
            dev = results["models"][n].get("dev") or {}
            loss, accuracy = dev.get("dev_contrastive_loss"), dev.get("dev_accuracy")
            lines.append(
                f"| {n} | {'-' if loss is None else f'{loss:.4f}'} | {'-' if accuracy is None else f'{accuracy:.4f}'} |"
            )
    return "\n".join(lines) + "\n"


def plot_layers(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, model in results["models"].items():
        layers = sorted(model["layers"], key=int)
        x = [int(layer) for layer in layers]
        figures = [model["layers"][layer][HEADLINE] for layer in layers]
        axis.plot(x, [f["value"] for f in figures], marker="o", label=name)
        axis.fill_between(x, [f["low"] for f in figures], [f["high"] for f in figures], alpha=0.2)
    axis.axhline(results["chance"][HEADLINE], color="grey", linestyle="--", label="chance")
    axis.set_xlabel("layer (0: CNN features after projection)")
    axis.set_ylabel(f"test {NAMES[HEADLINE]}")
    axis.set_title(f"{results['task']}-level probes, held-out participants")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(results: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "probe_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(output_dir / "probe_results.json")
    (output_dir / "probe_report.md").write_text("# Linear probes\n\n" + report_tables(results))
    plot_layers(results, output_dir / "probe_layers.png")
