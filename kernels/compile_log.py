"""Every Triton compile of this process, as it happens: the kernel, its specialization, how long it took.

Triton compiles one kernel per specialization of its arguments (constexpr values, int arguments
equal to 1 or divisible by 16, 16-byte alignment of pointers). A variant first met inside a timed
run compiles there: on a machine whose on-disk Triton cache is cold that cost B1 a third of its
wall. The engine warms every variant it can meet before it serves (ModelRunner.warm_up, inside
`warming()`), and this log is how a run proves it: `after_warm_up()` lists the compiles outside
any engine build once one has ended, and the throughput benchmark reports them.

    KVRELAY_LOG_COMPILES=1 python3 -m kvrelay.bench.throughput ...   # one stderr line per compile

Without that variable, only the compiles after the warm-up are logged (warnings: each is a variant
the warm-up missed). Works with Triton >= 3.4 (`triton.knobs.runtime` hooks, called with keyword
arguments `key`, `repr`, `fn`, ...) and with older releases (`JITFunction.cache_hook` /
`compiled_hook`); with no Triton, nothing is recorded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

try:
    import triton
except ImportError:
    triton = None

log = logging.getLogger(__name__)
ENV = "KVRELAY_LOG_COMPILES"


@dataclass
class Compile:
    kernel: str  # the jitted function's name
    signature: str  # Triton's repr: options and each argument's specialized type ("*bf16D", "i32", constexpr values)
    seconds: float  # from the cache hook to the post-compile hook (an on-disk cache hit is fast, not free)
    after_warm_up: bool


_compiles: list[Compile] = []
_started: dict[str, float] = {}
_state = {"installed": False, "warm": False, "warming": 0}


def install() -> bool:
    """Hook Triton's compiler (once per process); False where Triton has no hooks to use."""
    if _state["installed"]:
        return True
    if triton is None:
        return False
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "jit_post_compile_hook"):
        runtime.jit_cache_hook = _chain(runtime.jit_cache_hook, _before)
        runtime.jit_post_compile_hook = _chain(runtime.jit_post_compile_hook, _after)
    else:
        from triton.runtime.jit import JITFunction

        if not hasattr(JITFunction, "compiled_hook"):
            return False
        JITFunction.cache_hook = _chain(getattr(JITFunction, "cache_hook", None), _before)
        JITFunction.compiled_hook = _chain(JITFunction.compiled_hook, _after)
    _state["installed"] = True
    return True


@contextmanager
def warming():
    """Compiles inside are the warm-up's (an engine's build); after the first one ends, every
    compile outside one is a variant that the warm-up missed."""
    _state["warming"] += 1
    try:
        yield
    finally:
        _state["warming"] -= 1
        _state["warm"] = True


def count() -> int:
    return len(_compiles)


def compiles(since: int = 0) -> list[Compile]:
    """The compiles after the first `since` (a `count()` taken earlier)."""
    return _compiles[since:]


def after_warm_up() -> list[Compile]:
    return [c for c in _compiles if c.after_warm_up]


def _chain(previous, hook):
    if previous is None:
        return hook

    def both(**kwargs):
        hook(**kwargs)
        return previous(**kwargs)  # the previous hook's answer stands (a cache hook's True skips the compile)

    return both


def _before(**kwargs) -> None:
    _started[str(kwargs.get("key"))] = time.perf_counter()


def _after(**kwargs) -> None:
    fn = kwargs.get("fn")
    name = getattr(fn, "name", None) or getattr(fn, "__name__", "?")
    started = _started.pop(str(kwargs.get("key")), None)
    c = Compile(name, str(kwargs.get("repr", "")), time.perf_counter() - started if started else 0.0, _state["warm"] and not _state["warming"])
    _compiles.append(c)
    if c.after_warm_up or os.environ.get(ENV) == "1":
        when = "after the warm-up" if c.after_warm_up else "warm-up"
        line = f"triton compile ({when}): {c.kernel} in {c.seconds:.2f} s: {c.signature}"
        if os.environ.get(ENV) == "1":
            print(line, file=sys.stderr, flush=True)
        else:
            log.warning(line)
