"""Continued (or from-scratch) wav2vec 2.0 self-supervised pretraining on long-form recordings.

    accelerate launch pretrain.py configs/recipes/wav2vec2-base-continued.yaml \\
        --train_manifest manifests/train.tsv --dev_manifest manifests/dev.tsv --output_dir runs/home

Random 8 s crops are read from the long files by seeking (utils.crops.CropStream), silent crops are
redrawn, masks and negatives are drawn in the DataLoader workers, and the contrastive + diversity
loss is normalised by the number of masked frames of the whole effective batch (all accumulation
micro-steps on all processes), so the update does not depend on how the batch is split.
A YAML recipe may come first; flags after it override it.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, get_scheduler
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from utils.audio import TARGET_SAMPLE_RATE, conv_frames, conv_geometry
from utils.cards import format_number, hardware_description, hub_base_model, push_folder_to_hub, software_versions
from utils.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.crops import CropStream, stream_totals
from utils.manifests import (
    DEFAULT_PARTICIPANT_REGEX,
    parse_weighted_manifests,
    read_manifest,
    scan_audio_folder,
    split_by_participant,
    write_manifests,
)
from utils.training import (
    StopSignal,
    TrainingArguments,
    append_jsonl,
    end_processes,
    gather_unreadable,
    load_feature_extractor,
    make_accelerator,
    make_loader,
    optimizer_param_groups,
    parse_args_with_recipe,
    read_jsonl,
    start_train_log,
)

logger = logging.getLogger("pretrain")

# fairseq's wav2vec2-base ended its 400k updates with the Gumbel temperature at its floor (0.5);
# a continued run starts there instead of re-heating the quantizer to 2.0 (which transformers
# does on load) and scrambling the codebook the checkpoint learned.
PRETRAINED_GUMBEL_STEPS = 400_000


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default="facebook/wav2vec2-base",
        metadata={"help": "Wav2Vec2ForPreTraining checkpoint (hub id or local folder) to continue from."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config folder to train from scratch (random init); overrides model_name_or_path."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma list of config changes, e.g. 'layerdrop=0.05,hidden_dropout=0.1'."}
    )
    feature_grad_mult: float = field(
        default=0.1,
        metadata={"help": "Scale of the CNN feature encoder's gradients (fairseq: 0.1); 1 leaves them alone."},
    )
    freeze_feature_encoder: bool = field(default=False, metadata={"help": "Train the transformer and quantizer only."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2 or flex_attention."}
    )


@dataclass
class DataArguments:
    train_manifest: str | None = field(
        default=None,
        metadata={"help": "TSV from data/prepare_manifest.py, or several with weights: 'home.tsv:0.7,read.tsv:0.3'."},
    )
    dev_manifest: str | None = field(default=None, metadata={"help": "Dev TSV(s) for evaluation on fixed crops."})
    audio_dir: str | None = field(
        default=None, metadata={"help": "Instead of manifests: scan this folder and split it by participant."}
    )
    participant_regex: str = field(
        default=DEFAULT_PARTICIPANT_REGEX,
        metadata={"help": "With --audio_dir: regex whose first group is the participant id."},
    )
    dev_fraction: float = field(default=0.1, metadata={"help": "With --audio_dir: share of audio hours for dev."})
    crop_seconds: float = field(default=8.0)
    min_rms: float = field(default=0.001, metadata={"help": "Crops quieter than this are redrawn."})
    max_crop_retries: int = field(default=10)
    epoch_multiplier: int = field(default=10, metadata={"help": "Crops per file per epoch."})
    crops_by_duration: bool = field(
        default=False, metadata={"help": "Share an epoch's crops out in proportion to file duration instead."}
    )
    dev_crops_per_file: int = field(default=8, metadata={"help": "Fixed dev crops per dev file."})


@dataclass
class ObjectiveArguments:
    mask_time_prob: float = field(
        default=0.65,
        metadata={"help": "Share of frames that start a masked span (fairseq: 0.65 -> ~49%% of frames masked)."},
    )
    mask_time_length: int = field(default=10, metadata={"help": "Frames per masked span."})
    num_negatives: int = field(default=100)
    contrastive_temperature: float = field(default=0.1)
    diversity_loss_weight: float = field(default=0.1)
    feature_penalty_weight: float = field(
        default=10.0,
        metadata={
            "help": "Weight of the mean square of the CNN features in the loss (fairseq: 10; transformers' model has no such term)."
        },
    )
    max_gumbel_temperature: float = field(default=2.0)
    min_gumbel_temperature: float = field(default=0.5)
    gumbel_temperature_decay: float = field(default=0.999995)
    gumbel_start_step: int | None = field(
        default=None,
        metadata={
            "help": f"Schedule step the run starts at; default 0 from scratch, {PRETRAINED_GUMBEL_STEPS} (temperature at its floor) when continuing."
        },
    )


class MaskAndNegatives:
    """Runs in the DataLoader workers: a span mask and contrastive negatives for every crop.

    Each crop's draw is seeded by its (seed, epoch, index) key, so masks do not depend on the batch
    a crop lands in, the number of workers or processes, or whether the run was resumed.
    transformers' helpers draw from numpy's global RNG; it is saved and restored around them.
    """

    def __init__(self, num_frames: int, mask_time_prob: float, mask_time_length: int, num_negatives: int):
        self.num_frames, self.mask_time_prob, self.mask_time_length = num_frames, mask_time_prob, mask_time_length
        self.num_negatives = num_negatives

    def __call__(self, batch: dict) -> dict:
        masks, negatives = [], []
        for row, key in enumerate(batch["crop_keys"]):
            with numpy_global_seed(key):
                mask = _compute_mask_indices(
                    (1, self.num_frames), self.mask_time_prob, self.mask_time_length, min_masks=2
                )
                negative = _sample_negative_indices((1, self.num_frames), self.num_negatives, mask)
            masks.append(mask[0])
            negatives.append(negative[0] + row * self.num_frames)
        batch["mask_time_indices"] = np.stack(masks)
        batch["sampled_negative_indices"] = np.stack(negatives)
        return batch


@contextmanager
def numpy_global_seed(key):
    state = np.random.get_state()
    np.random.seed(np.random.SeedSequence([int(k) for k in key] + [3]).generate_state(1)[0])
    try:
        yield
    finally:
        np.random.set_state(state)


def gumbel_temperature(args: ObjectiveArguments, step: int) -> float:
    return max(args.max_gumbel_temperature * args.gumbel_temperature_decay**step, args.min_gumbel_temperature)


def apply_config_overrides(config, overrides: str | None) -> None:
    for item in filter(None, (s.strip() for s in (overrides or "").split(","))):
        key, _, value = item.partition("=")
        if not hasattr(config, key):
            raise SystemExit(f"error: --config_overrides: the model config has no field {key!r}")
        old, new = getattr(config, key), yaml.safe_load(value)  # 0.1 -> float, false -> bool, null -> None
        setattr(
            config,
            key,
            type(old)(new)
            if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(new, (int, float))
            else new,
        )


def load_rows(data: DataArguments, output_dir: Path, is_main: bool, seed: int):
    """Returns ([(train rows, weight)], train names, dev rows or None)."""
    if data.audio_dir:
        if data.train_manifest or data.dev_manifest:
            raise ValueError("give either --audio_dir or --train_manifest/--dev_manifest, not both")
        valid, invalid = scan_audio_folder(data.audio_dir, data.participant_regex)
        for bad in invalid:
            logger.warning("leaving out %s: %s", bad["path"], bad["reason"])
        train, dev = split_by_participant(valid, data.dev_fraction, seed)
        if is_main:  # the split that was used, as data/prepare_manifest.py writes it, for the card and for reruns
            write_manifests(output_dir / "manifests", train, dev, invalid)
        return [(train, 1.0)], [f"--audio_dir {data.audio_dir} (train split)"], dev or None
    if not data.train_manifest:
        raise ValueError("give --train_manifest (TSV from data/prepare_manifest.py) or --audio_dir")
    train = [(read_manifest(path), weight) for path, weight in parse_weighted_manifests(data.train_manifest)]
    names = [path for path, _ in parse_weighted_manifests(data.train_manifest)]
    dev = None
    if data.dev_manifest:
        dev = [row for path, _ in parse_weighted_manifests(data.dev_manifest) for row in read_manifest(path)]
        if not dev:
            raise ValueError(f"dev manifest {data.dev_manifest} has no files")
    for (rows, _), name in zip(train, names):
        if not rows:
            raise ValueError(f"train manifest {name} has no files")
    return train, names, dev


def main(argv=None):
    model_args, data_args, objective, train_args = parse_args_with_recipe(
        [ModelArguments, DataArguments, ObjectiveArguments, TrainingArguments], argv
    )
    output_dir = Path(train_args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # ------------------------------------------------------------------ config, accelerator
    model_source = model_args.config_name or model_args.model_name_or_path
    try:
        config = Wav2Vec2Config.from_pretrained(model_source)
    except OSError as error:
        raise SystemExit(
            f"error: cannot load a wav2vec2 config from {model_source!r} (--config_name / --model_name_or_path): {error}"
        ) from None
    apply_config_overrides(config, model_args.config_overrides)
    if objective.mask_time_prob <= 0:
        raise SystemExit("error: --mask_time_prob must be above 0: the contrastive task predicts masked frames")
    # The objective is ours, whatever the checkpoint's config says: time masks from the workers
    # (the model only applies them with apply_spec_augment), no feature masking.
    config.apply_spec_augment, config.mask_time_prob, config.mask_feature_prob = True, objective.mask_time_prob, 0.0
    accelerator, trackers = make_accelerator(train_args, output_dir, config.layerdrop)
    set_seed(train_args.seed)

    # ------------------------------------------------------------------ data
    num_frames = conv_frames(round(data_args.crop_seconds * TARGET_SAMPLE_RATE), *conv_geometry(config))
    feature_extractor = load_feature_extractor(model_source)
    try:
        train_sources, train_names, dev_rows = load_rows(
            data_args, output_dir, accelerator.is_main_process, train_args.seed
        )
        transform = MaskAndNegatives(
            num_frames, objective.mask_time_prob, objective.mask_time_length, objective.num_negatives
        )
        stream_options = dict(
            crop_seconds=data_args.crop_seconds,
            min_rms=data_args.min_rms,
            max_crop_retries=data_args.max_crop_retries,
            normalize=feature_extractor.do_normalize,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            transform=transform,
        )
        train_stream = CropStream(
            train_sources,
            train_args.per_device_train_batch_size,
            epoch_multiplier=data_args.epoch_multiplier,
            crops_by_duration=data_args.crops_by_duration,
            seed=train_args.seed,
            names=train_names,
            **stream_options,
        )
        dev_stream = None
        if dev_rows:
            dev_stream = CropStream(
                [(dev_rows, 1.0)],
                train_args.per_device_eval_batch_size,
                epoch_multiplier=data_args.dev_crops_per_file,
                seed=train_args.seed + 1,
                fixed=True,
                names=[f"dev manifest {data_args.dev_manifest or '(split)'}"],
                **stream_options,
            )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if dev_stream is None:
        logger.warning("no dev set: give --dev_manifest (or use --audio_dir) to follow the dev loss")
    if train_stream.short_files:
        logger.warning(
            "%d train file(s) shorter than one %.1f s crop are left out",
            train_stream.short_files,
            data_args.crop_seconds,
        )

    # ------------------------------------------------------------------ model
    if model_args.config_name:
        model = Wav2Vec2ForPreTraining._from_config(config, attn_implementation=model_args.attn_implementation)
        base_model, from_scratch = f"random init from {model_args.config_name}", True
    else:
        # config=config: overrides such as dropout rates must be in place when the modules are built.
        model, loading_info = Wav2Vec2ForPreTraining.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            attn_implementation=model_args.attn_implementation,
            output_loading_info=True,
        )
        config = model.config
        base_model, from_scratch = model_args.model_name_or_path, False
        fresh_heads = [
            k for k in loading_info["missing_keys"] if k.startswith(("quantizer", "project_q", "project_hid"))
        ]
        if fresh_heads:
            logger.warning(
                "\n%s\n%s has no pretraining heads (%s): it looks like a CTC or encoder-only checkpoint. The quantizer "
                "and projections start from random weights, so this is not a continuation of its pretraining and the "
                "first thousands of steps will mostly train those heads.\n%s",
                "!" * 80,
                model_args.model_name_or_path,
                ", ".join(sorted({k.split(".")[0] for k in fresh_heads})),
                "!" * 80,
            )
    # The model's forward reads these three; the masking flags are ours (masks come from the workers).
    config.num_negatives = objective.num_negatives
    config.contrastive_logits_temperature = objective.contrastive_temperature
    config.diversity_loss_weight = objective.diversity_loss_weight
    gumbel_start = objective.gumbel_start_step
    if gumbel_start is None:
        gumbel_start = 0 if from_scratch else PRETRAINED_GUMBEL_STEPS

    if model_args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    elif model_args.feature_grad_mult != 1.0:
        for param in model.wav2vec2.feature_extractor.parameters():
            param.register_hook(lambda grad, mult=model_args.feature_grad_mult: grad * mult)
    # fairseq adds 10 x the mean square of the CNN features to the loss; transformers' model does
    # not. Without it the features of a model trained from scratch grow without bound and a few
    # channels come to dominate (mean square 58 instead of about 1 after 400 demo steps), which
    # fine-tuning then struggles to undo.
    cnn_output: dict[str, torch.Tensor] = {}
    use_feature_penalty = objective.feature_penalty_weight > 0 and not model_args.freeze_feature_encoder
    if use_feature_penalty:
        model.wav2vec2.feature_extractor.register_forward_hook(
            lambda module, args, output: cnn_output.__setitem__("features", output)
        )
    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ optimizer, resume
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, train_args.weight_decay),
        lr=train_args.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    # Stepped by hand once per update: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(
        train_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=train_args.warmup_steps,
        num_training_steps=train_args.max_train_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)

    start_step, stream_state = 0, {}
    checkpoint = resolve_checkpoint(output_dir, train_args.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, train_args)
        start_step, stream_state = state["step"], state
        train_stream.start_at(state["epoch"], state["batch_in_epoch"])
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            checkpoint,
            start_step,
            state["epoch"],
            state["batch_in_epoch"],
        )
    log_path = start_train_log(
        accelerator,
        output_dir,
        start_step,
        {"model": model_args, "data": data_args, "objective": objective, "training": train_args},
        trackers,
        "pretrain",
    )

    # ------------------------------------------------------------------ evaluation
    def evaluate() -> dict:
        """Loss per masked frame and contrastive accuracy on the fixed dev crops and masks."""
        unwrapped.eval()  # the bare module, as in finetune_ctc.py: no gradients, so nothing for DDP to do
        sums = torch.zeros(4, device=accelerator.device)  # loss, masked frames, correct, contrastive loss
        with torch.no_grad():
            for batch in make_loader(dev_stream, train_args.num_workers, batch_size=None):
                inputs = to_device(batch, accelerator.device)
                out = unwrapped(**inputs)
                mask = inputs["mask_time_indices"]
                sums += torch.stack(
                    [
                        out.loss.float(),
                        mask.sum().float(),
                        contrastive_correct(out, inputs, unwrapped.config).float(),
                        out.contrastive_loss.float(),
                    ]
                )
        cnn_output.clear()
        sums = accelerator.reduce(sums, reduction="sum")
        unwrapped.train()
        return {
            "dev_loss": (sums[0] / sums[1]).item(),
            "dev_contrastive_loss": (sums[3] / sums[1]).item(),
            "dev_accuracy": (sums[2] / sums[1]).item(),
        }

    # ------------------------------------------------------------------ training loop
    stop = StopSignal()
    accumulation = train_args.gradient_accumulation_steps
    batches = iter(make_loader(train_stream, train_args.num_workers, batch_size=None))
    worker_stats: dict[int, dict] = {}
    unreadable: set[str] = set(stream_state.get("unreadable", []))
    window = torch.zeros(
        7, device=accelerator.device
    )  # loss, contrastive, diversity, masked, frames, perplexity-sum, feature penalty
    window_steps, window_start = 0, time.time()
    crop_seconds_per_update = (
        data_args.crop_seconds * train_args.per_device_train_batch_size * accumulation * accelerator.num_processes
    )
    progress = tqdm(
        range(start_step, train_args.max_train_steps),
        initial=start_step,
        total=train_args.max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="pretrain",
    )
    if dev_stream is not None and start_step == 0 and train_args.eval_steps:
        record = {"step": 0, **evaluate()}
        if accelerator.is_main_process:
            append_jsonl(log_path, record)
        accelerator.log(record, step=0)
    model.train()
    step = start_step
    for step in range(start_step + 1, train_args.max_train_steps + 1):
        temperature = gumbel_temperature(objective, gumbel_start + step - 1)
        unwrapped.set_gumbel_temperature(temperature)
        micro_batches = [next(batches) for _ in range(accumulation)]
        for batch in micro_batches:
            worker_stats[batch["worker"]] = batch["stream_stats"]
            unreadable.update(batch["new_unreadable"])
        last = micro_batches[-1]
        position = {"epoch": int(last["epoch"]), "batch_in_epoch": int(last["batch_in_epoch"]) + 1}
        masked_here = sum(int(b["mask_time_indices"].sum()) for b in micro_batches)
        total_masked = accelerator.reduce(torch.tensor(float(masked_here), device=accelerator.device), reduction="sum")
        # The summed loss divided by the masked frames of the whole effective batch. DDP averages
        # gradients over processes and accelerator.backward divides by the accumulation steps:
        # both are undone so every masked frame of the update weighs the same.
        loss_scale = accelerator.num_processes * accumulation / total_masked
        for batch in micro_batches:
            inputs = to_device(batch, accelerator.device)
            with accelerator.accumulate(model):
                out = model(**inputs)
                penalty = (
                    feature_penalty(cnn_output.pop("features"), inputs["mask_time_indices"])
                    if use_feature_penalty
                    else torch.zeros((), device=accelerator.device)
                )
                accelerator.backward((out.loss + objective.feature_penalty_weight * penalty) * loss_scale)
                if accelerator.sync_gradients:  # --max_grad_norm 0: no clipping, the norm is still logged
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window += torch.stack(
                [
                    out.loss.detach().float(),
                    out.contrastive_loss.detach().float(),
                    out.diversity_loss.detach().float(),
                    inputs["mask_time_indices"].sum().float(),
                    torch.tensor(float(inputs["mask_time_indices"].numel()), device=accelerator.device),
                    out.codevector_perplexity.detach().float(),
                    penalty.detach().float(),
                ]
            )
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule step
            scheduler.step()
        window_steps += 1
        progress.update(1)

        if step % train_args.logging_steps == 0 or step == train_args.max_train_steps:
            totals = accelerator.reduce(window, reduction="sum")
            stream = stream_totals(worker_stats)
            unreadable = gather_unreadable(accelerator, unreadable)
            stream_global = accelerator.reduce(
                torch.tensor(
                    [stream.get("crops", 0), stream.get("retries", 0), stream.get("all_silent", 0)],
                    device=accelerator.device,
                    dtype=torch.float64,
                ),
                reduction="sum",
            )
            elapsed = time.time() - window_start
            record = {
                "step": step,
                "loss": (totals[0] / totals[3]).item(),
                "contrastive_loss": (totals[1] / totals[3]).item(),
                "diversity_loss": (totals[2] / totals[3]).item(),
                "loss_sum_per_update": (totals[0] / window_steps).item(),
                "codevector_perplexity": (
                    totals[5] / (window_steps * accumulation * accelerator.num_processes)
                ).item(),
                "feature_penalty": (totals[6] / totals[3]).item(),
                "masked_fraction": (totals[3] / totals[4]).item(),
                "gumbel_temperature": temperature,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if math.isfinite(grad_norm) else None,  # an fp16 overflow step
                "audio_seconds_per_second": crop_seconds_per_update * window_steps / max(elapsed, 1e-9),
                "epoch": position["epoch"],
                "crops_redrawn_silent": int(stream_global[1]),
                "crops_all_silent": int(stream_global[2]),
                "skipped_files": len(unreadable),
            }
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", skipped=record["skipped_files"]
            )
            window.zero_()
            window_steps, window_start = 0, time.time()

        if (
            dev_stream is not None
            and train_args.eval_steps
            and (step % train_args.eval_steps == 0 or step == train_args.max_train_steps)
        ):
            record = {"step": step, **evaluate()}
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            accelerator.log(record, step=step)
            logger.info("step %d: dev loss %.4f, dev accuracy %.3f", step, record["dev_loss"], record["dev_accuracy"])

        preempted = stop.agreed(accelerator)
        if (train_args.save_steps and step % train_args.save_steps == 0) or preempted:
            unreadable = gather_unreadable(accelerator, unreadable)
            save_checkpoint(accelerator, output_dir, step, {**position, "unreadable": sorted(unreadable)}, train_args)
        if preempted:
            logger.warning("SIGTERM: saved a checkpoint at step %d; resume with --resume_from_checkpoint latest", step)
            del model
            end_processes(accelerator)
            return None
    progress.close()

    # ------------------------------------------------------------------ save
    unreadable = gather_unreadable(accelerator, unreadable)
    if unreadable:
        logger.warning("%d unreadable file(s) were skipped: %s", len(unreadable), ", ".join(sorted(unreadable)[:10]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        feature_extractor.save_pretrained(output_dir)
        log = read_jsonl(log_path)
        plot_losses(log, output_dir / "loss_curve.png")
        (output_dir / "README.md").write_text(
            model_card(
                unwrapped,
                base_model,
                train_sources,
                train_names,
                dev_rows,
                data_args,
                objective,
                train_args,
                log,
                hardware_description(accelerator),
                accelerator.mixed_precision,
                sorted(unreadable),
                gumbel_start,
                accelerator.num_processes,
            )
        )
        if train_args.push_to_hub:
            push_folder_to_hub(
                output_dir,
                train_args.hub_model_id or output_dir.name,
                commit_message=f"wav2vec2 pretraining, step {step}",
            )
    stop.release()
    del model
    end_processes(accelerator)
    return output_dir


def to_device(batch: dict, device) -> dict:
    return {
        "input_values": batch["input_values"].to(device, non_blocking=True),
        "mask_time_indices": batch["mask_time_indices"].to(device, non_blocking=True),
        "sampled_negative_indices": batch["sampled_negative_indices"].to(device, non_blocking=True),
    }


def feature_penalty(features: torch.Tensor, mask_time_indices: torch.Tensor) -> torch.Tensor:
    """Each crop's mean square CNN feature, times its masked frames, summed like the model's loss:
    divided by the update's masked frames, it does not depend on how the update is split."""
    per_crop = features.float().pow(2).mean(dim=(1, 2))
    return (per_crop * mask_time_indices.sum(1)).sum()


def contrastive_correct(out, inputs: dict, config) -> torch.Tensor:
    """Masked frames whose true quantized vector scores above all its negatives."""
    quantized, context = out.projected_quantized_states, out.projected_states
    batch, frames, dim = quantized.shape
    negatives = quantized.reshape(-1, dim)[inputs["sampled_negative_indices"].long().reshape(-1)]
    negatives = negatives.reshape(batch, frames, -1, dim).permute(2, 0, 1, 3)
    logits = Wav2Vec2ForPreTraining.compute_contrastive_logits(
        quantized[None], negatives, context, config.contrastive_logits_temperature
    )
    logits[1:][(quantized == negatives).all(-1)] = float("-inf")
    return ((logits.argmax(0) == 0) & inputs["mask_time_indices"].bool()).sum()


# ---------------------------------------------------------------------------- model card


def plot_losses(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in log if "dev_loss" in r]
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


def model_card(
    model,
    base_model,
    train_sources,
    train_names,
    dev_rows,
    data_args,
    objective,
    train_args,
    log,
    hardware,
    precision,
    unreadable,
    gumbel_start,
    num_processes,
) -> str:
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
    mixing = (
        ", ".join(f"{n} (weight {w})" for n, (_, w) in zip(train_names, train_sources))
        if len(train_sources) > 1
        else train_names[0]
    )
    hub_id = hub_base_model(base_model)
    base_model_line = f"base_model: {hub_id}\n" if hub_id else ""  # the Hub takes a hub id here, or nothing
    return f"""---
library_name: transformers
tags: [wav2vec2, audio, speech, self-supervised, pretraining]
{base_model_line}---
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
| Gumbel temperature | max({objective.max_gumbel_temperature:g} x {objective.gumbel_temperature_decay}^(step + {gumbel_start:,}), {objective.min_gumbel_temperature:g}) |
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
| Dev loss, first evaluation (step {devs[0]["step"] if devs else "n/a"}) | {format_number(devs[0]["dev_loss"] if devs else None)} | |
| Dev loss, last evaluation (step {devs[-1]["step"] if devs else "n/a"}) | {format_number(devs[-1]["dev_loss"] if devs else None)} | |
| Dev contrastive accuracy, last evaluation | {format_number(devs[-1]["dev_accuracy"] if devs else None, 3)} | |

![loss curve](loss_curve.png)

## How to use

```python
import soundfile as sf, soxr, torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

model = Wav2Vec2Model.from_pretrained("{train_args.hub_model_id or train_args.output_dir}")
feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained("{train_args.hub_model_id or train_args.output_dir}")
audio, rate = sf.read("recording.wav", dtype="float32", always_2d=True)
audio = soxr.resample(audio.mean(axis=1), rate, 16000)
inputs = feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    hidden_states = model(**inputs).last_hidden_state  # (1, frames at 50 per second, {config.hidden_size})
```

For hours-long files use `extract_features.py` (chunked, bounded memory); for speech recognition
fine-tune with `finetune_ctc.py --model_name_or_path <this model>`.
"""


if __name__ == "__main__":
    main()
