"""Fixtures shared by the test files: tiny checkpoints of every supported arch, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels run in Triton's interpreter. It must be on before anything
    # imports triton: triton.jit picks compiled or interpreted when it wraps a function, and the
    # language's own jitted helpers (tl.sum, tl.cdiv) are wrapped when triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvrelay.ranks.engine.checkpoint import ARCHS, make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny seed-0 float32 checkpoint, for llama, mistral, qwen2 and qwen3."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of Triton kernels on CPU tensors: skipped where CUDA is (the `gpu` tests cover them there)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton runs compiled here; the gpu tests check the kernels")
    # Triton 3.6's interpreter turns a scalar (a 1-element array) into a loop bound with int(array),
    # which numpy >= 2.3 refuses; give it the element instead. Compiled kernels never take this path.
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_tensor_with_index)
