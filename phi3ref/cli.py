"""The ``phi3ref`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .gguf_file import GGUFError
from .hub import HubError
from .llama_builds import BuildError
from .errors import ModelBusyError, NonFiniteError
from .loading import NUMERICS

TUTORIAL_PROMPT = "Write a haiku about ice hockey"
DEMO = "demo"

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .file_report import describe, format_report

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
    from pathlib import Path

    import numpy as np

    from .loading import load

    # everything the command needs is checked before the model is opened or a kernel compiled
    tokens = _parse_tokens(args.tokens)
    _check_common(args)
    if args.n_ctx is not None and args.n_ctx < len(tokens):
        raise ValueError(f"--n-ctx {args.n_ctx} is less than the {len(tokens)} tokens of --tokens")
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"--model {args.model}: no such file (logits takes a local .gguf path)")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"-o {args.output}: the folder {output.parent} does not exist")
    t0 = time.perf_counter()
    model = load(args.model, n_ctx=args.n_ctx or max(len(tokens), 16), numerics=args.numerics, threads=args.threads)
    t1 = time.perf_counter()
    # A first pass of (at most) two tokens compiles, or loads from Numba's cache, the
    # kernels this model's types need, so that compile time is reported apart from run time.
    model.logits(tokens[:2])
    t2 = time.perf_counter()
    logits = model.logits(tokens)
    t3 = time.perf_counter()
    if args.last:
        logits = logits[-1:]
    np.save(output, logits)
    print(
        f"wrote {args.output}: logits {logits.shape[0]}x{logits.shape[1]} float32 ({args.numerics} numerics); "
        f"last position argmax {int(logits[-1].argmax())}; load {t1 - t0:.2f} s, compile and a first pass of "
        f"{min(2, len(tokens))} tokens {t2 - t1:.2f} s, {len(tokens)} tokens in {t3 - t2:.2f} s",
        file=sys.stderr,
    )
    return 0


def _check_common(args: argparse.Namespace) -> None:
    """Flags every command checks before any download, compile or load."""
    import numba

    if args.n_ctx is not None and args.n_ctx <= 0:
        raise ValueError(f"--n-ctx must be a positive integer, got {args.n_ctx}")
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"--threads must be from 1 to {numba.config.NUMBA_NUM_THREADS}, got {args.threads}")


def _demo_model() -> str:
    """A tiny random-weight Phi-3 with the real vocabulary, written once into the user cache."""
    import os
    from pathlib import Path

    from .synthetic import write_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi3ref"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "demo-phi3-mini-tiny-Q4_K_M.gguf"
    if not path.exists():
        write_model(path, preset="phi3-mini", size="tiny", quant="Q4_K_M", seed=0)
    return str(path)


def _check_generation_flags(args: argparse.Namespace) -> None:
    """Every generation flag, checked before a model is downloaded, written or loaded."""
    from .sampler import SamplingParams

    _check_common(args)
    SamplingParams(**_sampling(args))
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.model == DEMO and (args.file or args.revision):
        raise ValueError("--file and --revision name a file of a Hub repository; --model demo has none")


def _load_for_generation(args: argparse.Namespace):
    from .hub import resolve_model
    from .loading import load

    _check_generation_flags(args)
    if args.model == DEMO:
        print("phi3ref: --model demo is a tiny model with random weights and the real Phi-3 vocabulary: its output is noise.", file=sys.stderr)
        path = _demo_model()
    else:
        path = resolve_model(args.model, filename=args.file, revision=args.revision, file_flag="--file")
    return load(path, numerics=args.numerics, threads=args.threads, n_ctx=args.n_ctx)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    import secrets

    from .generate import generate

    model = _load_for_generation(args)
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    print(f"seed {seed} (repeat this run with --seed {seed})", file=sys.stderr)
    stream = generate(
        args.prompt, model=model, system=args.system, max_tokens=args.max_tokens, seed=seed, stop=args.stop or (),
        stream=True, **_sampling(args),
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = stream.result
    print(f"[{result.finish_reason}] {result.timings}", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .generate import Chat

    model = _load_for_generation(args)
    chat = Chat(model, system=args.system, seed=args.seed, max_tokens=args.max_tokens, stop=args.stop or (), **_sampling(args))
    print(f"seed {chat.seed}. Type a message; /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            chat = Chat(model, system=args.system, seed=args.seed, max_tokens=args.max_tokens, stop=args.stop or (), **_sampling(args))
            continue
        if not line.strip():
            continue
        stream = chat.send(line, stream=True)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(f"[{stream.result.finish_reason}] {stream.result.timings}", file=sys.stderr)


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    from .hub import DEFAULT_REPO
    from .sampler import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLING

    p.add_argument("--model", default=DEFAULT_REPO, help=f"a .gguf path, a Hub repository id (default {DEFAULT_REPO}), or 'demo'")
    p.add_argument("--file", default=None, help="which .gguf of the Hub repository (default: its known file)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature, help=f"0 = greedy (default {DEFAULT_SAMPLING.temperature})")
    p.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p)
    p.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k)
    p.add_argument("--min-p", type=float, default=DEFAULT_SAMPLING.min_p)
    p.add_argument("--repeat-penalty", type=float, default=DEFAULT_SAMPLING.repeat_penalty)
    p.add_argument("--repeat-last-n", type=int, default=DEFAULT_SAMPLING.repeat_last_n)
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--numerics", default="ggml", choices=list(NUMERICS))
    p.add_argument("--n-ctx", type=int, default=None, help="context size (default: the model's, at most 4096)")


def _cmd_write_model(args: argparse.Namespace) -> int:
    from .synthetic import write_model

    path = write_model(args.output, preset=args.preset, size=args.size, quant=args.quant, pure=args.pure, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB): synthetic {args.preset} ({args.size}), {args.quant}, random weights")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import DEFAULT_QUANTS, format_report, run

    quants = tuple(q.strip() for q in args.quants.split(",") if q.strip()) if args.quants else DEFAULT_QUANTS
    progress = None if args.json else (lambda step: print(f"... {step}", file=sys.stderr, flush=True))
    report = run(levels=args.level, quants=quants, threads=args.threads, progress=progress)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    if report.get("llama_cpp_python") is None:
        return 3
    return 0 if report["bit_exact"] else 1


def build_parser() -> argparse.ArgumentParser:
    from .synthetic import PRESETS, QUANT_MIXES

    parser = argparse.ArgumentParser(prog="phi3ref", description="Reference inference for the Phi-3 family in GGUF files.")
    parser.add_argument("--version", action="version", version=f"phi3ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show a GGUF file's architecture, config, tokenizer and tensors")
    p.add_argument("file", help="path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON for programs")
    p.add_argument("--metadata", action="store_true", help="also list every metadata key")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("generate", help="generate text (the tutorial's run: haiku prompt, temperature 1, repeat penalty 1.2)")
    p.add_argument("prompt", nargs="?", default=TUTORIAL_PROMPT, help=f"sent as the user's message (default: {TUTORIAL_PROMPT!r})")
    _add_generation_flags(p)
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("chat", help="an interactive multi-turn chat")
    _add_generation_flags(p)
    p.set_defaults(run=_cmd_chat)

    p = sub.add_parser("logits", help="every position's logits for a token sequence, saved as .npy (to compare runtimes)")
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,32010,1724")
    p.add_argument("-o", "--output", required=True, help="where to write the .npy array (n_tokens, n_vocab) float32")
    p.add_argument("--numerics", default="ggml", choices=list(NUMERICS))
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache size (default: the number of tokens)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--last", action="store_true", help="only the last position")
    p.set_defaults(run=_cmd_logits)

    p = sub.add_parser(
        "selfcheck", help="does this CPU reproduce llama.cpp bit for bit? (per op, on small synthetic models)",
        description="Write small synthetic models, trace them beside llama.cpp and report, per operation, whether "
        "phi3ref's ggml numerics are bit-identical. Exit status 0: bit for bit; 1: a difference; 3: "
        "llama-cpp-python is not installed, nothing compared.",
    )
    p.add_argument("--json", action="store_true", help="print JSON for programs")
    p.add_argument(
        "--level", action="append", default=None, metavar="LEVEL",
        help="check against llama.cpp built for this level (avx2, avx512, avx512bf16, or 'all' this CPU runs; "
        "repeatable; built once from llama-cpp-python's sources, about 2 minutes each) instead of the installed one",
    )
    p.add_argument("--quants", default=None, help="comma-separated weight types (default: Q4_K_M,Q8_0,F16)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=_cmd_selfcheck)

    p = sub.add_parser("write-model", help="write a synthetic Phi-3 family model (real layout and vocabulary, random weights)")
    p.add_argument("output", help="path of the .gguf to write")
    p.add_argument("--preset", default="phi3-mini", choices=list(PRESETS))
    p.add_argument("--size", default="tiny", choices=["tiny", "heads", "full"],
                   help="tiny; heads: tiny with the real head sizes; full: the real model's size")
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
    except (GGUFError, HubError, BuildError, FileNotFoundError, NonFiniteError, ModelBusyError) as e:
        print(f"phi3ref: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"phi3ref: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
