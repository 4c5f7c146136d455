"""Where phi3ref's resident memory goes, stage by stage, on a full-size model.

    python benchmarks/memory.py [--model benchmarks/models/phi3-mini-full-Q4_K_M.gguf] [--prompt 512] [--decode 128] [--n-ctx N]

Prints the process's resident set (RSS), split into anonymous memory (the Python runtime,
the KV cache, activations) and file-backed pages (the mapped weights, shared libraries),
and the peak, after each stage: imports, load, the kernels (from a warm cache: run it
twice, or `phi3ref warmup` first), the tokenizer, a prompt of --prompt tokens, then
--decode tokens decoded one at a time. Linux only (/proc/self/status).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in MiB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found


def _show(stage: str) -> None:
    m = _status()
    print(f"{stage:34s} RSS {m['VmRSS']:7.0f} MiB  anon {m['RssAnon']:6.0f}  file {m['RssFile']:6.0f}  peak {m['VmHWM']:6.0f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).parent / "models" / "phi3-mini-full-Q4_K_M.gguf")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=None, help="the context to load with (default: --prompt + --decode)")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"--model {args.model}: no such file (benchmarks/write_full_model.py writes it)")
    _show("start")
    import numpy as np
    import numba  # noqa: F401

    _show("numpy and numba imported")
    import phi3ref

    _show("phi3ref imported")
    model = phi3ref.load(args.model, n_ctx=args.n_ctx or args.prompt + args.decode)
    _show("loaded (weights mapped in)")
    model.warmup()
    _show("kernels loaded")
    model.tokenizer
    _show("tokenizer built")
    prompt = np.random.default_rng(0).integers(100, 32000, size=args.prompt).tolist()
    logits = model.forward(prompt, 0)
    _show(f"prompt of {args.prompt}")
    pos = args.prompt
    for _ in range(args.decode):
        logits = model.forward([int(np.argmax(logits))], pos)
        pos += 1
    _show(f"+{args.decode} decoded")
    c = model.config
    kv = 2 * c.n_layer * pos * c.n_head_kv * c.head_dim * np.dtype(model.numerics.kv_dtype).itemsize
    size = os.path.getsize(args.model)
    print(f"file {size / 2**20:.0f} MiB (token_embd {model.token_embd.raw.nbytes / 2**20:.0f} MiB of it, read by row); "
          f"KV cache of {pos} positions {kv / 2**20:.0f} MiB; peak RSS / file {_status()['VmHWM'] * 2**20 / size:.2f}")


if __name__ == "__main__":
    sys.exit(main())
