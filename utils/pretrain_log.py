"""pretrain.py's log rows: train rows (sums over the updates since the last row, reported per masked
frame and summed over all processes, with the crop streams' counts) and dev rows (DevSums)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from utils.cards import format_number
from utils.crops import stream_totals
from utils.objective import contrastive_correct, diversity_of, soft_code_counts
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


class DevSums:
    """One evaluation on the fixed dev crops, summed over every crop, batch and process so that its
    figures do not depend on the eval batch size or the number of processes.

    dev_contrastive_loss and dev_accuracy (the headline figures): per masked frame, over every dev crop.
    dev_diversity_loss: the diversity term of the soft code distribution over all dev masked frames at
    once (computed as in training, where it is a statistic of each batch; eval mode's argmax perplexity
    of each batch would make it depend on the batch size). dev_loss: contrastive + weight x diversity,
    composed as the train loss is.
    """

    def __init__(self, config, device):
        self.config = config
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # contrastive loss, correct, masked, crops
        self.codes = torch.zeros(
            config.num_codevector_groups, config.num_codevectors_per_group, dtype=torch.float64, device=device
        )

    def add(self, out, inputs: dict, code_logits: torch.Tensor) -> None:
        mask = inputs["mask_time_indices"]
        correct = contrastive_correct(out, inputs)
        self.sums += torch.stack(
            [
                out.contrastive_loss.double(),
                correct.double(),
                mask.sum().double(),
                torch.tensor(float(len(mask)), dtype=torch.float64, device=mask.device),
            ]
        )
        self.codes += soft_code_counts(code_logits, mask, self.config.num_codevector_groups).double()

    def row(self, accelerator, step: int) -> dict:
        sums = accelerator.reduce(self.sums, reduction="sum").tolist()
        perplexity, diversity = diversity_of(accelerator.reduce(self.codes, reduction="sum"))
        contrastive = sums[0] / sums[2]
        return {
            "step": step,
            "dev_contrastive_loss": contrastive,
            "dev_accuracy": sums[1] / sums[2],
            "dev_diversity_loss": diversity,
            "dev_loss": contrastive + self.config.diversity_loss_weight * diversity,
            "dev_codevector_perplexity": perplexity,
            "dev_crops": int(sums[3]),
            "dev_masked_frames": int(sums[2]),
        }


def describe_dev_row(record: dict) -> str:
    """The log line of a dev row: which figure is which."""
    return (
        f"step {record['step']}: dev contrastive loss {format_number(record['dev_contrastive_loss'])} and accuracy "
        f"{format_number(record['dev_accuracy'], 3)} per masked frame over all {record['dev_crops']} dev crops "
        f"(the headline{'; n/a: computed from NaN or Inf' if record['dev_contrastive_loss'] is None else ''}); "
        f"dev loss {format_number(record['dev_loss'])} (+ diversity of the codes over the whole dev set)"
    )
