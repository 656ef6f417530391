"""The wav2vec 2.0 pretraining objective around transformers' model: the values of each model family,
masks and negatives drawn per crop, the Gumbel temperature schedule, the contrastive and diversity
losses (computed here, in less memory than the model's own), fairseq's feature penalty, contrastive
accuracy, and the soft code distribution the diversity term is computed from."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from utils.audio import TARGET_SAMPLE_RATE, conv_frames, conv_geometry


@dataclass(frozen=True)
class FamilyRecipe:
    """The objective a model family was pretrained with in fairseq, which a continued run keeps.
    `pretrained_updates`: where the Gumbel schedule of a continued run starts; the original runs
    ended there with the temperature at its floor, and starting there keeps the quantizer from being
    re-heated (transformers resets it to 2.0 on load) and scrambling the codebook it learned."""

    family: str
    source: str
    feature_penalty_weight: float
    feature_grad_mult: float
    min_gumbel_temperature: float
    pretrained_updates: int


# Keyed by config.feat_extract_norm: group norm in the CNN is wav2vec2-base's design, layer norm
# (with stable layer norm) that of large-lv60, large-robust and XLS-R. Sources in README.md.
FAMILY_RECIPES = {
    "group": FamilyRecipe(
        "group-norm (wav2vec2-base)", "fairseq wav2vec2_base_librispeech.yaml", 10.0, 0.1, 0.5, 400_000
    ),
    "layer": FamilyRecipe(
        "layer-norm (wav2vec2-large-lv60, large-robust, XLS-R)",
        "fairseq wav2vec2_large_librivox.yaml",
        0.0,
        1.0,
        0.1,
        1_000_000,
    ),
}


def family_recipe(config) -> FamilyRecipe:
    return FAMILY_RECIPES[config.feat_extract_norm]


def crop_frames(crop_seconds: float, config, mask_time_length: int) -> int:
    """The encoder frames of one --crop_seconds crop; SystemExit unless a --mask_time_length span fits in them."""
    if not (math.isfinite(crop_seconds) and crop_seconds > 0):
        raise SystemExit(f"error: --crop_seconds must be a positive number of seconds, not {crop_seconds}")
    if mask_time_length < 1:
        raise SystemExit(f"error: --mask_time_length must be at least 1 frame, not {mask_time_length}")
    receptive_field, stride = conv_geometry(config)
    frames = conv_frames(round(crop_seconds * TARGET_SAMPLE_RATE), receptive_field, stride)
    if frames <= mask_time_length:  # transformers' mask sampler fails on a span longer than the crop
        shortest = (receptive_field + mask_time_length * stride) / TARGET_SAMPLE_RATE
        raise SystemExit(
            f"error: --crop_seconds {crop_seconds} gives {frames} frame(s) (the model's receptive field is "
            f"{receptive_field} samples, a frame every {stride} after it): a masked span of --mask_time_length "
            f"{mask_time_length} needs more frames than that, at least {shortest:g} s of crop"
        )
    return frames


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


def to_device(batch: dict, device) -> dict:
    """The model inputs of a MaskAndNegatives batch, on the device."""
    check_negatives(batch)
    return {
        "input_values": batch["input_values"].to(device, non_blocking=True),
        "mask_time_indices": batch["mask_time_indices"].to(device, non_blocking=True),
        "sampled_negative_indices": batch["sampled_negative_indices"].to(device, non_blocking=True),
    }


@contextmanager
def numpy_global_seed(key):
    state = np.random.get_state()
    np.random.seed(np.random.SeedSequence([int(k) for k in key] + [3]).generate_state(1)[0])
    try:
        yield
    finally:
        np.random.set_state(state)


def gumbel_temperature(args, step: int) -> float:
    """`args`: pretrain.py's ObjectiveArguments (max/min_gumbel_temperature, gumbel_temperature_decay)."""
    return max(args.max_gumbel_temperature * args.gumbel_temperature_decay**step, args.min_gumbel_temperature)


def feature_penalty(features: torch.Tensor, mask_time_indices: torch.Tensor) -> torch.Tensor:
    """Each crop's mean square CNN feature, times its masked frames, summed like the model's loss:
    divided by the update's masked frames, it does not depend on how the update is split."""
    per_crop = features.float().pow(2).mean(dim=(1, 2))
    return (per_crop * mask_time_indices.sum(1)).sum()


def contrastive_logits(out, inputs: dict, temperature: float) -> torch.Tensor:
    """(batch, frames, 1 + negatives): the cosine similarity of each frame's context vector to its
    true quantized vector (column 0) and to its negatives, over the temperature; a negative equal to
    the true vector is -inf. Only masked frames count in the loss; all are computed, since picking them
    out would wait for the GPU in mid-step. The numbers of transformers' loss, without its (negatives, batch,
    frames, dim) copy of the quantized vectors (0.95 GB of the saved activations of a batch of 8 x 8 s
    with 100 negatives): each crop's context vectors are compared with all its quantized vectors at
    once, frames x frames, and the negatives picked from that. A frame's negatives are frames of its
    own crop (flat indices crop x frames + frame), as MaskAndNegatives and transformers draw them."""
    context, quantized = out.projected_states, out.projected_quantized_states
    batch, frames, _ = quantized.shape
    rows = torch.arange(batch, device=quantized.device)[:, None, None] * frames
    negatives = inputs["sampled_negative_indices"].long().reshape(batch, frames, -1) - rows
    # fp32 under autocast too (transformers rounds its similarities back to fp16/bf16 before the temperature)
    with torch.autocast(quantized.device.type, enabled=False):
        unit_context = F.normalize(context.float(), dim=-1, eps=1e-8)
        unit_quantized = F.normalize(quantized.float(), dim=-1, eps=1e-8)
        similarity = torch.bmm(unit_context, unit_quantized.transpose(1, 2))  # (batch, frames, frames)
    with torch.no_grad():  # a negative equal to the true vector (low code usage) is no negative; crop by crop
        same = torch.stack([(crop[picks] == crop[:, None]).all(-1) for crop, picks in zip(quantized, negatives)])
    negative = similarity.gather(2, negatives).masked_fill(same, float("-inf"))
    return torch.cat([similarity.diagonal(dim1=1, dim2=2)[..., None], negative], dim=-1) / temperature


def check_negatives(batch: dict) -> None:
    """ValueError unless every negative is a frame of its own crop, which contrastive_logits needs."""
    negatives, frames = np.asarray(batch["sampled_negative_indices"]), np.asarray(batch["mask_time_indices"]).shape[1]
    local = negatives.reshape(len(negatives), frames, -1) - np.arange(len(negatives))[:, None, None] * frames
    if local.size and (local.min() < 0 or local.max() >= frames):
        raise ValueError("sampled_negative_indices: a frame's negatives must be frames of its own crop")


def pretraining_forward(model, inputs: dict, config):
    """The model's output on a MaskAndNegatives batch, with the losses summed over the masked frames
    as transformers' model computes them (loss = contrastive_loss + diversity_loss_weight x
    diversity_loss), from contrastive_logits, which it keeps as out.contrastive_logits (for
    contrastive_correct). `config`: the model's."""
    out = model(inputs["input_values"], mask_time_indices=inputs["mask_time_indices"])
    out.contrastive_logits = contrastive_logits(out, inputs, config.contrastive_logits_temperature)
    targets = torch.where(inputs["mask_time_indices"].bool(), 0, -100).flatten()  # -100: not a masked frame
    out.contrastive_loss = F.cross_entropy(out.contrastive_logits.flatten(0, 1), targets, reduction="sum")
    codes = config.num_codevector_groups * config.num_codevectors_per_group
    out.diversity_loss = (codes - out.codevector_perplexity) / codes * inputs["mask_time_indices"].sum()
    out.loss = out.contrastive_loss + config.diversity_loss_weight * out.diversity_loss
    return out


def contrastive_correct(out, inputs: dict) -> torch.Tensor:
    """Masked frames whose true quantized vector scores above all its negatives (`out`: pretraining_forward's)."""
    best = out.contrastive_logits.detach().argmax(-1)
    return ((best == 0) & inputs["mask_time_indices"].bool()).sum()


@contextmanager
def code_logits_of(model):
    """Collects the quantizer's code logits (batch, frames, groups x codes) of each forward pass."""
    captured: list[torch.Tensor] = []
    hook = model.quantizer.weight_proj.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        hook.remove()


def soft_code_counts(code_logits: torch.Tensor, mask_time_indices: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(groups, codes): the softmax code probabilities summed over the masked frames, the distribution
    the model's diversity term is computed from in training (not eval mode's argmax)."""
    probs = code_logits.float().reshape(*code_logits.shape[:2], num_groups, -1).softmax(-1)
    return (probs * mask_time_indices.bool()[..., None, None]).sum(dim=(0, 1))


def diversity_of(code_counts: torch.Tensor) -> tuple[float, float]:
    """(code perplexity, diversity term) of summed code probabilities, as transformers computes them
    from a batch: perplexity exp(entropy) of each group's mean distribution, summed over groups."""
    marginal = code_counts / code_counts.sum(-1, keepdim=True).clamp(min=1e-12)
    perplexity = torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum()
    return perplexity.item(), (code_counts.numel() - perplexity).item() / code_counts.numel()
