"""Structured output on a worker: xgrammar matchers per sequence and the token bitmask of a step.

Grammars are compiled against the model's vocabulary once per distinct spec and kept; each sequence
with a spec gets a matcher that has accepted exactly its output tokens. A step fills the bitmask
of its grammar rows on the host (the sampler does it first thing, while the device still runs the
step's forward), copies it to the device once and masks the logits there (`apply_bitmask`).

State across preemption and handoff: a matcher advances only when the sampler draws a token, and a
preempted sequence recomputes KV without drawing any, so it is never advanced twice. A sequence
handed off by a prefill worker arrives with its output tokens so far (the first one).
NOTE: the decode worker rebuilds the matcher by replaying those tokens instead of receiving the
matcher's state: xgrammar has no serialized form of a matcher, replay is exact (a matcher is a
function of the tokens it accepted), and it costs one accept per output token, one at a handoff.
The same replay serves a worker that gets a sequence with any number of output tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from kvrelay.core.grammar import to_grammar
from kvrelay.core.request import StructuredOutput


class Grammars:
    """The compiled grammars and live matchers of one engine."""

    def __init__(self, model_dir: str | None, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size  # the model's (the logits' width), which may pass the tokenizer's
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None  # xgrammar.GrammarCompiler, built on first use
        self._info = None  # its xgrammar.TokenizerInfo
        self.compiled: dict[tuple[str, str], object] = {}  # (kind, spec) -> xgrammar.CompiledGrammar
        self.matchers: dict[str, object] = {}  # request id -> xgrammar.GrammarMatcher
        self.json: dict[str, bool] = {}  # request id -> follows a JSON schema
        self.last_token: dict[str, int] = {}  # request id -> its last output token (JSON rows)
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(vocab / 32)] int32 host (pinned on CUDA)
        self._copied: torch.cuda.Event | None = None  # the last copy of it to the device is done
        self._batch = None  # xgrammar.BatchGrammarMatcher: fills many rows on several threads
        self._json_safe: torch.Tensor | None = None  # [ceil(vocab / 32)] int32 host (NOTE in fill_bitmask)
        self._after_ed: torch.Tensor | None = None  # [ceil(vocab / 32)] int32 host
        self._ends_ed: np.ndarray | None = None  # [vocab] bool: the token's bytes end with 0xED

    def matcher(self, request_id: str, so: StructuredOutput, output_token_ids: list[int]):
        """The matcher of a sequence; a new one has accepted `output_token_ids` (see NOTE above)."""
        m = self.matchers.get(request_id)
        if m is not None:
            return m
        import xgrammar as xgr

        m = self.matchers[request_id] = xgr.GrammarMatcher(self._compile(so))
        self.json[request_id] = so.kind == "json"
        for t in output_token_ids:
            self.accept(request_id, t)
        return m

    def accept(self, request_id: str, token: int) -> None:
        if not self.matchers[request_id].accept_token(token):
            raise RuntimeError(f"request {request_id}: token {token} does not follow its grammar")
        if self.json[request_id]:
            self.last_token[request_id] = token

    def accept_batch(self, request_ids: list[str], tokens: list[int]) -> None:
        """accept() for many sequences in one call (xgrammar runs them on its threads)."""
        import xgrammar as xgr

        self._batch = self._batch or xgr.BatchGrammarMatcher()
        accepted = self._batch.batch_accept_token([self.matchers[r] for r in request_ids], tokens)
        for r, t, ok in zip(request_ids, tokens, accepted, strict=True):
            if not ok:
                raise RuntimeError(f"request {r}: token {t} does not follow its grammar")
            if self.json[r]:
                self.last_token[r] = t

    def is_terminated(self, request_id: str) -> bool:
        m = self.matchers.get(request_id)
        return m is not None and m.is_terminated()

    def release(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self.json.pop(request_id, None)
        self.last_token.pop(request_id, None)

    def fill_bitmask(self, request_ids: list[str], rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor:
        """[num_rows, ceil(vocab / 32)] int32 on `device`: bit t of row rows[j] says whether the
        grammar of request_ids[j] allows token t now; other rows are left as they are (the caller
        masks only `rows`)."""
        import xgrammar as xgr

        words = -(-self.vocab_size // 32)
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the buffer
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = torch.empty(max(num_rows, 64), words, dtype=torch.int32, pin_memory=device.type == "cuda")
            self._batch = xgr.BatchGrammarMatcher()
        bitmask = self._bitmask[:num_rows]
        self._batch.batch_fill_next_token_bitmask([self.matchers[r] for r in request_ids], bitmask, rows)
        # NOTE: two holes in xgrammar 0.2.8's JSON strings, closed here for JSON rows. (1) A string
        # with minLength/maxLength may hold raw control characters (U+0000-U+001F but CR, LF), which
        # JSON forbids, so json.loads fails (mlc-ai/xgrammar issue #800, fixes unreleased); compact
        # JSON (core/grammar.py: ANY_WHITESPACE off) holds no raw byte below 0x20 at all, so no token
        # with one is taken. (2) Any string may hold a UTF-16 surrogate written as UTF-8 (ED A0-BF xx),
        # which is not UTF-8: it decodes to U+FFFD, and a maxLength check then counts three
        # characters where the grammar counted one. No token with ED A0-BF inside is taken, nor a
        # token starting with A0-BF right after a token that ended with ED.
        json_rows = [(i, r) for i, r in zip(rows, request_ids) if self.json[r]]
        if json_rows:
            safe, after_ed, ends_ed = self._json_masks()
            bitmask[[i for i, _ in json_rows]] &= safe
            dangling = [i for i, r in json_rows if r in self.last_token and ends_ed[self.last_token[r]]]
            if dangling:
                bitmask[dangling] &= after_ed
        if device.type != "cuda":
            return bitmask
        # Asynchronous, so the host goes on while the step's forward runs; the event keeps the
        # next step from writing the pinned buffer before this copy has read it.
        out = bitmask.to(device, non_blocking=True)
        self._copied = self._copied or torch.cuda.Event()
        self._copied.record()
        return out

    def _json_masks(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        if self._json_safe is None:
            self._get_compiler()
            vocab = self._info.decoded_vocab
            n = -(-self.vocab_size // 32) * 32
            safe, after_ed, ends_ed = np.zeros(n, bool), np.ones(n, bool), np.zeros(n, bool)
            for t, b in enumerate(vocab[: self.vocab_size]):
                safe[t] = not any(x < 0x20 for x in b) and not re.search(rb"\xed[\xa0-\xbf]", b)
                after_ed[t] = not (b and 0xA0 <= b[0] <= 0xBF)
                ends_ed[t] = b.endswith(b"\xed")
            self._json_safe, self._after_ed = (torch.from_numpy(np.packbits(m, bitorder="little").view(np.int32).copy())
                                               for m in (safe, after_ed))
            self._ends_ed = ends_ed
        return self._json_safe, self._after_ed, self._ends_ed

    def _compile(self, so: StructuredOutput):
        key = (so.kind, so.spec)
        if key not in self.compiled:
            self.compiled[key] = self._get_compiler().compile_grammar(to_grammar(so))
        return self.compiled[key]

    def _get_compiler(self):
        if self._compiler is None:
            import tokenizers
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            from kvrelay.core.tokenizer import tokenizer_file

            assert self.model_dir is not None, "structured output needs the model's tokenizer"
            # xgrammar reads the vocabulary's encoding (byte-level, byte-fallback) from a transformers
            # tokenizer; this one wraps the same tokenizer.json that core/tokenizer.py reads.
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file(Path(self.model_dir))))
            self._info = xgr.TokenizerInfo.from_huggingface(
                PreTrainedTokenizerFast(tokenizer_object=backend), vocab_size=self.vocab_size,
                stop_token_ids=self.stop_token_ids or None,
            )
            self._compiler = xgr.GrammarCompiler(self._info)
        return self._compiler


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits [N, vocab] float32 (in place); bitmask [N, ceil(vocab / 32)] int32, same device:
    in each of `rows`, tokens whose bit is 0 get -inf. xgrammar's kernel (Triton on CUDA, C++ on
    the CPU) reads the bits where they lie; unpacking them in torch wrote a [rows, vocab] int32 and
    a float32 copy of the rows' logits each step (1 GB at 512 rows of a 128k vocabulary)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)


def warm_up_bitmask(device: torch.device, vocab_size: int) -> None:
    """Compile xgrammar's mask kernel for every row count it specializes on (Triton: 1, a multiple
    of 16, any other), so that the first steps with grammar rows compile nothing; a no-op without
    xgrammar, whose absence a request with a grammar reports by itself."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return
    logits = torch.zeros(16, vocab_size, dtype=torch.float32, device=device)
    bitmask = torch.full((16, -(-vocab_size // 32)), -1, dtype=torch.int32, device=device)
    for rows in (1, 3, 16):
        apply_bitmask(logits, bitmask, list(range(rows)))
