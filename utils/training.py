"""Training plumbing shared by pretrain.py and finetune_ctc.py: flags and recipes, the Accelerator,
data loaders, JSONL logs, optimizer groups, preemption and a clean exit."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from utils.audio import TARGET_SAMPLE_RATE
from utils.cards import card_flag_problem
from utils.processes import ignore_sigterm
from utils.progress import DEFAULT_PROGRESS_INTERVAL, PROGRESS_INTERVAL_HELP
from utils.recipes import read_recipe

logger = logging.getLogger(__name__)


@dataclass
class TrainingArguments:
    """The training-loop flags pretrain.py and finetune_ctc.py share (same names, same meaning)."""

    output_dir: str = field(
        default="runs/wav2vec2", metadata={"help": "Model, checkpoints, logs and model card go here."}
    )
    max_train_steps: int = field(default=1000, metadata={"help": "Optimizer updates to run."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Crops or utterances per process per micro-step."}
    )
    per_device_eval_batch_size: int = field(default=8)
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer update."})
    learning_rate: float = field(default=5e-5)
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "Any transformers scheduler name: linear, cosine, constant_with_warmup, ..."},
    )
    warmup_steps: int = field(default=0)
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay; never applied to biases and norms."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 turns it off."})
    max_consecutive_nonfinite: int = field(
        default=20,
        metadata={
            "help": "Stop after this many updates in a row skipped for a NaN/Inf loss or gradient (or fp16 overflow)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory."}
    )
    torch_compile: bool = field(default=False)
    seed: int = field(default=0)
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process."})
    logging_steps: int = field(default=10)
    progress_interval: float = field(default=DEFAULT_PROGRESS_INTERVAL, metadata={"help": PROGRESS_INTERVAL_HELP})
    eval_steps: int = field(default=500, metadata={"help": "Evaluate on dev every N updates; 0 turns it off."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N updates; 0 turns it off."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest in output_dir/checkpoints, if any) or a checkpoint path."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Accelerate trackers: tensorboard, wandb, all, none, or a comma list."},
    )
    push_to_hub: bool = field(default=False)
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id for --push_to_hub (default: output_dir's name)."}
    )
    hub_private_repo: bool = field(
        default=True,
        metadata={"help": "--push_to_hub creates a private repo; `--hub_private_repo false` a public one."},
    )
    language: str | None = field(
        default=None, metadata={"help": "Model card: ISO 639 code(s) of the speech, comma separated ('hi,en')."}
    )
    license: str | None = field(
        default=None, metadata={"help": "Model card: a Hub license id ('apache-2.0'); none given, none stated."}
    )
    dataset_tags: str | None = field(
        default=None, metadata={"help": "Model card: Hub dataset id(s) the model was trained on, comma separated."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in output_dir (its files are removed first); else it is refused."},
    )


# Flags whose smaller values would crash a run hours in (or silently do nothing), checked at parse time.
ARGUMENT_MINIMUMS = {
    "max_train_steps": 1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "warmup_steps": 0,
    "eval_steps": 0,
    "save_steps": 0,
    "num_workers": 0,
    "save_total_limit": 1,
    "max_crop_retries": 0,
    "epoch_multiplier": 1,
    "dev_crops_per_file": 1,
    "num_negatives": 1,
    "max_grad_norm": 0,
    "max_consecutive_nonfinite": 1,
    "progress_interval": 0,
    "health_window": 0,
}


# Old flag names that still work, with a warning: every script says "dev" for the held-out set.
DEPRECATED_FLAGS = {"eval_manifest": "dev_manifest", "eval_fraction": "dev_fraction"}


def deprecated_flag(name: str, current: set[str]) -> str | None:
    """The deprecated flag that `name` (from `--name`) stands for, read as argparse reads flags:
    '-' for '_', and any prefix that names one flag only; None if it is not one."""
    name = name.replace("-", "_")
    if name in DEPRECATED_FLAGS:
        return name
    matches = [old for old in DEPRECATED_FLAGS if old.startswith(name)]
    if name and len(matches) == 1 and not any(flag.startswith(name) for flag in current):
        return matches[0]
    return None


def rename_deprecated(argv: list[str], recipe: dict, current: set[str], source: str = "") -> tuple[list[str], dict]:
    """argv and recipe with deprecated flag names replaced by their current ones, each use warned about."""
    renamed_argv = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        old = deprecated_flag(name, current)
        if old:
            warnings.warn(f"--{old} is deprecated: use --{DEPRECATED_FLAGS[old]}", FutureWarning, stacklevel=3)
            arg = f"--{DEPRECATED_FLAGS[old]}{sep}{value}"
        renamed_argv.append(arg)
    renamed_recipe = {}
    for key, value in recipe.items():
        if key in DEPRECATED_FLAGS:
            warnings.warn(f"{source}: {key} is deprecated: use {DEPRECATED_FLAGS[key]}", FutureWarning, stacklevel=3)
            key = DEPRECATED_FLAGS[key]
        renamed_recipe[key] = value
    return renamed_argv, renamed_recipe


def parse_args_with_recipe(dataclass_types, argv: list[str] | None = None):
    """HfArgumentParser, with an optional YAML recipe as the first argument; flags override it."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    recipe, recipe_path = {}, None
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe_path = Path(argv.pop(0))
        if not recipe_path.is_file():
            parser.error(f"recipe file not found: {recipe_path}")
        try:
            recipe = read_recipe(recipe_path)
        except ValueError as error:  # one line: the usage message says nothing about a recipe's content
            raise SystemExit(f"error: {error}") from None
    known = {action.dest for action in parser._actions}
    argv, recipe = rename_deprecated(argv, recipe, known, f"recipe {recipe_path}")
    if recipe:
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"recipe {recipe_path} sets unknown option(s): {', '.join(unknown)}")
        parser.set_defaults(**recipe)
    *parsed, unknown_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown_flags:
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags)}")
    for group in parsed:
        for name, lowest in ARGUMENT_MINIMUMS.items():
            value = getattr(group, name, None)
            if value is not None and value < lowest:
                parser.error(f"--{name} must be at least {lowest}, not {value}")
        if isinstance(group, TrainingArguments) and card_flag_problem(group):
            parser.error(card_flag_problem(group))
    return parsed


def load_feature_extractor(source: str):
    """The model's preprocessor; without a preprocessor_config.json, wav2vec2's usual one, with an
    attention mask exactly for layer-norm models (large, robust, XLS-R), as their own configs have."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    try:
        return Wav2Vec2FeatureExtractor.from_pretrained(source)
    except OSError:
        attention_mask = Wav2Vec2Config.from_pretrained(source).feat_extract_norm == "layer"
        logger.warning(
            "no preprocessor_config.json in %s: using 16 kHz, normalised input, attention mask %s",
            source,
            attention_mask,
        )
        return Wav2Vec2FeatureExtractor(
            sampling_rate=TARGET_SAMPLE_RATE, do_normalize=True, return_attention_mask=attention_mask
        )


def gather_unreadable(accelerator, local: set[str]) -> set[str]:
    """The union of every process's unreadable files (each process meets its own)."""
    if accelerator.num_processes == 1:
        return set(local)
    from accelerate.utils import gather_object

    return set().union(*gather_object([sorted(local)]))


def make_accelerator(train_args: TrainingArguments, output_dir: Path, layerdrop: float, wait_minutes: float = 0):
    """The Accelerator both training scripts use, and the trackers named by --report_to. `wait_minutes`:
    how long processes may wait for the main one at a barrier, when it does long work alone (0: torch's
    default, 10 minutes for NCCL)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, TorchDynamoPlugin

    trackers = [t for t in train_args.report_to.split(",") if t and t != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(output_dir),
        # LayerDrop skips whole layers, whose parameters then get no gradient in that step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=layerdrop > 0)]
        + ([InitProcessGroupKwargs(timeout=timedelta(minutes=wait_minutes))] if wait_minutes else []),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if train_args.torch_compile else None,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator, trackers


def start_train_log(
    accelerator,
    output_dir: Path,
    start_step: int,
    arguments: dict,
    trackers: list[str],
    project: str,
    extra: dict | None = None,
) -> Path:
    """OUTPUT_DIR/train_log.jsonl cut back to start_step, training_args.json, and the trackers.

    A resumed run replaces the rows the interrupted run wrote after its last checkpoint.
    `arguments` maps a group name to its argument dataclass.
    """
    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        kept = [row for row in read_jsonl(log_path) if row.get("step", 0) <= start_step]
        log_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        record = (
            {"script": f"{project}.py"} | {name: asdict(group) for name, group in arguments.items()} | (extra or {})
        )
        (output_dir / "training_args.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    if trackers:
        flat = {
            k: v
            for group in arguments.values()
            for k, v in asdict(group).items()
            if isinstance(v, (int, float, str, bool))
        }
        accelerator.init_trackers(project, config=flat)
    return log_path


def make_loader(dataset, num_workers: int, **options) -> torch.utils.data.DataLoader:
    """A DataLoader with a private generator: creating its iterator must not draw from the global
    torch RNG, or a resumed run (RNG restored from the checkpoint) would diverge from an
    uninterrupted one. Its workers ignore SIGTERM (see ignore_sigterm)."""
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),
        worker_init_fn=ignore_sigterm,
        **options,
    )


def append_jsonl(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    """The rows of a JSONL log. A cut-off last line (a run killed mid-write) is dropped with a warning;
    a broken line before it is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().split("\n"), 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number != lines[-1][0]:
                raise SystemExit(
                    f"error: {path}, line {number} is not JSON ({error}): mend or delete that line"
                ) from None
            logger.warning("%s: dropping its last line %d, cut off (%s): %.60r", path, number, error, line)
    return rows


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norm parameters and other vectors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # original0 is the magnitude of the positional convolution's weight norm, a norm parameter too.
        (no_decay if param.ndim < 2 or "norm" in name.lower() or name.endswith("original0") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
