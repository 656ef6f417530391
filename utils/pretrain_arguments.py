"""The flags of pretrain.py: model (checkpoint or config, config overrides, feature-encoder
gradients), data (manifests or a folder to scan, crops), objective (masks, negatives, loss weights,
Gumbel schedule, training health), and the shared training-loop flags. A YAML recipe may set any of
them (utils.training).
apply_config_overrides is what --config_overrides does to the model config; resolve_objective_defaults
turns the 'auto' objective flags into the values of the model's family."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import yaml

from utils.hourglass import with_encoder
from utils.manifests import DEFAULT_PARTICIPANT_REGEX
from utils.objective import family_recipe
from utils.training import TrainingArguments

logger = logging.getLogger(__name__)
AUTO = "auto"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default="facebook/wav2vec2-base",
        metadata={"help": "Wav2Vec2ForPreTraining checkpoint (hub id or local folder) to continue from."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config folder to train from scratch (random init); overrides model_name_or_path."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma list of config changes, e.g. 'layerdrop=0.05,hidden_dropout=0.1'; 'hourglass=[2,(8,4),2]' makes the encoder an Hourglass (README)."
        },
    )
    feature_grad_mult: str = field(
        default=AUTO,
        metadata={
            "help": "Scale of the CNN feature encoder's gradients; auto: 0.1 for group-norm models (base), 1 (untouched) for layer-norm ones (large, robust, XLS-R), as fairseq."
        },
    )
    freeze_feature_encoder: bool = field(default=False, metadata={"help": "Train the transformer and quantizer only."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2 or flex_attention."}
    )


@dataclass
class DataArguments:
    train_manifest: str | None = field(
        default=None,
        metadata={"help": "TSV from data/prepare_manifest.py, or several with weights: 'home.tsv:0.7,read.tsv:0.3'."},
    )
    dev_manifest: str | None = field(default=None, metadata={"help": "Dev TSV(s) for evaluation on fixed crops."})
    audio_dir: str | None = field(
        default=None, metadata={"help": "Instead of manifests: scan this folder and split it by participant."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Instead of manifests: a Hugging Face dataset of recordings (hub id, local folder such as an audiofolder, or a save_to_disk folder)."
        },
    )
    dataset_config_name: str | None = field(default=None)
    train_split_name: str = field(default="train")
    eval_split_name: str = field(
        default="validation",
        metadata={
            "help": "Dev split; without it (or naming the train split) participants are split off by --dev_fraction."
        },
    )
    audio_column_name: str = field(default="audio")
    participant_column_name: str | None = field(
        default=None, metadata={"help": "With --dataset_name: the participant column (else --participant_regex)."}
    )
    participant_regex: str = field(
        default=DEFAULT_PARTICIPANT_REGEX,
        metadata={
            "help": "With --audio_dir (or --dataset_name without --participant_column_name): regex on the file name whose first group is the participant id."
        },
    )
    dev_fraction: float = field(
        default=0.1, metadata={"help": "With --audio_dir or --dataset_name: share of audio hours for dev."}
    )
    crop_seconds: float = field(default=8.0)
    min_rms: float = field(default=0.001, metadata={"help": "Crops quieter than this are redrawn."})
    max_crop_retries: int = field(default=10)
    epoch_multiplier: int = field(default=10, metadata={"help": "Crops per file per epoch."})
    crops_by_duration: bool = field(
        default=False, metadata={"help": "Share an epoch's crops out in proportion to file duration instead."}
    )
    dev_crops_per_file: int = field(default=8, metadata={"help": "Fixed dev crops per dev file."})
    probe_segments: str | None = field(
        default=None,
        metadata={
            "help": "A labelled-segments TSV (path, start, end, label[, participant]; see probe.py): linear probes of the start and the final model on held-out participants, in OUT/probes/ and the model card."
        },
    )


@dataclass
class ObjectiveArguments:
    mask_time_prob: float = field(
        default=0.65,
        metadata={"help": "Share of frames that start a masked span (fairseq: 0.65 -> ~49%% of frames masked)."},
    )
    mask_time_length: int = field(default=10, metadata={"help": "Frames per masked span."})
    num_negatives: int = field(default=100)
    contrastive_temperature: float = field(default=0.1)
    diversity_loss_weight: float = field(default=0.1)
    feature_penalty_weight: str = field(
        default=AUTO,
        metadata={
            "help": "Weight of the mean square of the CNN features in the loss (transformers' model has no such term); auto: 10 for group-norm models, 0 for layer-norm ones, as fairseq."
        },
    )
    max_gumbel_temperature: float = field(default=2.0)
    min_gumbel_temperature: str = field(
        default=AUTO,
        metadata={"help": "Floor of the Gumbel schedule; auto: 0.5 for group-norm models, 0.1 for layer-norm ones."},
    )
    gumbel_temperature_decay: float = field(default=0.999995)
    gumbel_start_step: str = field(
        default=AUTO,
        metadata={
            "help": "Schedule step the run starts at; auto: 0 from scratch, else where the model's own pretraining ended (400000 updates for group-norm models, 1000000 for layer-norm ones: temperature at its floor)."
        },
    )
    health_window: int = field(
        default=500,
        metadata={
            "help": "Updates after --warmup_steps over which training health is judged (README): a loss at chance, collapsed CNN features or codes, a vanishing gradient norm give a warning. 500: over twice the ~220 updates the demo's tiny model sits at chance before it learns. 0 turns the checks off."
        },
    )
    stop_on_collapse: bool = field(
        default=False,
        metadata={
            "help": "Stop when training health finds collapsed CNN features or codes or a vanished gradient: a checkpoint, no final model, exit status 1 (a loss at chance alone only warns)."
        },
    )


class Arguments(NamedTuple):
    """The four flag groups, as parse_args_with_recipe returns them."""

    model: ModelArguments
    data: DataArguments
    objective: ObjectiveArguments
    training: TrainingArguments


def apply_config_overrides(config, overrides: str | None):
    """'key=value,...': each value read as YAML, cast to the field's type where both are numbers.
    Returns the config, an hourglass one if `hourglass=[2,(8,4),2]` is among them (utils.hourglass)."""
    for item in split_overrides(overrides or ""):
        key, _, value = item.partition("=")
        if not hasattr(config, key) and key != "hourglass":
            raise SystemExit(f"error: --config_overrides: the model config has no field {key!r}")
        if key == "hourglass":  # as written: YAML would read '[2,(8,4),2]' as a list of strings
            setattr(config, key, value.strip())
            continue
        old, new = getattr(config, key), yaml.safe_load(value)  # 0.1 -> float, false -> bool, null -> None
        setattr(
            config,
            key,
            type(old)(new)
            if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(new, (int, float))
            else new,
        )
    try:
        return with_encoder(config)
    except ValueError as error:
        raise SystemExit(f"error: --config_overrides: {error}") from None


def split_overrides(overrides: str) -> list[str]:
    """The comma list split at the commas outside brackets: 'hourglass=[2,(8,4),2],layerdrop=0.05' is two."""
    items, depth, start = [], 0, 0
    for position, char in enumerate(overrides + ","):
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            items.append(overrides[start:position].strip())
            start = position + 1
    return [item for item in items if item]


# The objective flags whose right value depends on the model family (utils.objective.FAMILY_RECIPES).
FAMILY_FLAGS = ("feature_penalty_weight", "feature_grad_mult", "min_gumbel_temperature", "gumbel_start_step")


def resolve_objective_defaults(model_args: ModelArguments, objective: ObjectiveArguments, config) -> str:
    """Replaces each 'auto' of FAMILY_FLAGS with the value of the model's family (an explicit value
    wins), logs the outcome and returns it as one line for the model card."""
    recipe = family_recipe(config)
    from_scratch = bool(model_args.config_name)
    family_values = {
        "feature_penalty_weight": recipe.feature_penalty_weight,
        "feature_grad_mult": recipe.feature_grad_mult,
        "min_gumbel_temperature": recipe.min_gumbel_temperature,
        "gumbel_start_step": 0 if from_scratch else recipe.pretrained_updates,
    }
    parts, differs = [], False
    for name, family_value in family_values.items():
        group = model_args if hasattr(model_args, name) else objective
        given = getattr(group, name)
        cast = int if name == "gumbel_start_step" else float
        if given is None or str(given).strip().lower() == AUTO:  # a recipe's null means auto too
            setattr(group, name, cast(family_value))
            parts.append(f"{name} {_number(family_value)} (auto)")
            continue
        try:
            value = cast(float(given))
        except ValueError:
            raise SystemExit(f"error: --{name} takes a number or 'auto', not {given!r}") from None
        if value < 0 or value != float(given):
            raise SystemExit(f"error: --{name} must be a {'whole ' if cast is int else ''}number >= 0, not {given!r}")
        setattr(group, name, value)
        note = "" if value == family_value else f"; the family uses {_number(family_value)}"
        differs |= bool(note)
        parts.append(f"{name} {_number(value)} (set{note})")
    line = (
        f"objective for a {recipe.family} model, {'from scratch' if from_scratch else 'continued'}, "
        f"defaults from {recipe.source}: " + ", ".join(parts)
    )
    # A recipe written for another family (base values on a large model) is the mistake to catch.
    logger.log(logging.WARNING if differs else logging.INFO, line)
    return line


def _number(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() and abs(value) >= 1000 else f"{value:g}"
