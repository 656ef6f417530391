"""Does continued pretraining on the target domain help? A controlled domain-shift experiment on
synthetic audio: about 20 minutes on 2 idle CPU cores (`make adaptation`), under 40 when they are shared.

    python experiments/adaptation.py [--work_dir experiments/runs/adaptation] [--scale 1]
        [--seeds 0,1,2] [--steps 1200] [--exclude_test_audio] [--report_only] [--overwrite]

1. Two domains from data/make_demo_corpus.py: "source" (clean close-talk adult speech: a set A for
   S and a new set B of the same domain for S+) and "target" (home recordings of 8 participants:
   far-field, reverberant, noisy, child and adult voices, household events) with the segments the
   generator placed (adult, child, event, silence).
2. Per seed: a tiny model (configs/tiny-wav2vec2-base, recipe configs/recipes/adaptation-tiny.yaml)
   pretrained from scratch on source A (S); then, with the same number of further updates, S
   continued on source B (S+, the control: more audio of the domain it knows) and S continued on
   the target audio (T).
3. Per seed: probe.py on the target segments, probes trained on participants P01-P05 and scored on
   P06-P08 only (fixed before any result was seen, never tuned on). By default T's pretraining audio
   includes the test participants' recordings (unlabelled), as a user pretrains on all their audio;
   --exclude_test_audio leaves them out.
4. The report (adaptation_report.md, adaptation_results.json, adaptation_layers.png in --work_dir):
   per layer, S / S+ / T macro-F1 and UAR as means over seeds and the gain T - S+, at each model's
   best layer and over all layers, with 95 % intervals from a bootstrap that redraws the seeds and
   the test segments (the same draw for every model: the gain is paired). utils/adaptation.py.

--scale multiplies the minutes of audio and the updates (e.g. --scale 10 on a GPU). Finished steps
are kept when the script is run again with the same settings (a step that failed is run again);
--overwrite starts over. Each step's output is in --work_dir/logs/; a failing step stops the script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.adaptation import plot_layers, read_seed_results, report_tables, summarize  # noqa: E402
from utils.manifests import MANIFEST_COLUMNS, read_manifest, write_tsv  # noqa: E402

CONFIG = "configs/tiny-wav2vec2-base"
RECIPE = "configs/recipes/adaptation-tiny.yaml"
PARTICIPANTS = {"source": 4, "target": 8}
MINUTES = 4.0  # typical length of one recording at --scale 1
STEPS = 1200  # updates of S, and again of S+ and T, at --scale 1
CORPUS_SEEDS = {"source_a": 100, "source_b": 200, "target": 300}
TEST_PARTICIPANTS = "P06,P07,P08"
MODELS = {"S": "S", "S+": "S_plus", "T": "T"}  # name in the report: folder

# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(REPO / "experiments" / "runs" / "adaptation"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the minutes of audio and the updates")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (the corpus is the same for all)")
    parser.add_argument("--steps", type=int, help=f"updates of S, and of S+ and T after it (default {STEPS} x scale)")
    parser.add_argument("--test_participants", default=TEST_PARTICIPANTS, help="target participants the probes score")
    parser.add_argument("--exclude_test_audio", action="store_true", help="T pretrains without the test participants")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap draws for the intervals")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report from the probe results")
    parser.add_argument("--overwrite", action="store_true", help="remove the work folder's earlier experiment first")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be positive, not {args.scale}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers such as 0,1,2, not {args.seeds!r}")
    args.steps = args.steps or max(1, round(STEPS * args.scale))
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    args.work_dir = Path(args.work_dir).resolve()  # the steps run in the repo folder
    return args


def claim_work_dir(args, settings: dict) -> None:
    """Keep the finished steps of an earlier run with the same settings; refuse other settings."""
    saved = args.work_dir / "settings.json"
    if args.overwrite and saved.is_file():
        shutil.rmtree(args.work_dir)
    elif saved.is_file() and json.loads(saved.read_text()) != settings:
        sys.exit(
            f"error: {args.work_dir} holds an experiment with other settings ({saved}); pass --overwrite or another --work_dir"
        )
    elif args.work_dir.is_dir() and any(args.work_dir.iterdir()) and not saved.is_file():
        sys.exit(f"error: --work_dir {args.work_dir} is not empty and holds no experiment of this script")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=2) + "\n")


class Steps:
    """Runs the steps as subprocesses, logs each, keeps finished ones, times them (timings.json)."""

    def __init__(self, work_dir: Path, total: int):
        self.work_dir, self.total, self.done = work_dir, total, 0
        self.timings_file = work_dir / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        (work_dir / "logs").mkdir(exist_ok=True)

    def run(self, name: str, command: list, outputs: list[Path]) -> None:
        self.done += 1
        prefix = f"[{self.done}/{self.total}] {name}"
        if name in self.timings and all(p.exists() for p in outputs):
            print(f"{prefix}: kept from the earlier run ({self.timings[name]:.0f} s then)", flush=True)
            return
        log = self.work_dir / "logs" / f"{name.replace(' ', '_').replace('+', 'plus')}.log"
        print(f"{prefix} ...", end=" ", flush=True)
        start = time.monotonic()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            code = subprocess.run(
                [sys.executable, *map(str, command)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            ).returncode
        seconds = time.monotonic() - start
        missing = [str(p) for p in outputs if not p.exists()]
        if code != 0 or missing:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            why = f"exit status {code}" if code else f"it wrote no {', '.join(missing)}"
            sys.exit(
                "failed\n" + "\n".join(tail) + f"\nerror: step '{name}' failed ({why}); its whole output is in {log}"
            )
        print(f"{seconds:.0f} s", flush=True)
        self.timings[name] = seconds
        self.timings_file.write_text(json.dumps(self.timings, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# 2. Data: the two domains, their manifests, the target segments
# ---------------------------------------------------------------------------------------------


def make_data(work: Path, settings: dict, steps: Steps) -> None:
    corpus, manifests = work / "corpus", work / "manifests"
    segments = corpus / "target_segments.tsv"
    for name, seed in CORPUS_SEEDS.items():
        domain = name.split("_")[0]
        extra = ["--segments_tsv", segments] if domain == "target" else []
        command = ["data/make_demo_corpus.py", corpus / name, "--domain", domain, "--participants"]
        command += [PARTICIPANTS[domain], "--minutes", settings["minutes_per_recording"], "--seed", seed, *extra]
        steps.run(f"corpus {name}", command, [segments] if extra else [corpus / name])
        # The target's manifest holds every participant; S and S+ get a dev participant of their own.
        fraction = 0 if domain == "target" else 0.25
        command = ["data/prepare_manifest.py", corpus / name, "--output_dir", manifests / name]
        steps.run(f"manifest {name}", [*command, "--dev_fraction", fraction], [manifests / name / "train.tsv"])
    rows = read_manifest(manifests / "target" / "train.tsv")
    test_participants = settings["test_participants"]
    unknown = set(test_participants) - {r["participant"] for r in rows}
    if unknown:
        sys.exit(f"error: --test_participants {','.join(sorted(unknown))}: not in the target corpus ({segments})")
    held_out = [r for r in rows if r["participant"] in test_participants]
    kept = [r for r in rows if r["participant"] not in test_participants]
    write_tsv(manifests / "target_pretrain.tsv", kept if settings["exclude_test_audio"] else rows, MANIFEST_COLUMNS)
    # The probes' dev loss (and T's) on the test participants' audio: the same crops for every model.
    write_tsv(manifests / "target_dev.tsv", held_out, MANIFEST_COLUMNS)


# ---------------------------------------------------------------------------------------------
# 3. Models: per seed S from scratch on source A, then S+ (source B) and T (target) from S
# ---------------------------------------------------------------------------------------------


def pretrain_seed(work: Path, settings: dict, seed: int, steps: Steps) -> None:
    runs, manifests, n = work / f"seed{seed}", work / "manifests", settings["steps"]
    common = [RECIPE, "--max_train_steps", n, "--eval_steps", n, "--seed", seed, "--overwrite_output_dir"]
    data = {
        "S": (manifests / "source_a" / "train.tsv", manifests / "source_a" / "dev.tsv"),
        "S+": (manifests / "source_b" / "train.tsv", manifests / "source_b" / "dev.tsv"),
        "T": (manifests / "target_pretrain.tsv", manifests / "target_dev.tsv"),
    }
    for name, folder in MODELS.items():
        start = ["--config_name", CONFIG] if name == "S" else ["--model_name_or_path", runs / "S"]
        # S+ and T continue S's Gumbel schedule where S left it, not at a released model's 400k updates.
        start += [] if name == "S" else ["--gumbel_start_step", n]
        train, dev = data[name]
        command = ["pretrain.py", *common, *start, "--train_manifest", train, "--dev_manifest", dev]
        command += ["--output_dir", runs / folder]
        steps.run(f"pretrain {name} seed {seed}", command, [runs / folder / "model.safetensors"])


# ---------------------------------------------------------------------------------------------
# 4. Probes of S, S+ and T on the target segments, scored on the held-out participants
# ---------------------------------------------------------------------------------------------


def probe_seed(work: Path, settings: dict, seed: int, steps: Steps) -> None:
    runs = work / f"seed{seed}"
    command = ["probe.py", "--models", *(runs / f for f in MODELS.values()), "--names", ",".join(MODELS)]
    command += ["--segments", work / "corpus" / "target_segments.tsv", "--seed", seed]
    command += ["--test_participants", ",".join(settings["test_participants"])]
    command += ["--dev_manifest", work / "manifests" / "target_dev.tsv", "--output_dir", runs / "probes"]
    steps.run(f"probe seed {seed}", command, [runs / "probes" / "probe_results.json"])


# ---------------------------------------------------------------------------------------------
# 5. Figures: means over seeds, paired gains, bootstrap over seeds and test segments
# ---------------------------------------------------------------------------------------------


def figures(work: Path, settings: dict, resamples: int) -> dict:
    result_files = [work / f"seed{seed}" / "probes" / "probe_results.json" for seed in settings["seeds"]]
    missing = [str(p) for p in result_files if not p.is_file()]
    if missing:
        sys.exit(f"error: no probe results {', '.join(missing)}: run the experiment (without --report_only) first")
    try:
        summary = summarize(read_seed_results(result_files), list(MODELS), resamples=resamples)
    except ValueError as error:
        sys.exit(f"error: {error}")
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
    summary["settings"] = settings
    summary["runtime_seconds"] = {"steps": timings, "total": sum(timings.values())}
    pretraining_manifests = {"S": "source_a/train.tsv", "S+": "source_b/train.tsv", "T": "target_pretrain.tsv"}
    summary["minutes_of_audio"] = {
        name: round(sum(r["duration"] for r in read_manifest(work / "manifests" / tsv)) / 60, 1)
        for name, tsv in pretraining_manifests.items()
    }
    return summary


# ---------------------------------------------------------------------------------------------
# 6. Save: results JSON, plot, report
# ---------------------------------------------------------------------------------------------


def report_lines(summary: dict, timings: dict) -> list[str]:
    settings, pair = summary["settings"], summary["gains"].get("T - S+", {})
    seeds = ", ".join(map(str, settings["seeds"]))
    minutes = summary["minutes_of_audio"]
    pretrain = [v for k, v in timings.items() if k.startswith("pretrain")]
    probes = [v for k, v in timings.items() if k.startswith("probe")]
    test_audio = (
        "T's pretraining audio leaves the test participants out (--exclude_test_audio)."
        if settings["exclude_test_audio"]
        else "T's pretraining audio includes the test participants' recordings (unlabelled, as a user "
        "pretrains on all their audio); the probes never train on them."
    )
    lines = [
        "# Does continued pretraining help? Synthetic domain shift",
        "",
        f"`python experiments/adaptation.py --scale {settings['scale']:g} --seeds {','.join(map(str, settings['seeds']))}`"
        f" (`make adaptation` at scale 1). Runtime of all steps: {sum(timings.values()) / 60:.1f} min"
        + (f" (one pretraining run {sum(pretrain) / len(pretrain):.0f} s on average" if pretrain else "")
        + (f", one probe of three models {sum(probes) / len(probes):.0f} s)." if probes else ")."),
        "",
        f"- Source domain (clean close-talk adult speech): S pretrained from scratch on {minutes['S']} min "
        f"(the training split of {PARTICIPANTS['source']} participants), {settings['steps']} updates of `{settings['config']}` "
        f"with `{settings['recipe']}`.",
        f"- S+ (control): S continued for {settings['steps']} updates on {minutes['S+']} min of new source recordings (other participants, same domain).",
        f"- T: S continued for {settings['steps']} updates on the target domain (home recordings: far-field, "
        f"reverberant, noisy, child and adult voices, household events; {minutes['T']} min of "
        f"{PARTICIPANTS['target']} participants' recordings). {test_audio}",
        f"- Probes (probe.py, mean+std pooled segment features, logistic regression): {len(summary['labels'])} classes "
        f"({', '.join(summary['labels'])}), scored on {summary['num_test']} segments of participants "
        f"{', '.join(summary['test_participants'] or [])}, chosen before any result and never tuned on. "
        f"Seeds {seeds} (training randomness; the corpus is the same).",
        f"- Intervals: 95 % percentile bootstrap ({summary['bootstrap']['resamples']} draws) redrawing the seeds "
        "and the test segments together, the same draw for every model, so gains are paired. Best layer: each "
        "model at its own best layer by macro-F1, chosen again inside every draw.",
    ]
    if summary.get("chance"):
        lines.append(f"- Chance: macro-F1 {summary['chance']['macro_f1']:.3f}, UAR {summary['chance']['uar']:.3f}.")
    if pair:
        best, mean = pair["best_layer"]["macro_f1"], pair["mean_over_layers"]["macro_f1"]
        verdict = "above zero" if best["low"] > 0 else "below zero" if best["high"] < 0 else "includes zero"
        lines += [
            "",
            f"**Gain T - S+ (macro-F1): best layer {best['value']:+.3f} [{best['low']:+.3f}, {best['high']:+.3f}], "
            f"mean over layers {mean['value']:+.3f} [{mean['low']:+.3f}, {mean['high']:+.3f}]**; the best-layer "
            f"interval {verdict}.",
        ]
    return [*lines, "", *report_tables(summary), "", "![S, S+ and T per layer](adaptation_layers.png)"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = {
        "scale": args.scale,
        "seeds": args.seeds,
        "steps": args.steps,
        "minutes_per_recording": MINUTES * args.scale,
        "participants": PARTICIPANTS,
        "corpus_seeds": CORPUS_SEEDS,
        "test_participants": [p.strip() for p in args.test_participants.split(",") if p.strip()],
        "exclude_test_audio": args.exclude_test_audio,
        "config": CONFIG,
        "recipe": RECIPE,
    }
    work, started = args.work_dir, time.monotonic()
    if args.report_only:
        if not (work / "settings.json").is_file():
            sys.exit(f"error: --report_only: {work} holds no experiment (no settings.json)")
        settings = json.loads((work / "settings.json").read_text())
    else:
        claim_work_dir(args, settings)
        if not (REPO / "probe.py").is_file():
            sys.exit(f"error: {REPO / 'probe.py'} is missing: this experiment needs probe.py (issue 13)")
        steps = Steps(work, total=6 + 4 * len(settings["seeds"]))
        make_data(work, settings, steps)
        for seed in settings["seeds"]:
            pretrain_seed(work, settings, seed, steps)
            probe_seed(work, settings, seed, steps)
    summary = figures(work, settings, args.resamples)
    (work / "adaptation_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_layers(summary, work / "adaptation_layers.png")
    report = work / "adaptation_report.md"
    report.write_text("\n".join(report_lines(summary, summary["runtime_seconds"]["steps"])) + "\n")
    all_steps = summary["runtime_seconds"]["total"] / 60
    print(
        f"report: {report} (this invocation {(time.monotonic() - started) / 60:.1f} min, all steps {all_steps:.1f} min)"
    )
    return summary


if __name__ == "__main__":
    main()
