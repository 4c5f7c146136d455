"""Where a decoded token's time goes: phi3ref's kernels one by one, deep in a context.

    python benchmarks/kernel_times.py [--model benchmarks/models/phi3-mini-full-Q4_K_M.gguf] [--position 3500] [--tokens 8] [--threads 2] [--rounds 2]

Loads the model with a context of --position + --tokens + 1 (at least 4,096) positions,
fills the KV cache's first --position positions with random values of the cache's type
(no prompt is run: a timing of the passes, not of their text; the values' size is that of
real keys and values, so the kernels read as much memory as after a real prompt), then
decodes --tokens tokens one at a time, --rounds times. For each round: the wall time per
token, the time inside the threaded kernels (every ``phi3ref.jit.Threaded`` call timed,
its launch included), and the difference — Python between the kernels, the numpy steps,
the few single-threaded Numba kernels (the cache store). Then the last
round's kernels by time per token, with their calls per token. Needs warm kernels for the
figures to mean anything: the first pass compiles or loads them and is not timed.

A model whose LongRoPE switches factors before --position recomputes every cached key at
its first pass (as a real context crossing it does); that pass is not timed either.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).parent / "models" / "phi3-mini-full-Q4_K_M.gguf")
    parser.add_argument("--position", type=int, default=3500, help="cached positions before the first decoded token")
    parser.add_argument("--tokens", type=int, default=8, help="tokens decoded per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (benchmarks/write_full_model.py writes it)")
    for name in ("position", "tokens", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (got {getattr(args, name)})")

    import numpy as np

    import phi3ref
    from phi3ref import jit

    n_ctx = max(4096, args.position + args.rounds * args.tokens + 1)
    model = phi3ref.load(args.model, threads=args.threads, n_ctx=n_ctx)
    if args.position + args.rounds * args.tokens + 1 > model.config.n_ctx_train:
        print(f"note: {args.position + args.rounds * args.tokens + 1} positions are past the "
              f"{model.config.n_ctx_train} the model was trained for", file=sys.stderr)
    model.warmup()
    rng = np.random.default_rng(0)
    for cache in (model.cache.k, model.cache.v):  # (n_layer, n_ctx, n_head_kv, head_dim)
        layer = rng.standard_normal((args.position, *cache.shape[2:]), dtype=np.float32) * np.float32(0.5)  # (position, n_head_kv, head_dim)
        cache[:, : args.position] = layer.astype(cache.dtype)[None]
    model.tokens = [100] * args.position  # what the filled cache stands for
    logits = model.forward([200], args.position)  # not timed: loads the one-token kernels
    pos = args.position + 1

    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    plain_call = jit.Threaded.__call__

    def timed_call(self, *a):
        t = time.perf_counter()
        try:
            return plain_call(self, *a)
        finally:
            spent[self.part.__name__] += time.perf_counter() - t
            calls[self.part.__name__] += 1

    print(f"{args.model.name}: {args.tokens} tokens a round decoded from position {args.position} on, {args.threads} threads")
    for r in range(args.rounds):
        spent.clear()
        calls.clear()
        jit.Threaded.__call__ = timed_call
        try:
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                logits = model.forward([int(np.argmax(logits))], pos)
                pos += 1
            wall = (time.perf_counter() - t0) / args.tokens * 1e3
        finally:
            jit.Threaded.__call__ = plain_call
        inside = sum(spent.values()) / args.tokens * 1e3
        print(f"round {r + 1}: {wall:.1f} ms a token, {inside:.1f} ms of it in the kernels, {wall - inside:.1f} ms outside")
    for name, seconds in spent.most_common():
        print(f"  {name:44s} {seconds / args.tokens * 1e3:8.2f} ms  {calls[name] // args.tokens:4d} calls a token")


if __name__ == "__main__":
    sys.exit(main())
