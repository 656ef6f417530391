"""Checkpoints and model folders that a crash or a full disk never leaves half written: save, list.
utils/checkpoint_loading.py reads them back.

A checkpoint holds only data that cannot run code when read: the weights in safetensors, the
training state in JSON, and the optimizer, scheduler, gradient scaler and RNG states as tensors and
numbers that torch.load reads with weights_only=True (accelerate's save_state/load_state would
unpickle registered objects with weights_only=False). training_state.json records every file's size,
so a truncated file is found before anything is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

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


STATE_FILE = "training_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"
# Where checkpoints written through accelerate's save_state (earlier versions) keep the scheduler
# and the RNG states; read here as plain data too, never unpickled.
LEGACY_SCHEDULER_FILE = "custom_checkpoint_0.pkl"
LOUD = "!" * 80


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(CHECKPOINT_PREFIX + r"\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator, objects: tuple, output_dir, step: int, training_state: dict, train_args: TrainingArguments
) -> Path:
    """Write (model, optimizer, scheduler) and the RNG and training states into a temporary folder,
    then rename it; prune the oldest. A crash at any moment leaves the previous checkpoints and
    either the new one complete or none. A failed write (a full disk) removes the temporary folder
    and stops every process with one error naming the checkpoint and the free space."""
    # A model gone NaN must not become the newest checkpoint, nor push a good one out.
    bad = nonfinite_tensors(accelerator.unwrap_model(objects[0]))
    if bad:
        raise SystemExit(
            f"error: step {step}: {len(bad)} weight tensor(s) hold NaN or Inf (e.g. {bad[0]}): no checkpoint "
            f"written, the earlier ones in {output_dir}/checkpoints are kept"
        )
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    main = accelerator.is_main_process
    state = {**training_state, "step": step, "run_shape": run_shape(accelerator, train_args)}
    try:
        _on_every_process(accelerator, lambda: _make_empty(tmp) if main else None)
        _on_every_process(accelerator, lambda: _write_state(accelerator, objects, tmp))
        _on_every_process(accelerator, lambda: _publish(tmp, final, state) if main else None)
    except CheckpointWriteFailed as failure:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free / 2**20
        kept = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise SystemExit(
            f"error: could not write checkpoint {final}: {failure} ({free:.0f} MiB free there); "
            f"its temporary folder is removed, the earlier checkpoints are as they were ({kept})"
        ) from None
    if main and train_args.save_total_limit:
        for old in list_checkpoints(output_dir)[: -train_args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteFailed(Exception):
    pass


def _on_every_process(accelerator, action) -> None:
    """Run action here; if it failed on any process, raise CheckpointWriteFailed on all of them (no
    process is left waiting for the others)."""
    error = None
    try:
        action()
    except Exception as caught:  # a full disk shows as OSError, SafetensorError or torch's RuntimeError
        error = caught
    failed = error is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if failed:
        raise CheckpointWriteFailed(f"{type(error).__name__}: {error}" if error else "another process failed")


def _make_empty(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _write_state(accelerator, objects: tuple, folder: Path) -> None:
    """The main process writes the model, optimizer, scheduler (and fp16 scaler); each its RNG state."""
    from safetensors.torch import save_file

    model, optimizer, scheduler = objects
    if accelerator.is_main_process:
        weights = {
            k: v.contiguous()
            for k, v in accelerator.unwrap_model(model, keep_torch_compile=False).state_dict().items()
        }
        save_file(weights, str(folder / MODEL_FILE), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), folder / SCALER_FILE)
    torch.save(rng_state(), folder / rng_file(accelerator.process_index))


def _publish(tmp: Path, final: Path, state: dict) -> None:
    """training_state.json (with every file's size) last, everything on disk, then one rename."""
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    for name in sizes:
        _fsync_file(tmp / name)
    state_file = tmp / STATE_FILE
    state_file.write_text(json.dumps({**state, "files": sizes}, indent=2) + "\n")
    _fsync_file(state_file)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # the same step saved again (a rerun): never a moment without either
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    """This process's RNG states as plain tensors and numbers (no numpy objects to unpickle)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gaussian),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------


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
