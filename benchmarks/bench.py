"""phi3ref against llama.cpp on a full-size synthetic model Q4_K_M, side by side: Phi-3-mini
by default; ``--preset phi4-mini`` (its 200k-row output head is its largest matrix) or
``--preset phi4`` (14.7B, about 9 GB: where the machine's memory allows).

    python benchmarks/bench.py [--preset phi3-mini] [--rounds 3] [--threads 2] [--long] [--scaling] [--transformers] [--level native] [--out DIR]
    python benchmarks/bench.py --cold-only 3 [--preset phi3-mini] [--level native]

Every measurement runs in a fresh process; the runtimes alternate within each round and
the medians over rounds are reported, with the ratios phi3ref / llama.cpp as the headline
(the machines are noisy, ratios from the same run are what compare). Measured per runtime:
load time, prefill speed for 128- and 512-token prompts (fresh context each), decode speed
over 64 tokens after the 128-token prompt, peak RSS, and for phi3ref the time from process
start to the first generated token and the JIT compile time of a cold Numba cache (once,
in a fresh cache folder; with it the time to the second token, whose one-token kernels a
helper compiles in the background). ``--long`` adds a long context (a 2,048-token prefill of a 4k
context; 32 tokens decoded from position 3,500, where attention weighs most); ``--scaling``
adds the speed-up from 1 thread to ``--threads`` for both runtimes; ``--publish`` puts the
table in README.md and the chart in docs/images/ (the docs show what a run printed). Writes results.json, results.md and results.png (with matplotlib) to --out (default
benchmarks/results, for another preset benchmarks/results/<preset>).

``--level``: ``native`` (default) measures the installed llama-cpp-python (built for this
CPU) beside phi3ref as this CPU runs it; a phi3ref.isa level measures llama.cpp built for
that level (phi3ref.llama_builds) beside phi3ref computing that level. ``--level avx2``
runs both as an AVX2-only CPU (Haswell ... Zen 3) runs them, on any machine with AVX2:
phi3ref's kernels are compiled for Haswell too (NUMBA_CPU_NAME, its own Numba cache), so
neither runtime executes AVX-512, VNNI or GFNI.
Needs the ``bench`` extra (llama-cpp-python, matplotlib); transformers with --transformers.
It measures the phi3ref of its own checkout (its children run in that folder, whichever
folder it is started from); two checkouts against each other: ``ab_checkouts.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parent.parent)]  # this checkout's phi3ref, as the children's
from write_full_model import ensure_full_model  # noqa: E402

PROMPTS = (128, 512)
DECODE = 64

# Every child's own peak resident set: the high-water mark of its memory map (VmHWM). Not
# ru_maxrss: Linux carries a process's maximum across execve, so a child of this process
# would report at least the benchmark's own peak (a run that wrote Phi-4-mini's file printed
# 3.14 GB for every phi3ref child, whose own peak was 2.88 GB, measured).
PEAK_RSS = r"""
def peak_rss_bytes():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (not Linux): the rusage maximum, in bytes on macOS, KiB elsewhere
        pass
    import resource, sys
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
"""

PHI3REF = r"""
import json, sys, time
t_start = time.perf_counter()
import numpy as np
import phi3ref
path, threads, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
model = phi3ref.load(path, threads=threads, n_ctx=LONG_CTX if mode == "long" else 1024)
load_s = time.perf_counter() - t0
compile_s = model.warmup()  # the kernels of the model's weight types in its numerics, compiled or loaded from the cache
out = {"compile_s": compile_s, "load_s": load_s}
if mode == "first-token":
    r = phi3ref.generate("Write a haiku about ice hockey", model=model, max_tokens=1, seed=0)
    out["first_token_s"] = time.perf_counter() - t_start
    # the pass that gives the second token: one token's kernels (a helper compiles them in
    # the background while the prompt runs, when the cache is cold)
    model.forward(r.tokens[:1] or [0], len(model.tokens))
    out["second_token_s"] = time.perf_counter() - t_start
elif mode == "long":  # a long prompt, then decoding deep in the context: attention's share grows
    prompt = np.random.default_rng(1).integers(100, 32000, size=LONG_POS).tolist()
    t = time.perf_counter(); logits = model.forward(prompt[:LONG_PREFILL], 0); out[f"prefill{LONG_PREFILL}_tok_s"] = LONG_PREFILL / (time.perf_counter() - t)
    logits = model.forward(prompt[LONG_PREFILL:], LONG_PREFILL)
    pos, t = LONG_POS, time.perf_counter()
    for _ in range(LONG_DECODE):
        logits = model.forward([int(np.argmax(logits))], pos); pos += 1
    out[f"decode_at{LONG_POS}_tok_s"] = LONG_DECODE / (time.perf_counter() - t)
else:
    rng = np.random.default_rng(0)
    for n in (128, 512):
        prompt = rng.integers(100, 32000, size=n).tolist()
        model.reset()
        t = time.perf_counter(); logits = model.forward(prompt, 0); out[f"prefill{n}_tok_s"] = n / (time.perf_counter() - t)
        if n == 128:
            pos = n
            t = time.perf_counter()
            for _ in range(64):
                logits = model.forward([int(np.argmax(logits))], pos); pos += 1
            out["decode_tok_s"] = 64 / (time.perf_counter() - t)
out["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(out))
"""

LLAMA_CPP = r"""
import json, sys, time
import numpy as np
import llama_cpp
path, threads, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
# (llama-cpp-python keeps n_batch rows of logits, indexed by position: the long context
# needs n_batch = n_ctx; the micro-batches stay 512 tokens, as phi3ref's)
llm = llama_cpp.Llama(model_path=path, n_ctx=LONG_CTX if mode == "long" else 1024, n_batch=LONG_CTX if mode == "long" else 512,
                      n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
out = {"load_s": time.perf_counter() - t0}
rng = np.random.default_rng(0)
if mode == "long":
    prompt = np.random.default_rng(1).integers(100, 32000, size=LONG_POS).tolist()
    t = time.perf_counter(); llm.eval(prompt[:LONG_PREFILL]); out[f"prefill{LONG_PREFILL}_tok_s"] = LONG_PREFILL / (time.perf_counter() - t)
    llm.eval(prompt[LONG_PREFILL:])
    t = time.perf_counter()
    for _ in range(LONG_DECODE):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    out[f"decode_at{LONG_POS}_tok_s"] = LONG_DECODE / (time.perf_counter() - t)
for n in (128, 512) if mode != "long" else ():
    prompt = rng.integers(100, 32000, size=n).tolist()
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); out[f"prefill{n}_tok_s"] = n / (time.perf_counter() - t)
    if n == 128:
        t = time.perf_counter()
        for _ in range(64):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        out["decode_tok_s"] = 64 / (time.perf_counter() - t)
out["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(out))
"""

TRANSFORMERS = r"""
import json, sys, time
import numpy as np, torch, transformers
path, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
t0 = time.perf_counter()
p = __import__("pathlib").Path(path)
model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
out = {"load_s": time.perf_counter() - t0}
rng = np.random.default_rng(0)
with torch.no_grad():
    for n in (128, 512):
        ids = torch.tensor([rng.integers(100, 32000, size=n).tolist()])
        t = time.perf_counter(); res = model(ids, use_cache=True); out[f"prefill{n}_tok_s"] = n / (time.perf_counter() - t)
        if n == 128:
            past, logits = res.past_key_values, res.logits[0, -1]
            t = time.perf_counter()
            for _ in range(64):
                res = model(torch.tensor([[int(logits.argmax())]]), past_key_values=past, use_cache=True)
                past, logits = res.past_key_values, res.logits[0, -1]
            out["decode_tok_s"] = 64 / (time.perf_counter() - t)
out["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(out))
"""

# the long-context measurement (--long): a 2,048-token prefill, then decoding at position
# 3,500 of a 4k context, where attention's share of the work is largest
LONG_CTX, LONG_PREFILL, LONG_POS, LONG_DECODE = 4096, 2048, 3500, 32
for _name in ("PHI3REF", "LLAMA_CPP"):
    globals()[_name] = globals()[_name].replace("LONG_CTX", str(LONG_CTX)).replace("LONG_PREFILL", str(LONG_PREFILL)) \
        .replace("LONG_POS", str(LONG_POS)).replace("LONG_DECODE", str(LONG_DECODE))

METRICS = [
    ("load_s", "load (s)", False),
    ("prefill128_tok_s", "prefill 128 (tok/s)", True),
    ("prefill512_tok_s", "prefill 512 (tok/s)", True),
    ("decode_tok_s", "decode 64 after 128 (tok/s)", True),
    ("peak_rss_bytes", "peak RSS (GB)", False),
]
LONG_METRICS = [
    (f"prefill{LONG_PREFILL}_tok_s", f"prefill {LONG_PREFILL:,} of a {LONG_CTX // 1024}k context (tok/s)", True),
    (f"decode_at{LONG_POS}_tok_s", f"decode {LONG_DECODE} at position {LONG_POS:,} (tok/s)", True),
]
SCALED = ["prefill512_tok_s", "decode_tok_s"]  # reported at 1 thread too with --scaling


def run(script: str, *args: str, env: dict | None = None) -> dict:
    # from this checkout's folder, first on a `python -c` child's sys.path: the phi3ref
    # measured is the one beside this script, whatever folder the benchmark was started in
    out = subprocess.run([sys.executable, "-c", PEAK_RSS + script, *args], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_through(path: Path) -> None:
    """Read the file once, so that the OS holds it in its page cache: the first measurement
    (the cold start) would otherwise also time the disk (5 s for Phi-4-mini's file, read
    right after Phi-3-mini's, measured)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from phi3ref.synthetic import PRESETS

    parser.add_argument("--preset", default="phi3-mini", choices=list(PRESETS), help="the full-size model measured (written once, cached)")
    parser.add_argument("--model", type=Path, help="the file of --preset's shape to measure (default: benchmarks/models/<preset>-full-Q4_K_M.gguf)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--transformers", action="store_true", help="also measure HF transformers (fp32 from its own GGUF loader: slow, ~18 GB for phi3-mini; it misreads phi4-mini's partial rotary and LongRoPE)")
    parser.add_argument("--level", default="native", help="native, or a phi3ref.isa level: avx2, avx512, avx512bf16 (see above)")
    parser.add_argument("--long", action="store_true", help=f"also a {LONG_PREFILL:,}-token prefill and decoding at position "
                        f"{LONG_POS:,} of a {LONG_CTX:,}-token context (about two minutes per runtime and round)")
    parser.add_argument("--scaling", action="store_true", help="also measure at 1 thread: the speed-up from 1 to --threads")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--publish", action="store_true",
                        help="also copy results.json / .png to docs/images/ and put results.md in README.md, between the "
                        "markers <!-- bench:PRESET:LEVEL --> and <!-- /bench:PRESET:LEVEL -->")
    parser.add_argument("--publish-only", action="store_true", help="publish the last run's results in --out, measuring nothing")
    parser.add_argument("--cold-only", type=int, metavar="N", help="measure only phi3ref's cold start, N times (a fresh "
                        "cache folder each): compile time and process start to the first and second token")
    args = parser.parse_args()
    results_dir = Path(__file__).parent / "results"
    args.out = args.out or (results_dir if args.preset == "phi3-mini" else results_dir / args.preset)
    if args.publish_only:
        last = json.loads((args.out / "results.json").read_text())
        _publish(args.out, last["preset"], last["level"], (args.out / "results.md").read_text().rstrip("\n"))
        return
    from phi3ref import isa

    features = isa.host_features()
    envs = {"phi3ref": dict(os.environ), "llama.cpp": dict(os.environ), "transformers": dict(os.environ)}
    if args.level == "native":
        instruction_set = " ".join(sorted(f for f in features if f in isa.REPORTED_FEATURES)) + " (native builds)"
    else:
        from phi3ref import llama_builds

        level = isa.resolve(args.level)
        if not level.runs_on(features):
            raise SystemExit(f"--level {level}: this CPU lacks {', '.join(sorted(level.features - features))}")
        envs["phi3ref"]["PHI3REF_ISA"] = level.name
        envs["llama.cpp"]["LLAMA_CPP_LIB_PATH"] = str(llama_builds.build(level))
        instruction_set = f"llama.cpp built for {level.name} ({level.description}), phi3ref computing {level.name}"
        if level.name == "avx2":
            numba_cache = Path(tempfile.gettempdir()) / "phi3ref-bench-haswell-numba"
            envs["phi3ref"].update(isa.haswell_numba_env(), NUMBA_CACHE_DIR=str(numba_cache))
            instruction_set += " compiled for Haswell: neither executes AVX-512, VNNI or GFNI"

    model, _ = ensure_full_model(args.model and args.model.resolve(), preset=args.preset)  # absolute: the children run in this checkout
    _read_through(model)  # the cold start is of the kernel cache, not of the disk

    def cold_start() -> dict:  # phi3ref's start with an empty Numba cache, in a throw-away folder
        with tempfile.TemporaryDirectory() as cold:
            return run(PHI3REF, str(model), str(args.threads), "first-token", env={**envs["phi3ref"], "NUMBA_CACHE_DIR": cold})

    if args.cold_only:
        for i in range(args.cold_only):
            r = cold_start()
            print(f"cold start {i + 1}/{args.cold_only} ({args.preset}, {instruction_set}): JIT compile {r['compile_s']:.1f} s; "
                  f"process start to the first token {r['first_token_s']:.1f} s, to the second {r['second_token_s']:.1f} s")
        return
    file_bytes = model.stat().st_size
    args.out.mkdir(parents=True, exist_ok=True)
    runtimes = {"phi3ref": PHI3REF, "llama.cpp": LLAMA_CPP}
    if args.transformers:
        runtimes["transformers"] = TRANSFORMERS

    cold_run = cold_start()  # JIT compile with a cold Numba cache, once
    samples: dict[str, list[dict]] = {name: [] for name in runtimes}
    long_samples: dict[str, list[dict]] = {name: [] for name in ("phi3ref", "llama.cpp")}
    one_thread: dict[str, list[dict]] = {name: [] for name in ("phi3ref", "llama.cpp")}
    first_token = []
    for r in range(args.rounds):
        order = list(runtimes) if r % 2 == 0 else list(reversed(runtimes))
        for name in order:
            samples[name].append(run(runtimes[name], str(model), str(args.threads), "full", env=envs[name]))
            print(f"round {r + 1}/{args.rounds} {name}: {samples[name][-1]}", file=sys.stderr, flush=True)
            if name in one_thread and args.scaling:
                one_thread[name].append(run(runtimes[name], str(model), "1", "full", env=envs[name]))
                print(f"round {r + 1}/{args.rounds} {name}, 1 thread: {one_thread[name][-1]}", file=sys.stderr, flush=True)
            if name in long_samples and args.long:
                long_samples[name].append(run(runtimes[name], str(model), str(args.threads), "long", env=envs[name]))
                print(f"round {r + 1}/{args.rounds} {name}, long context: {long_samples[name][-1]}", file=sys.stderr, flush=True)
        first_token.append(run(PHI3REF, str(model), str(args.threads), "first-token", env=envs["phi3ref"])["first_token_s"])

    medians = {name: {k: statistics.median(s[k] for s in runs) for k, _, _ in METRICS} for name, runs in samples.items()}
    long_medians = {name: {k: statistics.median(s[k] for s in runs) for k, _, _ in LONG_METRICS}
                    for name, runs in long_samples.items() if runs}
    one_thread_medians = {name: {k: statistics.median(s[k] for s in runs) for k in SCALED} for name, runs in one_thread.items() if runs}
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "level": args.level,
        "instruction_set": instruction_set,
        "threads": args.threads,
        "rounds": args.rounds,
        "preset": args.preset,
        "model": str(model),
        "file_bytes": file_bytes,
        "medians": medians,
        "samples": samples,
        "phi3ref_compile_cold_s": cold_run["compile_s"],
        "phi3ref_first_token_cold_cache_s": cold_run["first_token_s"],
        "phi3ref_second_token_cold_cache_s": cold_run["second_token_s"],
        "phi3ref_first_token_warm_cache_s": statistics.median(first_token),
        "ratios": {k: medians["phi3ref"][k] / medians["llama.cpp"][k] for k, _, _ in METRICS},
        "long_context": {"medians": long_medians, "samples": long_samples,
                         "ratios": {k: long_medians["phi3ref"][k] / long_medians["llama.cpp"][k] for k, _, _ in LONG_METRICS}}
        if long_medians else None,
        "one_thread": {"medians": one_thread_medians, "samples": one_thread,
                       "speedup": {name: {k: medians[name][k] / m[k] for k in SCALED} for name, m in one_thread_medians.items()}}
        if one_thread_medians else None,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    flags = "".join(f" --{f}" for f in ("long", "scaling") if getattr(args, f))
    lines = [
        f"Full-size synthetic {args.preset} Q4_K_M ({file_bytes / 1e9:.2f} GB), {results['machine']}, {args.threads} threads, "
        f"{results['date']}; instruction set: {instruction_set}; medians of {args.rounds} rounds "
        f"(`python benchmarks/bench.py --preset {args.preset} --rounds {args.rounds} --level {args.level}{flags}`).",
        "",
        "| | " + " | ".join(runtimes) + " | phi3ref / llama.cpp |",
        "|---|" + "---|" * (len(runtimes) + 1),
    ]
    for key, label, _ in METRICS:
        scale = 1e9 if key == "peak_rss_bytes" else 1
        cells = [f"{medians[name][key] / scale:.2f}" for name in runtimes]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {results['ratios'][key]:.2f}x |")
    for key, label, _ in LONG_METRICS if long_medians else ():
        cells = [f"{long_medians[name][key]:.2f}" if name in long_medians else "—" for name in runtimes]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {results['long_context']['ratios'][key]:.2f}x |")
    if one_thread_medians:
        speedup = results["one_thread"]["speedup"]
        lines += ["", f"Thread scaling, 1 to {args.threads} threads (tok/s at {args.threads} / at 1; medians at 1 thread: "
                  + "; ".join(f"{name} prefill 512 {m['prefill512_tok_s']:.2f}, decode {m['decode_tok_s']:.2f}"
                              for name, m in one_thread_medians.items()) + "):", "",
                  "| | " + " | ".join(speedup) + " |", "|---|" + "---|" * len(speedup)]
        for key, label in (("prefill512_tok_s", "prefill 512"), ("decode_tok_s", "decode 64 after 128")):
            lines.append(f"| {label} | " + " | ".join(f"{speedup[name][key]:.2f}x" for name in speedup) + " |")
    lines += [
        "",
        f"phi3ref peak RSS / file size: {medians['phi3ref']['peak_rss_bytes'] / file_bytes:.2f}. "
        f"JIT compile with a cold cache: {results['phi3ref_compile_cold_s']:.1f} s; process start to first generated "
        f"token: {results['phi3ref_first_token_cold_cache_s']:.1f} s cold (to the second: "
        f"{results['phi3ref_second_token_cold_cache_s']:.1f} s), {results['phi3ref_first_token_warm_cache_s']:.1f} s with the cache warm.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        _chart(results, runtimes, args.out / "results.png")
    except ImportError:
        print("(matplotlib not installed: no chart)", file=sys.stderr)
    if args.publish:
        _publish(args.out, args.preset, args.level, "\n".join(lines))


def _publish(out: Path, preset: str, level: str, table: str) -> None:
    """Copy the results to docs/images/bench[-PRESET]-LEVEL.{json,png} and put the table in
    README.md between its markers for (preset, level): the docs show what this run printed."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    stem = "bench" + ("" if preset == "phi3-mini" else f"-{preset}") + f"-{level}"
    for suffix in (".json", ".png"):
        if (out / f"results{suffix}").exists():
            shutil.copyfile(out / f"results{suffix}", root / "docs" / "images" / f"{stem}{suffix}")
    readme = root / "README.md"
    text = readme.read_text()
    begin, end = f"<!-- bench:{preset}:{level} -->", f"<!-- /bench:{preset}:{level} -->"
    if begin not in text or end not in text:
        print(f"README.md has no markers {begin} ... {end}: table not placed", file=sys.stderr)
        return
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    print(f"published: docs/images/{stem}.*, README.md ({begin})", file=sys.stderr)


def _chart(results: dict, runtimes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = (results.get("long_context") or {}).get("medians", {})
    speed = [(k, label) for k, label, higher in METRICS if higher] + ([(k, label) for k, label, _ in LONG_METRICS] if long else [])
    fig, ax = plt.subplots(figsize=(11 if long else 8, 4))
    width = 0.8 / len(runtimes)
    for i, name in enumerate(runtimes):
        values = [results["medians"][name].get(k, long.get(name, {}).get(k, 0.0)) for k, _ in speed]
        bars = ax.bar([j + i * width for j in range(len(speed))], values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(runtimes) - 1) / 2 for j in range(len(speed))],
                  [label.replace(" (tok/s)", "").replace(" of a", "\nof a").replace(" at ", "\nat ") for _, label in speed], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{results.get('preset', 'phi3-mini')} Q4_K_M, {results['machine']}, {results['date']}, level {results.get('level', 'native')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
