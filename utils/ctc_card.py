"""What finetune_ctc.py writes next to the fine-tuned model to describe it: eval_results.json and
the model card (README.md)."""

from __future__ import annotations

import json
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


def eval_results(kept: dict | None, step: int, data_summary: dict, unreadable: set[str]) -> dict:
    """eval_results.json: the scores of the model that was kept (None without a dev set), the step
    it is from, the steps trained, the data figures and how many files were skipped (their names,
    which hold participant ids, go to the local unreadable_files.txt: this file may be published)."""
    results = {"wer": None, "cer": None, "model_step": step}
    if kept:
        results = {
            "wer": kept["eval_wer"],
            "cer": kept["eval_cer"],
            "model_step": kept["step"],
            **{k: v for k, v in kept.items() if k not in ("step", "eval_wer", "eval_cer", "examples")},
        }
    results.update({"train_steps": step, **data_summary, "unreadable_files_skipped": len(unreadable)})
    return results


def write_eval_results(output_dir: Path, results: dict, unreadable: set[str]) -> None:
    """eval_results.json, and the unreadable files by name in unreadable_files.txt (never pushed)."""
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if unreadable:
        (output_dir / "unreadable_files.txt").write_text("".join(f"{path}\n" for path in sorted(unreadable)))


def model_card(model, base_model, results, model_args, data_args, train_args, log, accelerator) -> str:
    """README.md of a fine-tuning output: results, data, hyperparameters, hardware and how to use it.

    `results` is what eval_results.json holds; the argument groups are finetune_ctc.py's.
    """
    hardware, precision, num_processes = (
        hardware_description(accelerator),
        accelerator.mixed_precision,
        accelerator.num_processes,
    )
    config = model.config
    versions = software_versions()
    evals = [r for r in log if "eval_wer" in r]
    effective_batch = f"{train_args.per_device_train_batch_size} utterances per device x {num_processes} processes x {train_args.gradient_accumulation_steps} accumulation"
    name = card_model_name(train_args)
    curve = (
        "\n".join(
            f"| {r['step']:,} | {format_number(r['eval_wer'])} | {format_number(r['eval_cer'])} | {format_number(r['eval_loss'])} |"
            for r in evals
        )
        or "| n/a | | | |"
    )
    data_source = (
        f"`{dataset_name(data_args.dataset_name)}` ({data_args.train_split_name})"
        if data_args.dataset_name
        else f"`{public_name(data_args.train_manifest, [data_args.train_manifest])}`"
    )
    chosen = (
        f"The weights are those of step {results['model_step']:,} of {results['train_steps']:,}: the evaluation with the lowest dev WER."
        if results["wer"] is not None
        else f"The weights are those of the last step ({results['train_steps']:,}); "
        + ("no evaluation had finite outputs." if evals else "there was no dev set.")
    )
    model_index = hub_model_index(results, data_args, train_args.output_dir)
    hub_id, base_model = base_model_of(base_model)
    tags = ["wav2vec2", "audio", "speech", "automatic-speech-recognition", "ctc"]
    header = card_header(train_args, hub_id, tags, pipeline_tag="automatic-speech-recognition")
    return f"""---
{header}{model_index}---
# {Path(train_args.output_dir).name}: wav2vec 2.0 + CTC speech recognition

**{base_model}** fine-tuned with a character CTC head ({results["vocab_size"]} tokens) by `finetune_ctc.py`.
{chosen}

## Results

Greedy CTC decoding (no language model) on the dev set ({results["dev_set"]}); transcripts normalised
(NFC, {"lowercase, " if data_args.do_lower_case else ""}{"dashes, '|' and dandas made spaces, " if data_args.word_separators else ""}punctuation removed, whitespace folded).

| Dev set | WER | CER | Utterances | Words | Characters | Hours |
|---|---|---|---|---|---|---|
| {results["dev_set"]} | {format_number(results["wer"])} | {format_number(results["cer"])} | {format_number(results.get("eval_utterances"))} | {format_number(results.get("eval_words"))} | {format_number(results.get("eval_chars"))} | {results["dev_hours"]:.3f} |

| Step | Dev WER | Dev CER | Dev loss per character |
|---|---|---|---|
{curve}

## Training data

| Statistic | Value |
|---|---|
| Source | {data_source} |
| Train utterances | {results["train_utterances"]:,} ({format_number(results["train_hours"], 3)} h, {results["train_participants"]} participants) |
| Dev utterances | {results["dev_utterances"]:,} ({results["dev_hours"]:.3f} h, {results["dev_participants"]} participants) |
| Longer than {data_args.max_duration_seconds:g} s (train) | {format_number(results["long_train_utterances"])} ({"trained alone" if data_args.long_utterances == "alone" else "left out"}) |
| Too short for their transcript (train, left out) | {format_number(results["too_short_train_utterances"])} |
| Unreadable files skipped | {results["unreadable_at_start"] + results["unreadable_files_skipped"]} |

## Training hyperparameters

| Hyperparameter | Value |
|---|---|
| Base model | {base_model} |
| Parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M ({config.num_hidden_layers} layers, hidden size {config.hidden_size}) |
| Feature encoder | {"frozen" if model_args.freeze_feature_encoder else "trained"} |
| Optimiser | AdamW (no weight decay on biases and norms), weight decay {train_args.weight_decay:g} |
| Learning rate | {train_args.learning_rate:g}, {train_args.lr_scheduler_type} schedule, {train_args.warmup_steps:,} warmup steps |
| Steps | {results["train_steps"]:,} |
| Batch | {effective_batch}, grouped by length: {data_args.group_by_length} |
| Loss | CTC summed over the update / its target characters; zero_infinity {model_args.ctc_zero_infinity} |
| Dropout | attention {model_args.attention_dropout:g}, activation {model_args.activation_dropout:g}, hidden {model_args.hidden_dropout:g}, feature projection {model_args.feat_proj_dropout:g}, final {model_args.final_dropout:g}, layerdrop {model_args.layerdrop:g} |
| SpecAugment | time mask {model_args.mask_time_prob:g} x {model_args.mask_time_length} frames, feature mask {model_args.mask_feature_prob:g} x {model_args.mask_feature_length} |
| Max gradient norm | {train_args.max_grad_norm:g} |
| Precision | {precision} |
| Gradient checkpointing | {"enabled" if train_args.gradient_checkpointing else "disabled"} |
| Hardware | {hardware} |
| Software | Python {versions["python"]}, PyTorch {versions["torch"]}, Transformers {versions["transformers"]}, Accelerate {versions["accelerate"]}, soundfile {versions["soundfile"]}, soxr {versions["soxr"]} |

{how_to_use(name, getattr(config, "hourglass", None))}"""


def dataset_name(name: str) -> str:
    """A dataset as a card names it: a Hub id as it is, a local folder by its name only."""
    return Path(name).resolve().name if Path(name).exists() else name


def hub_model_index(results: dict, data_args, output_dir: str) -> str:
    """The card metadata's model-index (empty without a dev set): the Hub refuses a card whose
    model-index lacks a dataset or has empty metrics. Local data is named, never located."""
    if results["wer"] is None:
        return ""
    hub_dataset = bool(data_args.dataset_name) and not Path(data_args.dataset_name).exists()
    if data_args.dataset_name:
        name = dataset_name(data_args.dataset_name)
    else:
        name = f"dev set ({public_name(data_args.dev_manifest or data_args.train_manifest, [data_args.dev_manifest, data_args.train_manifest])})"
    dataset = {"type": name if hub_dataset else "local", "name": name}
    dataset["split"] = data_args.eval_split_name if data_args.dataset_name else "dev"
    return f"""model-index:
- name: {json.dumps(Path(output_dir).resolve().name)}
  results:
  - task: {{type: automatic-speech-recognition, name: Speech Recognition}}
    dataset: {json.dumps(dataset, ensure_ascii=False)}
    metrics:
    - {{type: wer, value: {results["wer"]:.4f}, name: Dev WER}}
    - {{type: cer, value: {results["cer"]:.4f}, name: Dev CER}}
"""


def how_to_use(name: str, hourglass: str | None = None) -> str:
    """The card's last section: transcribe.py, and plain transformers for short utterances."""
    # An Hourglass encoder is built by the hourglass.py saved with it (utils/hourglass.py).
    model_class, trust = ("AutoModelForCTC", ", trust_remote_code=True") if hourglass else ("Wav2Vec2ForCTC", "")
    return f"""## How to use

```bash
python transcribe.py --model_name_or_path {name} recording.flac other.wav
```

```python
import soundfile as sf, soxr, torch
from transformers import {model_class}, Wav2Vec2Processor

model = {model_class}.from_pretrained("{name}"{trust}).eval()
processor = Wav2Vec2Processor.from_pretrained("{name}")
audio, rate = sf.read("utterance.wav", dtype="float32", always_2d=True)
audio = soxr.resample(audio.mean(axis=1), rate, 16000)
inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    ids = model(**inputs).logits.argmax(-1)
print(processor.batch_decode(ids)[0])
```

For recordings longer than a minute use `transcribe.py` (or `utils.ctc.transcribe` from Python),
which reads and decodes them in chunks.
"""
