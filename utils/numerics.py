"""Guards against non-finite numbers. One NaN or Inf sample makes every loss, gradient and weight of a
run NaN, and figures computed from NaN can look real (a NaN logit wins every comparison). So: audio
with non-finite samples is reported and left out; an update whose loss or gradient norm is not finite
is skipped and counted, and too many in a row stop the run; weights that are not finite are never
saved; metrics computed from non-finite values are reported as null."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from utils.audio import TARGET_SAMPLE_RATE

logger = logging.getLogger(__name__)

NONFINITE_SAMPLES = "non-finite samples"
# Only float-sample files can hold NaN or Inf; integer PCM and lossy codecs decode to finite values.
FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}


def nonfinite_samples(samples: np.ndarray, start_seconds: float = 0.0, sample_rate: int = TARGET_SAMPLE_RATE):
    """None if every sample (frames, or frames x channels) is finite; else the reason to report."""
    finite = np.isfinite(samples)
    if finite.all():
        return None
    first = int(np.argmin(finite.reshape(len(finite), -1).all(axis=1)))
    return f"{NONFINITE_SAMPLES} (NaN or Inf at {start_seconds + first / sample_rate:.3f} s)"


def require_finite_samples(samples: np.ndarray, start_seconds: float = 0.0, sample_rate: int = TARGET_SAMPLE_RATE):
    """Raise ValueError (which the data loaders count as an unreadable file) if a sample is NaN or Inf."""
    reason = nonfinite_samples(samples, start_seconds, sample_rate)
    if reason:
        raise ValueError(reason)
    return samples


def scan_float_file(audio: sf.SoundFile, block_frames: int = 1 << 20) -> str | None:
    """For a float-sample file, read as float32 (as training does) in blocks: the reason if any sample
    is NaN or Inf, else None. Other files are not read: they cannot hold such samples."""
    if audio.subtype not in FLOAT_SUBTYPES:
        return None
    audio.seek(0)
    for index, block in enumerate(audio.blocks(blocksize=block_frames, dtype="float32", always_2d=True)):
        reason = nonfinite_samples(block, index * block_frames / audio.samplerate, audio.samplerate)
        if reason:
            return reason
    return None


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point weights and buffers that hold a NaN or Inf."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def null_if_nonfinite(record: dict, keys=None) -> dict:
    """Set every metric in `keys` (default: every float of `record`) to None, in place, if any of them
    is not finite: they come from the same outputs, and NaN outputs give real-looking figures."""
    keys = [k for k, v in record.items() if isinstance(v, float)] if keys is None else keys
    if any(isinstance(record[k], float) and not math.isfinite(record[k]) for k in keys):
        record.update(dict.fromkeys(keys))
    return record


def kept_checkpoint(output_dir) -> str:
    from utils.checkpoints import list_checkpoints  # checkpoints imports this module

    found = list_checkpoints(output_dir) if output_dir is not None else []
    if not found:
        return "no checkpoint had been saved"
    return f"the last good checkpoint, {found[-1]}, is kept (--resume_from_checkpoint latest)"


class UpdateGuard:
    """Applies an update only if its numbers are finite, and counts those it skips.

    An update is skipped when a loss sum it added to the log window (on any process) or its gradient
    norm is NaN or Inf, or when the fp16 grad scaler skipped the optimizer step (an overflow). A
    skipped update changes no weight and no optimizer state, and its sums leave the log window; the
    caller then neither steps the scheduler nor counts a step, so `step`, the Gumbel schedule and the
    --max_train_steps budget count applied updates only, as in fairseq. After `max_consecutive`
    skips in a row the run must stop: `stopped` is set and `raise_if_stopped()` ends it with the message.
    """

    def __init__(self, max_consecutive: int = 20, output_dir: Path | None = None, skipped: int = 0):
        self.max_consecutive, self.output_dir, self.skipped = max_consecutive, output_dir, skipped
        self.consecutive, self.message = 0, None

    @property
    def stopped(self) -> bool:
        return self.message is not None

    def step(self, accelerator, optimizer, grad_norm, sums: torch.Tensor, before: torch.Tensor, step: int) -> bool:
        """Call after the update's last backward and clip_grad_norm_ (which unscales fp16 gradients),
        with the log window's sums before and after the update. Returns whether it was applied."""
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=sums.device).reshape(1)
        numbers = torch.cat([(sums - before).float().reshape(-1), norm])
        flag = (~torch.isfinite(numbers)).any().float().reshape(1)
        if accelerator.num_processes > 1:  # every process must take the same decision
            flag = accelerator.reduce(flag, reduction="sum")
        finite = flag.item() == 0
        if finite:
            optimizer.step()
        elif accelerator.scaler is not None:  # it found the Inf when unscaling: lower the scale, take no step
            accelerator.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if finite and not accelerator.optimizer_step_was_skipped:
            self.consecutive = 0
            return True
        sums.copy_(before)
        self.skipped += 1
        self.consecutive += 1
        cause = "fp16 overflow" if finite else f"non-finite loss or gradient norm ({float(norm):g})"
        if accelerator.is_main_process:
            logger.warning(
                "update after step %d skipped: %s (%d in a row, %d in all)",
                step,
                cause,
                self.consecutive,
                self.skipped,
            )
        if self.consecutive >= self.max_consecutive:
            self.message = (
                f"error: {self.consecutive} updates in a row skipped after step {step} (--max_consecutive_nonfinite): "
                f"the last for a {cause}. The run stops without saving a model; {kept_checkpoint(self.output_dir)}. "
                "Look for audio that is NaN, Inf or clipped, lower --learning_rate, or train in bf16 or fp32"
            )
        return False

    def counts(self) -> dict:
        """What a checkpoint stores of the guard."""
        return {"skipped_updates": self.skipped}

    def restore(self, checkpoint_state: dict) -> UpdateGuard:
        self.skipped = checkpoint_state.get("skipped_updates", 0)
        return self

    def finish(self, model) -> bool:
        """True if the run must end without saving a final model: stopped, or weights not finite."""
        bad = [] if self.stopped else nonfinite_tensors(model)
        if bad:
            self.message = (
                f"error: {len(bad)} weight tensor(s) of the final model hold NaN or Inf (e.g. {bad[0]}): "
                f"not saved; {kept_checkpoint(self.output_dir)}"
            )
        return self.stopped

    def raise_if_stopped(self) -> None:
        if self.message:
            raise SystemExit(self.message)
