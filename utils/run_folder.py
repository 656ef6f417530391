"""Whose output folder is it: a training run never writes over another run (Hugging Face's
--overwrite_output_dir / --resume_from_checkpoint convention)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path

from utils.cards import HUB_FILES

logger = logging.getLogger(__name__)

# What pretrain.py and finetune_ctc.py write in OUTPUT_DIR: a folder holding any of them holds a run,
# and --overwrite_output_dir removes exactly these (a user's other files stay): what a push uploads,
# the weights, and what stays local.
RUN_FILES = HUB_FILES | {"model.safetensors", "pytorch_model.bin", "training_args.json", "unreadable_files.txt"}
# checkpoints, the split that was used, the kept model while training, and the TensorBoard projects.
RUN_FOLDERS = {
    "checkpoints",
    "manifests",
    "probes",
    "best",
    ".final",
    ".tmp-best",
    ".tmp-.final",
    "pretrain",
    "finetune_ctc",
}


def run_entries(folder: Path) -> list[Path]:
    """The files and folders of a training run in `folder`."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.name in RUN_FILES | RUN_FOLDERS or (p.name.startswith("model-") and p.suffix == ".safetensors")
    )


def script_of_run(folder: Path) -> str | None:
    """Which script wrote the run in `folder` (None if it cannot be told)."""
    args_file, config_file = folder / "training_args.json", folder / "config.json"
    try:
        if args_file.is_file():
            record = json.loads(args_file.read_text())
            return record.get("script") or ("pretrain.py" if "objective" in record else "finetune_ctc.py")
        if config_file.is_file():
            architectures = json.loads(config_file.read_text()).get("architectures") or [""]
            return {"Wav2Vec2ForPreTraining": "pretrain.py", "Wav2Vec2ForCTC": "finetune_ctc.py"}.get(architectures[0])
    except (OSError, ValueError):
        return None
    return None


# The flags that name files or folders a run reads.
PATH_FLAG_ENDINGS = (
    "_manifest",
    "_segments",
    "_or_path",
    "_dir",
    "config_name",
    "dataset_name",
    "resume_from_checkpoint",
)


def input_paths(groups) -> list[tuple[str, Path]]:
    """(--flag, resolved path) for each existing file or folder the argument groups name (each of a
    weighted manifest list 'a.tsv:0.7,b.tsv:0.3'), output_dir aside."""
    found = []
    for group in groups:
        for item in fields(group) if is_dataclass(group) else ():
            value = getattr(group, item.name)
            if item.name == "output_dir" or not item.name.endswith(PATH_FLAG_ENDINGS) or not isinstance(value, str):
                continue
            for part in filter(None, (p.strip() for p in value.split(","))):
                path = Path(re.sub(r":[\d.]+$", "", part))
                if path.exists():
                    found.append((f"--{item.name}", path.resolve()))
    return found


def claim_output_dir(accelerator, script: str, groups) -> None:
    """Refuse an OUTPUT_DIR that holds another run, unless --resume_from_checkpoint continues it or
    --overwrite_output_dir replaces it (the old run's files removed first, so nothing is mixed).
    `groups` are the script's argument dataclasses (one of them the TrainingArguments). Every
    process looks before any writes, so all of them reach the same verdict."""
    train_args = next(g for g in groups if hasattr(g, "overwrite_output_dir"))
    output_dir = Path(train_args.output_dir)
    entries = run_entries(output_dir)
    problem = output_dir_problem(output_dir, entries, script, groups, train_args) if entries else None
    if problem:
        raise SystemExit(f"error: {problem}")
    accelerator.wait_for_everyone()
    if entries and train_args.overwrite_output_dir and accelerator.is_main_process:
        logger.warning(
            "--overwrite_output_dir: removing the earlier run in %s: %s",
            output_dir,
            ", ".join(p.name for p in entries),
        )
        for path in entries:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    accelerator.wait_for_everyone()


def output_dir_problem(output_dir: Path, entries: list[Path], script: str, groups, train_args) -> str | None:
    """Why `script` may not write into `output_dir`, which holds the run `entries` (None if it may)."""
    from utils.checkpoints import list_checkpoints

    owner, names = script_of_run(output_dir), ", ".join(p.name for p in entries[:6])
    held = f"--output_dir {output_dir} already holds a {owner or 'training'} run ({names})"
    resume = train_args.resume_from_checkpoint
    if train_args.overwrite_output_dir:
        doomed = {p.resolve() for p in entries}
        for flag, path in input_paths(groups):
            if any(path == d or d in path.parents for d in doomed) or path == output_dir.resolve():
                return f"{held}: --overwrite_output_dir would delete {flag} {path}"
        return None
    if resume and owner not in (None, script):
        return f"{held}: {script} would replace its model and resume from its checkpoints; choose another --output_dir"
    if resume == "latest" and not list_checkpoints(output_dir) and (output_dir / "model.safetensors").is_file():
        return (
            f"{held} but no checkpoint: --resume_from_checkpoint latest would start over and replace its "
            "model; pass --overwrite_output_dir to replace it, or choose another --output_dir"
        )
    if not resume:
        return (
            f"{held}; pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to "
            "replace it, or choose another --output_dir"
        )
    return None
