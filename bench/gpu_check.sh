#!/usr/bin/env bash
# The GPU figures, in one go (about 5 minutes on an H100/H200, at most 8):
#
#   bash bench/gpu_check.sh [--smoke] [--output_dir bench_results]
#
# On a machine with one CUDA GPU it measures, with random-init models of wav2vec2-base's
# architecture (95 M parameters) and synthetic audio:
#   - pretraining audio-seconds/s and MFU in bf16 and in fp16 (bare step, batch 8 x 8 s);
#   - the full pretrain.py loop's overhead ratio against the bare step (bf16);
#   - peak memory at batch 2 x 8 s in fp16 with gradient checkpointing, standard and Hourglass
#     [2,(8,4),2] encoder (utils/hourglass.py), with the hourglass speedup;
#   - CTC fine-tuning audio-seconds/s (bf16, batches grouped by length);
#   - feature-extraction real-time factor (extract_features.py, fp16, batch 16).
# It writes OUTPUT_DIR/gpu.json (and each bench's log next to it) and prints the figures.
# --smoke runs every step with the tiny config for a few steps (checks the script, not the GPU);
# without a GPU the script falls back to that on the CPU. It installs nothing but requirements.txt
# (and only if an import is missing); torch must be there already, as the CUDA build the machine needs.
# PYTHON picks the interpreter (default .venv/bin/python, else python3); PEAK_TFLOPS overrides the
# GPU's dense bf16/fp16 peak used for MFU (known: H100/H200 SXM 989, H100 PCIe 756, A100 312, ...).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

smoke=0
out=bench_results
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --output_dir) out="${2:?--output_dir needs a folder}"; shift ;;
        -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "error: $py cannot import torch: install the torch build for this machine first (e.g. make setup TORCH=torch==2.13.0)" >&2
    exit 2
fi
if ! "$py" -c "import transformers, accelerate, datasets, soundfile, soxr, jiwer, yaml, tqdm, matplotlib" 2>/dev/null; then
    "$py" -m pip install --quiet -r requirements.txt || { echo "error: pip install -r requirements.txt failed" >&2; exit 2; }
fi
gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
if [ -z "$gpu" ] && [ "$smoke" = 0 ]; then
    echo "no CUDA GPU: the CPU fallback in smoke mode (tiny model, a few steps: these are not GPU figures)"
    smoke=1
fi
peak="${PEAK_TFLOPS:-}"
if [ -z "$peak" ]; then
    case "$gpu" in
        *H100*PCIe*) peak=756 ;;
        *H100* | *H200* | *GH200*) peak=989 ;;
        *A100*) peak=312 ;;
        *L40S*) peak=362 ;;
        *A10G* | *A10*) peak=125 ;;
        *V100*) peak=125 ;;
        *L4*) peak=121 ;;
        *) peak=989 ;;
    esac
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$out"
start=$(date +%s)
budget=480 # seconds for everything: each step gets its share, and never more than what is left
stretch=1  # smoke mode: 3x the time, for a CPU shared with other jobs
[ "$smoke" = 1 ] && budget=900 stretch=3
failed=()

# run NAME SECONDS COMMAND...: the command's output in OUTPUT_DIR/gpu_NAME.log and on the screen
run() {
    local name=$1 seconds=$(($2 * stretch)) began
    shift 2
    began=$(date +%s)
    local left=$((budget - ($(date +%s) - start)))
    [ "$seconds" -gt "$left" ] && seconds=$left
    if [ "$seconds" -le 0 ]; then
        echo "== $name: skipped, the ${budget} s budget is spent" | tee "$out/gpu_$name.log"
        failed+=("$name")
        return
    fi
    echo "== $name (at most $seconds s): $*"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/gpu_$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: $(($(date +%s) - began)) s"
    if [ "$rc" != 0 ]; then
        echo "== $name failed (exit status $rc$([ "$rc" = 124 ] && echo ', out of time'))" | tee -a "$out/gpu_$name.log"
        failed+=("$name")
    fi
}

if [ "$smoke" = 1 ]; then
    size=(--config tiny --batch_size 2 --crop_seconds 2 --steps 1 --warmup_steps 1 --num_workers 0)
    memory=(--config tiny --batch_size 2 --crop_seconds 2 --steps 1 --warmup_steps 1)
    hourglass="[1,(1,4),1]"
    ctc=(--config_name configs/tiny-wav2vec2-base --batch_size 2 --steps 1 --warmup_steps 1 --max_duration_seconds 3)
    extract=(--configs tiny --minutes 0.2 --batch_sizes 2 --num_workers 0)
    device=cpu
    [ -n "$gpu" ] && device=cuda
else
    size=(--config base --batch_size 8 --crop_seconds 8 --steps 20 --warmup_steps 3 --num_workers 6)
    memory=(--config base --batch_size 2 --crop_seconds 8 --steps 10 --warmup_steps 3)
    hourglass="[2,(8,4),2]"
    ctc=(--config_name base --batch_size 8 --steps 15 --warmup_steps 3)
    extract=(--configs base --minutes 10 --batch_sizes 16 --num_workers 4)
    device=cuda
fi

run pretrain_bf16 150 "$py" bench/train_throughput.py "${size[@]}" --precision bf16 --peak_tflops "$peak"
run pretrain_fp16 60 "$py" bench/train_throughput.py "${size[@]}" --precision fp16 --skip_loop --peak_tflops "$peak"
run memory_fp16_checkpointing 120 "$py" bench/train_throughput.py "${memory[@]}" --precision fp16 \
    --gradient_checkpointing --hourglass "$hourglass"
run ctc_bf16 60 "$py" bench/ctc_throughput.py "${ctc[@]}" --bf16 --device "$device"
run extract_fp16 60 "$py" bench/extract_throughput.py "${extract[@]}" --dtypes fp16 --device "$device"

"$py" - "$out" "$gpu" "$smoke" "$peak" "$hourglass" "$(($(date +%s) - start))" "${failed[@]}" <<'EOF'
"""Read the figures out of the benches' logs into gpu.json, and print them."""
import json
import re
import sys
from pathlib import Path

import torch

out, gpu, smoke, peak, hourglass, seconds, *failed = sys.argv[1:]


def log(name):
    path = Path(out) / f"gpu_{name}.log"
    return path.read_text() if path.is_file() else ""


def number(name, pattern, group=1):
    match = re.search(pattern, log(name), re.MULTILINE)
    return float(match.group(group)) if match else None


def mfu(name, speed):
    gflop = number(name, r"\(([\d.]+) GFLOP per audio second\)")
    return None if gflop is None or speed is None else round(speed * gflop * 1e9 / (float(peak) * 1e12), 4)


bare = r"^bare step:\s+([\d.]+) audio-s/s\s+peak memory ([\d.]+) GB"
result = {
    "device": gpu or "CPU (no CUDA GPU)",
    "smoke": smoke == "1",
    "torch": torch.__version__,
    "peak_tflops": float(peak),
    "model": "tiny config" if smoke == "1" else "wav2vec2-base architecture, random init",
    "pretrain": {},
    "failed": failed,
    "seconds": int(seconds),
}
for precision in ("bf16", "fp16"):
    speed = number(f"pretrain_{precision}", bare)
    result["pretrain"][precision] = {"audio_seconds_per_second": speed, "mfu": mfu(f"pretrain_{precision}", speed)}
loop = number("pretrain_bf16", r"^full loop:\s+([\d.]+) audio-s/s")
result["pretrain_loop_bf16"] = {
    "audio_seconds_per_second": loop,
    "mfu": mfu("pretrain_bf16", loop),
    "overhead_ratio": number("pretrain_bf16", r"^overhead ratio \(bare / loop\): ([\d.]+)"),
}
memory = "memory_fp16_checkpointing"
result["memory_fp16_checkpointing_batch_2"] = {
    "standard_peak_gb": number(memory, r"^standard: .*peak memory ([\d.]+) GB"),
    "hourglass": hourglass,
    "hourglass_peak_gb": number(memory, r"^hourglass: .*peak memory ([\d.]+) GB"),
    "hourglass_memory_ratio": number(memory, r"^hourglass memory ratio: ([\d.]+)"),
    "hourglass_speedup": number(memory, r"^hourglass speedup: ([\d.]+)"),
}
result["ctc_bf16_audio_seconds_per_second"] = number("ctc_bf16", r"^grouped by length .*?([\d.]+) audio s/s")
extracted = [json.loads(line) for line in log("extract_fp16").splitlines() if line.startswith("{")]
result["extract_fp16_realtime_factor"] = extracted[-1]["realtime_factor"] if extracted else None
(Path(out) / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")

print(f"\n{result['device']}{' (smoke mode: not GPU figures)' if result['smoke'] else ''}, torch {result['torch']}")
for precision, figures in result["pretrain"].items():
    print(f"pretraining {precision} bare step: {figures['audio_seconds_per_second']} audio-s/s, MFU {figures['mfu']}")
print(f"pretrain.py loop bf16: {loop} audio-s/s, overhead ratio {result['pretrain_loop_bf16']['overhead_ratio']}")
figures = result["memory_fp16_checkpointing_batch_2"]
print(
    f"peak memory fp16 + checkpointing, batch 2: standard {figures['standard_peak_gb']} GB, hourglass {hourglass} "
    f"{figures['hourglass_peak_gb']} GB (ratio {figures['hourglass_memory_ratio']}, speedup {figures['hourglass_speedup']})"
)
print(f"CTC fine-tuning bf16: {result['ctc_bf16_audio_seconds_per_second']} audio-s/s")
print(f"feature extraction fp16: real-time factor {result['extract_fp16_realtime_factor']}")
print(f"written: {Path(out) / 'gpu.json'} ({seconds} s)")


def missing_figures(figures, prefix=""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from missing_figures(value, f"{prefix}{key}.")
        elif value is None and not (key == "mfu" and not gpu):  # MFU needs a GPU's peak
            yield prefix + key


missing = list(missing_figures(result))
if failed or missing:
    print(f"INCOMPLETE: failed steps {failed}, missing figures {missing}", file=sys.stderr)
    sys.exit(1)
EOF
