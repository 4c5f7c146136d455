"""``phi3ref selfcheck``: does this CPU reproduce llama.cpp bit for bit?

The first thing a cross-checker runs on a new machine. It writes small synthetic Phi-3
models (the real head size 96, a few weight types), runs :meth:`phi3ref.Model.trace`
beside :func:`phi3ref.crosscheck.llama_cpp_trace` on a prompt past every kernel threshold,
and a few decoding steps beside :func:`~phi3ref.crosscheck.llama_cpp_generation_logits`,
and reports per operation whether the tensors are bit-identical, the instruction-set level
phi3ref chose, and the first tensor that differs.

Against the installed llama-cpp-python (built natively for this CPU) by default; with
``levels``, against llama.cpp built at those levels (:mod:`phi3ref.llama_builds`).
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import isa as isa_levels

__all__ = ["CheckResult", "OpSummary", "run", "format_report"]

# The weight types checked by default: a K-quant mix (Q4_K with Q6_K), a 32-block type, float16.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0", "F16")
# A prompt longer than every batch threshold llama.cpp's kernels switch at (tinyBLAS from 2
# tokens, the Q8_0 / K-quant GEMM tiles, 256-padded KV), and a short decode after another prompt.
PROMPT_TOKENS = 300
DECODE_PROMPT, DECODE_STEPS = 40, 16
N_CTX = 1024


@dataclass
class OpSummary:
    """One operation (all layers' tensors of one name, e.g. ``kqv_out``)."""

    op: str
    tensors: int
    equal: int
    max_abs: float


@dataclass
class CheckResult:
    """One weight type against one llama.cpp build."""

    runtime: str  # "installed llama-cpp-python" or "llama.cpp built for <level>"
    level: str  # the level phi3ref computed in
    quant: str
    ops: list[OpSummary] = field(default_factory=list)
    first_difference: str | None = None  # the first tensor (in computing order) that differs
    prompt_max_abs: float = 0.0  # every position's logits of the prompt
    decode_max_abs: float = 0.0  # the logits of each single-token step through the KV cache

    @property
    def bit_exact(self) -> bool:
        return self.first_difference is None and self.prompt_max_abs == 0 and self.decode_max_abs == 0


def _runtime_name(build: isa_levels.Level | None) -> str:
    return "installed llama-cpp-python" if build is None else f"llama.cpp built for {build.name}"


def _op_name(tensor: str) -> str:
    return re.sub(r"-\d+$", "", tensor)


def _check_one(path: Path, quant: str, level: isa_levels.Level, build: isa_levels.Level | None, threads: int | None) -> CheckResult:
    from .crosscheck import compare, compare_traces, generation_logits, llama_cpp_calls
    from .loading import load

    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 32000, size=PROMPT_TOKENS).tolist()
    decode_prompt = rng.integers(100, 32000, size=DECODE_PROMPT).tolist()
    steps = rng.integers(100, 32000, size=DECODE_STEPS).tolist()
    trace, gen = llama_cpp_calls(
        [("trace", dict(path=str(path), tokens=prompt, n_ctx=N_CTX)),
         ("generation", dict(path=str(path), prompt=decode_prompt, continuation=steps, n_ctx=N_CTX))],
        level=build, threads=threads,
    )
    model = load(path, n_ctx=N_CTX, isa=level, threads=threads)
    ours = model.trace(prompt)
    matches = compare_traces(ours, trace)
    ops: dict[str, OpSummary] = {}
    for m in matches:
        s = ops.setdefault(_op_name(m.name), OpSummary(_op_name(m.name), 0, 0, 0.0))
        s.tensors += 1
        s.equal += m.equal
        s.max_abs = max(s.max_abs, m.max_abs)
    first = next((m.name for m in matches if not m.equal), None)
    return CheckResult(
        runtime=_runtime_name(build), level=level.name, quant=quant, ops=list(ops.values()), first_difference=first,
        prompt_max_abs=compare(ours["result_output"], trace["result_output"].reshape(ours["result_output"].shape)).max_abs,
        decode_max_abs=compare(generation_logits(model, decode_prompt, steps), gen).max_abs,
    )


def run(levels: list[str] | None = None, quants: tuple[str, ...] = DEFAULT_QUANTS, threads: int | None = None,
        progress=None) -> dict:
    """Check phi3ref's ggml numerics against llama.cpp on this CPU; a JSON-ready report.

    ``levels`` None: the installed llama-cpp-python against phi3ref's choice for this CPU
    (:func:`phi3ref.isa.resolve`); else each named level (``"all"``: every level this CPU
    runs) against llama.cpp built for it. ``progress(str)`` is told each step."""
    from .synthetic import QUANT_MIXES, write_model

    if levels is not None and not levels:
        raise ValueError("levels is empty (None: the installed llama-cpp-python; 'all': every level this CPU runs)")
    for q in quants:
        if q not in QUANT_MIXES:
            raise ValueError(f"unknown weight type {q!r}; one of {', '.join(QUANT_MIXES)}")
    features = isa_levels.host_features() if isa_levels.is_x86() else frozenset()
    chosen = isa_levels.resolve()
    report: dict = {
        "cpu": {
            "features": sorted(f for f in features if f in isa_levels.REPORTED_FEATURES),
            "level": chosen.name,
            "level_description": chosen.description,
            "runnable_levels": [lv.name for lv in isa_levels.LEVELS.values() if lv.runs_on(features)],
            "not_reproduced": isa_levels.native_gaps(features),
        },
        "checks": [],
    }
    try:
        from .llama_builds import installed_version

        report["llama_cpp_python"] = installed_version()
    except Exception as e:  # noqa: BLE001 - the report says why nothing was compared
        report["llama_cpp_python"] = None
        report["skipped"] = str(e)
        return report
    if levels is None:
        plan = [(chosen, None)]
    else:
        names = [lv.name for lv in isa_levels.LEVELS.values() if lv.runs_on(features)] if [n.lower() for n in levels] == ["all"] else levels
        plan = []
        if not names:
            raise ValueError("this CPU runs none of phi3ref's levels (it lacks AVX2): no llama.cpp build to compare with")
        for name in names:
            if name.lower() not in isa_levels.LEVELS:
                raise ValueError(f"unknown level {name!r}; one of {', '.join(isa_levels.LEVELS)}, or 'all'")
            level = isa_levels.runnable_level(name, features)
            plan.append((level, level))
    with tempfile.TemporaryDirectory(prefix="phi3ref-selfcheck-") as tmp:
        for quant in quants:
            path = write_model(Path(tmp) / f"selfcheck-{quant}.gguf", preset="phi3-mini", size="heads", quant=quant, seed=5)
            for level, build in plan:
                if progress:
                    progress(f"{quant}: phi3ref at {level.name} vs {_runtime_name(build)}")
                t0 = time.perf_counter()
                try:
                    result = _check_one(path, quant, level, build, threads)
                except RuntimeError as e:  # llama.cpp failed or crashed in its child process
                    entry = {"runtime": _runtime_name(build), "level": level.name, "quant": quant, "error": str(e).splitlines()[0], "bit_exact": False}
                else:
                    entry = {**asdict(result), "bit_exact": result.bit_exact}
                entry["seconds"] = round(time.perf_counter() - t0, 1)
                report["checks"].append(entry)
    report["bit_exact"] = all(c["bit_exact"] for c in report["checks"])
    return report


def format_report(report: dict) -> str:
    """The report as text: the CPU, then per check and operation, equal or not."""
    cpu = report["cpu"]
    lines = [
        f"CPU features: {' '.join(cpu['features']) or '(no x86 SIMD extensions)'}",
        f"phi3ref computes ggml numerics at level {cpu['level']}: {cpu['level_description']}",
        f"levels this CPU runs: {', '.join(cpu['runnable_levels']) or 'none'}",
    ]
    lines += [f"note: {gap}" for gap in cpu["not_reproduced"]]
    if report.get("llama_cpp_python") is None:
        lines.append(f"nothing compared: {report.get('skipped')}")
        return "\n".join(lines)
    lines.append(f"llama-cpp-python {report['llama_cpp_python']}")
    for c in report["checks"]:
        if "error" in c:
            lines.append(f"\n{c['quant']}: phi3ref ({c['level']}) vs {c['runtime']}: NOT COMPARED: {c['error']}")
            continue
        verdict = "bit for bit" if c["bit_exact"] else f"DIFFERS (first at {c['first_difference'] or 'the logits'})"
        lines.append(f"\n{c['quant']}: phi3ref ({c['level']}) vs {c['runtime']}: {verdict}  [{c['seconds']} s]")
        for op in c["ops"]:
            state = "equal" if op["equal"] == op["tensors"] else f"{op['tensors'] - op['equal']} differ, max|Δ| {op['max_abs']:.3g}"
            lines.append(f"  {op['op']:<14} {op['equal']:>3}/{op['tensors']:<3} {state}")
        lines.append(f"  {'prompt logits':<14} max|Δ| {c['prompt_max_abs']:.3g}  ({PROMPT_TOKENS} tokens)")
        lines.append(f"  {'decode logits':<14} max|Δ| {c['decode_max_abs']:.3g}  ({DECODE_STEPS} steps after {DECODE_PROMPT} tokens)")
    lines.append("\nresult: " + ("this CPU reproduces llama.cpp bit for bit" if report["bit_exact"] else "phi3ref and llama.cpp differ on this CPU (see above)"))
    return "\n".join(lines)
