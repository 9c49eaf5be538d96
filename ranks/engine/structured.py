"""Structured output on a worker: xgrammar matchers per sequence and the token bitmask of a step.

Grammars are compiled against the tokenizer's vocabulary once per distinct spec and kept; each
sequence with a spec gets a matcher that has accepted exactly its output tokens. A step fills the
bitmask of its grammar rows on the host after launching its forward, so while the device runs it,
copies it to the device once and masks the logits there (`GrammarMask.apply`): the ids the model
has past its tokenizer's stay masked (NOTE in Grammars._get_compiler).

NOTE: the bitmask of step N needs only the tokens accepted through step N - 1, so the engine leaves
the grammar rows' ids on the device like those of rows without a grammar (Engine._defers), and the
next step accepts them once its own forward is launched: the accepts and the fill both run beside
a forward instead of between two (vLLM and SGLang overlap the same way). An id that ends its
grammar (a stop token it allowed) terminates the matcher when accepted; the engine then drops the
sequence's row of that next step, which gets no mask.

State across preemption and handoff: a matcher advances only when the engine reads a token the
sampler drew (at once, or in the next step for a deferred read, even if the sequence was preempted
in between), and a preempted sequence recomputes KV without drawing any, so it is never advanced
twice. A sequence
handed off by a prefill worker arrives with its output tokens so far (the first one).
NOTE: the decode worker rebuilds the matcher by replaying those tokens instead of receiving the
matcher's state: xgrammar has no serialized form of a matcher, replay is exact (a matcher is a
function of the tokens it accepted), and it costs one accept per output token, one at a handoff.
The same replay serves a worker that gets a sequence with any number of output tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvrelay.core.grammar import to_grammar
from kvrelay.core.request import StructuredOutput
from kvrelay.ranks.engine.device import to_device


@dataclass
class GrammarMask:
    """The token bitmask of one step's grammar rows, on the logits' device."""

    bitmask: torch.Tensor  # [N, ceil(vocab / 32)] int32 on the logits' device; rows not in `rows` are stale
    rows: list[int]  # the batch rows with a grammar

    def apply(self, logits: torch.Tensor) -> None:
        # The rows as a tensor from pinned memory: given a list, xgrammar's CUDA path copies it
        # from pageable memory.
        apply_bitmask(logits, self.bitmask, to_device(self.rows, logits.device, torch.int32))


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
        self.grammar_vocab_size = 0  # the ids xgrammar knows: the tokenizer's (NOTE in _get_compiler)
        self._fill: torch.Tensor | None = None  # [rows, ceil(grammar_vocab_size / 32)] int32 host (pinned on CUDA)
        self._mask: torch.Tensor | None = None  # [rows, ceil(vocab / 32)] int32 on the logits' device, 0 past _fill's words
        self._copied: torch.cuda.Event | None = None  # the last copy of _fill to the device is done
        self._batch = None  # xgrammar.BatchGrammarMatcher: fills many rows on several threads
        self._json_safe: torch.Tensor | None = None  # [fill words] int32 on the logits' device (NOTE in fill_bitmask)
        self._after_ed: torch.Tensor | None = None  # [fill words] int32 on the logits' device
        self._ends_ed: np.ndarray | None = None  # [fill words * 32] bool: the token's bytes end with 0xED

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

    def fill_bitmask(self, request_ids: list[str], rows: list[int], num_rows: int, device: torch.device) -> GrammarMask:
        """Bit t of row rows[j] of the mask says whether the grammar of request_ids[j] allows token t
        now. The host fills it (xgrammar's threads) and copies it once, without a wait; what is left
        of the work is queued on `device`."""
        self._get_compiler()
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read _fill
        host, bitmask = self._buffers(num_rows, device)
        self._batch.batch_fill_next_token_bitmask([self.matchers[r] for r in request_ids], host, rows)
        if self._mask is not self._fill:
            # Asynchronous on CUDA, so the host goes on while the step's forward runs; the event keeps
            # the next step from writing the pinned buffer before this copy has read it.
            bitmask[:, : host.shape[1]].copy_(host, non_blocking=True)
            if device.type == "cuda":
                self._copied = self._copied or torch.cuda.Event()
                self._copied.record()
        words = bitmask[:, : host.shape[1]]  # the words xgrammar fills: the rest stay 0
        # NOTE: two holes in xgrammar 0.2.8's JSON strings, closed here for JSON rows. (1) A string
        # with minLength/maxLength may hold raw control characters (U+0000-U+001F but CR, LF), which
        # JSON forbids, so json.loads fails (mlc-ai/xgrammar issue #800, fixes unreleased); compact
        # JSON (core/grammar.py: ANY_WHITESPACE off) holds no raw byte below 0x20 at all, so no token
        # with one is taken. (2) Any string may hold a UTF-16 surrogate written as UTF-8 (ED A0-BF xx),
        # which is not UTF-8: it decodes to U+FFFD, and a maxLength check then counts three
        # characters where the grammar counted one. No token with ED A0-BF inside is taken, nor a
        # token starting with A0-BF right after a token that ended with ED. Both masks are ANDed on
        # the device: on the host, a gather and a scatter of every JSON row (8 MB a step at 512 rows
        # of a 128k vocabulary) cost more than xgrammar's fill.
        json_rows = [i for i, r in zip(rows, request_ids) if self.json[r]]
        if json_rows:
            safe, after_ed, ends_ed = self._json_masks(device)
            if len(json_rows) == num_rows:
                words &= safe
            else:
                words[to_device(json_rows, device)] &= safe
            dangling = [i for i, r in zip(rows, request_ids) if self.json[r] and r in self.last_token and ends_ed[self.last_token[r]]]
            if dangling:
                words[to_device(dangling, device)] &= after_ed
        return GrammarMask(bitmask, rows)

    def _buffers(self, num_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The host buffer xgrammar fills and the mask on `device`, num_rows rows each; on the CPU
        they are one tensor where the tokenizer's words span the model's vocabulary."""
        import xgrammar as xgr

        fill_words, words = -(-self.grammar_vocab_size // 32), -(-self.vocab_size // 32)
        if self._fill is None or self._fill.shape[0] < num_rows:
            rows = max(num_rows, 64)
            self._fill = torch.empty(rows, fill_words, dtype=torch.int32, pin_memory=device.type == "cuda")
            if device.type == "cpu" and fill_words == words:
                self._mask = self._fill
            else:
                self._mask = torch.zeros(rows, words, dtype=torch.int32, device=device)
            self._batch = xgr.BatchGrammarMatcher()
        return self._fill[:num_rows], self._mask[:num_rows]

    def _json_masks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        if self._json_safe is None:
            self._get_compiler()
            n = -(-self.grammar_vocab_size // 32) * 32
            safe, after_ed, ends_ed = np.zeros(n, bool), np.ones(n, bool), np.zeros(n, bool)
            for t, b in enumerate(self._info.decoded_vocab):
                safe[t] = not any(x < 0x20 for x in b) and not re.search(rb"\xed[\xa0-\xbf]", b)
                after_ed[t] = not (b and 0xA0 <= b[0] <= 0xBF)
                ends_ed[t] = b.endswith(b"\xed")
            self._json_safe, self._after_ed = (torch.from_numpy(np.packbits(m, bitorder="little").view(np.int32).copy())
                                               .to(device) for m in (safe, after_ed))
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
            # NOTE: xgrammar learns the tokenizer's ids (rounded up to whole bitmask words), not the
            # model's padded vocabulary: it takes every id it has no text for as a special token,
            # which no grammar allows, and pays for each of them in every fill (clearing its bit)
            # and every accept: at the 8B shape's 128,256 ids over a 500-token tokenizer, 95% of the
            # host time of a step of 512 JSON rows (bench/grammar_host.py). The mask's words past
            # these stay 0 on the device, so the padding ids are still never drawn. Whole words,
            # because xgrammar leaves the bits past its vocabulary in its last word set.
            tokens = max(backend.get_vocab_size(with_added_tokens=True), max(self.stop_token_ids, default=-1) + 1)
            self.grammar_vocab_size = min(self.vocab_size, -(-tokens // 32) * 32)
            self._info = xgr.TokenizerInfo.from_huggingface(
                PreTrainedTokenizerFast(tokenizer_object=backend), vocab_size=self.grammar_vocab_size,
                stop_token_ids=self.stop_token_ids or None,
            )
            self._compiler = xgr.GrammarCompiler(self._info)
        return self._compiler


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | torch.Tensor) -> None:
    """logits [N, vocab] float32 (in place); bitmask [N, ceil(vocab / 32)] int32 and rows (a list or
    [R] int32), same device:
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
