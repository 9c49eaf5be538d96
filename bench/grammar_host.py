"""The host work of structured output per decode step, without a model: bench.batch_api's schema arm
as the engine's grammar calls see it.

    python -m kvrelay.bench.grammar_host --json runs/grammar-host.json             # CPU, 512 rows
    python -m kvrelay.bench.grammar_host --device cuda --json runs/grammar-host-gpu.json
    python -m kvrelay.bench.grammar_host --tokenizer /models/Llama-3.1-8B/tokenizer.json   # a real vocabulary
    python -m kvrelay.bench.grammar_host --train-bpe 128000     # a 128k vocabulary trained here (minutes)

It writes the files of the `--size` checkpoint (tokenizer and config, no weights: the 8B shape has
128,256 ids over the 500-token test tokenizer), builds the engine's `Grammars` for that vocabulary,
gives `--rows` sequences the `--fields`-field JSON schema of bench.batch_api, and runs `--steps`
decode steps. Each step makes the engine's two calls, timed: `Grammars.accept_batch` (the tokens of
the last step: in the engine, the deferred read of the next step) and `Grammars.fill_bitmask` (every
row's mask, its copy to `--device`, the JSON safety masks). Inside the fill, xgrammar's threaded
fill alone is timed by one more fill of the same matchers into a scratch buffer (a fill does not
change a matcher). The tokens stand in for a random model's greedy draws: each row takes a token
its mask allows, uniformly (seeded), so most rows spend most steps inside long strings, as B1's
schema lines do. The first step (empty matchers) is reported apart. `--tokenizer` replaces the test
tokenizer with a real one (the model's vocabulary then is its size rounded up to 64 ids, and
xgrammar finds its stop tokens itself): the test tokenizer's 500 tokens make a fill far cheaper
than a real 128k vocabulary's. Where no real tokenizer is at hand, `--train-bpe N` trains a byte-level
BPE of N tokens (Llama 3's pre-tokenizer) on the Python sources installed beside torch, which, like a
real vocabulary, has thousands of tokens holding a quote or a backslash: the ones xgrammar checks
one by one inside a JSON string.

On a CPU device the mask's device ops (the JSON ANDs) run on the host and count in the fill; on
CUDA they are queued. The engine's thread count is xgrammar's "auto": half the machine's hardware
threads; xgrammar's fill alone is also timed at 1, 2, 4 ... threads, up to the machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvrelay.bench.batch_api import schema
from kvrelay.bench.throughput import Report, sync
from kvrelay.core.request import StructuredOutput
from kvrelay.ranks.engine.checkpoint import write_model_files
from kvrelay.ranks.engine.structured import Grammars


def allowed_draws(bitmask: torch.Tensor, vocab: int, rng: np.random.Generator) -> list[int]:
    """One token per row of a [rows, words] int32 mask, uniformly among the first `vocab` ids' bits
    that are set; no bit past those may be."""
    words = bitmask.cpu().numpy()
    assert not words[:, -(-vocab // 32):].any(), "a mask allows an id the tokenizer does not have"
    bits = np.unpackbits(words[:, : -(-vocab // 32)].view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    out = []
    for row in bits:
        allowed = np.flatnonzero(row)
        assert allowed.size, "a row whose grammar allows no token"
        out.append(int(rng.choice(allowed)))
    return out


def train_bpe(size: int, out: str, max_bytes: int = 120_000_000) -> None:
    """A byte-level BPE of `size` tokens, with the llama test tokenizer's pre-tokenizer and special
    tokens, trained on up to `max_bytes` of the .py files under torch's site-packages directory."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from kvrelay.ranks.engine.checkpoint import _FAMILIES

    family = _FAMILIES["llama"]

    def lines():
        read = 0
        for path in sorted(Path(torch.__file__).parent.parent.rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="ignore")
            yield from text.splitlines(keepends=True)
            read += len(text)
            if read > max_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials])
    tok.save(out)


def stats_ms(values: list[float]) -> dict:
    ms = sorted(1e3 * v for v in values)
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "max": ms[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvrelay bench grammar-host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="8b-shape", choices=["tiny", "8b-shape"])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--fields", type=int, default=10)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="a tokenizer.json to use instead of the test tokenizer")
    ap.add_argument("--train-bpe", type=int, metavar="N", help="train an N-token BPE on local sources and use it")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.steps < 2:
        ap.error("--rows must be at least 1 and --steps at least 2")
    device = torch.device(args.device)
    report = Report("args", args, device, args.json)
    import xgrammar as xgr

    with tempfile.TemporaryDirectory(prefix="kvrelay-grammar-") as tmp:
        model_dir = Path(tmp) / f"llama-{args.size}"
        cfg = write_model_files(model_dir, "llama", args.size, "float32")
        eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
        if args.train_bpe is not None:
            args.tokenizer = str(Path(tmp) / "bpe.json")
            train_bpe(args.train_bpe, args.tokenizer)
        if args.tokenizer is not None:
            import tokenizers

            if not Path(args.tokenizer).is_file():
                ap.error(f"--tokenizer {args.tokenizer} is not a file; give a tokenizer.json")
            size = tokenizers.Tokenizer.from_file(str(args.tokenizer)).get_vocab_size(with_added_tokens=True)
            shutil.copyfile(args.tokenizer, model_dir / "tokenizer.json")
            cfg["vocab_size"], eos = -(-size // 64) * 64, []
        g = Grammars(str(model_dir), cfg["vocab_size"], eos)
        so = StructuredOutput("json", json.dumps(schema(args.fields)))
        ids = [f"r{i}" for i in range(args.rows)]
        rows = list(range(args.rows))
        t0 = time.perf_counter()
        g.matcher(ids[0], so, [])
        t1 = time.perf_counter()
        for r in ids[1:]:
            g.matcher(r, so, [])
        t2 = time.perf_counter()
        threads = max(1, (os.cpu_count() or 2) // 2)  # xgrammar's "auto": hardware_concurrency() / 2
        report.emit("setup", {"vocab": cfg["vocab_size"], "grammar_vocab": g.grammar_vocab_size, "compile_s": t1 - t0,
                              "matchers_s": t2 - t1, "cpu_count": os.cpu_count(), "xgrammar_threads": threads})
        scratch = torch.empty(args.rows, -(-g.grammar_vocab_size // 32), dtype=torch.int32)
        sweep = sorted({threads} | {n for n in (1, 2, 4, 8, 16) if n <= (os.cpu_count() or 2)})
        batches = {n: xgr.BatchGrammarMatcher(n) for n in sweep}
        by_threads: dict[int, list[float]] = {n: [] for n in sweep}
        rng = np.random.default_rng(args.seed)
        accept, fill, xgr_fill, allowed = [], [], [], []
        tokens = None
        for step in range(args.steps):
            if tokens is not None:
                t0 = time.perf_counter()
                g.accept_batch(ids, tokens)
                accept.append(time.perf_counter() - t0)
            sync(device)
            t0 = time.perf_counter()
            mask = g.fill_bitmask(ids, rows, args.rows, device)
            fill.append(time.perf_counter() - t0)
            sync(device)
            t0 = time.perf_counter()
            matchers = [g.matchers[r] for r in ids]
            batches[threads].batch_fill_next_token_bitmask(matchers, scratch, rows)
            xgr_fill.append(time.perf_counter() - t0)
            for n, batch in batches.items():
                t0 = time.perf_counter()
                batch.batch_fill_next_token_bitmask(matchers, scratch, rows)
                by_threads[n].append(time.perf_counter() - t0)
            tokens = allowed_draws(mask.bitmask, g.grammar_vocab_size, rng)
            allowed.append(int(np.unpackbits(scratch[0].numpy().view(np.uint8)).sum()))
        first = {"fill_ms": 1e3 * fill[0], "xgrammar_fill_ms": 1e3 * xgr_fill[0]}
        steady = {"accept_ms": stats_ms(accept), "fill_ms": stats_ms(fill[1:]), "xgrammar_fill_ms": stats_ms(xgr_fill[1:])}
        total = [a + f for a, f in zip(accept, fill[1:])]
        steady["accept_plus_fill_ms"] = stats_ms(total)
        steady["per_row_us"] = 1e3 * steady["accept_plus_fill_ms"]["mean"] / args.rows
        steady["xgrammar_fill_ms_by_threads"] = {n: stats_ms(v[1:]) for n, v in by_threads.items()}
        steady["row0_allowed_tokens"] = {"min": min(allowed), "median": statistics.median(allowed), "max": max(allowed)}
        report.emit("first_step", first)
        report.emit("steps", steady)
    print(f"\n{args.rows} rows x {args.steps} steps, {args.fields}-field schema, vocab {cfg['vocab_size']:,} "
          f"(xgrammar's {g.grammar_vocab_size:,}), {args.device}, {threads} xgrammar thread(s) of {os.cpu_count()} cpus")
    print(f"{'ms per step':<28}{'mean':>9}{'median':>9}{'p90':>9}{'max':>9}")
    for name, key in [("accept_batch", "accept_ms"), ("fill_bitmask", "fill_ms"), ("  xgrammar's fill in it", "xgrammar_fill_ms"),
                      ("accept + fill", "accept_plus_fill_ms")]:
        s = steady[key]
        print(f"{name:<28}{s['mean']:>9.2f}{s['median']:>9.2f}{s['p90']:>9.2f}{s['max']:>9.2f}")
    print(f"per row: {steady['per_row_us']:.1f} us; first step's fill {first['fill_ms']:.1f} ms")
    print("xgrammar's fill alone, median ms by threads: "
          + ", ".join(f"{n}: {s['median']:.2f}" for n, s in steady["xgrammar_fill_ms_by_threads"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
