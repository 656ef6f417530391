"""What several test modules need: audio writers for known signals in any format, rate and channel
count; a script runner, a flag builder and a train-log reader."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from utils.audio import TARGET_SAMPLE_RATE

REPO = Path(__file__).resolve().parent.parent
SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}


def write_signal(path, signal: np.ndarray, sample_rate: int, subtype: str | None = None) -> Path:
    """Write float samples (frames or frames x channels) in blocks (libsndfile's Vorbis encoder
    crashes on one very large write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = subtype or SUBTYPES[path.suffix[1:]]
    channels = 1 if signal.ndim == 1 else signal.shape[1]
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype=subtype) as f:
        for start in range(0, len(signal), 65536):
            f.write(signal[start : start + 65536])
    return path


def chirp(seconds: float, sample_rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A slow sweep plus noise: every region differs from every other, so a wrong seek shows."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (100 * t + 20 * t**2)) + 0.05 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)


# A region read by seeking goes through soxr in a different block than the whole-file reference, so
# float32 rounding differs: measured at most 3e-7 over all formats, rates and channel counts on
# signals of amplitude ~0.35. 1e-5 leaves a 30x margin and is still far below what a read that is
# off by one sample gives (the chirp's noise makes neighbouring samples differ by ~0.05; the tests
# check that too).
TOLERANCE = 1e-5


def decode_whole(path) -> np.ndarray:
    """The reference for seeking reads: decode everything, downmix, resample in one pass."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)
    return mono if sr == TARGET_SAMPLE_RATE else soxr.resample(mono, sr, TARGET_SAMPLE_RATE)


def flags(**options) -> list[str]:
    """--key value for each option; True gives a bare --key (a store_true flag)."""
    args = []
    for key, value in options.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return args


def run_script(script, *args, env_extra=None, launcher=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run a repo script (a path relative to the repo, or absolute) offline, as a user would; by
    default a non-zero exit fails the test with the end of the script's output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    command = [*(launcher or [sys.executable]), str(REPO / script), *map(str, args)]
    result = subprocess.run(
        command, cwd=REPO, env={**env, **(env_extra or {})}, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-6000:]}"
        )
    return result


def sigterm_group_when(script, *args, ready, log_file, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run a repo script in a process group of its own and, once ready() is true, send SIGTERM to the
    whole group (`kill -TERM -- -PGID`), DataLoader workers included, as SLURM and Kubernetes do."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    return signal_when(command, ready, log_file, signal.SIGTERM, True, env_extra, timeout)


def signal_when(command, ready, log_file, sig, to_group: bool, env_extra=None, timeout=300):
    """Run command in a process group of its own; once ready() is true, send sig to the process (or to
    its whole group); wait for it to end. The output goes to log_file (a pipe nobody reads would fill
    up and stall the command); nothing of the group outlives the call."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    command = list(map(str, command))
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, **(env_extra or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while process.poll() is None and time.time() < deadline and not ready():
            time.sleep(0.05)
        try:
            if process.poll() is None:
                (os.killpg if to_group else os.kill)(process.pid, sig)
            process.wait(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(command, process.returncode, Path(log_file).read_text(), "")


def logged_steps(output_dir) -> int:
    """Complete lines in a running script's train_log.jsonl (0 before it exists)."""
    path = Path(output_dir) / "train_log.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def log_rows(output_dir) -> list[dict]:
    """Every row of a run's train_log.jsonl."""
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses(output_dir) -> dict[int, float]:
    """{step: training loss} from a run's log."""
    return {row["step"]: row["loss"] for row in log_rows(output_dir) if "loss" in row}
