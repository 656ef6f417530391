"""One extraction at a time in a features folder (a lock naming its pid; stale locks of dead
processes taken over), and never over the outputs of other flags: --skip_existing completes an
extraction made with the same flags, --overwrite_output_dir removes the old one first."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

# What extract_features.py writes: its tables, and feature files (with their partial forms).
EXTRACTION_TABLES = ("extract_config.json", "index.tsv", "failures.tsv")
FEATURE_SUFFIXES = (".npy", ".pt", ".safetensors", ".partial", ".raw")
LOCK_NAME = ".extract.lock"


def model_fingerprint(model_name_or_path: str) -> str | None:
    """For a local model folder, what changes when the model is trained again in place (its config
    and the size and time of its weight files); None for a hub id."""
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        return None
    parts = []
    for path in sorted(folder.iterdir()):
        if path.name in ("config.json", "preprocessor_config.json"):
            parts.append(f"{path.name}:{path.read_text()}")
        elif path.suffix in (".safetensors", ".bin") and path.is_file():
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def extraction_problem(output_dir: Path, settings: dict, skip_existing: bool, overwrite: bool) -> str | None:
    """Why extracting into `output_dir` with `settings` would mix outputs of other flags, or None."""
    config_file, index_file = output_dir / "extract_config.json", output_dir / "index.tsv"
    if overwrite or not (config_file.is_file() or index_file.is_file()):
        return None
    if not config_file.is_file():
        return f"{output_dir} holds features (index.tsv) without extract_config.json: the flags that made them are unknown; use --overwrite_output_dir or another --output_dir"
    previous = json.loads(config_file.read_text())
    changed = {key: [previous.get(key), value] for key, value in settings.items() if previous.get(key) != value}
    if not skip_existing:
        return f"{output_dir} holds the outputs of an earlier extraction; pass --skip_existing to complete it (same flags), --overwrite_output_dir to replace it, or choose another --output_dir"
    if changed:
        return f"--skip_existing: {output_dir} holds outputs made with other settings {changed} ([old, new]); use the same flags, --overwrite_output_dir, or another --output_dir"
    return None


def remove_extraction(output_dir: Path) -> int:
    """Remove an earlier extraction's tables and feature files (nothing else) and the folders left empty."""
    removed = 0
    for path in sorted(output_dir.rglob("*"), key=lambda p: -len(p.parts)):
        if path.name == LOCK_NAME:
            continue
        table = path.name in EXTRACTION_TABLES or path.name.startswith(("index.rank", "failures.rank"))
        if path.is_file() and (table or path.suffix in FEATURE_SUFFIXES):
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def process_start(pid: int) -> str | None:
    """The start time of a process (Linux: clock ticks since boot), to tell a reused pid from the
    one that wrote a lock; None where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_alive(holder: dict) -> bool:
    """Whether the process named in a lock file may still run (another host's: assume so)."""
    if not holder.get("pid"):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    started = process_start(int(holder["pid"]))
    return not (started and holder.get("started") and started != holder["started"])


class ExtractionLock:
    """OUT/.extract.lock, held by one extraction at a time: flock where the file system has it (the
    kernel drops it when the process dies), else the pid it names, checked for being alive."""

    def __init__(self, output_dir: Path):
        self.path, self.fd = output_dir / LOCK_NAME, None

    def acquire(self) -> str | None:
        """Take the lock; returns why not (naming the holder's pid), or None once held."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = self._read(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or holder_alive(holder):
                    os.close(fd)
                    return self._busy(holder)
                # No flock on this file system and the holder is gone: a stale lock, taken over below.
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)  # the holder removed the file as we opened it: try the new one
        else:
            return f"{self.path}: could not take the lock"
        if holder.get("pid"):
            logger.warning(
                "%s: the extraction of pid %s ended without releasing it; taking it over", self.path, holder["pid"]
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def _busy(self, holder: dict) -> str:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
        return (
            f"{self.path.parent} is in use by another extraction ({who}): wait for it or choose another "
            f"--output_dir; if that process is gone, delete {self.path}"
        )


@contextmanager
def claim_features_dir(args, settings: dict, state):
    """The extraction's hold on --output_dir for the `with` block: the lock (main process), then the
    refusal of outputs made with other flags, or their removal with --overwrite_output_dir. Every
    process gets the main process's verdict."""
    output_dir = Path(args.output_dir)
    lock, problem = ExtractionLock(output_dir), None
    if state.is_main_process:
        problem = lock.acquire() or extraction_problem(
            output_dir, settings, args.skip_existing, args.overwrite_output_dir
        )
        model = Path(args.model_name_or_path).resolve()
        if not problem and args.overwrite_output_dir and output_dir.resolve() in (model, *model.parents):
            problem = (
                f"--overwrite_output_dir would delete the model {args.model_name_or_path}, which lies in {output_dir}"
            )
    problem = agree(problem, state)
    try:
        if problem:
            raise SystemExit(f"error: {problem}")
        if args.overwrite_output_dir and state.is_main_process:
            removed = remove_extraction(output_dir)
            if removed:
                logger.warning(
                    "--overwrite_output_dir: removed %d files of an earlier extraction in %s", removed, output_dir
                )
        state.wait_for_everyone()
        yield
    finally:
        lock.release()


def agree(value, state):
    """The main process's value on every process (the processes may not be in a process group: tests)."""
    import torch.distributed as dist

    if state.num_processes == 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
