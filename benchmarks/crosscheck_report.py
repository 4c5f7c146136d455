"""How closely phi3ref agrees with transformers and llama.cpp, preset by preset.

    python benchmarks/crosscheck_report.py [--tokens 64] [--out report.md]

Writes tiny synthetic models of every preset and quant mix to a temporary folder, runs the
same prompt through phi3ref (exact and ggml numerics), HF transformers (float32) and
llama.cpp (llama-cpp-python), and prints a markdown table of max |Δlogit|, top-1
agreement and KL divergence. Needs the crosscheck extra.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import phi3ref
from phi3ref.crosscheck import compare, llama_cpp_logits, transformers_logits
from phi3ref.testing import PRESETS, write_model

QUANTS = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prompt = np.random.default_rng(42).integers(100, 32000, size=args.tokens).tolist()
    lines = [
        f"Prompt of {args.tokens} random token ids; each cell: max |Δlogit| / top-1 agreement / KL (nats).",
        "",
        "| preset | quant | phi3ref exact vs transformers | phi3ref ggml vs llama.cpp | phi3ref exact vs llama.cpp |",
        "|---|---|---|---|---|",
    ]

    def cell(c) -> str:
        return f"{c.max_abs:.2g} / {100 * c.top1:.0f}% / {c.kl:.1g}"

    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            for quant in QUANTS:
                path = write_model(Path(tmp) / f"{preset}-{quant}.gguf", preset=preset, quant=quant, seed=1)
                exact = phi3ref.load(path, numerics="exact").logits(prompt)
                ggml = phi3ref.load(path, numerics="ggml").logits(prompt)
                hf = transformers_logits(path, prompt)
                ll = llama_cpp_logits(path, prompt)
                row = f"| {preset} | {quant} | {cell(compare(exact, hf))} | {cell(compare(ggml, ll))} | {cell(compare(exact, ll))} |"
                print(row, flush=True)
                lines.append(row)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
