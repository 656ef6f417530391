"""The state of a fine-tuning run: what stays fixed while it trains (Run) and where it stands between
updates (Progress: step, data position, best evaluation, unreadable files), which a checkpoint
stores and a resumed run restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import Wav2Vec2ForCTC

from utils.batches import Loaders
from utils.checkpoint_loading import load_checkpoint
from utils.ctc_arguments import CTCTrainingArguments, DataArguments, ModelArguments
from utils.ctc_corpus import Corpus
from utils.numerics import UpdateGuard


@dataclass
class Run:
    """What stays fixed while the run trains. It never holds the prepared (DDP-wrapped) model: that
    must be freed before utils.processes.end_processes, so only the script's main() and training
    loop see it."""

    model_args: ModelArguments
    data_args: DataArguments
    train_args: CTCTrainingArguments
    accelerator: object
    output_dir: Path
    corpus: Corpus
    loaders: Loaders
    unwrapped: Wav2Vec2ForCTC  # the model itself, for evaluation and saving
    log_path: Path


@dataclass
class Progress:
    step: int
    position: dict  # epoch and batch in epoch of the next training batch
    best: dict  # the evaluation of the best model so far, kept in OUTPUT_DIR/best
    unreadable: set[str]
    last_eval: dict | None = None
    guard: UpdateGuard = field(default_factory=UpdateGuard)  # skips updates with a non-finite loss or gradient

    def checkpoint_state(self, vocab: dict) -> dict:
        """What a checkpoint stores besides the weights, optimizer, scheduler and RNG states."""
        return {
            **self.position,
            "best": self.best,
            "unreadable": sorted(self.unreadable),
            "vocab": vocab,
            **self.guard.counts(),
        }


def resume(accelerator, objects: tuple, output_dir: Path, train_args, vocab: dict) -> tuple[Progress, Path | None]:
    """Step 0, or the state of --resume_from_checkpoint ((model, optimizer, scheduler) and RNG
    restored), which must have been trained with the same vocabulary; and that checkpoint."""
    state, checkpoint = load_checkpoint(accelerator, objects, output_dir, train_args)
    if checkpoint is not None:
        if state.get("vocab") != vocab:
            raise SystemExit(
                f"error: vocabulary mismatch: {checkpoint} was trained with another vocabulary "
                f"({len(state.get('vocab') or {})} tokens, this run builds {len(vocab)}): did the transcripts or --chars_to_ignore change?"
            )
    progress = Progress(
        step=state.get("step", 0),
        position={"epoch": state.get("epoch", 0), "batch_in_epoch": state.get("batch_in_epoch", 0)},
        best=state.get("best") or {},
        unreadable=set(state.get("unreadable", [])),
        guard=UpdateGuard(train_args.max_consecutive_nonfinite, output_dir).restore(state),
    )
    return progress, checkpoint
