"""The Hourglass wav2vec 2.0 encoder (Nawrot et al. 2021, arXiv 2110.13711; NVIDIA's wav2vec2 recipe).

`hourglass: "[2,(8,4),2]"` in the model config: 2 transformer layers at the full frame rate (50 Hz),
then the sequence is shortened by average pooling over 4 frames and 8 layers run at 12.5 Hz, then
each shortened frame is repeated 4 times, the full-rate state from before the shortening is added
back (a residual), and 2 more layers run at 50 Hz. Attention is quadratic in the sequence length,
so the middle layers cost far less. The conv feature encoder, the masks, the negatives, the
quantizer and the CTC head all work at 50 Hz as in the standard model: only the middle of the
transformer stack is shortened. Factor 1 is the standard encoder (no pooling, no residual).

Pooling respects the attention mask: a shortened frame is the mean of the real frames among its
`factor` frames (the tail is padded up to a multiple of `factor` and the padding is never counted),
and it is padding itself only when all of them are. So padding a batch never changes a real frame.

Hidden states (`output_hidden_states=True`) are all on the 50 Hz grid: hidden state i of a
shortened layer is that layer's output with each shortened frame repeated `factor` times (frame t
holds the state of pooled group t // factor), without the residual; the input of the first
full-rate layer after the hourglass is the last of those plus the residual.

The weights have the standard names (encoder.layers.0 ... L-1): a standard checkpoint loads into an
hourglass model and the other way round (the numbers then mean something else). Saved hourglass
models carry this file and load anywhere with
`AutoModel.from_pretrained(path, trust_remote_code=True)` (also AutoModelForPreTraining,
AutoModelForCTC); importing this module registers the classes with the Auto classes, so our
scripts need no flag. This file travels with the models, so it imports only torch and transformers.
"""

from __future__ import annotations

import ast

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCTC,
    AutoModelForPreTraining,
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
    Wav2Vec2ForPreTraining,
    Wav2Vec2Model,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.integrations.fsdp import is_fsdp_managed_module
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2Encoder, Wav2Vec2EncoderStableLayerNorm

MODEL_TYPE = "hourglass_wav2vec2"
_FILE = __name__.rsplit(".", 1)[-1]  # saved models hold this file under its own name


def parse_hourglass(spec) -> tuple[int, int, int, int]:
    """'[2,(8,4),2]' -> (layers before, shortened layers, factor, layers after). Raises ValueError."""
    try:
        value = ast.literal_eval(spec) if isinstance(spec, str) else spec
        before, (middle, factor), after = value
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(f"hourglass {spec!r}: expected '[layers, (shortened layers, factor), layers]'") from None
    numbers = (before, middle, factor, after)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in numbers):
        # The first layers see the full rate before pooling mixes frames; the last ones give the
        # model a full-rate output (and hidden state 0 is the full-rate input).
        raise ValueError(f"hourglass {spec!r}: every layer count and the factor must be whole numbers >= 1")
    return numbers


def format_hourglass(before: int, middle: int, factor: int, after: int) -> str:
    return f"[{before},({middle},{factor}),{after}]"


class HourglassWav2Vec2Config(Wav2Vec2Config):
    """Wav2Vec2Config with `hourglass` (null: the standard encoder)."""

    model_type = MODEL_TYPE
    hourglass: str | None = None

    def __post_init__(self, **kwargs):
        if self.hourglass is not None:
            self.hourglass = format_hourglass(*parse_hourglass(self.hourglass))
            check_layers(self)
        # So the saved config names the classes of the file that travels with the model.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": f"{_FILE}.HourglassWav2Vec2Config",
                "AutoModel": f"{_FILE}.HourglassWav2Vec2Model",
                "AutoModelForPreTraining": f"{_FILE}.HourglassWav2Vec2ForPreTraining",
                "AutoModelForCTC": f"{_FILE}.HourglassWav2Vec2ForCTC",
            },
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.hourglass is not None:
            check_layers(self)


def check_layers(config) -> None:
    before, middle, _, after = parse_hourglass(config.hourglass)
    if before + middle + after != config.num_hidden_layers:
        raise ValueError(
            f"hourglass {config.hourglass} has {before + middle + after} layers but num_hidden_layers is "
            f"{config.num_hidden_layers}: set both"
        )


def shorten(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, factor: int):
    """Mean of every `factor` frames, over real frames only; the tail is padded to a multiple of
    `factor`. Returns the shortened states and their mask (None when there was none)."""
    batch, length, dim = hidden_states.shape
    pad = -length % factor
    valid = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
    if attention_mask is not None:
        valid = attention_mask.bool()
    # where(), not a product: a padded frame's state never reaches the sum, not even as NaN * 0.
    summed = torch.where(valid[..., None], hidden_states, 0.0)
    summed = torch.nn.functional.pad(summed, (0, 0, 0, pad)).view(batch, -1, factor, dim).sum(2)
    counts = torch.nn.functional.pad(valid, (0, pad)).view(batch, -1, factor).sum(2)
    pooled = summed / counts.clamp(min=1).to(summed.dtype)[..., None]
    return pooled, (counts > 0 if attention_mask is not None else None)


def lengthen(hidden_states: torch.Tensor, factor: int, length: int) -> torch.Tensor:
    """Each frame repeated `factor` times, cut to `length` frames."""
    return hidden_states.repeat_interleave(factor, dim=1)[:, :length]


def run_layers(encoder, layers, hidden_states, attention_mask, **kwargs):
    """The layers in turn, with LayerDrop as transformers' encoder applies it."""
    synced_gpus = is_deepspeed_zero3_enabled() or is_fsdp_managed_module(encoder)
    for layer in layers:
        skip = encoder.training and encoder.config.layerdrop > 0.0 and torch.rand([]) < encoder.config.layerdrop
        if not skip or synced_gpus:
            hidden_states = layer(hidden_states, attention_mask=attention_mask, **kwargs)
    return hidden_states


def run_hourglass(encoder, hidden_states, attention_mask, **kwargs):
    """The transformer layers of `encoder` as an hourglass; `attention_mask` is the 2-D frame mask.
    A stack cut short (extract_features.py drops the layers above the last one it saves) runs the
    layers it has."""
    before, middle, factor, _ = encoder.hourglass
    config, layers = encoder.config, encoder.layers
    full_mask = create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    if factor == 1 or len(layers) <= before:
        return run_layers(encoder, layers, hidden_states, full_mask, **kwargs)
    hidden_states = run_layers(encoder, layers[:before], hidden_states, full_mask, **kwargs)
    residual = hidden_states
    short, short_frames = shorten(hidden_states, attention_mask, factor)
    short_mask = create_bidirectional_mask(config=config, inputs_embeds=short, attention_mask=short_frames)
    short = run_layers(encoder, layers[before : before + middle], short, short_mask, **kwargs)
    hidden_states = lengthen(short, factor, residual.shape[1]) + residual
    return run_layers(encoder, layers[before + middle :], hidden_states, full_mask, **kwargs)


def _zero_padding(hidden_states, attention_mask):
    if attention_mask is not None:  # as transformers' encoders do: padded frames enter as zeros
        hidden_states[~attention_mask.unsqueeze(-1).repeat(1, 1, hidden_states.shape[2])] = 0
    return hidden_states


class HourglassWav2Vec2Encoder(Wav2Vec2Encoder):
    """Post-layer-norm encoder (wav2vec2-base): the same modules, layers run as an hourglass."""

    def __init__(self, config):
        super().__init__(config)
        self.hourglass = parse_hourglass(config.hourglass)  # parsed once: forward stays plain tensor code

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        hidden_states = _zero_padding(hidden_states, attention_mask)
        position_embeddings = self.pos_conv_embed(hidden_states)
        hidden_states = hidden_states + position_embeddings.to(hidden_states.device)
        hidden_states = self.dropout(self.layer_norm(hidden_states))
        return BaseModelOutput(last_hidden_state=run_hourglass(self, hidden_states, attention_mask, **kwargs))


class HourglassWav2Vec2EncoderStableLayerNorm(Wav2Vec2EncoderStableLayerNorm):
    """Pre-layer-norm encoder (large-lv60, large-robust, XLS-R), layers run as an hourglass."""

    def __init__(self, config):
        super().__init__(config)
        self.hourglass = parse_hourglass(config.hourglass)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        hidden_states = _zero_padding(hidden_states, attention_mask)
        hidden_states = self.dropout(hidden_states + self.pos_conv_embed(hidden_states))
        hidden_states = run_hourglass(self, hidden_states, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden_states))


class HourglassWav2Vec2Model(Wav2Vec2Model):
    config_class = HourglassWav2Vec2Config

    def __init__(self, config: HourglassWav2Vec2Config):
        super().__init__(config)
        if config.hourglass is not None:
            check_layers(config)
            encoder_class = (
                HourglassWav2Vec2EncoderStableLayerNorm if config.do_stable_layer_norm else HourglassWav2Vec2Encoder
            )
            self.encoder = encoder_class(config)
            self.post_init()  # initialises the new encoder only: the rest is marked initialised

    def forward(self, input_values, attention_mask=None, mask_time_indices=None, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        outputs = super().forward(
            input_values,
            attention_mask=attention_mask,
            mask_time_indices=mask_time_indices,
            return_dict=True,
            **kwargs,
        )
        if outputs.hidden_states is not None and self.config.hourglass is not None:
            factor, length = self.encoder.hourglass[2], outputs.last_hidden_state.shape[1]
            outputs["hidden_states"] = tuple(
                state if state is None or state.shape[1] == length else lengthen(state, factor, length)
                for state in outputs.hidden_states
            )
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return outputs.to_tuple()
        return outputs


class HourglassWav2Vec2ForPreTraining(Wav2Vec2ForPreTraining):
    config_class = HourglassWav2Vec2Config

    def __init__(self, config: HourglassWav2Vec2Config):
        super().__init__(config)
        self.wav2vec2 = HourglassWav2Vec2Model(config)
        self.post_init()


class HourglassWav2Vec2ForCTC(Wav2Vec2ForCTC):
    config_class = HourglassWav2Vec2Config

    def __init__(self, config: HourglassWav2Vec2Config, target_lang: str | None = None):
        super().__init__(config, target_lang=target_lang)
        self.wav2vec2 = HourglassWav2Vec2Model(config)
        self.post_init()


HOURGLASS_CLASSES = {
    Wav2Vec2Model: (HourglassWav2Vec2Model, AutoModel),
    Wav2Vec2ForPreTraining: (HourglassWav2Vec2ForPreTraining, AutoModelForPreTraining),
    Wav2Vec2ForCTC: (HourglassWav2Vec2ForCTC, AutoModelForCTC),
}
HourglassWav2Vec2Config.register_for_auto_class()
AutoConfig.register(MODEL_TYPE, HourglassWav2Vec2Config, exist_ok=True)
for hourglass_class, auto_class in HOURGLASS_CLASSES.values():
    hourglass_class.register_for_auto_class(auto_class.__name__)
    auto_class.register(HourglassWav2Vec2Config, hourglass_class, exist_ok=True)


def model_class(config, standard_class):
    """The class to build `config` with: the hourglass variant of `standard_class` for an hourglass config."""
    return HOURGLASS_CLASSES[standard_class][0] if isinstance(config, HourglassWav2Vec2Config) else standard_class


def with_encoder(config):
    """`config` as the class its `hourglass` field asks for (set, e.g., by --config_overrides
    hourglass=[2,(8,4),2], or null); raises ValueError for a malformed one."""
    hourglass = getattr(config, "hourglass", None)
    if isinstance(hourglass, str) and hourglass.strip().lower() in ("", "null", "none"):
        hourglass = None
    if hourglass is None and type(config) is Wav2Vec2Config and not hasattr(config, "hourglass"):
        return config  # rebuilt otherwise, so that no 'hourglass' key is saved with a standard model
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "auto_map", "hourglass")}
    return Wav2Vec2Config(**fields) if hourglass is None else HourglassWav2Vec2Config(hourglass=hourglass, **fields)


def read_config(source: str, **overrides):
    """A model folder's or hub id's config, HourglassWav2Vec2Config for an hourglass model."""
    config_dict, _ = Wav2Vec2Config.get_config_dict(source)
    hourglass = config_dict.get("model_type") == MODEL_TYPE or config_dict.get("hourglass") is not None
    config_class = HourglassWav2Vec2Config if hourglass else Wav2Vec2Config
    return config_class.from_pretrained(source, **overrides)
