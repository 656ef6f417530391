"""pretrain.py's train-log rows: sums over the updates since the last row, reported per masked frame
and summed over all processes, with the crop streams' counts."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from utils.cards import format_number
from utils.crops import stream_totals
from utils.training import gather_unreadable

logger = logging.getLogger(__name__)
# Beyond this share of crops that stayed silent through every redraw, the run is warned about.
SILENT_SHARE_TO_WARN = 0.5


@dataclass
class LogWindow:
    """The updates since the train log's last row: their sums (on the device) and what each update holds;
    and the crop counts of the run so far, which the row reports too."""

    sums: torch.Tensor  # loss, contrastive, diversity, masked, frames, perplexity-sum, feature penalty
    micro_batches_per_update: int  # accumulation steps x processes
    seconds_per_update: float  # of audio
    steps: int = 0
    start: float = field(default_factory=time.time)
    worker_stats: dict[int, dict] = field(default_factory=dict)  # each loader worker's crop counts so far
    warned_silent: bool = False  # the mostly-silent-corpus warning is given once per run

    def add(self, out, mask_time_indices: torch.Tensor, penalty: torch.Tensor, device) -> None:
        """One micro-batch's model output (summed losses) and feature penalty."""
        self.sums += torch.stack(
            [
                out.loss.detach().float(),
                out.contrastive_loss.detach().float(),
                out.diversity_loss.detach().float(),
                mask_time_indices.sum().float(),
                torch.tensor(float(mask_time_indices.numel()), device=device),
                out.codevector_perplexity.detach().float(),
                penalty.detach().float(),
            ]
        )

    def reset(self) -> None:
        self.sums.zero_()
        self.steps, self.start = 0, time.time()


def train_row(
    accelerator, window: LogWindow, step, temperature, lr, grad_norm, epoch, unreadable: set[str], skipped=0
):
    """The row for `step`, and the unreadable files of all processes. `skipped`: the updates skipped
    so far for a non-finite loss or gradient norm or an fp16 overflow (utils.numerics.UpdateGuard)."""
    totals = accelerator.reduce(window.sums, reduction="sum")
    stream = stream_totals(window.worker_stats)
    unreadable = gather_unreadable(accelerator, unreadable)
    stream_global = accelerator.reduce(
        torch.tensor(
            [stream.get("crops", 0), stream.get("retries", 0), stream.get("all_silent", 0)],
            device=accelerator.device,
            dtype=torch.float64,
        ),
        reduction="sum",
    )
    crops, all_silent = int(stream_global[0]), int(stream_global[2])
    if crops and all_silent / crops > SILENT_SHARE_TO_WARN and not window.warned_silent:
        window.warned_silent = True
        if accelerator.is_main_process:
            logger.warning(
                "%.0f %% of the training crops so far (%d of %d) were silent on every try (RMS below --min_rms): "
                "the corpus is mostly silence (or --min_rms is too high), and each such crop is the loudest of its tries",
                100 * all_silent / crops,
                all_silent,
                crops,
            )
    elapsed = time.time() - window.start
    record = {
        "step": step,
        "loss": (totals[0] / totals[3]).item(),
        "contrastive_loss": (totals[1] / totals[3]).item(),
        "diversity_loss": (totals[2] / totals[3]).item(),
        "loss_sum_per_update": (totals[0] / window.steps).item(),
        "codevector_perplexity": (totals[5] / (window.steps * window.micro_batches_per_update)).item(),
        "feature_penalty": (totals[6] / totals[3]).item(),
        "masked_fraction": (totals[3] / totals[4]).item(),
        "gumbel_temperature": temperature,
        "lr": lr,
        "grad_norm": float(grad_norm) if math.isfinite(grad_norm) else None,  # an fp16 overflow step
        "audio_seconds_per_second": window.seconds_per_update * window.steps / max(elapsed, 1e-9),
        "epoch": epoch,
        "crops_redrawn_silent": int(stream_global[1]),
        "crops_all_silent": int(stream_global[2]),
        "skipped_files": len(unreadable),
        "skipped_updates": skipped,
    }
    return record, unreadable


def dev_summary(record: dict) -> str:
    """The dev row for the console; a figure computed from NaN is null."""
    return f"dev loss {format_number(record['dev_loss'])}, dev accuracy {format_number(record['dev_accuracy'], 3)}"
