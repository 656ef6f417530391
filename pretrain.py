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
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, get_scheduler

from utils.cards import push_folder_to_hub
from utils.checkpoint_loading import load_checkpoint
from utils.checkpoints import check_start_weights, save_checkpoint
from utils.crops import CropStream, exit_on_unreadable
from utils.dataset_recordings import dataset_recordings
from utils.hourglass import model_class, read_config
from utils.manifests import (
    parse_weighted_manifests,
    read_manifest,
    scan_audio_folder,
    split_by_participant,
    write_manifests,
)
from utils.numerics import UpdateGuard, null_if_nonfinite
from utils.objective import (
    MaskAndNegatives,
    code_logits_of,
    crop_frames,
    feature_penalty,
    gumbel_temperature,
    pretraining_forward,
    to_device,
)
from utils.pretrain_arguments import (
    Arguments,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    apply_config_overrides,
    resolve_objective_defaults,
)
from utils.pretrain_card import model_card, plot_losses
from utils.pretrain_log import DevSums, LogWindow, describe_dev_row, train_row
from utils.pretrain_probes import PROBE_WAIT_MINUTES, probe_final, probe_start, read_probe_segments
from utils.probe_data import ProbeData
from utils.processes import StopSignal, end_processes
from utils.progress import progress_bar
from utils.run_folder import claim_output_dir
from utils.step_memory import reduce_step_memory
from utils.training import (
    TrainingArguments,
    append_jsonl,
    gather_unreadable,
    load_feature_extractor,
    make_accelerator,
    make_loader,
    optimizer_param_groups,
    parse_args_with_recipe,
    read_jsonl,
    start_train_log,
)
from utils.training_health import HealthMonitor

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
    if data.audio_dir or data.dataset_name:
        if data.train_manifest or data.dev_manifest or (data.audio_dir and data.dataset_name):
            raise ValueError(
                "give either --audio_dir or --train_manifest/--dev_manifest, not both (or --dataset_name alone)"
            )
        if data.dataset_name:  # its eval split, or participants split off (utils/dataset_recordings.py)
            train, dev, invalid = dataset_recordings(data, seed)
        else:
            valid, invalid = scan_audio_folder(data.audio_dir, data.participant_regex)
            train, dev = split_by_participant(valid, data.dev_fraction, seed)
        for bad in invalid:
            logger.warning("leaving out %s: %s", bad["path"], bad["reason"])
        if is_main:  # the split that was used, as data/prepare_manifest.py writes it, for the card and for reruns
            write_manifests(output_dir / "manifests", train, dev, invalid)
        source = f"--dataset_name {data.dataset_name}" if data.dataset_name else f"--audio_dir {data.audio_dir}"
        return [(train, 1.0)], [f"{source} (train split)"], dev or None
    if not data.train_manifest:
        raise ValueError("give --train_manifest (TSV from data/prepare_manifest.py), --audio_dir or --dataset_name")
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
    probes: ProbeData | None = None  # --probe_segments, read and split before training


def build_data(args: Arguments, config, feature_extractor, accelerator, output_dir: Path) -> PretrainingData:
    """Train crops drawn afresh every epoch, fixed dev crops; each process reads its own share."""
    data_args, objective, train_args = args.data, args.objective, args.training
    num_frames = crop_frames(data_args.crop_seconds, config, objective.mask_time_length)
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
    probes = (
        read_probe_segments(data_args.probe_segments, data_args.participant_regex, train_args.seed)
        if data_args.probe_segments
        else None
    )
    return PretrainingData(train_stream, dev_stream, train_sources, train_names, dev_rows, probes)


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
    check_start_weights(model_args.model_name_or_path, model_args.config_name)
    config = apply_config_overrides(config, model_args.config_overrides)
    if objective.mask_time_prob <= 0:
        raise SystemExit("error: --mask_time_prob must be above 0: the contrastive task predicts masked frames")
    # The objective is ours, whatever the checkpoint's config says: time masks from the workers
    # (the model only applies them with apply_spec_augment), no feature masking.
    config.apply_spec_augment, config.mask_time_prob, config.mask_feature_prob = True, objective.mask_time_prob, 0.0
    return config


def load_model(model_args: ModelArguments, config: Wav2Vec2Config) -> tuple[Wav2Vec2ForPreTraining, str]:
    """The model (random init with --config_name) and its base model for the card."""
    if model_args.config_name:
        model = model_class(config, Wav2Vec2ForPreTraining)._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
        return model, f"random init from {model_args.config_name}"
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
    return model, model_args.model_name_or_path


def prepare_for_pretraining(model, model_args, objective, train_args):
    """The objective's settings (resolved for the model's family) in the model's config, the feature
    encoder's gradient hooks and gradient checkpointing. Returns the Gumbel schedule's first step, and
    the dict the feature penalty reads the CNN features from (None: no penalty)."""
    # The model's forward reads these three; the masking flags are ours (masks come from the workers).
    model.config.num_negatives = objective.num_negatives
    model.config.contrastive_logits_temperature = objective.contrastive_temperature
    model.config.diversity_loss_weight = objective.diversity_loss_weight
    gumbel_start = objective.gumbel_start_step

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
    reduce_step_memory(model)
    return gumbel_start, cnn_output


# ---------------------------------------------------------------------------------------------
# 4. Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(step: int, unwrapped, dev_stream: CropStream, accelerator, num_workers, cnn_output, log_path) -> dict:
    """The dev figures on every fixed dev crop and mask (utils.pretrain_log.DevSums says which is which), logged."""
    unwrapped.eval()  # the bare module, as in finetune_ctc.py: no gradients, so nothing for DDP to do
    sums = DevSums(unwrapped.config, accelerator.device)
    with torch.no_grad(), code_logits_of(unwrapped) as code_logits:
        for batch in exit_on_unreadable(make_loader(dev_stream, num_workers, batch_size=None)):
            inputs = to_device(batch, accelerator.device)
            sums.add(pretraining_forward(unwrapped, inputs, unwrapped.config), inputs, code_logits.pop())
    if cnn_output is not None:
        cnn_output.clear()
    record = sums.row(accelerator, step)
    unwrapped.train()
    null_if_nonfinite(record)  # NaN outputs gave dev accuracy 1.0
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
    """Where the run stands: its last applied update, the unreadable files met (by this process, or by
    all once gathered), the updates skipped for non-finite numbers, and its training health."""

    step: int = 0
    unreadable: set[str] = field(default_factory=set)
    guard: UpdateGuard = field(default_factory=UpdateGuard)
    health: HealthMonitor | None = None


def resume(
    accelerator, objects, output_dir: Path, train_args: TrainingArguments, train_stream: CropStream
) -> LoopState:
    """A fresh start, or the state of --resume_from_checkpoint with the train stream moved to its position."""
    guard = UpdateGuard(train_args.max_consecutive_nonfinite, output_dir)
    state, checkpoint = load_checkpoint(accelerator, objects, output_dir, train_args)
    if checkpoint is None:
        return LoopState(guard=guard)
    train_stream.start_at(state["epoch"], state["batch_in_epoch"])
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        checkpoint,
        state["step"],
        state["epoch"],
        state["batch_in_epoch"],
    )
    return LoopState(state["step"], set(state.get("unreadable", [])), guard.restore(state))


def update(accelerator, model, optimizer, micro_batches, window: LogWindow, cnn_output, args, state: LoopState):
    """One optimizer update on the micro-batches, their sums in the window, unless the guard skips it (a NaN
    or Inf loss or gradient norm, an fp16 overflow). Returns the gradient norm and whether it was applied."""
    objective, train_args, config = args.objective, args.training, accelerator.unwrap_model(model).config
    accumulation = train_args.gradient_accumulation_steps
    masked_here = sum(int(b["mask_time_indices"].sum()) for b in micro_batches)
    total_masked = accelerator.reduce(torch.tensor(float(masked_here), device=accelerator.device), reduction="sum")
    # The summed loss divided by the masked frames of the whole effective batch. DDP averages
    # gradients over processes and accelerator.backward divides by the accumulation steps:
    # both are undone so every masked frame of the update weighs the same.
    loss_scale = accelerator.num_processes * accumulation / total_masked
    before = window.sums.clone()
    for batch in micro_batches:
        inputs = to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            out = pretraining_forward(model, inputs, config)
            penalty = (
                feature_penalty(cnn_output.pop("features"), inputs["mask_time_indices"])
                if cnn_output is not None
                else torch.zeros((), device=accelerator.device)
            )
            accelerator.backward((out.loss + objective.feature_penalty_weight * penalty) * loss_scale)
            if accelerator.sync_gradients:  # --max_grad_norm 0: no clipping, the norm is still logged
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm or math.inf)
        window.add(out, inputs["mask_time_indices"], penalty, accelerator.device)
    return grad_norm, state.guard.step(accelerator, optimizer, grad_norm, window.sums, before, state.step)


def train(accelerator, model, optimizer, scheduler, data, cnn_output, gumbel_start, args, log_path, state, stop):
    """The updates up to --max_train_steps, with train-log rows, dev evaluations and checkpoints. Returns
    True if no final model is to be saved: SIGTERM (after a checkpoint), or state.guard stopped the run."""
    data_args, objective, train_args = args.data, args.objective, args.training
    output_dir, unwrapped = Path(train_args.output_dir), accelerator.unwrap_model(model)
    accumulation = train_args.gradient_accumulation_steps
    batches = exit_on_unreadable(make_loader(data.train, train_args.num_workers, batch_size=None))
    window = LogWindow(
        torch.zeros(7, device=accelerator.device),
        accumulation * accelerator.num_processes,
        data_args.crop_seconds * train_args.per_device_train_batch_size * accumulation * accelerator.num_processes,
    )
    progress = progress_bar(
        train_args.max_train_steps,
        "pretrain",
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        interval=train_args.progress_interval,
    )
    evaluation = (unwrapped, data.dev, accelerator, train_args.num_workers, cnn_output, log_path)
    if data.dev is not None and state.step == 0 and train_args.eval_steps:
        evaluate(0, *evaluation)
    model.train()
    while state.step < train_args.max_train_steps and not state.guard.stopped:
        temperature = gumbel_temperature(objective, gumbel_start + state.step)
        unwrapped.set_gumbel_temperature(temperature)
        micro_batches = [next(batches) for _ in range(accumulation)]
        for batch in micro_batches:
            window.worker_stats[batch["worker"]] = batch["stream_stats"]
            state.unreadable.update(batch["new_unreadable"])
        last = micro_batches[-1]
        position = {"epoch": int(last["epoch"]), "batch_in_epoch": int(last["batch_in_epoch"]) + 1}
        grad_norm, applied = update(accelerator, model, optimizer, micro_batches, window, cnn_output, args, state)
        if not applied:  # skipped: step, LR and Gumbel schedules and the step budget count applied updates only
            continue
        state.step = step = state.step + 1
        scheduler.step()
        window.steps += 1
        progress.update(1)

        if step % train_args.logging_steps == 0 or step == train_args.max_train_steps:
            lr, epoch = scheduler.get_last_lr()[0], position["epoch"]
            record, state.unreadable = train_row(
                accelerator, window, step, temperature, lr, grad_norm, epoch, state.unreadable, state.guard.skipped
            )
            state.health.observe(record)  # the same rows on every process: a warning puts `health` in the row
            if accelerator.is_main_process:
                append_jsonl(log_path, record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}",
                lr=f"{record['lr']:.2e}",
                skipped=record["skipped_files"],
                health=",".join(state.health.warned) or "ok",
            )
            window.reset()

        if (
            data.dev is not None
            and train_args.eval_steps
            and (step % train_args.eval_steps == 0 or step == train_args.max_train_steps)
        ):
            record = evaluate(step, *evaluation)
            logger.info(describe_dev_row(record))

        preempted = stop.agreed(accelerator)
        if (train_args.save_steps and step % train_args.save_steps == 0) or preempted or state.health.stop:
            state.unreadable = gather_unreadable(accelerator, state.unreadable)
            checkpoint_state = {**position, "unreadable": sorted(state.unreadable), **state.guard.counts()}
            save_checkpoint(accelerator, (model, optimizer, scheduler), output_dir, step, checkpoint_state, train_args)
        if state.health.stop:  # --stop_on_collapse: ends the loop as the guard's stop does, no final model
            state.guard.message = state.health.error(output_dir)
        if preempted:
            logger.warning("SIGTERM: saved a checkpoint at step %d; resume with --resume_from_checkpoint latest", step)
            return True
    progress.close()
    return state.guard.finish(unwrapped)  # True: no final model (non-finite updates or weights)


# ---------------------------------------------------------------------------------------------
# 6. Save
# ---------------------------------------------------------------------------------------------


def save(accelerator, unwrapped, feature_extractor, data, base_model, args, log_path, state, defaults) -> None:
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
        card = model_card(unwrapped, base_model, data, args, log, accelerator, sorted(unreadable), defaults)
        if data.probes:
            card += "\n## Linear probes\n\n" + probe_final(unwrapped, feature_extractor, data.probes, output_dir)
        (output_dir / "README.md").write_text(card)
        if train_args.push_to_hub:
            repo_id = train_args.hub_model_id or output_dir.resolve().name
            message = f"wav2vec2 pretraining, step {state.step}"
            push_folder_to_hub(output_dir, repo_id, train_args.hub_private_repo, message)


def main(argv=None):
    args = parse_arguments(argv)
    model_args, train_args = args.model, args.training
    output_dir = Path(train_args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    config = load_config(model_args, args.objective)
    objective_defaults = resolve_objective_defaults(model_args, args.objective, config)  # logged, and in the card
    # --probe_segments: the other processes wait while the main one probes the start model.
    wait = PROBE_WAIT_MINUTES if args.data.probe_segments else 0
    accelerator, trackers = make_accelerator(train_args, output_dir, config.layerdrop, wait)
    claim_output_dir(accelerator, "pretrain.py", args)  # never write over another run
    set_seed(train_args.seed)
    feature_extractor = load_feature_extractor(model_args.config_name or model_args.model_name_or_path)
    data = build_data(args, config, feature_extractor, accelerator, output_dir)

    model, base_model = load_model(model_args, config)
    gumbel_start, cnn_output = prepare_for_pretraining(model, model_args, args.objective, train_args)

    optimizer, scheduler = make_optimizer(model, train_args)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    state = resume(accelerator, (model, optimizer, scheduler), output_dir, train_args, data.train)
    log_path = start_train_log(accelerator, output_dir, state.step, args._asdict(), trackers, "pretrain")
    if data.probes and state.step == 0 and accelerator.is_main_process:  # the model before its first update
        probe_start(unwrapped, feature_extractor, data.probes, output_dir)
    accelerator.wait_for_everyone()  # the log is cut back to the checkpoint's step before any process reads it
    state.health = HealthMonitor(args, config, read_jsonl(log_path), accelerator.is_main_process)

    stop = StopSignal()
    preempted = train(
        accelerator, model, optimizer, scheduler, data, cnn_output, gumbel_start, args, log_path, state, stop
    )
    if not preempted:  # after SIGTERM a checkpoint is saved and the final save is the resumed run's
        save(accelerator, unwrapped, feature_extractor, data, base_model, args, log_path, state, objective_defaults)
    stop.release()  # SIGTERM ends the process again, preempted or not: a launcher can stop a stuck exit
    del model  # the DDP wrapper must not outlive the process group: see utils.processes.end_processes
    end_processes(accelerator)
    state.guard.raise_if_stopped()
    return None if preempted else output_dir


if __name__ == "__main__":
    main()
