"""Memory savers of the pretraining step that leave its numbers as they are: transformers' Gumbel
quantizer looks up the code vectors through a (frames, groups x codes, dim / groups) product
(1 GB in the forward pass and 2-3 GB in the backward pass for a batch of 8 x 8 s of wav2vec2-base,
the peak of the whole step), and the CNN's first layer keeps the largest activations of the step.
pretrain.py and bench/train_throughput.py call reduce_step_memory on the model they train."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer


class LeanGumbelQuantizer(Wav2Vec2GumbelVectorQuantizer):
    """transformers' quantizer (the same draws, codes, perplexity and parameters) with the code
    vectors looked up by a matrix product per group. The forward values are bit-identical: each
    group's (straight-through) one-hot picks one code vector (unless TF32 is allowed for fp32 matmuls,
    which then round this product as they do the model's other ones)."""

    def forward(self, hidden_states, mask_time_indices=None):
        batch_size, sequence_length, _ = hidden_states.shape
        frames, groups = batch_size * sequence_length, self.num_groups
        logits = self.weight_proj(hidden_states).view(frames * groups, -1)
        if self.training:
            probs = torch.nn.functional.gumbel_softmax(logits.float(), tau=self.temperature, hard=True)
            probs = probs.type_as(logits)
            soft = torch.softmax(logits.view(frames, groups, -1).float(), dim=-1)
            perplexity = self._compute_perplexity(soft, mask_time_indices)
        else:
            probs = logits.new_zeros(logits.shape).scatter_(-1, logits.argmax(dim=-1).view(-1, 1), 1.0)
            perplexity = self._compute_perplexity(probs.view(frames, groups, -1), mask_time_indices)
        with torch.autocast(hidden_states.device.type, enabled=False):  # fp32, as the model's product is
            codebook = self.codevectors.view(groups, self.num_vars, -1).float()
            codevectors = torch.bmm(probs.view(frames, groups, -1).float().transpose(0, 1), codebook)
        return codevectors.transpose(0, 1).reshape(batch_size, sequence_length, -1), perplexity


def recompute_first_conv_layer(model) -> None:
    """The CNN's first layer recomputed in the backward pass instead of keeping its activations: at
    512 channels every 5 samples they are the largest the step keeps (3 tensors, 1.2 GB of a batch of
    8 x 8 s in fp32), for well under 1 % of its compute. Exact (the layer has no dropout); with
    gradient checkpointing on, the model's own checkpointing already does this."""
    layer = model.wav2vec2.feature_extractor.conv_layers[0]
    if getattr(layer, "recomputed", False):  # already (a second call would nest the checkpoints)
        return
    forward = layer.forward

    def recomputed(hidden_states):
        if layer.training and torch.is_grad_enabled() and not layer.gradient_checkpointing:
            return checkpoint(forward, hidden_states, use_reentrant=False, preserve_rng_state=False)
        return forward(hidden_states)

    layer.forward, layer.recomputed = recomputed, True


def reduce_step_memory(model) -> None:
    """Both savers on a Wav2Vec2ForPreTraining model (standard or Hourglass), in place; the weights,
    their names and what is saved are unchanged."""
    if type(model.quantizer) is Wav2Vec2GumbelVectorQuantizer:  # not another quantizer of the same name
        model.quantizer.__class__ = LeanGumbelQuantizer
    if model.wav2vec2.feature_extractor._requires_grad:  # a frozen CNN keeps no activations
        recompute_first_conv_layer(model)
