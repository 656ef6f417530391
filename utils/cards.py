"""Model-card pieces both training scripts use (figures, versions, hardware, base model) and the Hub push."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import soundfile as sf
import soxr
import torch

logger = logging.getLogger(__name__)


def hub_base_model(name: str) -> str:
    """`name` when it reads as a hub id (a model card's base_model must be one), else ''."""
    if name.startswith("random init") or Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return ""
    return name


def format_number(value, digits: int = 4) -> str:
    """A figure for a model card: thousands separated, floats to `digits` places, None as n/a."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def software_versions() -> dict:
    import accelerate
    import transformers

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "soundfile": sf.__version__,
        "soxr": soxr.__version__,
    }
    return versions


def hardware_description(accelerator) -> str:
    if torch.cuda.is_available():
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(0)}"
    return f"{accelerator.num_processes} x CPU process ({os.cpu_count()} cores)"


def push_folder_to_hub(folder, repo_id: str, commit_message: str = "Upload model") -> bool:
    """Upload a finished output folder. The local folder is complete before this is called and a
    failed upload (offline server, bad token) only logs an error: the run's result is never lost."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        # Manifests and the run's arguments hold participant ids and local paths of sensitive recordings.
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message,
            ignore_patterns=["checkpoints/*", "*.tmp", "manifests/*", "training_args.json", "best/*", ".final/*"],
        )
    except Exception as error:
        logger.error(
            "push to the hub failed (%s); the model is complete in %s, push it later with `hf upload %s %s`",
            error,
            folder,
            repo_id,
            folder,
        )
        return False
    return True
