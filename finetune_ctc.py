"""CTC fine-tuning of a wav2vec 2.0 encoder for speech recognition, with WER/CER evaluation.

    accelerate launch finetune_ctc.py [recipe.yaml] --model_name_or_path runs/home-pretrained \\
        --train_manifest labelled/train.tsv --dev_manifest labelled/dev.tsv --output_dir runs/home-ctc
    python transcribe.py --model_name_or_path runs/home-ctc recording.flac other.wav

The encoder (a pretrain.py output folder, any wav2vec2 checkpoint, or a random init from
`--config_name`) gets a CTC head for the characters of the training transcripts, its bias set so
that the blank starts out likely. Data: manifests with `path` and `text` (optional `start`/`end`
seconds of a longer recording, `participant`; without `--dev_manifest` whole participants are split
off for dev) or a Hugging Face dataset. Unreadable files are skipped and counted, never fatal.
Batches group similar lengths and are a pure function of (seed, epoch), so a resumed run continues
exactly. The CTC loss is summed over the whole update and divided by its target characters. The
model with the lowest dev WER is left in OUTPUT_DIR with its processor, eval_results.json,
train_log.jsonl and a model card.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor, get_scheduler

from utils.audio import TARGET_SAMPLE_RATE, conv_geometry
from utils.batches import make_loaders
from utils.cards import format_number, push_folder_to_hub
from utils.checkpoints import check_start_weights, save_checkpoint, save_model_folder
from utils.ctc import blank_bias, check_ctc_head, ctc_loss_sum, evaluate_ctc, time_mask_indices
from utils.ctc_arguments import CTCTrainingArguments, DataArguments, ModelArguments, config_overrides
from utils.ctc_card import eval_results, model_card, write_eval_results
from utils.ctc_corpus import Corpus, select_training_utterances, stop_if_all_unreadable, summarize_data, write_split
from utils.ctc_run import Progress, Run, resume
from utils.dataset_utterances import dataset_utterances
from utils.hourglass import model_class, read_config
from utils.processes import StopSignal, end_processes
from utils.progress import progress_bar
from utils.run_folder import claim_output_dir
from utils.training import (
    append_jsonl,
    gather_unreadable,
    load_feature_extractor,
    make_accelerator,
    optimizer_param_groups,
    parse_args_with_recipe,
    read_jsonl,
    start_train_log,
)
from utils.utterances import manifest_utterances
from utils.vocabulary import load_tokenizer

logger = logging.getLogger("finetune_ctc")


# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------


def parse_arguments(argv=None):
    """(model, data, training) arguments from an optional recipe and the command line, checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["transcribe"]:  # the subcommand of earlier versions
        raise SystemExit(
            "error: transcription moved to transcribe.py: python transcribe.py "
            + (shlex.join(argv[1:]) or "--model_name_or_path MODEL FILES")
        )
    model_args, data_args, train_args = parse_args_with_recipe(
        [ModelArguments, DataArguments, CTCTrainingArguments], argv
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if data_args.long_utterances not in ("alone", "skip"):
        raise SystemExit(f"error: --long_utterances must be 'alone' or 'skip', not {data_args.long_utterances!r}")
    if not 0 <= model_args.initial_blank_probability < 1:
        raise SystemExit(
            f"error: --initial_blank_probability must be in [0, 1), not {model_args.initial_blank_probability}"
        )
    return model_args, data_args, train_args


# ---------------------------------------------------------------------------------------------
# 2. Data and vocabulary
# ---------------------------------------------------------------------------------------------


def load_corpus(model_args, data_args, seed: int) -> Corpus:
    """Utterances, vocabulary, config and processor; a problem found here stops the run with one clear error."""
    model_source = model_args.config_name or model_args.model_name_or_path
    dataset_splits = None
    try:
        if data_args.dataset_name:
            train_rows, dev_rows, unreadable_rows, dev_origin, dataset_splits = dataset_utterances(data_args, seed)
        else:
            train_rows, dev_rows, unreadable_rows, dev_origin = manifest_utterances(data_args, seed)
        tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, train_rows, dev_rows)
        check_start_weights(model_args.model_name_or_path, model_args.config_name)
        try:
            config = read_config(model_source)
        except OSError as error:
            flag = "--config_name" if model_args.config_name else "--model_name_or_path"
            raise ValueError(
                f"{flag} {model_source}: no wav2vec2 config could be loaded ({str(error).strip().splitlines()[0]})"
            ) from None
        check_ctc_head(model_source, config, tokenizer, model_args.new_ctc_head)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    vocab = tokenizer.get_vocab()
    processor = Wav2Vec2Processor(feature_extractor=load_feature_extractor(model_source), tokenizer=tokenizer)
    for row in train_rows + dev_rows:
        row["labels"] = tokenizer(row["text"]).input_ids
    return Corpus(
        train_rows, dev_rows, unreadable_rows, dev_origin, dataset_splits, tokenizer, processor, config, vocab
    )


# ---------------------------------------------------------------------------------------------
# 3. Model
# ---------------------------------------------------------------------------------------------


def build_model(model_args, train_args, corpus: Corpus) -> tuple[Wav2Vec2ForCTC, str]:
    """The encoder with a CTC head for the vocabulary, and the name of what it started from."""
    overrides = config_overrides(model_args, len(corpus.vocab), corpus.tokenizer.pad_token_id)
    if model_args.config_name:
        config = read_config(model_args.config_name, **overrides)
        model = model_class(config, Wav2Vec2ForCTC)._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
        base_model, loading = f"random init from {model_args.config_name}", {"missing_keys": []}
    else:
        # A plain from_pretrained: a local folder is a model to start from, never a checkpoint to
        # resume (resuming is --resume_from_checkpoint's job only).
        model, loading = model_class(corpus.config, Wav2Vec2ForCTC).from_pretrained(
            model_args.model_name_or_path,
            attn_implementation=model_args.attn_implementation,
            ignore_mismatched_sizes=model_args.new_ctc_head,
            output_loading_info=True,
            **overrides,
        )
        fresh_encoder = [k for k in loading["missing_keys"] if k.startswith("wav2vec2.")]
        if fresh_encoder:
            logger.warning(
                "%s lacks %d encoder weight(s) (e.g. %s): they start random",
                model_args.model_name_or_path,
                len(fresh_encoder),
                fresh_encoder[0],
            )
        if model_args.new_ctc_head:
            torch.nn.init.normal_(model.lm_head.weight, std=model.config.initializer_range)
            torch.nn.init.zeros_(model.lm_head.bias)
        base_model = model_args.model_name_or_path
    new_head = bool(model_args.config_name or model_args.new_ctc_head or "lm_head.weight" in loading["missing_keys"])
    if new_head and model_args.initial_blank_probability > 0:
        with torch.no_grad():
            model.lm_head.bias.zero_()
            model.lm_head.bias[corpus.tokenizer.pad_token_id] = blank_bias(
                model_args.initial_blank_probability, len(corpus.vocab)
            )
    if model_args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    if model_args.mask_time_prob == 0 and getattr(model.wav2vec2, "masked_spec_embed", None) is not None:
        # Only time masking uses it (feature masking zeroes): a trained parameter without a gradient stops DDP.
        model.wav2vec2.masked_spec_embed.requires_grad_(False)
    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info(
        "model: %s, %.2f M parameters (%.2f M trained), attention mask: %s",
        base_model,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "yes"
        if corpus.processor.feature_extractor.return_attention_mask
        else "no (zero padding, as the model was pretrained)",
    )
    return model, base_model


# ---------------------------------------------------------------------------------------------
# 4. Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(run: Run, step: int, unreadable: set[str]) -> dict | None:
    """Greedy decoding of the dev set; WER and CER over all of it (jiwer)."""
    texts, examples = [r["text"] for r in run.corpus.dev_rows], run.data_args.eval_examples_to_log
    scores = evaluate_ctc(
        run.unwrapped, run.loaders, texts, run.corpus.tokenizer, run.accelerator, unreadable, examples
    )
    if scores is None:
        logger.warning("step %d: no dev utterance could be read, nothing evaluated", step)
        return None
    result = {"step": step, **scores}
    logger.info(
        "step %d: dev WER %s, CER %s, loss %s (%d utterances)",  # null: computed from NaN or Inf outputs
        step,
        format_number(result["eval_wer"]),
        format_number(result["eval_cer"]),
        format_number(result["eval_loss"]),
        result["eval_utterances"],
    )
    for example in result["examples"]:
        logger.info("  ref: %s\n  hyp: %s", example["ref"], example["hyp"])
    return result


def keep_if_best(run: Run, result: dict | None, best: dict) -> dict:
    """The best evaluation so far (lowest WER, then CER); a new best has its model saved in OUTPUT_DIR/best.
    A null WER (from non-finite outputs) is never the best."""
    if result is None or result["eval_wer"] is None:
        return best
    if best and (result["eval_wer"], result["eval_cer"]) >= (best["eval_wer"], best["eval_cer"]):
        return best
    best = {k: v for k, v in result.items() if k != "examples"}
    if run.accelerator.is_main_process:
        extra_files = {"eval_results.json": json.dumps(best, indent=2) + "\n"}
        save_model_folder(run.output_dir / "best", run.unwrapped, run.corpus.processor, extra_files)
    run.accelerator.wait_for_everyone()
    return best


# ---------------------------------------------------------------------------------------------
# 5. Training loop
# ---------------------------------------------------------------------------------------------


def train(run: Run, model, optimizer, scheduler, state: Progress, stop: StopSignal) -> bool:
    """Updates up to --max_train_steps with logging, evaluation and checkpoints; True if no final model is to
    be saved: SIGTERM stopped it (a checkpoint was saved), or state.guard did."""
    accelerator, train_args = run.accelerator, run.train_args
    accumulation = train_args.gradient_accumulation_steps
    epoch, batch_in_epoch = state.position["epoch"], state.position["batch_in_epoch"]
    positions = run.loaders.plan.iterate(epoch, batch_in_epoch)
    batches = iter(run.loaders.train(epoch, batch_in_epoch))
    # Sums since the last log row: loss, characters, audio samples, padded samples, utterances.
    window = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    window_steps, window_start, grad_norm = 0, time.time(), None
    progress = progress_bar(
        train_args.max_train_steps,
        "finetune_ctc",
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        interval=train_args.progress_interval,
    )
    model.train()
    while state.step < train_args.max_train_steps and not state.guard.stopped:
        micro_batches = next_micro_batches(positions, batches, accumulation, state)
        stop_if_all_unreadable(run.corpus, state.unreadable)
        targets_here = sum(int((b["labels"] >= 0).sum()) for b in micro_batches)
        total_targets = accelerator.reduce(
            torch.tensor(float(targets_here), device=accelerator.device), reduction="sum"
        )
        # The summed loss divided by the target characters of the whole effective batch. DDP averages
        # gradients over processes and accelerator.backward divides by the accumulation steps: both
        # are undone so every character of the update weighs the same.
        loss_scale = accelerator.num_processes * accumulation / total_targets.clamp(min=1)
        before = window.clone()
        for batch in micro_batches:
            grad_norm = train_micro_batch(run, model, optimizer, batch, loss_scale, window, grad_norm)
        # A NaN or Inf loss or gradient norm, or an fp16 overflow: no step, and no step of the schedule or budget.
        if not state.guard.step(accelerator, optimizer, grad_norm, window, before, state.step):
            continue
        state.step = step = state.step + 1
        scheduler.step()
        window_steps += 1
        progress.update(1)

        if step % train_args.logging_steps == 0 or step == train_args.max_train_steps:
            record = log_window(run, state, scheduler, window, window_steps, window_start, grad_norm)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", skipped=record["skipped_files"]
            )
            window.zero_()
            window_steps, window_start = 0, time.time()

        if run.corpus.dev_rows and (
            (train_args.eval_steps and step % train_args.eval_steps == 0) or step == train_args.max_train_steps
        ):
            state.last_eval = evaluate(run, step, state.unreadable)
            if state.last_eval is not None:
                if accelerator.is_main_process:
                    append_jsonl(run.log_path, state.last_eval)
                accelerator.log({k: v for k, v in state.last_eval.items() if k != "examples"}, step=step)
                state.best = keep_if_best(run, state.last_eval, state.best)
            window_start = time.time()  # evaluation time is not training throughput

        preempted = stop.agreed(accelerator)
        if (train_args.save_steps and step % train_args.save_steps == 0) or preempted:
            state.unreadable = gather_unreadable(accelerator, state.unreadable)
            checkpoint_state = state.checkpoint_state(run.corpus.vocab)
            save_checkpoint(
                accelerator, (model, optimizer, scheduler), run.output_dir, step, checkpoint_state, train_args
            )
        if preempted:
            logger.warning("SIGTERM: saved a checkpoint at step %d; resume with --resume_from_checkpoint latest", step)
            return True
    progress.close()
    return state.guard.finish(run.unwrapped)  # True: no final model (non-finite updates or weights)


def next_micro_batches(positions, batches, accumulation: int, state: Progress) -> list[dict]:
    """The batches of one update; each unreadable file is reported once and counted."""
    micro_batches = []
    for _ in range(accumulation):
        epoch, index, _ = next(positions)
        batch = next(batches)
        for path, reason in batch["failed"]:
            if path not in state.unreadable:
                logger.warning("skipping unreadable utterance %s: %s", path, reason)
            state.unreadable.add(path)
        micro_batches.append(batch)
    state.position = {"epoch": epoch, "batch_in_epoch": index + 1}
    return micro_batches


def train_micro_batch(run: Run, model, optimizer, batch: dict, loss_scale, window, grad_norm):
    """Forward and backward of one micro-batch (the optimizer steps after the update's last one, in
    train()); its sums are added to `window`. Returns the gradient norm, new if gradients were synced."""
    accelerator, model_args, unwrapped = run.accelerator, run.model_args, run.unwrapped
    empty = not batch["indices"]
    if empty:  # every file of this batch failed: a silent stand-in keeps the processes in step
        batch = run.loaders.collate(
            [{"index": -1, "input_values": np.zeros(TARGET_SAMPLE_RATE, dtype=np.float32), "labels": []}]
        )
    inputs = batch["input_values"].to(accelerator.device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(accelerator.device) if run.loaders.collate.use_attention_mask else None
    frames = unwrapped._get_feat_extract_output_lengths(batch["input_lengths"])
    extra = {}
    if model_args.mask_time_prob > 0:  # SpecAugment, on the real frames only
        spans = time_mask_indices(
            inputs.shape[1],
            frames,
            conv_geometry(run.corpus.config),
            model_args.mask_time_prob,
            model_args.mask_time_length,
            unwrapped.config.mask_time_min_masks,
        )
        extra["mask_time_indices"] = torch.from_numpy(spans).to(accelerator.device)
    with accelerator.accumulate(model):
        logits = model(inputs, attention_mask=attention_mask, **extra).logits
        labels = batch["labels"].to(accelerator.device)
        blank = run.corpus.tokenizer.pad_token_id
        loss_sum = ctc_loss_sum(logits, frames.to(accelerator.device), labels, blank, model_args.ctc_zero_infinity)
        if empty:
            loss_sum = loss_sum * 0.0
        accelerator.backward(loss_sum * loss_scale)
        if accelerator.sync_gradients:  # --max_grad_norm 0: no clipping, the norm is still logged
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.train_args.max_grad_norm or math.inf)
    if not empty:
        real_samples = float(batch["input_lengths"].sum())
        window += torch.stack(
            [
                loss_sum.detach().double(),
                (labels >= 0).sum().double(),
                torch.tensor(real_samples, device=accelerator.device),
                torch.tensor(inputs.numel() - real_samples, device=accelerator.device),
                torch.tensor(float(len(batch["indices"])), device=accelerator.device),
            ]
        ).double()
    return grad_norm


def log_window(run: Run, state: Progress, scheduler, window, window_steps: int, window_start: float, grad_norm):
    """One train_log.jsonl row (and tracker entry) for the updates since the last one."""
    accelerator = run.accelerator
    totals = accelerator.reduce(window, reduction="sum")
    state.unreadable = gather_unreadable(accelerator, state.unreadable)
    elapsed = time.time() - window_start
    record = {
        "step": state.step,
        "loss": (totals[0] / totals[1].clamp(min=1)).item(),
        "lr": scheduler.get_last_lr()[0],
        # None: an fp16 overflow step
        "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(grad_norm) else None,
        "epoch": state.position["epoch"] + state.position["batch_in_epoch"] / run.loaders.plan.batches_per_epoch,
        "audio_seconds_per_second": (totals[2] / TARGET_SAMPLE_RATE / max(elapsed, 1e-9)).item(),
        "padding_fraction": (totals[3] / (totals[2] + totals[3]).clamp(min=1)).item(),
        "utterances_per_update": (totals[4] / window_steps).item(),
        "skipped_files": len(state.unreadable),
        "skipped_updates": state.guard.skipped,
    }
    if accelerator.is_main_process:
        append_jsonl(run.log_path, record)
    accelerator.log({k: v for k, v in record.items() if v is not None}, step=state.step)
    return record


# ---------------------------------------------------------------------------------------------
# 6. Save
# ---------------------------------------------------------------------------------------------


def save_outputs(run: Run, state: Progress, data_summary: dict, base_model: str) -> None:
    """The best model (or the last) in OUTPUT_DIR with eval_results.json and the model card; pushed if asked."""
    accelerator, output_dir, train_args = run.accelerator, run.output_dir, run.train_args
    step = state.step
    if run.corpus.dev_rows and state.last_eval is None:  # nothing trained (resumed at the end): still score the model
        state.last_eval = evaluate(run, step, state.unreadable)
        state.best = keep_if_best(run, state.last_eval, state.best)
    state.unreadable = gather_unreadable(accelerator, state.unreadable)
    unreadable = state.unreadable
    if unreadable:
        logger.warning("%d unreadable file(s) were skipped: %s", len(unreadable), ", ".join(sorted(unreadable)[:10]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        kept = place_model(run, state.best, state.last_eval)
        results = eval_results(kept, step, data_summary, unreadable)
        write_eval_results(output_dir, results, unreadable)
        (output_dir / "README.md").write_text(
            model_card(
                run.unwrapped,
                base_model,
                results,
                run.model_args,
                run.data_args,
                train_args,
                read_jsonl(run.log_path),
                accelerator,
            ),
            encoding="utf-8",
        )
        if results["wer"] is not None:
            logger.info(
                "dev WER %.4f, CER %.4f (%d utterances), model of step %d saved in %s",
                results["wer"],
                results["cer"],
                results["eval_utterances"],
                results["model_step"],
                output_dir,
            )
        if train_args.push_to_hub:
            repo_id = train_args.hub_model_id or output_dir.resolve().name
            push_folder_to_hub(output_dir, repo_id, train_args.hub_private_repo, f"CTC fine-tuning, step {step}")
    accelerator.wait_for_everyone()


def place_model(run: Run, best: dict, last_eval: dict | None) -> dict | None:
    """Move the model that is the result into OUTPUT_DIR; returns its evaluation (None if it has none).

    The model with the lowest dev WER is the result: its folder is moved into place. Without one
    (no dev set, or a run resumed from another output folder) the last model is. A finished run
    resumed again (a resubmitted job script) finds its best model already in place, moved there at
    the end of the first completion: it stays.
    """
    output_dir = run.output_dir
    best_folder, results_file = output_dir / "best", output_dir / "eval_results.json"
    earlier = json.loads(results_file.read_text()) if results_file.is_file() else {}
    best_in_place = (
        bool(best)
        and not best_folder.is_dir()
        and earlier.get("model_step") == best["step"]
        and (output_dir / "model.safetensors").is_file()
    )
    kept = best if best and (best_folder.is_dir() or best_in_place) else last_eval
    source = None if best_in_place else best_folder if best and best_folder.is_dir() else output_dir / ".final"
    if source is not None:
        if source.name == ".final":
            save_model_folder(source, run.unwrapped, run.corpus.processor)
        for item in source.iterdir():
            if (output_dir / item.name).is_dir():
                shutil.rmtree(output_dir / item.name)
            os.replace(item, output_dir / item.name)
        source.rmdir()
    return kept


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    model_args, data_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    accelerator, trackers = make_accelerator(train_args, output_dir, model_args.layerdrop)
    claim_output_dir(accelerator, "finetune_ctc.py", (model_args, data_args, train_args))  # never over another run
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)  # one copy of the progress messages, from the main process
    set_seed(train_args.seed, device_specific=True)  # SpecAugment spans and dropout differ between processes

    corpus = load_corpus(model_args, data_args, train_args.seed)
    long_train, too_short = select_training_utterances(corpus, data_args)
    if accelerator.is_main_process and corpus.dev_rows and not data_args.dev_manifest and not data_args.dataset_name:
        write_split(corpus, output_dir / "manifests")
    data_summary = summarize_data(corpus, data_args, long_train, too_short)
    logger.info("data: %s", json.dumps(data_summary))
    model, base_model = build_model(model_args, train_args, corpus)
    loaders = make_loaders(corpus, model.config, model_args, data_args, train_args, accelerator)

    optimizer = torch.optim.AdamW(optimizer_param_groups(model, train_args.weight_decay), lr=train_args.learning_rate)
    # Stepped by hand once per update: accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(
        train_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=train_args.warmup_steps,
        num_training_steps=train_args.max_train_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    state, checkpoint = resume(accelerator, (model, optimizer, scheduler), output_dir, train_args, corpus.vocab)
    if checkpoint is not None:
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.step, *state.position.values()
        )
    log_path = start_train_log(
        accelerator,
        output_dir,
        state.step,
        {"model": model_args, "data": data_args, "training": train_args},
        trackers,
        "finetune_ctc",
        extra={"data_summary": data_summary},
    )
    run = Run(model_args, data_args, train_args, accelerator, output_dir, corpus, loaders, unwrapped, log_path)

    stop = StopSignal()
    preempted = train(run, model, optimizer, scheduler, state, stop)
    if not preempted:  # after SIGTERM a checkpoint is saved and the final save is the resumed run's
        save_outputs(run, state, data_summary, base_model)
    stop.release()  # SIGTERM ends the process again, preempted or not: a launcher can stop a stuck exit
    del model  # the DDP wrapper must not outlive the process group: see utils.processes.end_processes
    end_processes(accelerator)
    state.guard.raise_if_stopped()
    return None if preempted else output_dir


if __name__ == "__main__":
    main()
