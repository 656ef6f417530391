"""CTC fine-tuning throughput with and without length grouping: audio seconds per second and padding.

    python bench/ctc_throughput.py [--config_name configs/tiny-wav2vec2-base | base] [--manifest train.tsv]
        [--batch_size 8] [--steps 20] [--max_duration_seconds 20] [--device cpu] [--bf16]

Batches are planned by utils.batches.plan_batches exactly as in training, once grouped by length
and once as plain shuffled batches of the same size, padded by utils.utterances.Collator and run
through the training step of finetune_ctc.py (forward, utils.ctc.ctc_loss_sum on the real frames,
backward, AdamW step) of a randomly initialised Wav2Vec2ForCTC, CNN feature encoder frozen as by
default. `--config_name base` is the wav2vec2-base architecture (95 M parameters).

Utterance durations come from `--manifest` (a finetune_ctc.py manifest: path, text, optional
start/end; only the durations are used) or, without one, from a seeded log-normal spread like
conversational speech (median 4 s, 0.5-20 s). The audio is noise of those lengths and the
transcripts random characters at 15 per second, so the figures measure the model and the padding,
not the disk.

Printed per mode: the padding fraction over a whole epoch (padded samples / all samples in the
batches), and over the timed steps the real (unpadded) audio seconds trained per second of wall
clock, and ms per step. Data preparation is not timed. The last line is the speedup of grouping.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.audio import TARGET_SAMPLE_RATE  # noqa: E402
from utils.batches import plan_batches  # noqa: E402
from utils.ctc import ctc_loss_sum, samples_for_frames  # noqa: E402
from utils.utterances import Collator, measure_durations, read_utterance_manifest  # noqa: E402


def durations_from(args) -> np.ndarray:
    if args.manifest:
        rows, bad = measure_durations(read_utterance_manifest(args.manifest))
        if bad:
            print(f"{len(bad)} unreadable file(s) in {args.manifest} left out")
        return np.array([r["duration"] for r in rows])
    rng = np.random.default_rng(args.seed)
    return np.clip(rng.lognormal(np.log(4.0), 0.7, args.num_utterances), 0.5, 20.0)


def padding_fraction(batches, durations) -> float:
    real = sum(durations[b].sum() for b in batches)
    return 1.0 - real / sum(durations[b].max() * len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config_name",
        default="configs/tiny-wav2vec2-base",
        help="config folder, or 'base' for the wav2vec2-base architecture",
    )
    parser.add_argument("--manifest", help="take the utterance durations from this manifest")
    parser.add_argument(
        "--num_utterances", type=int, default=4000, help="synthetic durations drawn without --manifest"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per mode")
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--max_duration_seconds", type=float, default=20.0)
    parser.add_argument(
        "--train_feature_encoder", action="store_true", help="unfreeze the CNN (the tiny demo recipe does)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as accelerate --mixed_precision bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    durations = durations_from(args)
    torch.manual_seed(args.seed)
    vocab_size = 32
    if args.config_name == "base":
        config, use_attention_mask = Wav2Vec2Config(), False
    else:
        config = Wav2Vec2Config.from_pretrained(args.config_name)
        use_attention_mask = bool(Wav2Vec2FeatureExtractor.from_pretrained(args.config_name).return_attention_mask)
    config.update(
        {"vocab_size": vocab_size, "pad_token_id": 0, "mask_time_prob": 0.05, "mask_time_length": 10, "layerdrop": 0.0}
    )
    model = Wav2Vec2ForCTC(config).to(args.device).train()
    if not args.train_feature_encoder:
        model.freeze_feature_encoder()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collate = Collator(use_attention_mask, samples_for_frames(config, config.mask_time_length + 1))
    rng = np.random.default_rng(args.seed + 1)
    print(
        f"model: {args.config_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), device {args.device}"
        f"{', bf16' if args.bf16 else ''}, batch {args.batch_size}, attention mask: {use_attention_mask}"
    )
    print(
        f"utterances: {len(durations)}, {durations.sum() / 3600:.2f} h, median {np.median(durations):.1f} s, "
        f"max {durations.max():.1f} s ({'--manifest ' + args.manifest if args.manifest else 'synthetic'})"
    )

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = {}
    for grouped in (True, False):
        epoch = plan_batches(
            durations, args.batch_size, args.seed, 0, args.max_duration_seconds, group_by_length=grouped
        )
        # The first planned batch is the longest on purpose (out of memory at once); timing starts after it.
        timed = epoch[1 : 1 + args.warmup_steps + args.steps]
        seconds = audio = padded = 0.0
        for k, indices in enumerate(timed):
            items = [
                {
                    "index": i,
                    "input_values": rng.standard_normal(int(durations[i] * TARGET_SAMPLE_RATE)).astype(np.float32),
                    "labels": rng.integers(3, vocab_size, max(1, int(15 * durations[i]))).tolist(),
                }
                for i in indices
            ]
            batch = collate(items)
            inputs = batch["input_values"].to(args.device)
            mask = batch["attention_mask"].to(args.device) if use_attention_mask else None
            frames = model._get_feat_extract_output_lengths(batch["input_lengths"]).to(args.device)
            labels = batch["labels"].to(args.device)
            sync()
            start = time.perf_counter()
            with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(inputs, attention_mask=mask).logits
            loss = ctc_loss_sum(logits, frames, labels, blank=0, zero_infinity=True) / (labels >= 0).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if k >= args.warmup_steps:
                seconds += time.perf_counter() - start
                audio += float(batch["input_lengths"].sum()) / TARGET_SAMPLE_RATE
                padded += inputs.numel() / TARGET_SAMPLE_RATE
        name = "grouped by length" if grouped else "shuffled"
        results[name] = audio / seconds
        print(
            f"{name:18s} padding {padding_fraction(epoch, durations):6.1%} of the epoch ({1 - audio / padded:6.1%} of the timed steps), "
            f"{audio / seconds:9.1f} audio s/s, {1000 * seconds / args.steps:8.1f} ms/step"
        )
    print(f"speedup from length grouping: {results['grouped by length'] / results['shuffled']:.2f}x")


if __name__ == "__main__":
    main()
