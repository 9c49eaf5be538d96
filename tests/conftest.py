"""Fixtures shared by the test files: tiny checkpoints of every supported arch, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrelay.ranks.engine.checkpoint import ARCHS, make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny seed-0 float32 checkpoint, for llama, mistral, qwen2 and qwen3."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_model(root / arch, arch) for arch in ARCHS}
