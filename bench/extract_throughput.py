"""Feature-extraction throughput of extract_features.py: audio seconds per second (real-time factor).

    python bench/extract_throughput.py                       # CPU: tiny and wav2vec2-base sizes, fp32
    python bench/extract_throughput.py --device cuda --configs base --dtypes fp32,fp16,bf16 \\
        --batch_sizes 1,8,32 --minutes 60 --num_workers 4    # a GPU

Each config is a random-init model saved to a temporary folder (no download): `tiny` is
configs/tiny-wav2vec2-base, `base` is the wav2vec2-base architecture (95 M parameters, group norm,
Wav2Vec2Config's defaults). The corpus is synthetic: --minutes of 16 kHz FLAC in files of 2 minutes
(so every batch size is filled with full windows from several files). Each (config, dtype, batch
size) runs extract_features.main with the default --chunk_seconds 30 --context_seconds 5 and
--layers last, once on one file to warm up, then on the corpus. --batch_size 1 is one window at a
time. The rate counts the kept (output) audio, over the extraction loop only (model loading left
out); "per CPU s" divides by the process's CPU time instead of the wall clock, which on a shared
machine is the steadier figure (with --num_workers 0 reading is in that process too).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import extract_features  # noqa: E402

CONFIGS = {
    "tiny": lambda: Wav2Vec2Config.from_pretrained(REPO / "configs" / "tiny-wav2vec2-base"),
    "base": Wav2Vec2Config,
}


def save_random_model(name: str, folder: Path) -> str:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        do_normalize=True, return_attention_mask=config.feat_extract_norm == "layer"
    ).save_pretrained(folder)
    return str(folder)


def write_corpus(folder: Path, minutes: float, file_minutes: float = 2.0, seed: int = 0) -> None:
    """Speech-like noise (bursts of filtered noise with pauses) in FLAC files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    remaining, index = minutes * 60, 0
    while remaining > 0:
        seconds = min(file_minutes * 60, remaining)
        n = int(seconds * 16000)
        envelope = np.repeat(rng.random(n // 3200 + 1) > 0.4, 3200)[:n]
        noise = np.convolve(rng.standard_normal(n), np.hanning(16), mode="same")
        sf.write(
            folder / f"rec{index:03d}.flac",
            (0.1 * noise * (0.05 + envelope)).astype(np.float32),
            16000,
            subtype="PCM_16",
        )
        remaining -= seconds
        index += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--minutes", type=float, default=8.0, help="audio per measured run (files of 2 minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)

    device_name = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    )
    print(f"device: {args.device} ({device_name}); torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_corpus(tmp / "corpus", args.minutes)
        write_corpus(tmp / "warmup", 1.0, file_minutes=1.0, seed=1)
        for name in args.configs.split(","):
            model = save_random_model(name, tmp / f"model-{name}")
            for dtype in args.dtypes.split(","):
                for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                    flags = [
                        "--model_name_or_path",
                        model,
                        "--device",
                        args.device,
                        "--dtype",
                        dtype,
                        "--batch_size",
                        str(batch_size),
                        "--num_workers",
                        str(args.num_workers),
                    ]
                    extract_features.main(flags + ["--output_dir", str(tmp / "out-warmup"), str(tmp / "warmup")])
                    run = extract_features.main(
                        flags + ["--output_dir", str(tmp / f"out-{name}-{dtype}-{batch_size}"), str(tmp / "corpus")]
                    )
                    result = {
                        "config": name,
                        "dtype": dtype,
                        "batch_size": batch_size,
                        "audio_seconds": run["audio_seconds"],
                        "seconds": run["seconds"],
                        "realtime_factor": run["realtime_factor"],
                        "per_cpu_second": round(run["audio_seconds"] / run["cpu_seconds"], 1),
                    }
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print("\n| config | dtype | batch | audio s | wall s | audio s per s | audio s per CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['dtype']} | {r['batch_size']} | {r['audio_seconds']:.0f} | {r['seconds']:.1f} | {r['realtime_factor']} | {r['per_cpu_second']} |"
        )
    return results


if __name__ == "__main__":
    main()
