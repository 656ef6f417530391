"""Layer-wise linear probes of frozen wav2vec 2.0 features: does a model (say, before and after
continued pretraining on your recordings) encode what you care about, and in which layer?

    python probe.py --models runs/start runs/continued --names start,continued \\
        --segments labels.tsv --output_dir probes/ [--test_participants P05,P06 | --test_fraction 0.3]
    python probe.py --models facebook/wav2vec2-base runs/home-ssl --segments vtc/*.rttm --audio_dir recordings/ \\
        --output_dir probes/ --frame_level

--segments is a TSV with path, start, end, label and optionally participant (paths relative to the
TSV's folder or absolute), or RTTM files (`SPEAKER <file id> 1 <start> <duration> <NA> <NA> <label> ...`)
whose file ids are the names, without extension, of audio files under --audio_dir. Participants
come from the participant column, else from --participant_regex on the file name (as in
data/prepare_manifest.py); the probes are trained on some participants and scored on the others
only, never on a participant they were trained on.

For each model and each layer (hidden state 0 = the Transformer's input, up to the last layer):
every segment's frames are pooled into their mean and standard deviation (--frame_level: every
50 Hz frame of the recordings that hold segments is an item, labelled by the segment around it,
"background" outside every segment), and an L2-regularised logistic regression on standardised
features is trained and scored. Reported: accuracy, macro-F1 and unweighted average recall (UAR)
with bootstrap 95 % intervals over the test items, and chance. With --dev_manifest, also each
model's contrastive loss and accuracy on fixed crops of that audio (models with pretraining heads).

Outputs in --output_dir: probe_results.json (everything, with each layer's test predictions),
probe_report.md (tables to paste into a model card: no participant ids, no paths), probe_layers.png.
The README section "Does continued pretraining help?" shows them in use.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import torch

from utils.audio import TARGET_SAMPLE_RATE
from utils.manifests import DEFAULT_PARTICIPANT_REGEX, read_manifest
from utils.probe_data import prepare, read_labelled_segments
from utils.probe_features import PROBE_DEFAULTS, dev_figures, load_probe_model, probe_model
from utils.probe_report import results_of, write_outputs
from utils.probes import HEADLINE

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model folders or hub ids, compared in this order")
    parser.add_argument("--names", help="comma-separated names for the models (default: the folder names)")
    parser.add_argument("--segments", nargs="+", required=True, help="a segments TSV, or RTTM files with --audio_dir")
    parser.add_argument("--audio_dir", help="where the RTTM file ids' audio files are (searched recursively)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--layers", default="all", help="'all' or hidden-state indices such as '0,6,12'")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--test_participants", help="comma-separated participant ids held out for scoring")
    split.add_argument("--test_fraction", type=float, default=0.3, help="else: this share of participants, by --seed")
    parser.add_argument("--participant_regex", default=DEFAULT_PARTICIPANT_REGEX)
    parser.add_argument("--seed", type=int, default=0, help="the participant split, the bootstrap, the probes")
    parser.add_argument("--frame_level", action="store_true", help="probe 50 Hz frames instead of pooled segments")
    parser.add_argument(
        "--max_frames_per_file",
        type=int,
        default=PROBE_DEFAULTS["max_frames_per_file"],
        help="--frame_level: evenly spread frames",
    )
    parser.add_argument(
        "--regularization",
        type=float,
        default=PROBE_DEFAULTS["regularization"],
        help="inverse L2 strength C of the probes",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=PROBE_DEFAULTS["bootstrap"],
        help="resamples of the test items for the intervals",
    )
    parser.add_argument("--dev_manifest", help="a manifest (data/prepare_manifest.py) for the dev loss and accuracy")
    parser.add_argument("--dev_crop_seconds", type=float, default=4.0)
    parser.add_argument("--dev_crops_per_file", type=int, default=8)
    parser.add_argument(
        "--chunk_seconds",
        type=float,
        default=PROBE_DEFAULTS["chunk_seconds"],
        help="long regions run in chunks (see README)",
    )
    parser.add_argument("--context_seconds", type=float, default=PROBE_DEFAULTS["context_seconds"])
    parser.add_argument(
        "--batch_size", type=int, default=PROBE_DEFAULTS["batch_size"], help="windows per forward pass"
    )
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    args.names = args.names.split(",") if args.names else [Path(m.rstrip("/")).name for m in args.models]
    if len(args.names) != len(args.models) or len(set(args.names)) != len(args.names):
        parser.error(f"--names {','.join(args.names)}: give one distinct name per model in --models")
    if not re.fullmatch(r"all|\d+(,\d+)*", args.layers):
        parser.error(f"--layers {args.layers!r}: expected 'all' or comma-separated indices such as '0,6,12'")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test_fraction {args.test_fraction}: must be between 0 and 1")
    for flag in ("max_frames_per_file", "bootstrap", "batch_size", "dev_crops_per_file"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    for flag in ("regularization", "chunk_seconds", "dev_crop_seconds"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag} {getattr(args, flag)}: must be > 0")
    return args


# ---------------------------------------------------------------------------------------------
# 2. Data: the segments, their participants and the split
# ---------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace):
    test_participants = args.test_participants.split(",") if args.test_participants else None
    try:
        segments = read_labelled_segments(args.segments, args.audio_dir, args.participant_regex)
        data = prepare(segments, test_participants, args.test_fraction, args.seed, args.frame_level)
        dev_rows = read_manifest(args.dev_manifest) if args.dev_manifest else None
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    counts = {label: sum(s.label == label for s in data.segments) for label in data.labels}
    logger.info(
        "%d segments (%s); train participants %s, test participants %s; %d skipped",
        len(data.segments),
        ", ".join(f"{label} {n}" for label, n in counts.items()),
        ",".join(data.train_participants),
        ",".join(data.test_participants),
        len(data.skipped),
    )
    return data, dev_rows


# ---------------------------------------------------------------------------------------------
# 3. Models: features of every layer, probes, dev figures
# ---------------------------------------------------------------------------------------------


def probe_all(args: argparse.Namespace, data, dev_rows) -> tuple[dict, dict]:
    """{name: results} for every model, and the first model's train/test labels (the same for all)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = {key: getattr(args, key) for key in ("chunk_seconds", "context_seconds", "batch_size", "frame_level")}
    options |= {
        "device": device,
        "max_frames_per_file": args.max_frames_per_file,
        "bootstrap": args.bootstrap,
        "regularization": args.regularization,
        "seed": args.seed,
        "layers": None if args.layers == "all" else [int(i) for i in args.layers.split(",")],
        "dev_crop_seconds": args.dev_crop_seconds,
        "dev_crops_per_file": args.dev_crops_per_file,
    }
    models, targets = {}, None
    for path, name in zip(args.models, args.names):
        try:
            model, feature_extractor = load_probe_model(path, device)
            if feature_extractor.sampling_rate != TARGET_SAMPLE_RATE:
                raise ValueError(f"--models {path}: expects {feature_extractor.sampling_rate} Hz audio, not 16 kHz")
            result = probe_model(model, feature_extractor, data, options)
            dev = dev_figures(model, feature_extractor, dev_rows, options) if dev_rows else None
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        if targets is None:
            targets = {"train": result["train_targets"], "test": result["test_targets"]}
        elif not np.array_equal(targets["test"], result["test_targets"]):
            raise SystemExit(f"error: --models {path} gives other test items than {args.models[0]} (frame geometry?)")
        for failure in result["failures"]:
            logger.warning("%s: skipped %s: %s", name, failure["source"], failure["reason"])
        models[name] = {"path": path, "dev": dev, "best_layer": result["best_layer"], "failures": result["failures"]}
        models[name]["layers"] = result["layers"]
        best = result["layers"][str(result["best_layer"])][HEADLINE]
        logger.info("%s: best layer %d, %s %.3f [%.3f, %.3f]", name, result["best_layer"], HEADLINE, *best.values())
        del model
    return models, targets


# ---------------------------------------------------------------------------------------------
# 4. Save: results, report, plot
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    data, dev_rows = load_data(args)
    models, targets = probe_all(args, data, dev_rows)
    results = results_of(data, models, targets["train"], targets["test"], args.frame_level, args.bootstrap)
    write_outputs(results, Path(args.output_dir))
    logger.info("wrote %s", Path(args.output_dir) / "probe_report.md")
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()
