"""pretrain.py --probe_segments: probe.py's linear probes of the start model (before the first update)
and of the final model, on the same segments and participant split, so the model card says whether
this run made the model better or worse for the labelled task. The segments are read and checked
before training starts; the start model's results are kept in OUT/probes/ for a resumed run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from utils.probe_data import ProbeData, prepare, read_labelled_segments
from utils.probe_features import PROBE_DEFAULTS, probe_model
from utils.probe_report import report_tables, results_of, write_outputs

logger = logging.getLogger(__name__)

START, FINAL = "start", "final"
# How long the other processes of a multi-process run may wait while the main one probes a model.
PROBE_WAIT_MINUTES = 120
# Without a participant list: this share of the segments' participants is held out, by the run's seed.
TEST_FRACTION = 0.3


def probe_options(seed: int, device) -> dict:
    """probe.py's defaults: segment level, every layer."""
    return {**PROBE_DEFAULTS, "frame_level": False, "device": device, "seed": seed, "layers": None}


def read_probe_segments(path: str, participant_regex: str, seed: int) -> ProbeData:
    """The segments and their participant split, checked now: a bad file must not cost a training run."""
    try:
        return prepare(read_labelled_segments([path], None, participant_regex), None, TEST_FRACTION, seed, False)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: --probe_segments {error}") from None


def probe_in_place(model, feature_extractor, data: ProbeData) -> dict:
    """One model's probes (utils.probe_features.probe_model), the model left in its training mode and
    the random number generators as they were: a run with probes trains exactly as one without."""
    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            result = probe_model(model, feature_extractor, data, probe_options(data.seed, model.device))
    finally:
        model.train(was_training)
    return result


def probe_start(model, feature_extractor, data: ProbeData, output_dir: Path) -> None:
    """Probe the model before its first update; kept as OUT/probes/start.json (a resumed run finds it)."""
    path = output_dir / "probes" / f"{START}.json"
    if path.exists():
        return
    result = probe_in_place(model, feature_extractor, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(as_json(result)) + "\n")
    tmp.replace(path)
    best = result["layers"][str(result["best_layer"])]["macro_f1"]["value"]
    logger.info("probes of the start model: best layer %d, macro-F1 %.3f", result["best_layer"], best)


def as_json(result: dict) -> dict:
    return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in result.items()}


def probe_final(model, feature_extractor, data: ProbeData, output_dir: Path) -> str:
    """Probe the final model, write OUT/probes/probe_{results.json,report.md,layers.png} with the start
    model's results next to it, and return the tables for the model card."""
    probes_dir = output_dir / "probes"
    try:  # the model is saved already: a probe that fails now must not fail the run
        final = as_json(probe_in_place(model, feature_extractor, data))
    except (ValueError, OSError) as error:
        logger.warning("--probe_segments: the final model could not be probed: %s", error)
        return "The final model could not be probed (the training log says why).\n"
    models = {}
    start_path = probes_dir / f"{START}.json"
    if start_path.exists():
        start = json.loads(start_path.read_text())
        if start["test_targets"] == final["test_targets"]:
            models[START] = start
        else:
            logger.warning("%s holds other test items than the final model's probes: not compared", start_path)
    else:
        logger.warning("no probes of the start model in %s (a run resumed from one without them)", probes_dir)
    models[FINAL] = final
    models = {
        name: {"path": name, "dev": None, "best_layer": m["best_layer"], "layers": m["layers"]}
        for name, m in models.items()
    }
    results = results_of(
        data, models, final["train_targets"], final["test_targets"], False, PROBE_DEFAULTS["bootstrap"]
    )
    write_outputs(results, probes_dir)
    gain = results["differences"].get(FINAL, {}).get(str(final["best_layer"]))
    if gain is not None:
        logger.info(
            "probes: final minus start model at the final model's best layer %d: macro-F1 %+.3f [%+.3f, %+.3f]",
            final["best_layer"],
            *gain.values(),
        )
    return report_tables(results)
