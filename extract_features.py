"""Extract wav2vec 2.0 features from long recordings: frame features or pooled vectors, per file or per segment.

    python extract_features.py --model_name_or_path facebook/wav2vec2-base --output_dir feats recordings/
    python extract_features.py --model_name_or_path runs/home-ssl --layers 6,12 --pooling meanstd \\
        --segments vtc_output.rttm --output_dir feats_chi recordings/
    accelerate launch extract_features.py ...    # several GPUs split the files between them

INPUT is any mix of audio files, folders (searched recursively) and manifest .tsv files with a `path`
column (as written by data/prepare_manifest.py). With a --segments TSV the INPUTs are left out.

Outputs: one float32 array per input file, OUT/<path relative to its input folder>.npy (or .pt,
.safetensors), or with --segments one per segment, OUT/<that path, no extension>/<start ms>-<end ms>[_<label>].npy:
the frames of the chosen --layers (--pooling none), or their mean (and standard deviation) over the
frames. OUT/index.tsv lists the outputs with their time span, shape and frame rate, OUT/failures.tsv
the files and segments that could not be read. Long files run in chunks of --chunk_seconds with
--context_seconds of audio on each side, on the frame grid of a whole-file pass, in memory that does
not grow with the file.

The README (section "Feature extraction") describes the output layout and index columns, the layers
(and stable layer norm), how chunked features compare with a whole-file pass, normalisation, batching,
several processes and --skip_existing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import soundfile as sf
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from transformers import AutoConfig, Wav2Vec2Model

from utils.audio import TARGET_SAMPLE_RATE
from utils.extraction_folder import claim_features_dir, model_fingerprint
from utils.features import FAILURE_COLUMNS, INDEX_COLUMNS, OutputFiles, merge_tables
from utils.hourglass import MODEL_TYPE, model_class, read_config
from utils.manifests import write_tsv
from utils.processes import StopSignal, ignore_sigterm
from utils.progress import DEFAULT_PROGRESS_INTERVAL, PROGRESS_INTERVAL_HELP, progress_bar
from utils.segments import Job, is_rttm, list_sources, make_jobs, name_files, read_segments
from utils.training import load_feature_extractor
from utils.windows import WindowReader, as_is, batches, run_model, window_geometry

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Flags the saved features depend on: --skip_existing refuses to mix outputs made with other values.
CONFIG_KEYS = ["model_name_or_path", "layers", "pooling", "format", "chunk_seconds", "context_seconds", "dtype"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files, folders or manifest .tsv files")
    parser.add_argument("--model_name_or_path", required=True, help="any wav2vec2 checkpoint: hub id or local folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--layers", default="last", help="'last', 'all', or hidden-state indices such as '6,12' (see the README)"
    )
    parser.add_argument("--pooling", choices=["none", "mean", "meanstd"], default="none")
    parser.add_argument("--format", choices=["npy", "pt", "safetensors"], default="npy")
    parser.add_argument(
        "--segments", help="RTTM (file ids = input file names without extension) or TSV with path, start, end[, label]"
    )
    parser.add_argument("--chunk_seconds", type=float, default=30.0)
    parser.add_argument(
        "--context_seconds", type=float, default=5.0, help="audio on each side of a chunk, run and then dropped"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", help="default: the process's accelerator device, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument(
        "--num_workers", type=int, default=1, help="background processes reading audio; 0 reads in the main process"
    )
    parser.add_argument("--skip_existing", action="store_true", help="keep outputs that are already complete")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="remove an earlier extraction's outputs first"
    )
    parser.add_argument(
        "--progress_interval", type=float, default=DEFAULT_PROGRESS_INTERVAL, help=PROGRESS_INTERVAL_HELP
    )
    args = parser.parse_args(argv)

    for item in args.inputs:
        if not os.path.exists(item):
            parser.error(f"INPUT {item} does not exist")
    if args.segments and not os.path.isfile(args.segments):
        parser.error(f"--segments {args.segments}: file not found")
    if not args.inputs and not (args.segments and not is_rttm(args.segments)):
        parser.error(
            "give at least one INPUT (audio file, folder or manifest .tsv), or a --segments TSV naming the files"
        )
    if args.inputs and args.segments and not is_rttm(args.segments):
        parser.error("a --segments TSV names its own files: give no INPUT with it")
    if not re.fullmatch(r"last|all|\d+(,\d+)*", args.layers):
        parser.error(
            f"--layers {args.layers!r}: expected 'last', 'all' or comma-separated layer indices such as '6,12'"
        )
    if args.chunk_seconds <= 0:
        parser.error(f"--chunk_seconds {args.chunk_seconds}: must be > 0")
    if args.context_seconds < 0:
        parser.error(f"--context_seconds {args.context_seconds}: must be >= 0")
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: must be >= 1")
    if args.num_workers < 0:
        parser.error(f"--num_workers {args.num_workers}: must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# 2. Data: the processes, the output files to make, and this process's share of the source files
# ---------------------------------------------------------------------------------------------


def start_processes(args: argparse.Namespace) -> PartialState:
    # accelerate forms a group of CPU processes (torchrun without GPUs) only when told it is on CPU.
    # Processes that finish their share early wait for the slowest at the end, which on a large
    # corpus can take hours: far past the process group's default timeout (10-30 minutes).
    state = PartialState(
        cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(days=7)
    )
    if int(os.environ.get("WORLD_SIZE", "1")) != state.num_processes:
        raise SystemExit(
            f"error: launched as {os.environ['WORLD_SIZE']} processes, but accelerate sees {state.num_processes}; for CPU processes set ACCELERATE_USE_CPU=1"
        )
    return state


def make_job_list(args: argparse.Namespace) -> list[Job]:
    """One job per output file: every input file, or every segment of --segments."""
    try:
        segments = read_segments(args.segments) if args.segments else None
        if args.inputs:
            sources = list_sources(args.inputs)
        else:  # a --segments TSV names its files
            sources = name_files(sorted({Path(key) for key, *_ in segments}))
        jobs = make_jobs(sources, segments, args.format)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if not jobs:
        raise SystemExit(f"error: no audio files found in {', '.join(args.inputs)}")
    return jobs


def share_of_files(jobs: list[Job], state) -> list[tuple[str, list[tuple[int, Job]]]]:
    """This process's source files, each with its (job id, job) pairs."""
    files: dict[str, list[tuple[int, Job]]] = {}
    for job_id, job in enumerate(jobs):
        files.setdefault(job.source, []).append((job_id, job))
    # Largest first, dealt out in turn: the processes get similar amounts of audio.
    by_size = sorted(files.items(), key=lambda kv: -os.path.getsize(kv[0]) if os.path.isfile(kv[0]) else 0)
    return by_size[state.process_index :: state.num_processes]


# ---------------------------------------------------------------------------------------------
# 3. Model: config checks, the layers to save, loading
# ---------------------------------------------------------------------------------------------


def load_config(args: argparse.Namespace):
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path}: {error}") from None
    if config.model_type not in ("wav2vec2", MODEL_TYPE):  # AutoConfig knows MODEL_TYPE once utils.hourglass is in
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path} is a {config.model_type} model, not wav2vec2"
        )
    if getattr(config, "add_adapter", False):
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path} has an adapter, which changes the frame rate; not supported"
        )
    return config


def pick_layers(args: argparse.Namespace, config) -> list[int] | None:
    """Hidden-state indices to save, in array order; None for the model's last_hidden_state."""
    if args.layers == "last":
        return None
    layers = (
        list(range(config.num_hidden_layers + 1)) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    )
    if max(layers) > config.num_hidden_layers:
        raise SystemExit(f"error: --layers {args.layers}: the model has hidden states 0..{config.num_hidden_layers}")
    return layers


def load_model(args: argparse.Namespace, layers: list[int] | None, device: torch.device):
    """The model, in eval mode on `device`, and its feature extractor (sampling rate, normalisation)."""
    feature_extractor = load_feature_extractor(args.model_name_or_path)
    if feature_extractor.sampling_rate != TARGET_SAMPLE_RATE:
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path} expects {feature_extractor.sampling_rate} Hz audio; only {TARGET_SAMPLE_RATE} Hz models are supported"
        )
    model = model_class(read_config(args.model_name_or_path), Wav2Vec2Model).from_pretrained(
        args.model_name_or_path, dtype=DTYPES[args.dtype]
    )
    if layers is not None:  # layers above the highest one asked for are never run
        del model.encoder.layers[max(1, max(layers)) :]
    model.to(device).eval()
    return model, feature_extractor


# ---------------------------------------------------------------------------------------------
# 4. Loop: windows -> batches -> model -> output files
# ---------------------------------------------------------------------------------------------


def region_seconds(job: Job) -> float:
    """For the progress bar: the region's length, from the header for whole files (0 if unreadable)."""
    if job.end is not None:
        return job.end - job.start
    try:
        return sf.info(job.source).duration
    except Exception:
        return 0.0


def extract(args, state, my_files, config, model, feature_extractor, layers, device) -> tuple[OutputFiles, dict]:
    """Run every window of this process's files; the output files are complete on return. Returns
    the outputs' index rows and failures, and the audio seconds and wall/CPU seconds of the loop."""
    geometry = window_geometry(config, args.chunk_seconds, args.context_seconds)
    frame_rate, pad_with_mask = geometry.frame_rate, geometry.pad_with_mask
    output_dir = Path(args.output_dir)
    reader = WindowReader(
        my_files,
        output_dir,
        geometry,
        feature_extractor.do_normalize,
        args.skip_existing,
    )
    loader = torch.utils.data.DataLoader(
        reader, batch_size=None, num_workers=args.num_workers, collate_fn=as_is, worker_init_fn=ignore_sigterm
    )
    layers_column = "last" if layers is None else ",".join(map(str, layers))
    layer_axis = args.layers == "all" or (layers is not None and len(layers) > 1)
    outputs = OutputFiles(
        output_dir, args.format, args.pooling, layers_column, layer_axis, config.hidden_size, frame_rate
    )
    total_hours = sum(region_seconds(job) for _, file_jobs in my_files for _, job in file_jobs) / 3600
    progress = progress_bar(
        total_hours,
        "extract_features",
        unit="audio h",
        disable=not state.is_local_main_process,
        interval=args.progress_interval,
        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio hours [{elapsed}<{remaining}{postfix}]",
    )
    audio_seconds, started, cpu_started = 0.0, time.perf_counter(), time.process_time()
    stop = StopSignal()  # cluster preemption: the files begun are finished, then the loop ends
    try:
        for kind, payload in batches(loader, args.batch_size, geometry.full_window, pad_with_mask):
            if kind == "batch":
                for item, features in zip(
                    payload, run_model(model, payload, layers, device, DTYPES[args.dtype], pad_with_mask)
                ):
                    outputs.add(item, features)
                batch_seconds = sum(item["window"].count for item in payload) / frame_rate
                audio_seconds += batch_seconds
                progress.set_postfix_str(
                    f"{audio_seconds / 3600 / (time.perf_counter() - started):.3g} audio h/s", refresh=False
                )
                progress.update(batch_seconds / 3600)
            elif "reason" in payload:
                outputs.fail(payload)
            else:
                outputs.done(payload)  # complete from an earlier run
                progress.update(payload["num_frames"] / frame_rate / 3600)
            if outputs.stop_when_open_files_complete(stop.received):
                logger.warning("SIGTERM: stopped with %d outputs complete; --skip_existing goes on", len(outputs.rows))
                break
    finally:
        stop.release()
        outputs.abort_all()  # whatever is still open was cut short
        progress.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return outputs, dict(audio_seconds=audio_seconds, seconds=seconds, cpu_seconds=cpu_seconds, stopped=stop.received)


# ---------------------------------------------------------------------------------------------
# 5. Save: the flags (before the loop); each process's index and failures, merged by the main process
# ---------------------------------------------------------------------------------------------


def extraction_settings(args: argparse.Namespace) -> dict:
    """What the saved features depend on: the flags, and for a local model folder its files' fingerprint."""
    settings = {key: getattr(args, key) for key in CONFIG_KEYS}
    return settings | {"model_fingerprint": model_fingerprint(args.model_name_or_path)}


def save_config(args: argparse.Namespace, settings: dict, state) -> None:
    """Write OUT/extract_config.json (claim_features_dir has refused a folder holding other settings' outputs)."""
    if state.is_main_process:
        (Path(args.output_dir) / "extract_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def save_tables(outputs: OutputFiles, state, output_dir: Path) -> None:
    """Write this process's part of index.tsv and failures.tsv; the main process merges the parts."""
    write_tsv(output_dir / f"index.rank{state.process_index}.tsv", outputs.rows, INDEX_COLUMNS)
    write_tsv(output_dir / f"failures.rank{state.process_index}.tsv", outputs.failures, FAILURE_COLUMNS)
    state.wait_for_everyone()
    if state.is_main_process:
        num_outputs = merge_tables(output_dir, "index", INDEX_COLUMNS, state.num_processes)
        num_failures = merge_tables(output_dir, "failures", FAILURE_COLUMNS, state.num_processes)
        logger.info(
            "%d outputs listed in %s, %d failures in %s",
            num_outputs,
            output_dir / "index.tsv",
            num_failures,
            output_dir / "failures.tsv",
        )
    state.wait_for_everyone()


def main(argv=None) -> dict:
    args = parse_args(argv)
    state = start_processes(args)
    device = torch.device(args.device) if args.device else state.device
    my_files = share_of_files(make_job_list(args), state)
    config = load_config(args)
    layers = pick_layers(args, config)
    settings = extraction_settings(args)
    with claim_features_dir(args, settings, state):  # one extraction at a time, never over other flags' outputs
        model, feature_extractor = load_model(args, layers, device)
        save_config(args, settings, state)
        outputs, timing = extract(args, state, my_files, config, model, feature_extractor, layers, device)
        save_tables(outputs, state, Path(args.output_dir))
    state.destroy_process_group()  # now, not in the interpreter's teardown, where gloo's threads can hang it
    audio_seconds, seconds = timing["audio_seconds"], timing["seconds"]
    return {
        "outputs": len(outputs.rows),
        "failures": len(outputs.failures),
        "audio_seconds": round(audio_seconds, 2),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(timing["cpu_seconds"], 3),
        "realtime_factor": round(audio_seconds / seconds, 1) if seconds else None,
        "stopped_by_sigterm": timing["stopped"],
    }


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    print(json.dumps(main()))
