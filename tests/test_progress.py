"""utils/progress.py: a bar on a terminal, a line at most every --progress_interval seconds in a log
file (a cluster job's output), where a bar redrawn on every step fills the file."""

import io
import math

import pytest
from helpers import flags, run_script

from utils.progress import LineProgress, progress_bar


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_line_at_most_every_interval_and_one_at_close():
    clock, stream = FakeClock(), io.StringIO()
    progress = LineProgress(1000, "pretrain", interval=30, stream=stream, clock=clock)
    for _ in range(1000):  # 1000 steps of 0.1 s: 100 s
        clock.now += 0.1
        progress.update(1)
        progress.set_postfix(loss="2.500", lr="1.00e-04")
    progress.close()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # at 30, 60 and 90 s, and the end
    assert lines[0].startswith("pretrain: 300/1000 it (30%), 0:00:30 elapsed, 10 it/s, loss=2.500, lr=1.00e-04")
    assert lines[-1].startswith("pretrain: 1000/1000 it (100%), 0:01:40 elapsed")
    assert "\r" not in stream.getvalue()


def test_resumed_runs_and_float_totals_read_well():
    clock, stream = FakeClock(), io.StringIO()
    progress = LineProgress(
        2.0, "extract_features", initial=0.5, unit="audio h", interval=0, stream=stream, clock=clock
    )
    clock.now += 60
    progress.set_postfix_str("45 audio h/s")
    progress.update(0.25)
    progress.close()  # nothing moved since the last line: no repeat
    lines = stream.getvalue().splitlines()
    assert lines == ["extract_features: 0.750/2.000 audio h (38%), 0:01:00 elapsed, 0.00417 audio h/s, 45 audio h/s"]


def test_a_terminal_gets_the_bar_and_a_file_the_lines():
    from tqdm.auto import tqdm

    bar = progress_bar(10, "x", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(10, "x", stream=io.StringIO()), LineProgress)
    assert isinstance(progress_bar(10, "x", stream=io.StringIO(), disable=True), tqdm)  # disabled: silent either way


@pytest.mark.slow
def test_pretrain_in_a_log_file_writes_progress_lines_not_a_bar(tmp_path, tiny_base_dir):
    """A subprocess's stderr is a pipe, as a cluster log file is: 6 steps, --progress_interval 3600,
    so the only progress line is the final one (a tqdm bar would redraw for every step)."""
    import numpy as np
    from helpers import write_signal

    from utils.manifests import prepare_manifests

    rng = np.random.default_rng(0)
    for i in range(3):
        write_signal(
            tmp_path / "audio" / f"S{i}_a.wav", (0.1 * rng.standard_normal(16000 * 6)).astype("float32"), 16000
        )
    prepare_manifests(tmp_path / "audio", tmp_path / "manifests", dev_fraction=0.0, seed=0)
    options = dict(
        config_name=tiny_base_dir,
        train_manifest=tmp_path / "manifests" / "train.tsv",
        output_dir=tmp_path / "out",
        crop_seconds=1.0,
        per_device_train_batch_size=2,
        num_negatives=5,
        max_train_steps=6,
        logging_steps=2,
        save_steps=0,
        num_workers=0,
        report_to="none",
        progress_interval=3600,
    )
    result = run_script("pretrain.py", *flags(**options))
    progress_lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("pretrain: ")]
    assert len(progress_lines) == 1, progress_lines
    assert progress_lines[0].startswith("pretrain: 6/6 it (100%)") and "loss=" in progress_lines[0]
    assert math.isfinite(float(progress_lines[0].split("loss=")[1].split(",")[0]))
