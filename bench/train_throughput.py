"""Pretraining throughput: the full pretrain.py loop against the bare model step, in one run.

    python bench/train_throughput.py [--config tiny|base|robust|PATH] [--batch_size 8] [--crop_seconds 8]
        [--precision fp32|fp16|bf16] [--gradient_checkpointing] [--steps 30] [--manifest M]
    python bench/train_throughput.py --config base --hourglass "[2,(8,4),2]" [--rounds 2]
    python bench/train_throughput.py --config base --against_transformers [--rounds 2]

The full loop is pretrain.main() itself (crop stream with workers, masks, loss normalisation,
logging); its speed is the steady-state `audio_seconds_per_second` it logs. The bare step is
forward + backward + AdamW on tensors already on the device with the same shapes. The overhead
ratio is bare / loop audio-seconds per second (1.00 = no overhead). On a GPU the run also prints
MFU from the training cost of wav2vec2-base (44 GFLOP per audio second; REFERENCE.md) scaled to
the model's size, and the peak memory of both.

With --hourglass the bare step of the standard and of the Hourglass encoder (utils/hourglass.py;
the same config otherwise, the same batch) are compared, LayerDrop off so that every step runs
every layer. Speed: both models in one process, a step of one then a step of the other, --steps
each after --warmup_steps, so that both see the same machine however busy other jobs keep it.
Memory: each in fresh processes (so that neither inherits the other's), alternately --rounds
times, the least peak of each. It prints `hourglass speedup: X` (audio-s/s, hourglass / standard)
and `hourglass memory ratio: Y` (peak memory, hourglass / standard). Peak memory is what
training the model takes at its peak above what the process held before the model was built
(weights, gradients, optimizer state, activations; on a GPU the allocator's peak, on a CPU the
resident set's high-water mark); `step memory` is the part above what was held just before the
timed steps (activations and temporaries: what the hourglass shrinks).

With --against_transformers the same comparison is of pretrain.py's step and the step as
transformers' model computes it (its own contrastive loss and quantizer, every activation of the
CNN kept; see utils/step_memory.py): `memory savers speedup` and `memory savers memory ratio`
(ours / transformers').
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import Wav2Vec2ForPreTraining  # noqa: E402

from utils.audio import conv_frames, conv_geometry  # noqa: E402
from utils.hourglass import model_class, parse_hourglass, read_config, with_encoder  # noqa: E402
from utils.manifests import prepare_manifests  # noqa: E402
from utils.objective import MaskAndNegatives, pretraining_forward  # noqa: E402
from utils.step_memory import reduce_step_memory  # noqa: E402

CONFIGS = {"tiny": REPO / "configs" / "tiny-wav2vec2-base", "robust": REPO / "configs" / "tiny-wav2vec2-robust"}
BASE_TRAIN_FLOPS_PER_AUDIO_SECOND = 44e9  # wav2vec2-base, 8 s crops, no activation checkpointing
BASE_PARAMETERS = 95.0e6


def model_folder(name: str, workdir: Path) -> Path:
    if name in CONFIGS:
        return CONFIGS[name]
    if name == "base":  # wav2vec2-base's architecture (transformers' defaults), random init
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

        folder = workdir / "wav2vec2-base-config"
        Wav2Vec2Config(feat_extract_norm="group", do_stable_layer_norm=False).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(folder)
        return folder
    return Path(name)


def synthetic_manifest(workdir: Path) -> Path:
    """Four minutes of 16 kHz noise in four files: reading costs little, no crop is silent."""
    rng = np.random.default_rng(0)
    (workdir / "audio").mkdir(parents=True)
    for index in range(4):
        noise = (0.1 * rng.standard_normal(60 * 16000)).astype(np.float32)
        sf.write(str(workdir / "audio" / f"B{index}_noise.wav"), noise, 16000, subtype="PCM_16")
    prepare_manifests(workdir / "audio", workdir / "manifests", dev_fraction=0.0)
    return workdir / "manifests" / "train.tsv"


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process peak so far (never reset)


def memory_gb(key: str = "VmRSS") -> float:
    """GPU: allocated now (VmRSS) or the peak since the last reset (VmHWM); CPU: the resident set."""
    if torch.cuda.is_available():
        return (torch.cuda.memory_allocated() if key == "VmRSS" else torch.cuda.max_memory_allocated()) / 2**30
    status = Path("/proc/self/status").read_text()  # Linux
    (line,) = [line for line in status.splitlines() if line.startswith(key + ":")]
    return int(line.split()[1]) / 2**20


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current VmRSS


def training_step(config_dir: Path, args, hourglass: str | None = None, transformers_step: bool = False):
    """forward + backward + AdamW step of a fresh model on ready tensors (a closure), and its device;
    the Hourglass encoder `hourglass` if given; transformers' own loss and quantizer if transformers_step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = read_config(config_dir)
    if args.hourglass:  # the standard encoder it is compared with has as many layers
        config.num_hidden_layers = sum(parse_hourglass(args.hourglass)) - parse_hourglass(args.hourglass)[2]
    if args.hourglass or args.against_transformers:
        # Every layer in every step: LayerDrop would make the two steps differ by chance (a run with
        # LayerDrop p spends 1 - p of each layer's time on average, in both), and a run must fit the
        # step that drops none.
        config.layerdrop = 0.0
    if hourglass:
        config.hourglass = hourglass
        config = with_encoder(config)
    model = model_class(config, Wav2Vec2ForPreTraining)._from_config(config, attn_implementation="sdpa")
    model = model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not transformers_step:
        reduce_step_memory(model)  # as pretrain.py does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    samples = int(args.crop_seconds * 16000)
    frames = conv_frames(samples, *conv_geometry(config))
    masks = MaskAndNegatives(frames, 0.65, 10, 100)(
        {"crop_keys": np.array([[0, 0, i] for i in range(args.batch_size)])}
    )
    inputs = {
        "input_values": torch.randn(args.batch_size, samples, device=device),
        "mask_time_indices": torch.from_numpy(masks["mask_time_indices"]).to(device),
        "sampled_negative_indices": torch.from_numpy(masks["sampled_negative_indices"]).to(device),
    }
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    scaler = torch.amp.GradScaler(device, enabled=args.precision == "fp16")

    def step():
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(**inputs) if transformers_step else pretraining_forward(model, inputs, model.config)
            loss = out.loss / inputs["mask_time_indices"].sum()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, device


def bare_step_speed(config_dir: Path, args, variant: tuple = (None, False)) -> dict:
    """Audio seconds per second of the training step, and the peak and step memory (see the module
    docstring); `variant`: training_step's hourglass and transformers_step."""
    before_model = memory_gb()
    step, _ = training_step(config_dir, args, *variant)
    for _ in range(args.warmup_steps):
        step()
    before_steps = memory_gb()
    peak = max(memory_gb("VmHWM"), before_steps)  # the warm-up steps' peak (the step memory is reset below)
    reset_peak_memory()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    step_peak = memory_gb("VmHWM")
    return {
        "audio_seconds_per_second": args.steps * args.batch_size * args.crop_seconds / elapsed,
        "peak_memory_gb": max(peak, step_peak) - before_model,
        "step_memory_gb": step_peak - before_steps,
    }


def compared(args) -> dict:
    """The two steps a comparison runs: name -> training_step's (hourglass, transformers_step)."""
    if args.hourglass:
        return {"standard": (None, False), "hourglass": (args.hourglass, False)}
    return {"transformers": (None, True), "ours": (None, False)}


def interleaved_speeds(config_dir: Path, args) -> dict:
    """Audio seconds per second of the two compared steps, taken in turns in one process: both see
    the same machine, however busy its other jobs keep it."""
    steps = {name: training_step(config_dir, args, *variant)[0] for name, variant in compared(args).items()}
    seconds = dict.fromkeys(steps, 0.0)
    for index in range(args.warmup_steps + args.steps):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            if index >= args.warmup_steps:
                seconds[variant] += time.perf_counter() - start
    return {variant: args.steps * args.batch_size * args.crop_seconds / s for variant, s in seconds.items()}


def loop_speed(config_dir: Path, manifest: Path, workdir: Path, args) -> tuple[float, float]:
    import pretrain

    os.environ["ACCELERATE_MIXED_PRECISION"] = {"fp32": "no"}.get(args.precision, args.precision)
    output_dir = workdir / "run"
    window = args.steps
    flags = [
        "--config_name",
        str(config_dir),
        "--train_manifest",
        str(manifest),
        "--output_dir",
        str(output_dir),
        "--crop_seconds",
        str(args.crop_seconds),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--max_train_steps",
        str(2 * window),
        "--logging_steps",
        str(window),
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--num_workers",
        str(args.num_workers),
        "--report_to",
        "none",
        "--learning_rate",
        "1e-5",
        "--epoch_multiplier",
        "1000",
    ]
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    pretrain.main(flags)
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    # The second window: the first holds worker start-up and the first steps' allocations.
    (timed,) = [r for r in rows if r["step"] == 2 * window and "loss" in r]
    return timed["audio_seconds_per_second"], peak_memory_gb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default="tiny",
        help="tiny, robust, base (wav2vec2-base architecture, random init) or a config folder",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_seconds", type=float, default=8.0)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--steps",
        type=int,
        default=30,
        help="timed steps (the loop runs 2 windows of this many, the last is reported)",
    )
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--manifest", help="train manifest to read crops from (default: synthetic 16 kHz noise)")
    parser.add_argument(
        "--peak_tflops", type=float, default=989.0, help="GPU peak for MFU (H100 SXM dense bf16/fp16: 989)"
    )
    parser.add_argument("--skip_loop", action="store_true", help="bare step only (e.g. for memory figures)")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed bare steps first")
    parser.add_argument(
        "--hourglass", help="also the Hourglass encoder with this shape, e.g. '[2,(8,4),2]': speedup and memory ratio"
    )
    parser.add_argument(
        "--against_transformers",
        action="store_true",
        help="compare pretrain.py's step with transformers' own (loss, quantizer, CNN activations): speedup, memory",
    )
    parser.add_argument("--rounds", type=int, default=1, help="with a comparison: runs of each step")
    parser.add_argument(
        "--measure", choices=["standard", "hourglass", "transformers", "ours"], help=argparse.SUPPRESS
    )  # one child run of a comparison
    args = parser.parse_args()

    if (args.hourglass or args.against_transformers) and not args.measure:
        compare_steps(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config_dir = model_folder(args.config, workdir)
        device = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        )
        print(
            f"config {args.config}, batch {args.batch_size} x {args.crop_seconds:g} s, {args.precision}, "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {device}"
        )
        bare_result = bare_step_speed(config_dir, args, compared(args).get(args.measure, (None, False)))
        if args.measure:
            print(json.dumps(bare_result))
            return
        bare = bare_result["audio_seconds_per_second"]
        print(
            f"bare step:  {bare:10.1f} audio-s/s   peak memory {bare_result['peak_memory_gb']:.2f} GB "
            f"(step {bare_result['step_memory_gb']:.2f} GB)"
        )
        if not args.skip_loop:
            manifest = Path(args.manifest) if args.manifest else synthetic_manifest(workdir)
            loop, loop_memory = loop_speed(config_dir, manifest, workdir, args)
            print(f"full loop:  {loop:10.1f} audio-s/s   peak memory {loop_memory:.2f} GB")
            print(f"overhead ratio (bare / loop): {bare / loop:.3f}")
        if torch.cuda.is_available():
            from transformers import Wav2Vec2Config

            parameters = sum(np.prod(p) for p in _parameter_shapes(Wav2Vec2Config.from_pretrained(config_dir)))
            flops = BASE_TRAIN_FLOPS_PER_AUDIO_SECOND * parameters / BASE_PARAMETERS
            best = loop if not args.skip_loop else bare
            print(
                f"MFU: {best * flops / (args.peak_tflops * 1e12) * 100:.1f} % ({flops / 1e9:.1f} GFLOP per audio second)"
            )
        print(f"audio-s/s: {loop if not args.skip_loop else bare:.1f}")


# glibc keeps freed blocks for reuse, so a CPU process's resident set lags what it holds: with every
# block above 64 KB mapped and unmapped on its own, the peak resident set is the peak of the tensors.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def compare_steps(args) -> dict:
    """Memory: each step in fresh processes (--rounds each, alternately; the least peak counts).
    Speed: both in this process, a step of one then a step of the other."""
    child = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--steps", "1"]
    runs = {name: [] for name in compared(args)}
    before, after = runs
    label = "hourglass" if args.hourglass else "memory savers"
    for round_index in range(args.rounds):
        for variant in runs:
            result = subprocess.run([*child, "--measure", variant], capture_output=True, text=True, env=MALLOC_ENV)
            if result.returncode != 0:
                raise SystemExit(f"{variant} run failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
            runs[variant].append(json.loads(result.stdout.strip().splitlines()[-1]))
            run = runs[variant][-1]
            print(
                f"round {round_index + 1} {variant:12s} peak memory {run['peak_memory_gb']:.3f} GB "
                f"(step {run['step_memory_gb']:.3f} GB)",
                flush=True,
            )
    peak = {variant: min(r["peak_memory_gb"] for r in rs) for variant, rs in runs.items()}
    step = {variant: min(r["step_memory_gb"] for r in rs) for variant, rs in runs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        speed = interleaved_speeds(model_folder(args.config, Path(tmp)), args)
    summary = {
        "speedup": speed[after] / speed[before],
        "memory_ratio": peak[after] / peak[before],
        "step_memory_ratio": step[after] / step[before],
    }
    print(
        f"config {args.config}, batch {args.batch_size} x {args.crop_seconds:g} s, {args.precision}, "
        f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        + (f"hourglass {args.hourglass}" if args.hourglass else "pretrain.py's step against transformers'")
    )
    for variant in runs:
        print(
            f"{variant}: {speed[variant]:.2f} audio-s/s, peak memory {peak[variant]:.3f} GB, "
            f"step memory {step[variant]:.3f} GB"
        )
    print(f"{label} speedup: {summary['speedup']:.3f}")
    print(f"{label} memory ratio: {summary['memory_ratio']:.3f}")
    print(f"{label} step memory ratio: {summary['step_memory_ratio']:.3f}")
    return summary


def _parameter_shapes(config):
    from transformers import Wav2Vec2Model

    with torch.device("meta"):
        return [p.shape for p in Wav2Vec2Model(config).parameters()]


if __name__ == "__main__":
    main()
