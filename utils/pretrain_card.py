"""pretrain.py's outputs beside the model: the loss curve and the model card (README.md)."""

from __future__ import annotations

from pathlib import Path

from utils.cards import (
    base_model_of,
    card_header,
    card_model_name,
    format_number,
    hardware_description,
    public_name,
    software_versions,
)
from utils.training_health import health_section


def plot_losses(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in log if r.get("dev_loss") is not None]  # None: from NaN outputs
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev (fixed crops)")
    ax.set_xlabel("update")
    ax.set_ylabel("loss per masked frame")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _window_mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def model_card(model, base_model, data, args, log, accelerator, unreadable, objective_defaults: str) -> str:
    """README.md of a pretraining output. `data` is pretrain.py's PretrainingData (train_sources,
    train_names, dev_rows); `args` its argument groups (utils.pretrain_arguments.Arguments), with the
    objective flags resolved; `objective_defaults` says how (utils.pretrain_arguments.resolve_objective_defaults)."""
    train_sources, train_names, dev_rows = data.train_sources, data.train_names, data.dev_rows
    data_args, objective, train_args = args.data, args.objective, args.training
    hardware, precision, num_processes = (
        hardware_description(accelerator),
        accelerator.mixed_precision,
        accelerator.num_processes,
    )
    config = model.config
    train_rows = [r for rows, _ in train_sources for r in rows]
    hours = lambda rows: sum(float(r["duration"]) for r in rows) / 3600  # noqa: E731
    people = lambda rows: len({r["participant"] for r in rows})  # noqa: E731
    dev_rows = dev_rows or []
    steps = [r for r in log if "loss" in r]
    devs = [r for r in log if "dev_loss" in r]
    last_step = steps[-1]["step"] if steps else 0
    first_k = [r for r in steps if r["step"] <= min(1000, last_step)]
    last_k = [r for r in steps if r["step"] > last_step - 1000]
    params = sum(p.numel() for p in model.parameters())
    effective_batch = train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps * num_processes
    versions = software_versions()
    # Manifests and the scanned folder by their names only: the card may be published.
    local_paths = [data_args.audio_dir, *train_names, data_args.dev_manifest]
    train_names = [public_name(name, local_paths) for name in train_names]
    mixing = (
        ", ".join(f"{n} (weight {w})" for n, (_, w) in zip(train_names, train_sources))
        if len(train_sources) > 1
        else train_names[0]
    )
    hub_id, base_model = base_model_of(base_model)
    header = card_header(train_args, hub_id, ["wav2vec2", "audio", "speech", "self-supervised", "pretraining"])
    return f"""---
{header}---
# wav2vec 2.0 self-supervised pretraining: {Path(train_args.output_dir).name}

Self-supervised (contrastive + diversity) pretraining of a wav2vec 2.0 encoder on long-form
recordings, starting from **{base_model}**, trained with `pretrain.py`. No transcriptions were used:
fine-tune it (`finetune_ctc.py`) or extract its features (`extract_features.py`) for a task.

| Property | Value |
|---|---|
| Base model | {base_model} |
| Architecture | Wav2Vec2ForPreTraining |
| Parameters | {params / 1e6:.2f} M |
| Hidden size | {config.hidden_size} |
| Attention heads | {config.num_attention_heads} |
| Transformer layers | {config.num_hidden_layers} |
| Feature extractor | {len(config.conv_dim)}-layer CNN ({config.feat_extract_norm} norm{", stable layer norm" if config.do_stable_layer_norm else ""}) |
| Quantiser | {config.num_codevector_groups} groups x {config.num_codevectors_per_group} codebook entries |

## Training data

| Statistic | Value |
|---|---|
| Total audio | {hours(train_rows) + hours(dev_rows):.2f} hours |
| Number of recordings | {len(train_rows) + len(dev_rows)} files |
| Train split | {len(train_rows)} files, {hours(train_rows):.2f} h, {people(train_rows)} participants |
| Dev split | {len(dev_rows)} files, {hours(dev_rows):.2f} h, {people(dev_rows)} participants |
| Split strategy | by participant id (no participant in both splits) |
| Train sources | {mixing} |
| Unreadable files skipped | {len(unreadable)} |

Preprocessing: {data_args.crop_seconds:g} s random crops read by seeking into the long files, resampled on the fly
to 16 kHz mono; crops with RMS < {data_args.min_rms:g} redrawn (up to {data_args.max_crop_retries} tries);
{data_args.epoch_multiplier} crops per file per epoch{" shared in proportion to duration" if data_args.crops_by_duration else ""}, fresh positions every epoch.

## Training hyperparameters

| Hyperparameter | Value |
|---|---|
| Optimiser | AdamW (betas 0.9/0.98, no weight decay on biases and norms) |
| Learning rate | {train_args.learning_rate:g} |
| LR scheduler | {train_args.lr_scheduler_type}, {train_args.warmup_steps:,} warmup steps |
| Total training steps | {last_step:,} |
| Effective batch size | {effective_batch} ({train_args.per_device_train_batch_size} per device x {num_processes} processes x {train_args.gradient_accumulation_steps} accumulation) |
| Precision | {precision} |
| Gradient checkpointing | {"enabled" if train_args.gradient_checkpointing else "disabled"} |
| Max gradient norm | {train_args.max_grad_norm:g} |
| Weight decay | {train_args.weight_decay:g} |
| Crop duration | {data_args.crop_seconds:g} s |
| Mask time prob / length | {objective.mask_time_prob:g} / {objective.mask_time_length} frames (masked fraction {format_number(_window_mean(steps, "masked_fraction"), 3)}) |
| Num negatives | {objective.num_negatives} |
| Contrastive temperature | {objective.contrastive_temperature:g} |
| Diversity loss weight | {objective.diversity_loss_weight:g} |
| Feature penalty weight | {objective.feature_penalty_weight:g} (x mean square of the CNN features, as fairseq) |
| Gumbel temperature | max({objective.max_gumbel_temperature:g} x {objective.gumbel_temperature_decay}^(step + {objective.gumbel_start_step:,}), {objective.min_gumbel_temperature:g}) |
| Feature encoder gradient scale | {"frozen" if args.model.freeze_feature_encoder else f"{args.model.feature_grad_mult:g}"} |
| Objective defaults | {objective_defaults} |
| Hardware | {hardware} |
| Software | PyTorch {versions["torch"]}, Transformers {versions["transformers"]}, Accelerate {versions["accelerate"]}, soundfile {versions["soundfile"]}, soxr {versions["soxr"]} |

## Training loss

Loss per masked frame (contrastive + {objective.diversity_loss_weight:g} x diversity; the feature penalty is logged apart as
`feature_penalty` in train_log.jsonl). "Summed" is the
model's raw summed loss per update, the figure some cards report.

| Metric | Per masked frame | Summed per update |
|---|---|---|
| Initial loss (step {steps[0]["step"] if steps else "n/a"}) | {format_number(steps[0]["loss"] if steps else None)} | {format_number(steps[0]["loss_sum_per_update"] if steps else None, 1)} |
| Final loss (step {last_step}) | {format_number(steps[-1]["loss"] if steps else None)} | {format_number(steps[-1]["loss_sum_per_update"] if steps else None, 1)} |
| Avg loss (first {min(1000, last_step):,} steps) | {format_number(_window_mean(first_k, "loss"))} | {format_number(_window_mean(first_k, "loss_sum_per_update"), 1)} |
| Avg loss (last {min(1000, last_step):,} steps) | {format_number(_window_mean(last_k, "loss"))} | {format_number(_window_mean(last_k, "loss_sum_per_update"), 1)} |
| Dev contrastive loss, first evaluation (step {devs[0]["step"] if devs else "n/a"}) | {format_number(devs[0].get("dev_contrastive_loss") if devs else None)} | |
| Dev contrastive loss, last evaluation (step {devs[-1]["step"] if devs else "n/a"}) | {format_number(devs[-1].get("dev_contrastive_loss") if devs else None)} | |
| Dev contrastive accuracy, last evaluation | {format_number(devs[-1]["dev_accuracy"] if devs else None, 3)} | |
| Dev loss with diversity, last evaluation | {format_number(devs[-1]["dev_loss"] if devs else None)} | |

Dev figures ({devs[-1].get("dev_crops", "n/a") if devs else "n/a"} fixed crops of the dev recordings, fixed masks and negatives): the
contrastive loss and accuracy per masked frame over every dev crop are the headline, independent of the
eval batch size and the number of processes. "Dev loss with diversity" adds {objective.diversity_loss_weight:g} x the
diversity term of the soft code distribution over all dev masked frames at once (in training that term is
a statistic of each batch, so the two are not the same figure).

![loss curve](loss_curve.png)
{health_section(log, objective, train_args)}
""" + how_to_use(card_model_name(train_args), config.hidden_size, getattr(config, "hourglass", None))


def how_to_use(name: str, hidden_size: int, hourglass: str | None = None) -> str:
    # An Hourglass encoder (utils/hourglass.py) is built by the hourglass.py saved with it: Wav2Vec2Model would
    # quietly build the standard encoder instead.
    model_class, trust = ("AutoModel", ", trust_remote_code=True") if hourglass else ("Wav2Vec2Model", "")
    return f"""## How to use

```python
import soundfile as sf, soxr, torch
from transformers import {"AutoModel, Wav2Vec2FeatureExtractor" if hourglass else "Wav2Vec2FeatureExtractor, Wav2Vec2Model"}

model = {model_class}.from_pretrained("{name}"{trust})
feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained("{name}")
audio, rate = sf.read("recording.wav", dtype="float32", always_2d=True)
audio = soxr.resample(audio.mean(axis=1), rate, 16000)
inputs = feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    hidden_states = model(**inputs).last_hidden_state  # (1, frames at 50 per second, {hidden_size})
```

For hours-long files use `extract_features.py` (chunked, bounded memory); for speech recognition
fine-tune with `finetune_ctc.py --model_name_or_path <this model>`.
"""
