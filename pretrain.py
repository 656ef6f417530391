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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, get_scheduler

from utils.audio import TARGET_SAMPLE_RATE, conv_frames, conv_geometry
from utils.cards import push_folder_to_hub
from utils.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.crops import CropStream
from utils.hourglass import model_class, read_config
from utils.manifests import (
    parse_weighted_manifests,
    read_manifest,
    scan_audio_folder,
    split_by_participant,
    write_manifests,
)
from utils.objective import (
    PRETRAINED_GUMBEL_STEPS,
    MaskAndNegatives,
    contrastive_correct,
    feature_penalty,
    gumbel_temperature,
)
from utils.pretrain_arguments import (
    Arguments,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    apply_config_overrides,
)
from utils.pretrain_card import model_card, plot_losses
from utils.pretrain_log import LogWindow, train_row
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


# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------


def parse_arguments(argv=None) -> Arguments:
    """The flag groups (utils/pretrain_arguments.py) from an optional YAML recipe and the command line."""
    return Arguments(
        *parse_args_with_recipe([ModelArguments, DataArguments, ObjectiveArguments, TrainingArguments], argv)
    )


# ---------------------------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------------------------


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


@dataclass
class PretrainingData:
    """The crop streams, and the manifest rows behind them (for the model card)."""

    train: CropStream
    dev: CropStream | None
    train_sources: list[tuple[list[dict], float]]
    train_names: list[str]
    dev_rows: list[dict] | None


def build_data(args: Arguments, config, feature_extractor, accelerator, output_dir: Path) -> PretrainingData:
    """Train crops drawn afresh every epoch, fixed dev crops; each process reads its own share."""
    data_args, objective, train_args = args.data, args.objective, args.training
    num_frames = conv_frames(round(data_args.crop_seconds * TARGET_SAMPLE_RATE), *conv_geometry(config))
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
    return PretrainingData(train_stream, dev_stream, train_sources, train_names, dev_rows)


# ---------------------------------------------------------------------------------------------
# 3. Model
# ---------------------------------------------------------------------------------------------


def load_config(model_args: ModelArguments, objective: ObjectiveArguments) -> Wav2Vec2Config:
    model_source = model_args.config_name or model_args.model_name_or_path
    try:
        config = read_config(model_source)
    except OSError as error:
        raise SystemExit(
            f"error: cannot load a wav2vec2 config from {model_source!r} (--config_name / --model_name_or_path): {error}"
        ) from None
    config = apply_config_overrides(config, model_args.config_overrides)
    if objective.mask_time_prob <= 0:
        raise SystemExit("error: --mask_time_prob must be above 0: the contrastive task predicts masked frames")
    # The objective is ours, whatever the checkpoint's config says: time masks from the workers
    # (the model only applies them with apply_spec_augment), no feature masking.
    config.apply_spec_augment, config.mask_time_prob, config.mask_feature_prob = True, objective.mask_time_prob, 0.0
    return config


def load_model(model_args: ModelArguments, config: Wav2Vec2Config) -> tuple[Wav2Vec2ForPreTraining, str, bool]:
    """The model (random init with --config_name), its base model for the card, and whether it is from scratch."""
    if model_args.config_name:
        model = model_class(config, Wav2Vec2ForPreTraining)._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
        return model, f"random init from {model_args.config_name}", True
    # config=config: overrides such as dropout rates must be in place when the modules are built.
    model, loading_info = model_class(config, Wav2Vec2ForPreTraining).from_pretrained(
        model_args.model_name_or_path,
        config=config,
        attn_implementation=model_args.attn_implementation,
        output_loading_info=True,
    )
    fresh_heads = [k for k in loading_info["missing_keys"] if k.startswith(("quantizer", "project_q", "project_hid"))]
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
    return model, model_args.model_name_or_path, False


def prepare_for_pretraining(model, model_args, objective, train_args, from_scratch: bool):
    """The objective's settings in the model's config, the feature encoder's gradient hooks and gradient
    checkpointing. Returns the Gumbel schedule's first step, and the dict the feature penalty reads
    the CNN features from (None: no penalty)."""
    # The model's forward reads these three; the masking flags are ours (masks come from the workers).
    model.config.num_negatives = objective.num_negatives
    model.config.contrastive_logits_temperature = objective.contrastive_temperature
    model.config.diversity_loss_weight = objective.diversity_loss_weight
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
    use_feature_penalty = objective.feature_penalty_weight > 0 and not model_args.freeze_feature_encoder
    cnn_output: dict[str, torch.Tensor] | None = {} if use_feature_penalty else None
    if use_feature_penalty:
        model.wav2vec2.feature_extractor.register_forward_hook(
            lambda module, args, output: cnn_output.__setitem__("features", output)
        )
    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return gumbel_start, cnn_output


# ---------------------------------------------------------------------------------------------
# 4. Evaluation
# ---------------------------------------------------------------------------------------------


def to_device(batch: dict, device) -> dict:
    return {
        "input_values": batch["input_values"].to(device, non_blocking=True),
        "mask_time_indices": batch["mask_time_indices"].to(device, non_blocking=True),
        "sampled_negative_indices": batch["sampled_negative_indices"].to(device, non_blocking=True),
    }


def evaluate(step: int, unwrapped, dev_stream: CropStream, accelerator, num_workers, cnn_output, log_path) -> dict:
    """Loss per masked frame and contrastive accuracy on the fixed dev crops and masks, logged."""
    unwrapped.eval()  # the bare module, as in finetune_ctc.py: no gradients, so nothing for DDP to do
    sums = torch.zeros(4, device=accelerator.device)  # loss, masked frames, correct, contrastive loss
    with torch.no_grad():
        for batch in make_loader(dev_stream, num_workers, batch_size=None):
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
    if cnn_output is not None:
        cnn_output.clear()
    sums = accelerator.reduce(sums, reduction="sum")
    unwrapped.train()
    record = {
        "step": step,
        "dev_loss": (sums[0] / sums[1]).item(),
        "dev_contrastive_loss": (sums[3] / sums[1]).item(),
        "dev_accuracy": (sums[2] / sums[1]).item(),
    }
    if accelerator.is_main_process:
        append_jsonl(log_path, record)
    accelerator.log(record, step=step)
    return record


# ---------------------------------------------------------------------------------------------
# 5. Training loop
# ---------------------------------------------------------------------------------------------


def make_optimizer(model, train_args: TrainingArguments):
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
    return optimizer, scheduler


@dataclass
class LoopState:
    """Where the run stands: its last update and the unreadable files met (by this process, or by all
    once gathered)."""

    step: int = 0
    unreadable: set[str] = field(default_factory=set)


def resume(accelerator, output_dir: Path, train_args: TrainingArguments, train_stream: CropStream) -> LoopState:
    """A fresh start, or the state of --resume_from_checkpoint with the train stream moved to its position."""
    checkpoint = resolve_checkpoint(output_dir, train_args.resume_from_checkpoint)
    if checkpoint is None:
        return LoopState()
    state = load_checkpoint(accelerator, checkpoint, train_args)
    train_stream.start_at(state["epoch"], state["batch_in_epoch"])
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        checkpoint,
        state["step"],
        state["epoch"],
        state["batch_in_epoch"],
    )
    return LoopState(state["step"], set(state.get("unreadable", [])))


def update(accelerator, model, optimizer, micro_batches, window: LogWindow, cnn_output, objective, train_args):
    """One optimizer update on the micro-batches; their sums go into the window. Returns the gradient norm."""
    accumulation = train_args.gradient_accumulation_steps
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
                if cnn_output is not None
                else torch.zeros((), device=accelerator.device)
            )
            accelerator.backward((out.loss + objective.feature_penalty_weight * penalty) * loss_scale)
            if accelerator.sync_gradients:  # --max_grad_norm 0: no clipping, the norm is still logged
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window.add(out, inputs["mask_time_indices"], penalty, accelerator.device)
    return grad_norm


def train(accelerator, model, optimizer, scheduler, data, cnn_output, gumbel_start, args, log_path, state, stop):
    """The updates up to --max_train_steps, with train-log rows, dev evaluations and checkpoints.
    Returns whether SIGTERM stopped the run (after saving a checkpoint)."""
    data_args, objective, train_args = args.data, args.objective, args.training
    output_dir, unwrapped = Path(train_args.output_dir), accelerator.unwrap_model(model)
    accumulation = train_args.gradient_accumulation_steps
    batches = iter(make_loader(data.train, train_args.num_workers, batch_size=None))
    window = LogWindow(
        torch.zeros(7, device=accelerator.device),
        accumulation * accelerator.num_processes,
        data_args.crop_seconds * train_args.per_device_train_batch_size * accumulation * accelerator.num_processes,
    )
    progress = tqdm(
        range(state.step, train_args.max_train_steps),
        initial=state.step,
        total=train_args.max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="pretrain",
    )
    evaluation = (unwrapped, data.dev, accelerator, train_args.num_workers, cnn_output, log_path)
    if data.dev is not None and state.step == 0 and train_args.eval_steps:
        evaluate(0, *evaluation)
    model.train()
    for step in range(state.step + 1, train_args.max_train_steps + 1):
        state.step = step
        temperature = gumbel_temperature(objective, gumbel_start + step - 1)
        unwrapped.set_gumbel_temperature(temperature)
        micro_batches = [next(batches) for _ in range(accumulation)]
        for batch in micro_batches:
            window.worker_stats[batch["worker"]] = batch["stream_stats"]
            state.unreadable.update(batch["new_unreadable"])
        last = micro_batches[-1]
        position = {"epoch": int(last["epoch"]), "batch_in_epoch": int(last["batch_in_epoch"]) + 1}
        grad_norm = update(accelerator, model, optimizer, micro_batches, window, cnn_output, objective, train_args)
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule step
            scheduler.step()
        window.steps += 1
        progress.update(1)

        if step % train_args.logging_steps == 0 or step == train_args.max_train_steps:
            lr, epoch = scheduler.get_last_lr()[0], position["epoch"]
            record, state.unreadable = train_row(
                accelerator, window, step, temperature, lr, grad_norm, epoch, state.unreadable
            )
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", skipped=record["skipped_files"]
            )
            window.reset()

        if (
            data.dev is not None
            and train_args.eval_steps
            and (step % train_args.eval_steps == 0 or step == train_args.max_train_steps)
        ):
            record = evaluate(step, *evaluation)
            logger.info("step %d: dev loss %.4f, dev accuracy %.3f", step, record["dev_loss"], record["dev_accuracy"])

        preempted = stop.agreed(accelerator)
        if (train_args.save_steps and step % train_args.save_steps == 0) or preempted:
            state.unreadable = gather_unreadable(accelerator, state.unreadable)
            checkpoint_state = {**position, "unreadable": sorted(state.unreadable)}
            save_checkpoint(accelerator, output_dir, step, checkpoint_state, train_args)
        if preempted:
            logger.warning("SIGTERM: saved a checkpoint at step %d; resume with --resume_from_checkpoint latest", step)
            return True
    progress.close()
    return False


# ---------------------------------------------------------------------------------------------
# 6. Save
# ---------------------------------------------------------------------------------------------


def save(accelerator, unwrapped, feature_extractor, data, base_model, args, log_path, state, gumbel_start) -> None:
    """The model, its preprocessor, the loss curve and the model card in --output_dir; then the Hub push."""
    train_args = args.training
    output_dir = Path(train_args.output_dir)
    unreadable = gather_unreadable(accelerator, state.unreadable)
    if unreadable:
        logger.warning("%d unreadable file(s) were skipped: %s", len(unreadable), ", ".join(sorted(unreadable)[:10]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        feature_extractor.save_pretrained(output_dir)
        log = read_jsonl(log_path)
        plot_losses(log, output_dir / "loss_curve.png")
        card = model_card(unwrapped, base_model, data, args, log, accelerator, sorted(unreadable), gumbel_start)
        (output_dir / "README.md").write_text(card)
        if train_args.push_to_hub:
            push_folder_to_hub(
                output_dir,
                train_args.hub_model_id or output_dir.name,
                commit_message=f"wav2vec2 pretraining, step {state.step}",
            )


def main(argv=None):
    args = parse_arguments(argv)
    model_args, train_args = args.model, args.training
    output_dir = Path(train_args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    config = load_config(model_args, args.objective)
    accelerator, trackers = make_accelerator(train_args, output_dir, config.layerdrop)
    set_seed(train_args.seed)
    feature_extractor = load_feature_extractor(model_args.config_name or model_args.model_name_or_path)
    data = build_data(args, config, feature_extractor, accelerator, output_dir)

    model, base_model, from_scratch = load_model(model_args, config)
    gumbel_start, cnn_output = prepare_for_pretraining(model, model_args, args.objective, train_args, from_scratch)

    optimizer, scheduler = make_optimizer(model, train_args)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    state = resume(accelerator, output_dir, train_args, data.train)
    log_path = start_train_log(accelerator, output_dir, state.step, args._asdict(), trackers, "pretrain")

    stop = StopSignal()
    preempted = train(
        accelerator, model, optimizer, scheduler, data, cnn_output, gumbel_start, args, log_path, state, stop
    )
    if not preempted:  # after SIGTERM a checkpoint is saved and the final save is the resumed run's
        save(accelerator, unwrapped, feature_extractor, data, base_model, args, log_path, state, gumbel_start)
        stop.release()
    del model  # the DDP wrapper must not outlive the process group: see utils.training.end_processes
    end_processes(accelerator)
    return None if preempted else output_dir


if __name__ == "__main__":
    main()
