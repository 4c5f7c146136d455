"""The ``phi3ref`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .gguf_file import GGUFError

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import describe, format_report

    info = describe(args.file)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(info, show_metadata=args.metadata))
    return 0


def _parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--tokens takes comma-separated integer ids, got {text!r}") from None
    if not tokens:
        raise ValueError("--tokens is empty")
    return tokens


def _cmd_logits(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .kernels import warmup
    from .model import load

    tokens = _parse_tokens(args.tokens)
    compile_s = warmup() if args.numerics != "numpy" else 0.0
    t0 = time.perf_counter()
    model = load(args.model, n_ctx=args.n_ctx or max(len(tokens), 16), numerics=args.numerics, threads=args.threads)
    t1 = time.perf_counter()
    logits = model.logits(tokens)
    t2 = time.perf_counter()
    if args.last:
        logits = logits[-1:]
    np.save(args.output, logits)
    print(
        f"wrote {args.output}: logits {logits.shape[0]}x{logits.shape[1]} float32 ({args.numerics} numerics); "
        f"last position argmax {int(logits[-1].argmax())}; compile {compile_s:.2f} s, load {t1 - t0:.2f} s, "
        f"{len(tokens)} tokens in {t2 - t1:.2f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_write_model(args: argparse.Namespace) -> int:
    from .testing import write_model

    path = write_model(args.output, preset=args.preset, size=args.size, quant=args.quant, pure=args.pure, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB): synthetic {args.preset} ({args.size}), {args.quant}, random weights")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .testing import PRESETS, QUANT_MIXES

    parser = argparse.ArgumentParser(prog="phi3ref", description="Reference inference for the Phi-3 family in GGUF files.")
    parser.add_argument("--version", action="version", version=f"phi3ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show a GGUF file's architecture, config, tokenizer and tensors")
    p.add_argument("file", help="path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON for programs")
    p.add_argument("--metadata", action="store_true", help="also list every metadata key")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("logits", help="every position's logits for a token sequence, saved as .npy (to compare runtimes)")
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,32010,1724")
    p.add_argument("-o", "--output", required=True, help="where to write the .npy array (n_tokens, n_vocab) float32")
    p.add_argument("--numerics", default="ggml", choices=["ggml", "exact", "numpy"])
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache size (default: the number of tokens)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--last", action="store_true", help="only the last position")
    p.set_defaults(run=_cmd_logits)

    p = sub.add_parser("write-model", help="write a synthetic Phi-3 family model (real layout and vocabulary, random weights)")
    p.add_argument("output", help="path of the .gguf to write")
    p.add_argument("--preset", default="phi3-mini", choices=list(PRESETS))
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--quant", default="Q4_K_M", choices=list(QUANT_MIXES))
    p.add_argument("--pure", action="store_true", help="every matrix in the base type of --quant")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_write_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``phi3ref`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GGUFError as e:
        print(f"phi3ref: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"phi3ref: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
