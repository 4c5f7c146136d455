"""The exact numerics' Numba kernels (phi3ref.kernels) against naive numpy references, on every
type they serve; the kernel cache and warm-up of both kernel modules. The ggml kernels are
tests/test_ggml.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from phi3ref import QUANT_TYPES, dequantize, kernels, quantize
from phi3ref.ggml import kernels as ggml_kernels
from phi3ref.quants import QUANTIZABLE_TYPES
from phi3ref.weights import Weight

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # as phi3ref.jit counts them
from phi3ref.loading import numerics_named

BLOCK_TYPES = [t for t, q in QUANT_TYPES.items() if q.block_size > 1]
N_IN = 512
THREADS = numba.get_num_threads()

def random_weight(qtype: QT, rows: int, seed: int) -> np.ndarray:
    """Weight bytes: quantized Gaussian rows where phi3ref can encode the type, otherwise
    random blocks whose float16 scales are set to random values of sensible size."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE_TYPES:
        return quantize(rng.standard_normal((rows, N_IN)).astype(np.float32) * 0.05, qtype)
    t = QUANT_TYPES[qtype]
    raw = rng.integers(0, 256, size=(rows, N_IN // t.block_size * t.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, t.type_size)
    for off in t.scale_offsets:  # the float16 scales, set to sane values
        scales = (rng.random(blocks.shape[0]) * 0.01 + 0.001).astype("<f2")
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_decode_row_is_bit_exact(qtype):
    raw = random_weight(qtype, 6, 1)
    ref = dequantize(raw, qtype)
    out = np.empty(N_IN, dtype=np.float32)
    for r in range(raw.shape[0]):
        kernels.decode_row(raw[r], int(qtype), out, kernels.F16_TABLE)
        assert np.array_equal(out.view(np.uint32), ref[r].view(np.uint32)), f"row {r}"


@pytest.mark.parametrize("qtype", list(QUANT_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_exact_matmul_matches_numpy(qtype, n_tokens):
    raw = random_weight(qtype, 37, 2) if qtype not in (QT.F32, QT.F16, QT.BF16) else quantize(
        np.random.default_rng(2).standard_normal((37, N_IN)).astype(np.float32) * 0.05, qtype
    )
    x = np.random.default_rng(3).standard_normal((n_tokens, N_IN)).astype(np.float32)
    w = Weight("w", raw, qtype, (37, N_IN))
    ref = x.astype(np.float64) @ dequantize(raw, qtype).astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(dequantize(raw, qtype)).astype(np.float64).T
    for numerics in ("exact", "numpy"):
        out = numerics_named(numerics).matmul(w, x)
        assert out.shape == (n_tokens, 37) and out.dtype == np.float32
        assert (np.abs(out - ref) <= 1e-5 * scale + 1e-30).all(), numerics


# ---- ggml numerics ------------------------------------------------------------------


def test_matmul_shape_errors():
    w = Weight("blk.0.ffn_up.weight", quantize(np.zeros((4, 256), np.float32), QT.Q4_K), QT.Q4_K, (4, 256))
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight: input of shape \\(1, 128\\)"):
        numerics_named("ggml").matmul(w, np.zeros((1, 128), np.float32))
    with pytest.raises(ValueError, match="numerics must be one of"):
        numerics_named("fast")


@pytest.mark.parametrize("warmup", [kernels.warmup, ggml_kernels.warmup], ids=["exact", "ggml"])
def test_warmup_reports_compile_time(warmup):
    seconds = warmup()
    assert seconds >= 0
    # the second call finds everything compiled
    assert warmup() < max(1.0, seconds)


def test_kernel_cache_knows_the_simd_form_and_source():
    """Numba's cache of phi3ref's kernels sits in a folder per SIMD form and is stamped with
    the content of simd.py and quants.py (whose block layouts the kernels bake in) and of
    jit.py (how the parts are compiled), so neither an edit of those nor another form loads
    stale code; the kernels made for one weight type (jit.specialized) are cached the same
    way."""
    import hashlib
    import os

    from phi3ref import jit, quants
    from phi3ref.ggml import simd

    q4_k = int(QT.Q4_K)
    for kernel in (ggml_kernels.product_kernel(q4_k, 8, 8, True).part, kernels.matmul_exact_kernel(q4_k).part, ggml_kernels.rms_norm_ggml.part, jit._run_parts):
        cache = kernel._cache
        assert type(cache._impl.locator).__name__ == "KernelCacheLocator"
        assert f"simd-{simd.FORM}" in Path(cache._cache_path).parts
        if not os.environ.get("NUMBA_CACHE_DIR"):
            assert Path(cache._cache_path).is_relative_to(jit.kernel_cache_folder())
        stamp = cache._impl.locator.get_source_stamp()
        assert stamp[1] == hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (simd, quants, jit))).digest()


def test_kernels_are_cached_in_the_user_cache_folder(tmp_path):
    """Without NUMBA_CACHE_DIR, a fresh process caches its kernels in phi3ref's cache folder
    (PHI3REF_CACHE here), per install and SIMD form — not beside the package's source,
    which a read-only install cannot write — and a second process loads them."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PHI3REF_CACHE"] = str(tmp_path)
    code = (
        "import numpy as np, phi3ref.jit as jit\n"
        "from phi3ref.kernels import decode_row, F16_TABLE\n"
        "decode_row(np.zeros(18, np.uint8), 8, np.empty(32, np.float32), F16_TABLE)\n"  # one Q8_0 block
        "print(jit.kernel_cache_folder(), decode_row.stats.cache_hits.total(), decode_row.stats.cache_misses.total())\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr[-2000:]
    folder, hits, misses = runs[0].stdout.split()
    assert Path(folder).is_relative_to(tmp_path / "kernels") and any(Path(folder).glob("kernels.decode_row-*.nbi"))
    assert (int(hits), int(misses)) == (0, 1)
    assert runs[1].stdout.split()[1:] == ["1", "0"]  # loaded, not compiled


def _stand_in_jobs(names: str, later: str) -> tuple[list, list, dict]:
    """Warm-up jobs whose kernels read as missing from the cache; each run() is recorded."""
    from types import SimpleNamespace

    from phi3ref import jit

    kernels = {n: SimpleNamespace(_cache=SimpleNamespace(_cache_file=SimpleNamespace(_load_index=dict))) for n in names}
    ran: list[str] = []
    jobs = [jit.WarmJob(n, 1.0, lambda n=n: ran.append(n), lambda n=n: [kernels[n]], later=n in later) for n in names]
    return jobs, ran, kernels


def _stand_in_helper(work: str, record: str | None = None) -> str:
    """The code of a stand-in helper: it says it is ready, then for each job named on its
    stdin, ``work`` (n: the name), then the name on its stdout; ``record``: a file it
    appends each name to."""
    keep = f"    open({record!r}, 'a').write(n)\n" if record else ""
    return (f"import sys, time\nprint({jit_ready()!r}, flush=True)\nfor line in sys.stdin:\n    n = line.strip()\n"
            f"    {work}\n{keep}    print(n, flush=True)\n")


def jit_ready() -> str:
    from phi3ref import jit

    return jit._HELPER_READY


@pytest.mark.skipif(CORES < 2, reason="a helper shares a compile on two cores or more")
def test_a_slow_helper_takes_fewer_jobs(monkeypatch, tmp_path):
    """The two processes take the jobs one at a time, each when it is free: a helper that
    takes 2 s per job while this process takes 0.2 s does at most one of six (a split fixed
    in advance would have given it three; it takes its first when it says it is ready,
    so here one or none); every job runs here (its own, then the helper's
    loaded), the later one in the helper's hands until finish_background()."""
    from phi3ref import jit

    import time

    monkeypatch.setenv("PHI3REF_COMPILE_HELPER", "1")
    jobs, ran, kernels = _stand_in_jobs("abcdefg", later="g")
    for job in jobs:  # this process: 0.2 s a job
        job.run = lambda run=job.run: (time.sleep(0.2), run())
    record = tmp_path / "helper"
    jit.run_warm_jobs(jobs, lambda: _stand_in_helper("time.sleep(2.0)", str(record)))
    try:
        assert sorted(ran) == list("abcdef")
        assert not record.exists() or len(record.read_text()) <= 1  # at most the one it took when ready
    finally:
        jit.finish_background()
    assert ran.count("g") == 1 and record.read_text()[-1] == "g"


@pytest.mark.skipif(CORES < 2, reason="a helper shares a compile on two cores or more")
def test_later_jobs_wait_in_the_background_until_their_kernel_is_called(monkeypatch):
    """A stand-in helper (it names each job as done, the later one after a pause): the
    warm-up runs the prompt's jobs (its own, then the helper's, loaded) and returns with the
    later job still in the helper's hands; calling another kernel through ready() does not
    wait, calling the later job's does — once."""
    from phi3ref import jit

    monkeypatch.setenv("PHI3REF_COMPILE_HELPER", "1")
    jobs, ran, kernels = _stand_in_jobs("abcd", later="d")
    helper_code = lambda: _stand_in_helper("time.sleep(0.5 if n == 'd' else 0)")
    waited = jit.background_seconds()
    jit.run_warm_jobs(jobs, helper_code)
    try:
        assert sorted(ran) == ["a", "b", "c"]
        assert jit.ready(kernels["a"]) is kernels["a"] and "d" not in ran
        assert jit.ready(kernels["d"]) is kernels["d"] and ran.count("d") == 1
        jit.ready(kernels["d"])
        assert ran.count("d") == 1 and jit.background_seconds() > waited
    finally:
        jit.finish_background()


@pytest.mark.skipif(CORES < 2, reason="a helper shares a compile on two cores or more")
def test_threads_that_need_a_background_kernel_at_once_wait_for_it(monkeypatch):
    """Two threads call the later job's kernel through ready() while the helper still
    compiles it: each returns only once the job has run here, and it runs once; each
    thread counts its own wait."""
    import threading

    from phi3ref import jit

    monkeypatch.setenv("PHI3REF_COMPILE_HELPER", "1")
    jobs, ran, kernels = _stand_in_jobs("abcd", later="d")
    helper_code = lambda: _stand_in_helper("time.sleep(1.0 if n == 'd' else 0)")
    jit.run_warm_jobs(jobs, helper_code)
    seen, waits, mine = [], [], jit.background_seconds()

    def call() -> None:
        jit.ready(kernels["d"])
        seen.append("d" in ran)
        waits.append(jit.background_seconds())

    try:
        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert seen == [True, True] and ran.count("d") == 1
        assert min(waits) > 0.5 and jit.background_seconds() == mine  # the main thread waited for nothing
    finally:
        jit.finish_background()


@pytest.mark.skipif(CORES < 2, reason="a helper shares a compile on two cores or more")
def test_a_helper_that_dies_leaves_its_jobs_to_the_warmup(monkeypatch):
    """A helper that exits before it is ready: the warm-up runs the prompt's jobs itself,
    and the later one, left to the helper, runs here as soon as it is needed (the helper
    is not waited for once it has exited)."""
    import time

    from phi3ref import jit

    monkeypatch.setenv("PHI3REF_COMPILE_HELPER", "1")
    jobs, ran, kernels = _stand_in_jobs("abcd", later="d")
    jit.run_warm_jobs(jobs, lambda: "raise SystemExit(1)")
    assert sorted(ran) == ["a", "b", "c"]
    start = time.perf_counter()
    jit.ready(kernels["d"])
    assert sorted(ran) == ["a", "b", "c", "d"] and time.perf_counter() - start < 20  # the bound is 34 s
    assert jit.finish_background() == 0.0


@pytest.mark.skipif(CORES < 2, reason="a helper shares a compile on two cores or more")
def test_a_helper_that_dies_on_a_job_leaves_it_to_the_warmup(monkeypatch):
    """A helper that takes a job and exits without doing it: the warm-up runs that job
    itself (and the later one), and leaves nothing in the background."""
    import time

    from phi3ref import jit

    monkeypatch.setenv("PHI3REF_COMPILE_HELPER", "1")
    jobs, ran, kernels = _stand_in_jobs("abcde", later="e")
    for job in jobs:  # this process: 0.5 s a job, so that the helper is ready for one
        job.run = lambda run=job.run: (time.sleep(0.5), run())
    jit.run_warm_jobs(jobs, lambda: f"import sys\nprint({jit._HELPER_READY!r}, flush=True)\nsys.stdin.readline()\nraise SystemExit(1)\n")
    assert sorted(ran) == ["a", "b", "c", "d", "e"]
    assert jit.finish_background() == 0.0


def _share_part(th, n_threads, x, out):
    """A stand-in part: out[i] = 2 x[i] + th for thread th's share of i (interleaved)."""
    for i in range(th, x.size, n_threads):
        out[i] = 2 * x[i] + th


def test_a_threaded_kernel_runs_every_share_once():
    """Threaded runs part(th, n_threads, *args) for each th below n_threads, whatever the
    count of Numba's threads (fewer or more): every element is written by its own share."""
    import numba as nb

    from phi3ref.jit import Threaded

    kernel = Threaded(nb.njit(_share_part))
    x = np.arange(23, dtype=np.float32)
    for n_threads in (1, 2, 3, 7, 23):
        out = np.full(23, -1, dtype=np.float32)
        kernel(x, out, n_threads)
        np.testing.assert_array_equal(out, 2 * x + np.arange(23) % n_threads)


def test_a_threaded_kernel_compiles_a_part_per_argument_types():
    """A call of other Numba types (another dtype, a strided view) runs a part compiled for
    them, never one made for others (the part's address is looked up by the types)."""
    import numba as nb

    from phi3ref.jit import Threaded

    kernel = Threaded(nb.njit(_share_part))
    base = np.arange(40, dtype=np.float64)
    for x in (base[:20].astype(np.float32), base[:20], base[::2], base.astype(np.float32)[::2]):
        out = np.zeros(20, dtype=np.float32)
        kernel(x, out, 2)
        np.testing.assert_array_equal(out, (2 * x + np.arange(20) % 2).astype(np.float32))
    assert len(kernel.part.signatures) == 4


def _raising_part(th, n_threads, x):
    if x[th] < 0:
        raise ValueError("a negative entry")


def test_an_error_in_a_part_reaches_the_caller():
    """An exception a part raises (an IndexError under NUMBA_BOUNDSCHECK=1, here a
    ValueError) reaches the caller of the threaded kernel, not a line on stderr."""
    import numba as nb

    from phi3ref.jit import Threaded

    kernel = Threaded(nb.njit(_raising_part))
    kernel(np.zeros(2), 2)
    with pytest.raises(ValueError, match="a negative entry"):
        kernel(np.full(2, -1.0), 2)


def _arrays(args: tuple) -> dict[int, np.ndarray]:
    """A call's array arguments, copied (by position)."""
    return {i: a.copy() for i, a in enumerate(args) if isinstance(a, np.ndarray)}


def _written_overlaps(before: dict[int, np.ndarray], args: tuple) -> list[tuple[int, int]]:
    """The pairs (written, other) of a call's array arguments, by position, where the part
    wrote the first (it differs from its copy ``before``) and it shares an element with the
    second: what PartCompiler's noalias promises a part never gets. Arrays a part only
    reads may overlap (noalias speaks of memory that is modified)."""
    written = [i for i, copy in before.items() if not np.array_equal(copy, args[i], equal_nan=True)]
    return [(i, j) for i in written for j in before if j != i and np.shares_memory(args[i], args[j])]


@pytest.mark.parametrize("preset,quant,numerics", [
    ("phi3-mini", "Q4_K_M", "ggml"), ("phi3-medium", "Q4_0", "ggml"), ("phi4-mini", "BF16", "ggml"),
    ("phi3-mini", "Q8_0", "exact"), ("phi3-mini", "F16", "exact"),
])
def test_no_array_a_part_writes_overlaps_another_argument(tiny_model, monkeypatch, preset, quant, numerics):
    """The parts are compiled with noalias arguments (phi3ref.jit.PartCompiler): a pass may
    never hand a part an array it writes that overlaps another argument (LLVM would be
    free to compute wrong results). Every threaded call of a prompt (prompt kernels,
    batched attention), of one token and of a two-token batch after them is checked (a
    write is seen by what it changed: one that leaves an array as it was goes unseen)."""
    import phi3ref
    from phi3ref.jit import Threaded

    x = np.ones((2, 256), np.float32)
    args = (x, np.ones(256, np.float32), 1e-5, x, 1)  # RMSNorm in place: out is x
    before = _arrays(args)
    x *= 2
    assert _written_overlaps(before, args) == [(0, 3), (3, 0)]  # the check sees an overlap

    calls, overlapping = [], []
    run = Threaded.__call__

    def checked(self, *args):
        before = _arrays(args)
        run(self, *args)
        calls.append(self.part.__name__)
        if pairs := _written_overlaps(before, args):
            overlapping.append((self.part.__name__, pairs))

    monkeypatch.setattr(Threaded, "__call__", checked)
    model = phi3ref.load(tiny_model(preset, quant), numerics=numerics, threads=2)
    tokens = list(range(100, 113))
    model.forward(tokens[:10], 0)
    model.forward(tokens[10:11], 10)
    model.forward(tokens[11:13], 11)
    # the pass's kernels went through the check: the batched and the one-token attention too
    wanted = ["attention_scores_tinyblas", "attention_scores_vecdot", "attention_values_tinyblas",
              "attention_values_vecdot", "rms_norm", "matmul"] if numerics == "ggml" else ["matmul"]
    assert all(any(w in name for name in calls) for w in wanted), sorted(set(calls))
    assert overlapping == [], sorted(set(map(repr, overlapping)))


def test_compile_notice_speaks_only_when_slow(capsys):
    import time

    from phi3ref.jit import compile_notice

    with compile_notice("Q4_K weights", after=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("phi3ref: compiling the Numba kernels for Q4_K weights") and "kernels ready in" in err[1]
    with compile_notice("Q4_K weights", after=5):
        pass
    assert capsys.readouterr().err == ""


def test_warmup_compiles_every_signature_the_model_uses(tiny_model):
    """In a fresh process, each numerics' model.warmup() then a prompt and a decoded token:
    the forward pass must not add a signature to any kernel (it would compile on a user's
    first prompt); and warmup compiled the matrix products of the model's weight types
    (Q4_K, Q5_K, Q6_K) and of no other type. Without a helper, so that warmup() loads
    every kernel itself (a helper compiles one token's kernels in the background, which
    the first one-token pass then loads: test_a_cold_warmup_shares_the_compile_with_a_helper)."""
    code = (
        "import re, phi3ref\n"
        "from phi3ref.jit import all_kernels\n"
        "def signatures():\n"
        "    return {name: len(f.signatures) for name, f in all_kernels().items()}\n"
        "added = {}\n"
        "for numerics in ('ggml', 'exact'):\n"
        "    model = phi3ref.load(%r, n_ctx=64, numerics=numerics)\n"
        "    model.warmup()\n"
        "    before = signatures()\n"
        "    model.forward(list(range(100, 120)), 0)\n"
        "    model.forward([5], 20)\n"
        "    after = signatures()\n"
        "    added.update({f'{numerics} {n}': (before.get(n, 0), after[n]) for n in after if after[n] != before.get(n, 0)})\n"
        "made = sorted({m.group(1) for n, s in signatures().items() if s for m in [re.search(r'matmul_[a-z0-9_]+_([A-Z][A-Z0-9_]*)$', n)] if m})\n"
        "print(added)\n"
        "print(made)\n"
    ) % str(tiny_model("phi3-mini", "Q4_K_M"))
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PHI3REF_COMPILE_HELPER": "0"},
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    added, made = done.stdout.strip().splitlines()
    assert made == "['Q4_K', 'Q5_K', 'Q6_K']", made
    assert added == "{}", f"compiled after warmup (kernel: signatures before, after): {added}"


@pytest.mark.skipif(CORES < 2, reason="a helper shares a compile on two cores or more")
def test_a_cold_warmup_shares_the_compile_with_a_helper(tiny_model, tmp_path):
    """With an empty cache, model.warmup() has a helper process compile part of the kernels
    into the cache while it compiles the rest, then loads the helper's (cache hits); one
    token's attention kernels the helper compiles last, while the prompt runs, and the first
    one-token pass loads them; the logits (a prompt's, then a token's) are those of a
    warm-up without a helper."""
    import os

    code = (
        "import sys, numpy as np, phi3ref\n"
        "from phi3ref.jit import all_kernels\n"
        "model = phi3ref.load(%r, n_ctx=64)\n"
        "model.warmup()\n"
        "hits = sorted(n for n, f in all_kernels().items() if f.stats.cache_hits.total())\n"
        "misses = sorted(n for n, f in all_kernels().items() if f.stats.cache_misses.total())\n"
        "deferred = sorted(n for n, f in all_kernels().items() if '.attention_' in n and 'vecdot' in n and not f.signatures)\n"
        "prompt = model.forward(list(range(100, 120)), 0)\n"
        "np.save(sys.argv[1], np.stack([prompt, model.forward([7], 20)]))\n"
        "loaded = sorted(n for n in deferred if all_kernels()[n].stats.cache_hits.total())\n"
        "print(hits)\n"
        "print(misses)\n"
        "print(deferred)\n"
        "print(loaded)\n"
    ) % str(tiny_model("phi3-mini", "Q4_K_M"))
    runs = {}
    for helper in ("1", "0"):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / f"cache{helper}"), "PHI3REF_COMPILE_HELPER": helper}
        out = tmp_path / f"logits{helper}.npy"
        done = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=1100)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[helper] = done.stdout.strip().splitlines(), np.load(out)
    (hits, misses, deferred, loaded), with_helper = runs["1"]
    assert hits != "[]" and misses != "[]", (hits, misses)  # some loaded (the helper's), some compiled here
    # one token's attention kernels: compiled by the helper after the rest, in the
    # background, and loaded by the first one-token pass
    assert deferred == loaded and "attention_scores_vecdot" in deferred and "attention_values_vecdot" in deferred, (deferred, loaded)
    (hits, _, deferred, _), without = runs["0"]
    assert hits == "[]" and deferred == "[]"  # alone, it compiled everything itself, at once
    assert np.array_equal(with_helper, without)
