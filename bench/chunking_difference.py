"""How far chunked feature extraction is from a whole-file pass, per model family and --chunk_seconds.

    python bench/chunking_difference.py                                  # tiny group-norm and layer-norm models
    python bench/chunking_difference.py --models base,large --device cuda --minutes 10   # full-size, random init
    python bench/chunking_difference.py --model_dirs demo_data/pretrained --models ""    # trained models

The recording is synthetic and changes character as a home recording does: room noise, speech-like
bursts at changing levels, a stretch of tonal sound (television, toys), silence. Each model extracts
it with extract_features.main, once in one window (the whole-file pass: Wav2Vec2FeatureExtractor and
the model over the whole file) and once per --chunk_seconds with --context_seconds; the table gives
the |difference| of the last-layer features relative to the whole-file features' RMS (1 = the
typical size of a feature value): mean, 99th percentile and largest. Random-init models run twice:
with the usual per-window input normalisation (do_normalize) and without it ("raw input"), which
leaves the group norm of the first conv layer as the only per-window statistic. `tiny-base`/`base` are
group-norm configs (wav2vec2-base), `tiny-robust`/`large` layer-norm ones (large-lv60, large-robust,
XLS-R); they are random-init models unless --model_dirs names trained ones.
"""

from __future__ import annotations

import argparse
import logging
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
    "tiny-base": lambda: Wav2Vec2Config.from_pretrained(REPO / "configs" / "tiny-wav2vec2-base"),
    "tiny-robust": lambda: Wav2Vec2Config.from_pretrained(REPO / "configs" / "tiny-wav2vec2-robust"),
    "base": Wav2Vec2Config,  # the wav2vec2-base architecture
    "large": lambda: Wav2Vec2Config(  # the large-lv60 / large-robust architecture
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
    ),
}


def save_random_model(name: str, folder: Path, normalize: bool) -> str:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        do_normalize=normalize, return_attention_mask=config.feat_extract_norm == "layer"
    ).save_pretrained(folder)
    return str(folder)


def home_recording(seconds: float, seed: int = 0) -> np.ndarray:
    """Room noise throughout; in turn speech-like bursts (syllable-rate envelope on filtered noise)
    at a changing level, near silence, tonal sweeps, and louder speech-like bursts."""
    rng = np.random.default_rng(seed)
    n, sr = int(seconds * 16000), 16000
    audio = 0.003 * np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    t = np.arange(n) / sr
    part = n // 4
    syllables = np.repeat(rng.random(n // 3200 + 1) > 0.5, 3200)[:n] * np.abs(np.sin(2 * np.pi * 4 * t))
    speech = np.convolve(rng.standard_normal(n), np.hanning(24), mode="same") * syllables
    level = 0.02 + 0.1 * (1 + np.sin(2 * np.pi * t / 40))  # drifts over tens of seconds
    audio[:part] += (level * speech)[:part]
    phase = t % 3
    audio[2 * part : 3 * part] += (0.2 * np.sin(2 * np.pi * (150 * phase + 200 * phase**2)))[2 * part : 3 * part]
    audio[3 * part :] += (0.4 * speech)[3 * part :]
    return audio.astype(np.float32)


def extract(model: str, audio_path: Path, output_dir: Path, chunk_seconds: float, context: float, device: str):
    extract_features.main(
        [
            "--model_name_or_path",
            model,
            "--output_dir",
            str(output_dir),
            "--chunk_seconds",
            str(chunk_seconds),
            "--context_seconds",
            str(context),
            "--device",
            device,
            "--num_workers",
            "0",
            str(audio_path),
        ]
    )
    return np.load(output_dir / f"{audio_path.stem}.npy")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-base,tiny-robust", help=f"random-init configs: {', '.join(CONFIGS)}")
    parser.add_argument("--model_dirs", default="", help="comma list of trained model folders")
    parser.add_argument("--chunk_seconds", default="8,15,30,60")
    parser.add_argument("--context_seconds", type=float, default=5.0)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    print(
        f"{args.minutes:g} min synthetic home recording, --context_seconds {args.context_seconds:g}; "
        "|chunked - whole-file| of the last layer / RMS of the whole-file features"
    )
    print(f"{'model':<34} {'norm':<6} {'chunk s':>7} {'RMS':>8} {'mean':>8} {'p99':>8} {'max':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio_path = tmp / "home.wav"
        sf.write(audio_path, home_recording(args.minutes * 60), 16000, subtype="FLOAT")
        models = [
            (
                f"{name}{'' if normalize else ' (raw input)'}",
                save_random_model(name, tmp / f"{name}-{normalize}", normalize),
            )
            for name in filter(None, args.models.split(","))
            for normalize in (True, False)
        ]
        models += [(folder, folder) for folder in filter(None, args.model_dirs.split(","))]
        for name, model in models:
            norm = Wav2Vec2Config.from_pretrained(model).feat_extract_norm
            out = tmp / "out" / Path(model).name
            whole = extract(model, audio_path, out / "whole", 1e6, 0.0, args.device)
            rms = float(np.sqrt(np.mean(whole.astype(np.float64) ** 2)))
            for chunk in [float(c) for c in args.chunk_seconds.split(",")]:
                chunked = extract(model, audio_path, out / f"{chunk:g}", chunk, args.context_seconds, args.device)
                diff = np.abs(chunked - whole) / rms
                print(
                    f"{name:<34} {norm:<6} {chunk:>7g} {rms:>8.3f} {diff.mean():>8.4f} "
                    f"{np.percentile(diff, 99):>8.4f} {diff.max():>8.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
