"""Run the full-size synthetic Phi-3-mini Q4_K_M through phi3ref and report load time, JIT
compile time, prefill and decode speed and peak memory.

    python benchmarks/model_bench.py [--prompt 128] [--generate 32] [--numerics ggml] [--json out.json]

The model file is written once and cached (benchmarks/write_full_model.py). Each
measurement runs in a fresh process, so peak RSS and load time are those of a new user.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from write_full_model import DEFAULT_PATH, ensure_full_model  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
t0 = time.perf_counter()
import phi3ref
from phi3ref import kernels
t_import = time.perf_counter() - t0
compile_s = kernels.warmup()
t1 = time.perf_counter()
model = phi3ref.load(sys.argv[1], numerics=sys.argv[2], n_ctx=int(sys.argv[3]) + int(sys.argv[4]))
load_s = time.perf_counter() - t1
prompt = np.random.default_rng(0).integers(100, 32000, size=int(sys.argv[3])).tolist()
t2 = time.perf_counter()
logits = model.forward(prompt, 0)
prefill_s = time.perf_counter() - t2
pos = len(prompt)
t3 = time.perf_counter()
for _ in range(int(sys.argv[4])):
    logits = model.forward([int(np.argmax(logits))], pos)
    pos += 1
decode_s = time.perf_counter() - t3
print(json.dumps({
    "import_s": t_import, "compile_s": compile_s, "load_s": load_s,
    "prefill_tokens": len(prompt), "prefill_s": prefill_s, "prefill_tok_s": len(prompt) / prefill_s,
    "decode_tokens": int(sys.argv[4]), "decode_s": decode_s, "decode_tok_s": int(sys.argv[4]) / decode_s,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def measure(model: Path, numerics: str, prompt: int, generate: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), numerics, str(prompt), str(generate)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--numerics", default="ggml", choices=["ggml", "exact"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    model, _ = ensure_full_model(args.model)
    result = measure(model, args.numerics, args.prompt, args.generate)
    size = model.stat().st_size
    result.update(
        model=str(model), file_bytes=size, numerics=args.numerics, rss_over_file=result["peak_rss_bytes"] / size,
        threads=os.cpu_count(), machine=f"{platform.machine()}, {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"),
    )
    print(
        f"phi3ref {args.numerics} on {model.name} ({size / 1e9:.2f} GB), {result['machine']}, {result['date']}\n"
        f"  JIT warmup (compiles, or loads Numba's cache) {result['compile_s']:.1f} s, load {result['load_s']:.2f} s\n"
        f"  prefill {args.prompt} tokens: {result['prefill_tok_s']:.2f} tok/s\n"
        f"  decode {args.generate} tokens: {result['decode_tok_s']:.2f} tok/s\n"
        f"  peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB = {result['rss_over_file']:.2f} x the file"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
