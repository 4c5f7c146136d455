"""What the hook points cost: a pass without hooks, with a hook that only reads, and the
hook-point calls themselves.

    python benchmarks/hooks_overhead.py [--model PATH] [--rounds 5] [--threads 2]

On the full-size synthetic Phi-3-mini Q4_K_M (benchmarks/write_full_model.py writes it
once) in ggml numerics: the median time of a decode step (one token after a 128-token
prompt) and of a 128-token prompt,

* plain: ``model.forward`` with no hooks (what every user runs);
* points: the calls a plain pass makes at its hook points (the name formatted, the no-op
  ``NO_HOOKS(name, value)``), timed alone and scaled to a pass's count of points;
* read all: a hook on ``"*"`` that only looks (every point's value copied for it).

The first line is the one to read: the share of a plain pass spent at its hook points.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from write_full_model import DEFAULT_PATH, ensure_full_model  # noqa: E402


def _median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help=f"a .gguf file (default: {DEFAULT_PATH}, written if missing)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    import phi3ref
    from phi3ref.hooks import NO_HOOKS

    path = args.model or ensure_full_model()[0]
    model = phi3ref.load(path, threads=args.threads, n_ctx=512)
    model.warmup()
    prompt = np.random.default_rng(0).integers(100, 32000, size=128).tolist()
    n_points = len(model.hook_names)

    def decode(hooks=None):
        model.forward([500], len(prompt), hooks=hooks)

    def prefill(hooks=None):
        model.forward(prompt, 0, hooks=hooks)

    model.forward(prompt, 0)
    read_all = {"*": lambda value, name: None}
    results = {}
    for label, step in (("decode step", decode), ("128-token prompt", prefill)):
        step()  # warm
        plain = _median_seconds(step, args.rounds)
        reading = _median_seconds(lambda: step(read_all), args.rounds)
        results[label] = (plain, reading)

    value = np.zeros((1, model.config.n_embd), np.float32)
    calls = 100_000
    t0 = time.perf_counter()
    for i in range(calls):
        NO_HOOKS(f"l_out-{i & 31}", value)
    per_point = (time.perf_counter() - t0) / calls

    print(f"phi3ref hook points on {Path(path).name}: {n_points} points a pass; a point without hooks "
          f"costs {per_point * 1e9:.0f} ns ({args.rounds} rounds, median)")
    for label, (plain, reading) in results.items():
        share = n_points * per_point / plain
        print(f"  {label:<17} plain {plain * 1e3:9.2f} ms | points {n_points * per_point * 1e3:6.3f} ms "
              f"= {100 * share:.3f}% of the pass | reading every point {reading * 1e3:9.2f} ms ({reading / plain:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
