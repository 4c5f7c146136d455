"""How closely phi3ref agrees with transformers and llama.cpp, preset by preset, per level.

    python benchmarks/crosscheck_report.py [--tokens 300] [--level avx2 --level avx512] [--out report.md]

Writes synthetic models of every preset (size "heads": two layers, the real head sizes) in
every weight type to a temporary folder (Q2_K, Q3_K_M, IQ4_NL, IQ4_XS by llama.cpp's own
quantizer), runs one prompt through phi3ref (exact numerics, and ggml numerics at each
level), HF transformers (float32) and llama.cpp built for each level (phi3ref.llama_builds),
and prints a markdown table of max |Δlogit| / top-1 agreement / KL divergence over every
position. Levels default to every level this CPU runs. Needs the crosscheck extra.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np

import phi3ref
from phi3ref import isa
from phi3ref.crosscheck import compare, llama_cpp_calls, llama_cpp_quantize, transformers_logits
from phi3ref.synthetic import PRESETS, write_model

WRITTEN = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]
LLAMA_QUANTIZED = ["Q2_K", "Q3_K_M", "IQ4_NL", "IQ4_XS"]
N_CTX = 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--level", action="append", default=None, help="a phi3ref.isa level (repeatable; default: all this CPU runs)")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--quants", default=",".join(WRITTEN + LLAMA_QUANTIZED))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    features = isa.host_features()
    levels = [isa.resolve(n) for n in args.level] if args.level else [lv for lv in isa.LEVELS.values() if lv.runs_on(features)]
    if not levels:
        raise SystemExit("this CPU runs none of phi3ref's levels (no AVX2): nothing to compare against")
    prompt = np.random.default_rng(42).integers(100, 32000, size=args.tokens).tolist()
    cpu = " ".join(sorted(f for f in features if f in isa.REPORTED_FEATURES))
    lines = [
        f"CPU: {platform.processor() or platform.machine()} ({cpu}). Prompt of {args.tokens} random token ids, every "
        "position; each cell: max |Δlogit| / top-1 agreement / KL (nats).",
        "",
        "| preset | quant | exact vs transformers | " + " | ".join(f"ggml vs llama.cpp ({lv})" for lv in levels)
        + f" | exact vs llama.cpp ({levels[0]}) |",
        "|---|---|---|" + "---|" * (len(levels) + 1),
    ]

    def cell(c) -> str:
        return f"{c.max_abs:.2g} / {100 * c.top1:.0f}% / {c.kl:.1g}"

    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            paths = {}
            for quant in args.quants.split(","):
                path = Path(tmp) / f"{preset}-{quant}.gguf"
                if quant in LLAMA_QUANTIZED:
                    if "F32" not in paths:
                        paths["F32"] = write_model(Path(tmp) / f"{preset}-F32.gguf", preset=preset, size="heads", quant="F32", seed=1)
                    llama_cpp_quantize(paths["F32"], path, quant)
                else:
                    write_model(path, preset=preset, size="heads", quant=quant, seed=1)
                paths[quant] = path
            for quant in args.quants.split(","):
                path = paths[quant]
                calls = [("logits", dict(path=str(path), tokens=prompt, n_ctx=N_CTX))]
                theirs = [llama_cpp_calls(calls, level=lv)[0] for lv in levels]
                exact = phi3ref.load(path, numerics="exact", n_ctx=N_CTX).logits(prompt)
                ggml = [phi3ref.load(path, isa=lv, n_ctx=N_CTX).logits(prompt) for lv in levels]
                hf = transformers_logits(path, prompt)
                cells = [cell(compare(exact, hf))] + [cell(compare(g, t)) for g, t in zip(ggml, theirs)] + [cell(compare(exact, theirs[0]))]
                row = f"| {preset} | {quant} | " + " | ".join(cells) + " |"
                print(row, flush=True)
                lines.append(row)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
