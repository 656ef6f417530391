"""Reading a checkpoint back for --resume_from_checkpoint: every file checked and read as plain data
(safetensors, JSON, torch.load with weights_only=True: nothing in a checkpoint can run code) before
any is applied; 'latest' falls back past corrupt checkpoints, loudly."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from utils.checkpoints import (
    LEGACY_SCHEDULER_FILE,
    LOUD,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    list_checkpoints,
    rng_file,
    run_shape,
    set_rng_state,
)

if TYPE_CHECKING:
    from utils.training import TrainingArguments

logger = logging.getLogger(__name__)


class CorruptCheckpoint(Exception):
    """A checkpoint file that is missing, truncated, or not plain data."""


def load_checkpoint(
    accelerator, objects: tuple, output_dir, train_args: TrainingArguments
) -> tuple[dict, Path | None]:
    """Restore (model, optimizer, scheduler) and the RNG states from --resume_from_checkpoint; returns
    the checkpoint's training state and folder, or ({}, None) to start afresh.

    Every file is read and checked before any is applied. 'latest' takes the newest complete
    checkpoint, warning loudly about newer corrupt ones; a corrupt checkpoint named by its path stops
    the run with an error naming the file. A missing or damaged RNG state is a warning: the run goes
    on, no longer exactly as an uninterrupted one."""
    choice = train_args.resume_from_checkpoint
    if not choice:
        return {}, None
    if choice == "latest":
        candidates = list_checkpoints(output_dir)[::-1]
        if not candidates:
            return {}, None
    elif not Path(choice).is_dir():
        raise SystemExit(f"error: --resume_from_checkpoint {choice}: no such checkpoint folder")
    else:
        candidates = [Path(choice)]
    corrupt = []
    for path in candidates:
        try:
            contents, error = read_checkpoint(path, accelerator.process_index), None
        except CorruptCheckpoint as caught:
            error = caught
        if not _everywhere(accelerator, error is None):
            corrupt.append(str(error or f"{path} is unreadable on another process"))
            if choice != "latest":
                raise SystemExit(f"error: --resume_from_checkpoint {path}: {corrupt[-1]}")
            continue
        if corrupt:
            logger.warning(
                "%s\nskipping corrupt checkpoint(s), newest first:\n  %s\nresuming from %s, the newest complete one\n%s",
                LOUD,
                "\n  ".join(corrupt),
                path,
                LOUD,
            )
        return apply_checkpoint(accelerator, objects, path, contents, train_args), path
    raise SystemExit(
        f"error: --resume_from_checkpoint latest: no complete checkpoint in {Path(output_dir) / 'checkpoints'}: "
        + "; ".join(corrupt)
    )


def read_checkpoint(path: Path, rank: int) -> dict:
    """Every file of the checkpoint this process needs, read into memory as plain data. Raises
    CorruptCheckpoint naming the file that is missing, truncated or holds anything but plain data."""
    from safetensors.torch import load_file

    state = _read(path / STATE_FILE, {}, lambda f: json.loads(f.read_text()))
    sizes = state.get("files", {})
    scheduler_name = SCHEDULER_FILE if (path / SCHEDULER_FILE).is_file() else LEGACY_SCHEDULER_FILE
    contents = {
        "state": state,
        "model": _read(path / MODEL_FILE, sizes, lambda f: load_file(str(f))),
        "optimizer": _read(path / OPTIMIZER_FILE, sizes, _plain_data),
        "scheduler": _read(path / scheduler_name, sizes, _plain_data),
        "scaler": _read(path / SCALER_FILE, sizes, _plain_data) if (path / SCALER_FILE).is_file() else None,
    }
    try:
        contents["rng"] = _read(path / rng_file(rank), sizes, _plain_data)
    except CorruptCheckpoint as error:
        contents["rng"] = _legacy_rng_state(path, rank) or error
    return contents


def apply_checkpoint(accelerator, objects: tuple, path: Path, contents: dict, train_args: TrainingArguments) -> dict:
    """Load what read_checkpoint read into the model, optimizer, scheduler, scaler and RNGs; warn
    loudly when the run cannot continue exactly (RNG state lost; another process count, batch size,
    accumulation or seed, whose data position points at other data)."""
    model, optimizer, scheduler = objects
    weights = contents["model"]
    for wrapper in ("module.", "_orig_mod."):  # names of a DDP- or torch.compile-wrapped model (earlier versions)
        if weights and all(k.startswith(wrapper) for k in weights):
            weights = {k[len(wrapper) :]: v for k, v in weights.items()}
    try:
        accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(weights)
        optimizer.load_state_dict(contents["optimizer"])
        scheduler.load_state_dict(contents["scheduler"])
        if contents["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(contents["scaler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise SystemExit(
            f"error: checkpoint {path} does not fit this run's model: {str(error).strip()[:500]}"
        ) from None
    state = contents["state"]
    if isinstance(contents["rng"], CorruptCheckpoint):
        logger.warning(
            "%s\n%s: the random number generators start afresh, so the resumed run is NOT an exact continuation "
            "(other dropout, masks and noise from here on)\n%s",
            LOUD,
            contents["rng"],
            LOUD,
        )
    else:
        set_rng_state(contents["rng"])
    saved, current = state.get("run_shape"), run_shape(accelerator, train_args)
    if saved and saved != current:
        changed = ", ".join(
            f"{key} {saved.get(key)} -> {value}" for key, value in current.items() if saved.get(key) != value
        )
        logger.warning(
            "%s\nresuming %s with %s: the run continues, but not exactly where it stopped (other crops or "
            "batches from here on)\n%s",
            LOUD,
            path,
            changed,
            LOUD,
        )
    return state


def _read(file: Path, sizes: dict, reader):
    if not file.is_file():
        raise CorruptCheckpoint(f"{file} is missing")
    size = file.stat().st_size
    if file.name in sizes and size != sizes[file.name]:
        raise CorruptCheckpoint(f"{file} is truncated or changed: {size} bytes, {sizes[file.name]} when written")
    try:
        return reader(file)
    except Exception as error:  # whatever the parser says, the file is unusable
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpoint(f"{file} is unreadable: {message[:300]}") from None


def _plain_data(file: Path):
    """Tensors, numbers, strings and containers only: torch's weights_only unpickler runs no code."""
    return torch.load(file, map_location="cpu", weights_only=True)


def _legacy_rng_state(path: Path, rank: int) -> dict | None:
    """The RNG state file accelerate's save_state wrote (numpy arrays in it), read as plain data."""
    from accelerate.utils import load

    try:
        saved = load(path / f"random_states_{rank}.pkl", weights_only=True)
        return {
            "python": saved["random_state"],
            "numpy": saved["numpy_random_seed"],
            "torch": saved["torch_manual_seed"],
            "cuda": saved.get("torch_cuda_manual_seed"),
        }
    except Exception:
        return None


def _everywhere(accelerator, ok: bool) -> bool:
    """True when ok on every process (each reads its own RNG file; all must pick the same checkpoint)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == 0)
