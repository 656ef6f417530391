"""Shared fixtures: the repo on sys.path, offline Hub, tiny model configs and a small synthetic corpus."""

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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """Five participants, one or two recordings of ~30 s each in WAV/FLAC/OGG, with manifests."""
    from common import prepare_manifests
    from data.make_demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root / "audio", participants=5, minutes=0.5, seed=1)
    summary = prepare_manifests(root / "audio", root / "manifests", dev_fraction=0.2, seed=0)
    return {"audio": root / "audio", "manifests": root / "manifests", "summary": summary}
