"""The pretraining step's memory savers: the contrastive loss without a copy of the quantized vectors
per negative (utils.objective), the quantizer without a product per code and the CNN's first layer
recomputed in the backward pass (utils.step_memory). Each must give the numbers of transformers'
own loss and model."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Wav2Vec2ForPreTraining

from utils.audio import conv_frames, conv_geometry
from utils.hourglass import model_class, read_config
from utils.objective import (
    MaskAndNegatives,
    contrastive_logits,
    pretraining_forward,
    to_device,
)
from utils.step_memory import LeanGumbelQuantizer, recompute_first_conv_layer, reduce_step_memory

BATCH, SAMPLES, NEGATIVES = 3, 16000, 10


def tiny_model(seed: int = 0, name: str = "tiny-wav2vec2-base"):
    torch.manual_seed(seed)
    config = read_config(str(REPO / "configs" / name), layerdrop=0.0)
    return model_class(config, Wav2Vec2ForPreTraining)._from_config(config).train()


def drawn_batch(model, samples: int = SAMPLES) -> dict:
    """A loader's batch: random audio, masks and negatives drawn as in pretrain.py's workers."""
    frames = conv_frames(samples, *conv_geometry(model.config))
    batch = MaskAndNegatives(frames, 0.65, 2, NEGATIVES)({"crop_keys": np.array([[0, 0, i] for i in range(BATCH)])})
    batch["input_values"] = torch.randn(BATCH, samples, generator=torch.Generator().manual_seed(1))
    for key in ("mask_time_indices", "sampled_negative_indices"):
        batch[key] = torch.from_numpy(batch[key])
    return batch


def batch_for(model, samples: int = SAMPLES) -> dict:
    return to_device(drawn_batch(model, samples), "cpu")


def saved_bytes(step) -> int:
    """The bytes of the distinct storages autograd keeps for the backward pass of `step()`."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def gradients(model, loss_of) -> dict:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout and Gumbel draws for every call
    loss = loss_of()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def test_losses_and_gradients_equal_the_models_own_loss():
    model = tiny_model()
    inputs = batch_for(model)
    torch.manual_seed(2)
    own = model(**inputs)
    torch.manual_seed(2)
    ours = pretraining_forward(model, inputs, model.config)
    for name in ("loss", "contrastive_loss", "diversity_loss"):
        assert torch.allclose(ours[name], own[name], rtol=1e-5), name
    expected = gradients(model, lambda: model(**inputs).loss)
    got = gradients(model, lambda: pretraining_forward(model, inputs, model.config).loss)
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        if name.endswith("k_proj.bias"):  # zero in exact arithmetic (softmax ignores a shift): rounding only
            continue
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max()), name


@pytest.mark.parametrize("mode", ["eval", "bf16", "hourglass", "checkpointing"])
def test_the_losses_equal_the_models_own_in_every_mode(mode):
    model = tiny_model(name="tiny-wav2vec2-hourglass" if mode == "hourglass" else "tiny-wav2vec2-base")
    reduce_step_memory(model)
    model.train(mode != "eval")
    if mode == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = batch_for(model)
    losses = []
    for step in (lambda: model(**inputs), lambda: pretraining_forward(model, inputs, model.config)):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = step()
        losses.append(torch.stack([out.loss, out.contrastive_loss, out.diversity_loss]).float())
    # bf16: transformers rounds its similarities to bf16 before the temperature, we do not
    assert torch.allclose(losses[1], losses[0], rtol=2e-3 if mode == "bf16" else 1e-5), mode
    if mode in ("hourglass", "checkpointing"):
        expected = gradients(model, lambda: model(**inputs).loss)
        got = gradients(model, lambda: pretraining_forward(model, inputs, model.config).loss)
        for name, grad in expected.items():
            if not name.endswith("k_proj.bias"):
                assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max()), name


def test_a_negative_equal_to_the_true_vector_is_left_out_as_in_transformers():
    generator = torch.Generator().manual_seed(0)
    batch, frames, dim = 2, 30, 8
    codebook = torch.randn(3, dim, generator=generator)  # 3 distinct vectors: many negatives equal the positive
    quantized = codebook[torch.randint(0, 3, (batch, frames), generator=generator)]
    context = torch.randn(batch, frames, dim, generator=generator)
    transform = MaskAndNegatives(frames, 0.5, 3, NEGATIVES)
    drawn = transform({"crop_keys": np.array([[0, 0, 0], [0, 0, 1]])})
    inputs = {key: torch.from_numpy(drawn[key]) for key in ("mask_time_indices", "sampled_negative_indices")}
    out = SimpleNamespace(projected_states=context, projected_quantized_states=quantized)

    logits = contrastive_logits(out, inputs, 0.1)

    negatives = quantized.reshape(-1, dim)[inputs["sampled_negative_indices"].reshape(-1)]
    negatives = negatives.reshape(batch, frames, -1, dim).permute(2, 0, 1, 3)
    expected = Wav2Vec2ForPreTraining.compute_contrastive_logits(quantized[None], negatives, context, 0.1)
    expected[1:][(quantized == negatives).all(-1)] = float("-inf")
    expected = expected.permute(1, 2, 0)
    assert logits.shape == expected.shape == (batch, frames, NEGATIVES + 1)
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    assert 0.2 < torch.isinf(logits).float().mean() < 0.9
    finite = torch.isfinite(expected)
    assert torch.allclose(logits[finite], expected[finite], atol=1e-5)


def test_the_step_keeps_neither_a_copy_per_negative_nor_the_first_conv_layers_activations():
    model = tiny_model()
    inputs = batch_for(model)
    frames = inputs["mask_time_indices"].shape[1]
    negative_copy = (NEGATIVES + 1) * BATCH * frames * model.config.proj_codevector_dim * 4
    first_layer_frames = (SAMPLES - 10) // 5 + 1
    first_layer_output = BATCH * model.config.conv_dim[0] * first_layer_frames * 4

    own = saved_bytes(lambda: model(**inputs).loss)
    ours = saved_bytes(lambda: pretraining_forward(model, inputs, model.config).loss)
    recompute_first_conv_layer(model)
    recomputed = saved_bytes(lambda: pretraining_forward(model, inputs, model.config).loss)

    # transformers keeps the concatenated vectors and their normalised copy; the conv output and its
    # group norm are kept for the backward pass (the GELU's output is the next layer's input, kept)
    assert own - ours >= 2 * negative_copy
    assert ours - recomputed >= 1.9 * first_layer_output  # less a few small tensors the checkpoint keeps


def test_recomputing_the_first_conv_layer_leaves_the_gradients_unchanged():
    model = tiny_model()
    inputs = batch_for(model)
    expected = gradients(model, lambda: pretraining_forward(model, inputs, model.config).loss)
    recompute_first_conv_layer(model)
    recompute_first_conv_layer(model)  # a second call changes nothing
    got = gradients(model, lambda: pretraining_forward(model, inputs, model.config).loss)
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation makes (forward and backward) in its scope."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("training", [True, False])
def test_the_lean_quantizer_gives_the_same_codes_without_a_product_per_code(training):
    model = tiny_model()
    quantizer = model.quantizer.train(training)
    features = torch.randn(BATCH, 49, model.config.conv_dim[-1], generator=torch.Generator().manual_seed(3))
    mask = torch.rand(BATCH, 49, generator=torch.Generator().manual_seed(4)) < 0.5
    runs = {}
    for lean in (False, True):
        if lean:
            reduce_step_memory(model)
        assert isinstance(quantizer, LeanGumbelQuantizer) == lean
        quantizer.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with LargestTensor() as largest:
            vectors, perplexity = quantizer(features, mask_time_indices=mask)
            if training:
                (vectors.square().sum() + perplexity).backward()
        runs[lean] = vectors, perplexity, [p.grad for p in quantizer.parameters()], largest.largest
    (vectors, perplexity, grads, largest), (lean_vectors, lean_perplexity, lean_grads, lean_largest) = runs.values()
    assert torch.equal(lean_vectors, vectors) and torch.equal(lean_perplexity, perplexity)
    for grad, lean_grad in zip(grads, lean_grads):
        assert (grad is None) == (lean_grad is None) == (not training)
        assert grad is None or torch.allclose(lean_grad, grad, rtol=1e-5, atol=1e-6 * grad.abs().max())
    per_code = BATCH * 49 * model.config.num_codevector_groups * model.config.num_codevectors_per_group
    per_code *= model.config.codevector_dim // model.config.num_codevector_groups
    assert largest == per_code  # transformers' product: every code vector of every frame
    assert lean_largest <= per_code / 8


def test_negatives_from_another_crop_are_an_error():
    batch = drawn_batch(tiny_model())
    to_device(batch, "cpu")  # as drawn: no error
    batch["sampled_negative_indices"][1, 0, 0] = 0  # crop 1's first frame gets a frame of crop 0
    with pytest.raises(ValueError, match="sampled_negative_indices.*own crop"):
        to_device(batch, "cpu")
