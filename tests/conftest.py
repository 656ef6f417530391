"""Shared fixtures: the repo on sys.path, offline Hub, tiny model configs."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_base_dir() -> Path:
    return REPO / "configs" / "tiny-wav2vec2-base"


@pytest.fixture(scope="session")
def tiny_robust_dir() -> Path:
    return REPO / "configs" / "tiny-wav2vec2-robust"
