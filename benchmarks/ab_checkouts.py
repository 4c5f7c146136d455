"""phi3ref of two checkouts side by side: did a change make it slower?

    python benchmarks/ab_checkouts.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 6] [--model PATH]

e.g. after ``git worktree add /tmp/before HEAD~1``: ``python benchmarks/ab_checkouts.py
/tmp/before``. Each measurement runs in a fresh process with ``PYTHONPATH`` set to one
checkout (default NEW: this one), the two alternating and swapping order every round so
that a machine slowing down or speeding up mid-run weighs on both alike: a 128-token
prompt and 32 decoded tokens (ggml numerics, warm kernel caches) on the full-size
synthetic Phi-3-mini Q4_K_M (benchmarks/write_full_model.py writes it once). Prints
every round, the medians and new / old. For phi3ref against llama.cpp, use bench.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from write_full_model import DEFAULT_PATH, ensure_full_model  # noqa: E402

CHILD = r"""
import json, sys, time, numpy as np, phi3ref
model = phi3ref.load(sys.argv[1], threads=int(sys.argv[2]), n_ctx=1024)
(model.warmup if hasattr(model, "warmup") else model.numerics.warmup)()  # an older checkout has only the latter
prompt = np.random.default_rng(0).integers(100, 32000, size=128).tolist()
model.forward(prompt[:16], 0)  # first touch of every weight page
t = time.perf_counter(); logits = model.forward(prompt, 0); prefill = 128 / (time.perf_counter() - t)
pos, t = 128, time.perf_counter()
for _ in range(32):
    logits = model.forward([int(np.argmax(logits))], pos); pos += 1
print(json.dumps({"prefill128_tok_s": prefill, "decode_tok_s": 32 / (time.perf_counter() - t), "phi3ref": phi3ref.__file__}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="a phi3ref checkout (the folder holding phi3ref/)")
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help=f"a .gguf file (default: {DEFAULT_PATH}, written if missing)")
    args = parser.parse_args(argv)
    for checkout in (args.old, args.new):
        if not (checkout / "phi3ref" / "__init__.py").is_file():
            parser.error(f"{checkout} is not a phi3ref checkout (no phi3ref/__init__.py in it)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    # the children run in / (so that neither checkout is on the path twice): an absolute path
    path = args.model.resolve() if args.model is not None else ensure_full_model()[0]
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        order = [("old", args.old), ("new", args.new)]
        for name, checkout in order if r % 2 == 0 else order[::-1]:
            env = {"PYTHONPATH": str(checkout.resolve()), "PATH": "/usr/bin:/bin"}
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.threads)], capture_output=True, text=True, env=env, cwd="/")
            if out.returncode:
                raise SystemExit(f"the {name} checkout's run failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)
    keys = ("prefill128_tok_s", "decode_tok_s")
    medians = {name: {k: statistics.median(run[k] for run in rows) for k in keys} for name, rows in runs.items()}
    for name in runs:
        print(f"{name} ({args.old if name == 'old' else args.new}): " + ", ".join(f"{k} {v:.2f}" for k, v in medians[name].items()))
    print("new / old: " + ", ".join(f"{k} {medians['new'][k] / medians['old'][k]:.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
