"""The ``phi3ref`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .gguf_file import GGUFError
from .hub import DEMO, HubError
from .llama_builds import BuildError
from .errors import ModelBusyError, NonFiniteError
from .loading import NUMERICS

TUTORIAL_PROMPT = "Write a haiku about ice hockey"

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .file_report import describe, format_report

    info = describe(_demo_model() if args.file == DEMO else args.file)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(info, show_metadata=args.metadata))
    return 0


def _parse_tokens(text: str) -> list[int]:
    parts = [t for t in text.replace(" ", "").split(",") if t]
    if not all(t.isascii() and t.lstrip("-").isdigit() for t in parts):  # (int() also reads other scripts' digits)
        raise ValueError(f"--tokens takes comma-separated integer ids, got {text!r}")
    tokens = [int(t) for t in parts]
    if not tokens:
        raise ValueError("--tokens is empty")
    return tokens


def _local_model(flag: str, value: str) -> str:
    """The path a command that reads a local file is given: a .gguf path, or 'demo'."""
    from pathlib import Path

    if value == DEMO:
        return _demo_model()
    try:
        regular = Path(value).is_file()
    except OSError as e:  # a name too long for the file system, ...
        raise FileNotFoundError(f"{flag} {value[:200]}: not a usable path ({e.strerror})") from None
    if not regular:
        what = "a folder" if Path(value).is_dir() else "no such file" if not Path(value).exists() else "not a regular file"
        raise FileNotFoundError(f"{flag} {value}: {what} (a local .gguf path, or 'demo')")
    return value


def _output_path(flag: str, value: str):
    """A file a command will write, checked before any work: its folder exists and can be
    written, and it is not a folder itself."""
    import os
    from pathlib import Path

    path = Path(value)
    try:
        if path.is_dir():
            raise FileNotFoundError(f"{flag} {value}: a folder, not a file name")
        if path.exists() and not path.is_file():
            raise FileNotFoundError(f"{flag} {value}: not a regular file (a device or a pipe), not written")
        folder = path.resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {value}: the folder {folder} does not exist")
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.errno is None:
            raise
        raise FileNotFoundError(f"{flag} {value[:200]}: not a usable path ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise FileNotFoundError(f"{flag} {value}: the folder {folder} cannot be written to")
    return path


def _cmd_logits(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import numpy as np

    from .loading import load

    # everything the command needs is checked before the model is opened or a kernel compiled
    if (args.tokens is None) == (args.text is None):
        raise ValueError("give --tokens or --text")
    tokens = _parse_tokens(args.tokens) if args.tokens is not None else None
    _check_common(args)
    if tokens is not None and args.n_ctx is not None and args.n_ctx < len(tokens):
        raise ValueError(f"--n-ctx {args.n_ctx} is less than the {len(tokens)} tokens of --tokens")
    output = _output_path("-o", args.output)
    path = _local_model("--model", args.model)
    t0 = time.perf_counter()
    if tokens is None:  # --text: encoded as it is, BOS as the file says
        from .gguf_file import GGUFFile
        from .tokenizer import Tokenizer

        with GGUFFile(path) as gf:
            tokens = Tokenizer.from_gguf(gf).encode(args.text)
        if not tokens:
            raise ValueError("--text encodes to no tokens")
        if args.n_ctx is not None and args.n_ctx < len(tokens):
            raise ValueError(f"--n-ctx {args.n_ctx} is less than the {len(tokens)} tokens --text encodes to")
    model = load(path, n_ctx=args.n_ctx or max(len(tokens), 16), numerics=args.numerics, threads=args.threads)
    t1 = time.perf_counter()
    model.warmup()  # the kernels this model's types need, compiled or loaded: reported apart from run time
    t2 = time.perf_counter()
    logits = model.logits(tokens)
    t3 = time.perf_counter()
    if args.last:
        logits = logits[-1:]
    with open(output, "wb") as f:  # the name as given (np.save would append .npy to a name without it)
        np.save(f, logits)
    print(
        f"wrote {args.output}: logits {logits.shape[0]}x{logits.shape[1]} float32 ({args.numerics} numerics); "
        f"last position argmax {int(logits[-1].argmax())}; load {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, "
        f"{len(tokens)} tokens in {t3 - t2:.2f} s",
        file=sys.stderr,
    )
    return 0


def _read_text(flag: str, path: str) -> str:
    from pathlib import Path

    try:
        if Path(path).exists() and not Path(path).is_dir() and not Path(path).is_file():  # a device or a pipe: read forever
            raise FileNotFoundError(f"{flag} {path}: not a regular file")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag} {path}: no such file" if e.errno else str(e)) from None
    except IsADirectoryError:
        raise FileNotFoundError(f"{flag} {path}: a folder, not a text file") from None
    except OSError as e:
        raise FileNotFoundError(f"{flag} {path[:200]}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _progress(label: str):
    """A progress line on a terminal (stderr), nothing otherwise: fn(done, total, note)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, note: str = "") -> None:
        width = 30
        bar = "#" * (width * done // max(total, 1))
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar:<{width}}] {done}/{total} {note}", end=end, file=sys.stderr, flush=True)

    return show


def _cmd_perplexity(args: argparse.Namespace) -> int:
    import time

    from .loading import load
    from .perplexity import chunks, perplexity, text_tokens

    _check_common(args)
    if args.n_ctx is None:
        args.n_ctx = 512  # llama-perplexity's default
    if args.n_ctx < 4:
        raise ValueError(f"--n-ctx must be at least 4, got {args.n_ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise ValueError(f"--chunks must be a positive integer, got {args.chunks}")
    text = _read_text("--text", args.text)
    path = _local_model("MODEL", args.model)
    model = load(path, n_ctx=args.n_ctx, numerics=args.numerics, threads=args.threads)
    tokens = text_tokens(model.tokenizer, text)
    chunks(tokens, args.n_ctx, args.chunks, None)  # a text too short for the chunks is refused before the compile
    compile_s = model.warmup()
    bar = _progress("perplexity")
    t0 = time.perf_counter()
    result = perplexity(model, tokens, args.n_ctx, args.chunks,
                        progress=None if bar is None else lambda c, n, ppl: bar(c, n, f"PPL {ppl:.4f}"))
    seconds = time.perf_counter() - t0
    evaluated = result.n_chunks * result.n_ctx
    if args.json:
        json.dump({**result.as_json(), "numerics": args.numerics, "text_tokens": len(tokens), "seconds": seconds,
                   "seconds_per_1k_tokens": 1000 * seconds / evaluated, "compile_seconds": compile_s}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.running)))
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    print(f"{result.n_chunks} chunks of {result.n_ctx} tokens, {result.tokens_scored} scored ({args.numerics} numerics); "
          f"{seconds:.1f} s, {1000 * seconds / evaluated:.2f} s per 1k tokens evaluated (compile {compile_s:.1f} s apart)",
          file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .crosscheck import compare_runtimes

    _check_common(args)
    if args.n_ctx is not None and args.n_ctx < 4:
        raise ValueError(f"--n-ctx must be at least 4, got {args.n_ctx}")
    if args.text is not None and args.tokens is not None:
        raise ValueError("give --text or --tokens, not both")
    tokens = _parse_tokens(args.tokens) if args.tokens is not None else None
    if tokens is not None and (args.n_ctx is not None or args.chunks is not None):
        raise ValueError("--n-ctx and --chunks cut a --text into chunks; --tokens are compared as one sequence")
    text = _read_text("--text", args.text) if args.text is not None else None
    if args.save_kld_base is not None:
        _output_path("--save-kld-base", args.save_kld_base)
    if args.against_model is not None:
        args.against_model = _local_model("--against-model", args.against_model)
    level = _llama_cpp_level(args)
    path = _local_model("MODEL", args.model)
    bar = _progress("compare")
    stats = compare_runtimes(path, args.against, text=text, tokens=tokens, n_ctx=args.n_ctx or 512, n_chunks=args.chunks,
                             numerics=args.numerics, against_model=args.against_model, save_kld_base=args.save_kld_base,
                             threads=args.threads, level=level, progress=None if bar is None else (lambda d, n: bar(d, n)))
    if args.save_kld_base is not None:
        print(f"wrote {args.save_kld_base}: phi3ref's log-probabilities ({args.numerics} numerics) as a KL-divergence base; "
              f"check a llama.cpp build against it with llama-perplexity -m MODEL --kl-divergence-base {args.save_kld_base} "
              "--kl-divergence", file=sys.stderr)
    if stats is None:
        return 0
    if args.json:
        json.dump({**stats.as_json(), "numerics": args.numerics, "against": str(args.against)}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"phi3ref ({args.numerics}) against {args.against}")
        print(stats)
    return 0


def _llama_cpp_level(args: argparse.Namespace):
    """--level of compare and diverge: the llama.cpp build to run (checked before any work)."""
    from .isa import runnable_level

    if args.level is None:
        return None
    if args.against != "llama.cpp":
        raise ValueError("--level picks a llama.cpp build: it goes with --against llama.cpp")
    return runnable_level(args.level)


def _cmd_diverge(args: argparse.Namespace) -> int:
    from .diverge import diverge

    _check_common(args)
    if (args.text is None) == (args.tokens is None):
        raise ValueError("give --text or --tokens")
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")
    tokens = _parse_tokens(args.tokens) if args.tokens is not None else None
    text = _read_text("--text", args.text) if args.text is not None else None
    if text is not None and text.endswith("\n"):
        text = text[:-1]  # as llama.cpp's tools read a prompt file (-f)
    if args.against_model is not None:
        args.against_model = _local_model("--against-model", args.against_model)
    level = _llama_cpp_level(args)
    path = _local_model("MODEL", args.model)
    result = diverge(path, args.against, tokens=tokens, text=text, numerics=args.numerics, against_model=args.against_model,
                     tolerance=args.tolerance, threads=args.threads, level=level)
    if args.json:
        json.dump(result.as_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"phi3ref ({args.numerics}) against {args.against}: relative error max|Δ| / max|theirs| per op (0: bit for bit)")
        print(result.format())
    return 0 if result.first is None and result.tokens_differ is None else 1


def _check_common(args: argparse.Namespace) -> None:
    """Flags every command checks before any download, compile or load."""
    import numba

    n_ctx = getattr(args, "n_ctx", None)  # diverge runs in the model's default context
    if n_ctx is not None and n_ctx <= 0:
        raise ValueError(f"--n-ctx must be a positive integer, got {n_ctx}")
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"--threads must be from 1 to {numba.config.NUMBA_NUM_THREADS}, got {args.threads}")


def _demo_model() -> str:
    """The bundled demo model: a small Phi-3 trained on Python's documentation."""
    from .hub import demo_path

    return str(demo_path())


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
        print("phi3ref: --model demo is a small Phi-3 trained on Python's documentation: "
              "expect text in that style, not answers.", file=sys.stderr)
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
    from dataclasses import asdict

    from .generate import generate

    if args.tokens is not None and (args.prompt is not None or args.raw):
        raise ValueError("--tokens is the prompt: give no prompt text and no --raw with it")
    if args.logprobs is not None and args.logprobs < 0:
        raise ValueError(f"--logprobs must be >= 0, got {args.logprobs}")
    if args.echo and args.logprobs is None:
        raise ValueError("--echo shows the prompt's log-probabilities: give --logprobs N too")
    tokens = _parse_tokens(args.tokens) if args.tokens is not None else None
    prompt = None if tokens is not None else TUTORIAL_PROMPT if args.prompt is None else args.prompt
    model = _load_for_generation(args)
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    if not args.json:
        print(f"seed {seed} (repeat this run with --seed {seed})", file=sys.stderr)
    stream = generate(
        prompt, tokens=tokens, raw=args.raw, model=model, system=args.system, max_tokens=args.max_tokens, seed=seed,
        stop=args.stop or (), stream=True, logprobs=args.logprobs, echo=args.echo, **_sampling(args),
    )
    for piece in stream:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = stream.result
    if args.json:
        out = {k: v for k, v in asdict(result).items() if k != "timings"}
        out["timings"] = {**asdict(result.timings), "prompt_tokens_per_second": result.timings.prompt_tokens_per_second,
                          "generation_tokens_per_second": result.timings.generation_tokens_per_second}
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write("\n")
    for title, records in (("prompt", result.prompt_logprobs), ("generated", result.logprobs)):
        if records:
            print(f"log-probabilities of the {title} tokens (id, text, logprob; the most likely):", file=sys.stderr)
            for r in records:
                logprob = "   -   " if r.logprob is None else f"{r.logprob:8.4f}"
                top = ", ".join(f"{t} {lp:.4f}" for t, lp in r.top)
                print(f"  {r.token:>7} {r.text!r:>14} {logprob}  {top}", file=sys.stderr)
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


def _cmd_warmup(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .jit import cache_folder_in_use, finish_background
    from .loading import load

    _check_common(args)
    path = _local_model("MODEL", args.model)
    model = load(path, n_ctx=16, numerics=args.numerics, threads=args.threads, isa=args.isa)
    start = time.perf_counter()
    seconds = model.warmup() + finish_background()  # one token's kernels too, whoever compiles them
    types = sorted({w.qtype.name for w in model.matrices()})
    folder = cache_folder_in_use()
    if args.json:
        json.dump({"model": path, "numerics": args.numerics, "weight_types": types, "compile_seconds": seconds,
                   "cache_folder": folder}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"{Path(path).name}: the kernels of {', '.join(types)} weights in {model.numerics!r} are ready "
              f"({time.perf_counter() - start:.1f} s; cached in {folder})")
    return 0


def _cmd_write_model(args: argparse.Namespace) -> int:
    from .synthetic import write_model

    _output_path("OUTPUT", args.output)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
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


def _add_run_flags(p: argparse.ArgumentParser, json_help: str) -> None:
    """--numerics, --threads and --json, which every cross-checking command takes."""
    p.add_argument("--numerics", default="ggml", choices=list(NUMERICS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help=json_help)


def _add_against_flags(p: argparse.ArgumentParser, against_help: str, required: bool) -> None:
    """MODEL, --against, --against-model and the tokens (--text or --tokens) of compare and diverge."""
    p.add_argument("model", help="path to a .gguf file, or 'demo'")
    p.add_argument("--against", required=required, default=None, help=against_help)
    p.add_argument("--against-model", default=None, help="the file the other runtime runs (default: the same)")
    p.add_argument("--text", default=None, help="a UTF-8 text file, encoded as it is")
    p.add_argument("--tokens", default=None, help="comma-separated token ids")
    p.add_argument("--level", default=None, metavar="LEVEL",
                   help="against llama.cpp built for this instruction-set level (avx2, avx512, avx512bf16; built once from "
                   "llama-cpp-python's sources, a few minutes) instead of the installed one, phi3ref's ggml numerics at it too")


def build_parser() -> argparse.ArgumentParser:
    from .synthetic import PRESETS, QUANT_MIXES

    parser = argparse.ArgumentParser(prog="phi3ref", description="Reference inference for the Phi-3 family in GGUF files.")
    parser.add_argument("--version", action="version", version=f"phi3ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show a GGUF file's architecture, config, tokenizer and tensors")
    p.add_argument("file", help="path to a .gguf file, or 'demo'")
    p.add_argument("--json", action="store_true", help="print JSON for programs")
    p.add_argument("--metadata", action="store_true", help="also list every metadata key")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("generate", help="generate text (the tutorial's run: haiku prompt, temperature 1, repeat penalty 1.2)")
    p.add_argument("prompt", nargs="?", default=None, help=f"sent as the user's message (default: {TUTORIAL_PROMPT!r})")
    p.add_argument("--raw", action="store_true", help="encode the prompt as it is (no chat template; BOS as the file says)")
    p.add_argument("--tokens", default=None, help="the prompt as comma-separated token ids (no template)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="each generated token's log-probability under the model, with the N most likely tokens")
    p.add_argument("--echo", action="store_true", help="with --logprobs: the prompt tokens' log-probabilities too")
    p.add_argument("--json", action="store_true", help="print the result as JSON (text, tokens, finish_reason, logprobs, ...)")
    _add_generation_flags(p)
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("chat", help="an interactive multi-turn chat")
    _add_generation_flags(p)
    p.set_defaults(run=_cmd_chat)

    p = sub.add_parser("logits", help="every position's logits for a token sequence, saved as .npy (to compare runtimes)")
    p.add_argument("--model", required=True, help="path to a .gguf file, or 'demo'")
    p.add_argument("--tokens", default=None, help="comma-separated token ids, e.g. 1,32010,1724")
    p.add_argument("--text", default=None, help="text, encoded as it is (no chat template; BOS as the file says)")
    p.add_argument("-o", "--output", required=True, help="where to write the .npy array (n_tokens, n_vocab) float32")
    p.add_argument("--numerics", default="ggml", choices=list(NUMERICS))
    p.add_argument("--n-ctx", type=int, default=None, help="KV cache size (default: the number of tokens)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--last", action="store_true", help="only the last position")
    p.set_defaults(run=_cmd_logits)

    p = sub.add_parser(
        "perplexity", help="perplexity of a text file, computed as llama.cpp's llama-perplexity computes it",
        description="Tokenize the text whole (BOS as the file says), cut it into chunks of --n-ctx tokens, each "
        "starting with BOS, and score the second half of each chunk; prints the running estimate and "
        "'Final estimate: PPL = x +/- err' as llama-perplexity does (ggml numerics: its number, when it runs "
        "with -fa off).",
    )
    p.add_argument("model", help="path to a .gguf file, or 'demo'")
    p.add_argument("--text", required=True, help="a UTF-8 text file (e.g. wiki.test.raw)")
    p.add_argument("--n-ctx", type=int, default=None, help="tokens per chunk (default 512, as llama-perplexity)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: every whole chunk)")
    _add_run_flags(p, "print JSON: ppl, ppl_err, n_chunks, n_ctx, tokens_scored, ...")
    p.set_defaults(run=_cmd_perplexity)

    p = sub.add_parser(
        "compare", help="phi3ref against llama.cpp, transformers or saved logits: KL divergence, top-1, perplexities",
        description="Run phi3ref and another runtime on the same tokens and report what llama-perplexity "
        "--kl-divergence reports (mean / median / 99%% / max KL, same top token, RMS Δp, both perplexities) plus "
        "max |Δlogit| and the first position whose top token differs. --text compares llama-perplexity's positions "
        "(the second half of each chunk of --n-ctx); --tokens every position.",
    )
    _add_against_flags(p, "llama.cpp, transformers, a .npy/.npz of logits, or a KL-divergence base file (.kld) "
                       "from llama-perplexity", required=False)
    p.add_argument("--n-ctx", type=int, default=None, help="tokens per chunk of --text (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks of --text")
    p.add_argument("--save-kld-base", default=None, metavar="PATH",
                   help="also write phi3ref's log-probabilities as llama-perplexity's KL-divergence base file")
    _add_run_flags(p, "print JSON: kl_mean, kl_max, kl_p99, top1, ppl_model, ppl_against, max_abs, ...")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser(
        "diverge", help="the first op where phi3ref and another runtime part, with a per-layer table",
        description="Record every intermediate of phi3ref and of the other side on the same tokens (one batch) and "
        "name the first op whose relative error max|Δ| / max|theirs| exceeds --tolerance. Token ids are compared "
        "first when --text is given. Exit status 0: they agree; 1: a divergence (or different tokens).",
    )
    _add_against_flags(p, "llama.cpp, transformers, or a directory of .npy / an .npz of arrays named by phi3ref's "
                       "hook points", required=True)
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative error that counts as parting (default 1e-3)")
    _add_run_flags(p, "print JSON: first (name, layer, op, rel_err) or null, table")
    p.set_defaults(run=_cmd_diverge)

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

    p = sub.add_parser(
        "warmup", help="compile the kernels a model file needs, ahead of its first run (cached for later runs)",
        description="Compile (or find in the cache) the Numba kernels a model's passes take: its weight types in the "
        "chosen numerics, nothing else. A first run does this by itself (a few seconds to a minute, once); "
        "warmup does it ahead, e.g. while building a container image. NUMBA_CACHE_DIR or PHI3REF_CACHE choose the folder.",
    )
    p.add_argument("model", help="path to a .gguf file, or 'demo'")
    p.add_argument("--isa", default=None, metavar="LEVEL",
                   help="the instruction-set level of ggml numerics (avx2, avx512, avx512bf16; default: this CPU's)")
    _add_run_flags(p, "print JSON: weight_types, compile_seconds, cache_folder")
    p.set_defaults(run=_cmd_warmup)

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
    except OSError as e:  # a file the command writes: a full disk, no permission, ...
        print(f"phi3ref: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
