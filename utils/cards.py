"""Model-card pieces both training scripts use (figures, versions, hardware, base model, the YAML
header) and the Hub push, which uploads only what identifies neither participants nor the machine."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import soundfile as sf
import soxr
import torch
import yaml

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DATASET_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def hub_base_model(name: str) -> str:
    """`name` when it reads as a hub id (a model card's base_model must be one), else ''."""
    if name.startswith("random init") or Path(name).exists() or not HUB_ID.fullmatch(name):
        return ""
    return name


def card_base_model(folder: Path) -> str:
    """The hub id a local model's own card names as its base_model ('' if none)."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    if not text.startswith("---"):
        return ""
    try:
        base = (yaml.safe_load(text.split("---", 2)[1]) or {}).get("base_model")
    except (yaml.YAMLError, AttributeError):
        return ""
    base = base[0] if isinstance(base, list) and len(base) == 1 else base
    return base if isinstance(base, str) and HUB_ID.fullmatch(base) else ""


def base_model_of(name: str) -> tuple[str, str]:
    """(the card's base_model: a hub id or '', how the card's text names the start), never a local path.

    A local folder passes on its own base: a model continued from facebook/wav2vec2-base in
    runs/home, then fine-tuned, names facebook/wav2vec2-base, so the Hub shows the lineage.
    """
    if name.startswith("random init"):
        return "", f"random init (config {Path(name.removeprefix('random init from ').strip()).name})"
    path = Path(name)
    if not path.exists():
        return hub_base_model(name), name if HUB_ID.fullmatch(name) else path.name
    cached = re.search(r"models--([\w.-]+?)--([\w.-]+)", str(path.resolve()))  # a Hub cache snapshot
    if cached:
        return f"{cached[1]}/{cached[2]}", f"{cached[1]}/{cached[2]}"
    base = card_base_model(path)
    return base, f"{path.resolve().name} (a local model{', from ' + base if base else ''})"


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def card_flag_problem(train_args) -> str | None:
    """Why --language, --license or --dataset_tags cannot go into a card's YAML header (None if they can)."""
    for code in split_list(train_args.language):
        if not LANGUAGE.fullmatch(code):
            return f"--language {code!r}: expected ISO 639 codes such as 'en' or 'hi', comma separated"
    if train_args.license is not None and not LICENSE.fullmatch(train_args.license):
        return f"--license {train_args.license!r}: expected a Hub license id such as 'apache-2.0' or 'cc-by-4.0'"
    for tag in split_list(train_args.dataset_tags):
        if not DATASET_ID.fullmatch(tag):
            return f"--dataset_tags {tag!r}: expected Hub dataset ids such as 'mozilla-foundation/common_voice_17_0'"
    return None


def card_header(train_args, base_hub_id: str, tags: list[str], pipeline_tag: str | None = None) -> str:
    """The card's YAML header up to (not including) a model-index: library, tags, base model, and
    --language, --license and --dataset_tags where given."""
    header = {"library_name": "transformers"}
    if pipeline_tag:
        header["pipeline_tag"] = pipeline_tag
    header["tags"] = tags
    for key, value in (
        ("base_model", base_hub_id),
        ("language", split_list(train_args.language)),
        ("license", train_args.license),
        ("datasets", split_list(train_args.dataset_tags)),
    ):
        if value:
            header[key] = value
    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True, default_flow_style=None, width=1000)


def public_name(text: str, paths) -> str:
    """`text` with each of `paths` that is local (as given and absolute) replaced by its file name;
    a Hub id stays as it is."""
    for path in paths:
        if path and (Path(path).exists() or Path(path).is_absolute()):
            for form in sorted({str(path), str(Path(path).resolve())}, key=len, reverse=True):
                text = text.replace(form, Path(path).name)
    return text


def card_model_name(train_args) -> str:
    """What the card's how-to loads: the hub id, else the output folder's name (never a local path)."""
    return train_args.hub_model_id or Path(train_args.output_dir).resolve().name


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


# Top-level files a push uploads: the model, its processor, the card, the scores, the loss curve and
# the train log without its dev examples. Checkpoints, manifests, training_args.json, TensorBoard
# logs and anything else stay local: they hold local paths, participant ids and dev transcripts.
HUB_FILES = {
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "vocab.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "README.md",
    "eval_results.json",
    "loss_curve.png",
    "train_log.jsonl",
    "model.safetensors.index.json",
}


def hub_upload_files(folder) -> dict[str, bytes | Path]:
    """{path in the repo: the file, or the bytes uploaded in its place}: what a push of `folder` uploads."""
    files: dict[str, bytes | Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        if path.name == "train_log.jsonl":  # the evaluations' reference/hypothesis pairs are dev transcripts
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            files[path.name] = "".join(
                json.dumps({k: v for k, v in r.items() if k != "examples"}) + "\n" for r in rows
            )
            files[path.name] = files[path.name].encode()
        elif path.name in HUB_FILES or (path.name.startswith("model") and path.suffix == ".safetensors"):
            files[path.name] = path
    return files


def private_strings(folder) -> set[str]:
    """Local paths no pushed file may hold: the output folder, the home folder, and each path the
    run's flags (training_args.json) name, as given, absolute, and its folder."""
    folder = Path(folder).resolve()
    found = {str(folder), str(Path.home())}
    args_file = folder / "training_args.json"
    record = json.loads(args_file.read_text()) if args_file.is_file() else {}
    values = [v for group in record.values() if isinstance(group, dict) for v in group.values() if isinstance(v, str)]
    for value in values:
        for part in value.split(","):
            path = Path(re.sub(r":[\d.]+$", "", part.strip()))
            if part.strip() and path.exists():
                resolved = path.resolve()
                found |= {str(resolved), *([str(path)] if len(path.parts) > 1 else [])}
                if len(resolved.parent.parts) > 2:
                    found.add(str(resolved.parent))
    return found


def private_content(files: dict[str, bytes | Path], strings: set[str]) -> list[tuple[str, str]]:
    """(file, string) for each of `strings` found in a file to upload (a safetensors file: its header)."""
    found = []
    for name, content in files.items():
        if isinstance(content, Path):
            with open(content, "rb") as f:
                if content.suffix == ".safetensors":
                    content = f.read(8)
                    content += f.read(int.from_bytes(content, "little") if len(content) == 8 else 0)
                else:
                    content = f.read()
        found += [(name, s) for s in sorted(strings) if s.encode() in content]
    return found


def push_folder_to_hub(folder, repo_id: str, private: bool = True, commit_message: str = "Upload model") -> bool:
    """Upload what hub_upload_files picks from a finished output folder, to a private repo unless
    `private` is False (--hub_private_repo false). A file holding a local path stops the push; a
    failed upload (offline server, bad token) only logs an error: the local folder is complete."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = hub_upload_files(folder)
    leaks = private_content(files, private_strings(folder))
    if leaks:
        logger.error(
            "not pushed to %s: %s would publish local paths (%s)",
            repo_id,
            ", ".join(sorted({name for name, _ in leaks})),
            "; ".join(f"{name}: {text}" for name, text in leaks[:5]),
        )
        return False
    kept = sorted(p.name for p in folder.iterdir() if p.name not in files)
    logger.info("pushing %s to %s; kept local: %s", ", ".join(files), repo_id, ", ".join(kept) or "nothing")
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not getattr(api.repo_info(repo_id), "private", True):
            raise PermissionError(f"{repo_id} exists and is public (--hub_private_repo false pushes to it)")
        operations = [
            CommitOperationAdd(
                path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content)
            )
            for name, content in files.items()
        ]
        api.create_commit(repo_id, operations=operations, commit_message=commit_message)
    except Exception as error:
        # Not `hf upload FOLDER`: that would upload the manifests, training_args.json and TensorBoard logs too.
        logger.error(
            "push to the hub failed (%s); the model is complete in %s, push it later with: python -c "
            "\"from utils.cards import push_folder_to_hub; push_folder_to_hub('%s', '%s', private=%s)\"",
            error,
            folder,
            folder,
            repo_id,
            private,
        )
        return False
    return True
