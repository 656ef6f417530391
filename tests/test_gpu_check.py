"""bench/gpu_check.sh in its smoke mode (the CPU fallback here): every measurement runs and lands in gpu.json."""

import json
import subprocess

import pytest
from helpers import REPO


@pytest.mark.slow
def test_gpu_check_smoke_mode_writes_every_figure(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--output_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["smoke"] is True and figures["failed"] == []
    for precision in ("bf16", "fp16"):
        assert figures["pretrain"][precision]["audio_seconds_per_second"] > 0
    loop = figures["pretrain_loop_bf16"]
    assert loop["audio_seconds_per_second"] > 0 and loop["overhead_ratio"] > 0
    memory = figures["memory_fp16_checkpointing_batch_2"]
    assert memory["hourglass"] == "[1,(1,4),1]"
    assert memory["standard_peak_gb"] > 0 and memory["hourglass_peak_gb"] > 0
    assert memory["hourglass_memory_ratio"] == pytest.approx(
        memory["hourglass_peak_gb"] / memory["standard_peak_gb"], rel=0.05
    )  # both printed rounded to 0.001 GB
    assert figures["ctc_bf16_audio_seconds_per_second"] > 0 and figures["extract_fp16_realtime_factor"] > 0
    for name in ("pretrain_bf16", "pretrain_fp16", "memory_fp16_checkpointing", "ctc_bf16", "extract_fp16"):
        assert (tmp_path / f"gpu_{name}.log").stat().st_size > 0
    assert f"written: {tmp_path / 'gpu.json'}" in result.stdout


def test_gpu_check_rejects_an_unknown_option():
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smok"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option --smok" in result.stderr
