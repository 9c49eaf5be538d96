"""The log of Triton compiles (kernels/compile_log.py): Triton's compile hooks, called the way
Triton calls them (keyword arguments; `jit_cache_hook` before a compile, whose truthy answer would
skip it, `jit_post_compile_hook` after), record each compile and flag those outside an engine's
build once one has ended. The GPU check that a run compiles nothing after the warm-up is
tests/test_gpu_engine.py's.

    python -m pytest -q tests/test_compile_log.py
"""

from __future__ import annotations

import pytest

from kvrelay.kernels import compile_log

triton = pytest.importorskip("triton")
knobs = pytest.importorskip("triton.knobs")


def _compile(name: str) -> None:
    """What JITFunction._do_compile does around one compile, hooks-wise."""
    from triton.runtime.jit import JitFunctionInfo

    kw = dict(key=(name, ("*bf16", "D")), repr=f"{name}[num_warps=4](x: ('*bf16', 'D'))",
              fn=JitFunctionInfo(__name__, name, None), compile={}, is_manual_warmup=False, already_compiled=False)
    assert not knobs.runtime.jit_cache_hook(**kw), "a truthy cache hook would skip the compile"
    knobs.runtime.jit_post_compile_hook(**kw)


def test_compiles_are_recorded_and_those_after_the_warm_up_flagged(capfd, monkeypatch):
    assert compile_log.install() and compile_log.install(), "installs once, then reports it installed"
    first = compile_log.count()
    with compile_log.warming():
        _compile("built")
        with compile_log.warming():  # a second engine built inside: still the warm-up
            _compile("nested")
    monkeypatch.setenv(compile_log.ENV, "1")
    _compile("missed")
    got = compile_log.compiles(first)
    assert [(c.kernel, c.after_warm_up) for c in got] == [("built", False), ("nested", False), ("missed", True)]
    assert "'*bf16', 'D'" in got[-1].signature and got[-1].seconds >= 0
    assert [c.kernel for c in compile_log.after_warm_up()][-1:] == ["missed"]
    assert "triton compile (after the warm-up): missed" in capfd.readouterr().err


def test_a_hook_installed_before_keeps_running(monkeypatch):
    """A hook that was there first (a profiler's, say) still sees every compile, and its answer stands."""
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(kw["key"]))
    monkeypatch.setitem(compile_log._state, "installed", False)
    assert compile_log.install()
    first = compile_log.count()
    _compile("chained")
    assert seen == [("chained", ("*bf16", "D"))] and [c.kernel for c in compile_log.compiles(first)] == ["chained"]
