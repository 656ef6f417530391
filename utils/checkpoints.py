"""Checkpoints and model folders that a crash never leaves half written: save, list, resolve
'latest', load."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from utils.numerics import nonfinite_tensors

if TYPE_CHECKING:
    from utils.training import TrainingArguments


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Where from_pretrained finds a model's weights in a local folder (a sharded checkpoint: its index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_start_weights(model_name_or_path: str | None, config_name: str | None) -> None:
    """A local --model_name_or_path folder that has a config but no weights would fail deep inside
    from_pretrained with a traceback: stop with a line that says how to get a random init instead."""
    folder = model_name_or_path
    if config_name or not folder or not os.path.isdir(folder):
        return
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise SystemExit(
            f"error: --model_name_or_path {folder} holds no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            f"to start from random weights with its config, use --config_name {folder}"
        )


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(CHECKPOINT_PREFIX + r"\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint of output_dir (None if none yet); a path -> that path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no training_state.json)")
    return path


def save_checkpoint(accelerator, output_dir, step: int, training_state: dict, train_args: TrainingArguments) -> Path:
    """accelerator.save_state into a temporary folder, then an atomic rename; prune the oldest.

    A crash at any moment leaves either the previous checkpoints or the new one complete; the
    folder name only appears once training_state.json is written.
    """
    # A model gone NaN must not become the newest checkpoint, nor push a good one out (accelerator._models:
    # the prepared models that save_state writes).
    bad = [name for model in accelerator._models for name in nonfinite_tensors(accelerator.unwrap_model(model))]
    if bad:
        raise SystemExit(
            f"error: step {step}: {len(bad)} weight tensor(s) hold NaN or Inf (e.g. {bad[0]}): no checkpoint "
            f"written, the earlier ones in {output_dir}/checkpoints are kept"
        )
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_file = tmp / "training_state.json"
        state_file.write_text(
            json.dumps({**training_state, "step": step, "run_shape": run_shape(accelerator, train_args)}, indent=2)
            + "\n"
        )
        _fsync_file(state_file)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if train_args.save_total_limit:
            for old in list_checkpoints(output_dir)[: -train_args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, train_args: TrainingArguments) -> dict:
    """Restore the checkpoint; warn loudly when the run resumes with another process count, batch
    size, accumulation or seed: its data position then points at other data."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / "training_state.json").read_text())
    saved, current = state.get("run_shape"), run_shape(accelerator, train_args)
    if saved and saved != current:
        changed = ", ".join(
            f"{key} {saved.get(key)} -> {value}" for key, value in current.items() if saved.get(key) != value
        )
        logger.warning(
            "%s\nresuming %s with %s: the run continues, but not exactly where it stopped (other crops or "
            "batches from here on)\n%s",
            "!" * 80,
            path,
            changed,
            "!" * 80,
        )
    return state


def save_model_folder(folder: Path, model, processor, extra_files: dict[str, str] | None = None) -> None:
    """save_pretrained into a temporary sibling, then one rename: never half a model on disk."""
    bad = nonfinite_tensors(model)
    if bad:  # the training loop stops before this; a last guard for the model that is the result
        raise SystemExit(f"error: {len(bad)} weight tensor(s) hold NaN or Inf (e.g. {bad[0]}): {folder} not written")
    tmp, old = folder.with_name(f".tmp-{folder.name}"), folder.with_name(f".old-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # preprocessor_config.json too: what pretrain.py, extract_features.py and older transformers read.
    processor.feature_extractor.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def run_shape(accelerator, train_args: TrainingArguments) -> dict:
    """What the data position in a checkpoint depends on."""
    return {
        "num_processes": accelerator.num_processes,
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "seed": train_args.seed,
    }


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
