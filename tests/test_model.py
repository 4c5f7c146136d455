"""The model on its own: numerics agreeing with each other, the KV cache, LongRoPE switching,
the sliding window, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_PRESETS, FORM_TIMEOUT, FORM_TOKENS, simd_form_params

import phi3ref
from phi3ref.crosscheck import compare, generation_logits
from phi3ref.synthetic import write_model

TOKENS = [1, 32010, 1724, 338, 263, 6432, 1048, 29973, 32007, 32001, 450, 4799, 338, 7254, 29889, 32007]


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_exact_matches_plain_numpy(preset, tiny_model):
    """The Numba path and the plain numpy reference compute the same model."""
    path = tiny_model(preset, "Q4_K_M")
    exact = phi3ref.load(path, numerics="exact").logits(TOKENS)
    plain = phi3ref.load(path, numerics="numpy").logits(TOKENS)
    assert exact.shape == (len(TOKENS), {"phi4": 100352, "phi4-mini": 200064}.get(preset, 32064)) and exact.dtype == np.float32
    c = compare(exact, plain)
    assert c.max_rel < 1e-5 and c.top1 == 1.0, c


@pytest.mark.parametrize("numerics", ["exact", "ggml"])
@pytest.mark.parametrize("preset", ["phi3-medium", "phi4-mini"])
def test_incremental_forward_equals_full_pass(preset, numerics, tiny_model):
    """Prompt in one batched pass, then one token at a time through the KV cache: each
    step's logits equal the corresponding row of a fresh full pass."""
    model = phi3ref.load(tiny_model(preset, "Q4_K_M"), numerics=numerics)
    full = model.logits(TOKENS)
    model.reset()
    steps = [model.forward(TOKENS[:10], 0)]
    for pos in range(10, len(TOKENS)):
        steps.append(model.forward([TOKENS[pos]], pos))
    c = compare(np.array(steps), full[9:])
    # activations are quantized row by row, so both passes see the same codes; in ggml
    # numerics batches and single tokens take different kernels (as in llama.cpp), whose
    # float sums differ in the last bits
    assert c.max_rel < 1e-5 and c.top1 == 1.0, c


@pytest.mark.parametrize("numerics", ["exact", "ggml"])
def test_separate_q_k_v_projections_compute_the_fused_model(numerics, tmp_path):
    """A file with attn_q / attn_k / attn_v (the fused projection's rows, in Q8_0) gives the
    fused file's logits bit for bit, prompt and decode, through the same hook points."""
    def run(fused: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = write_model(tmp_path / f"{fused}.gguf", preset="phi4-mini", quant="Q8_0", seed=4, fused_qkv=fused)
        model = phi3ref.load(path, numerics=numerics)
        logits, cache = model.run_with_cache(TOKENS, ["wqkv-1"])
        model.reset()
        model.forward(TOKENS[:10], 0)
        return logits, cache["wqkv-1"], model.forward([TOKENS[10]], 10)

    for a, b in zip(run(True), run(False)):
        assert np.array_equal(a, b)


def test_rewind_overwrites_the_cache(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_0"), numerics="exact")
    a = model.forward(TOKENS, 0)
    model.forward([5, 6, 7], 4)  # rewind to position 4 and branch
    b = model.forward(TOKENS[4:], 4)  # and back: same as the original continuation
    assert np.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("preset", ["phi3.5-mini", "phi4-mini"])
def test_longrope_switch_recomputes_the_cache(preset, tiny_model):
    """A generation that crosses the original context (256 in the tiny presets) switches
    every position to the long factors: the result equals a fresh pass over the whole
    sequence, which uses the long factors throughout."""
    model = phi3ref.load(tiny_model(preset, "Q8_0"), numerics="exact")
    orig = model.config.rope_orig_ctx
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 32000, size=orig + 8).tolist()
    fresh = model.logits(tokens)
    model.reset()
    model.forward(tokens[: orig - 2], 0)  # short factors
    assert model.cache_uses_long_rope is False
    steps = [model.forward([t], pos) for pos, t in enumerate(tokens[orig - 2 :], start=orig - 2)]
    assert model.cache_uses_long_rope is True
    c = compare(np.array(steps[2:]), fresh[orig:])
    assert c.max_rel < 1e-5, c
    # and the short factors do matter: below the original context the logits differ from
    # what the long factors give
    short = model.logits(tokens[:orig])
    assert compare(short, fresh[:orig]).max_abs > 1e-2


def test_sliding_window(tmp_path):
    plain = write_model(tmp_path / "plain.gguf", preset="phi3-mini", quant="F16")
    windowed = write_model(tmp_path / "w8.gguf", preset="phi3-mini", quant="F16", sliding_window=8)
    no_window = phi3ref.load(plain, numerics="exact").logits(TOKENS)
    with_window = phi3ref.load(windowed, numerics="exact").logits(TOKENS)
    ignored = phi3ref.load(windowed, numerics="exact", sliding_window=False).logits(TOKENS)
    assert np.array_equal(with_window[:8], no_window[:8])  # inside the window: identical
    assert compare(with_window[8:], no_window[8:]).max_abs > 1e-3  # beyond it, early positions drop out
    assert np.array_equal(ignored, no_window)
    # "ggml" follows llama.cpp, which disables Phi-3's sliding window, unless asked
    ggml_default = phi3ref.load(windowed, numerics="ggml").logits(TOKENS)
    assert np.array_equal(ggml_default, phi3ref.load(plain, numerics="ggml").logits(TOKENS))
    assert not np.array_equal(phi3ref.load(windowed, numerics="ggml", sliding_window=True).logits(TOKENS)[8:], ggml_default[8:])


def test_longrope_factors_follow_the_context_in_ggml(tiny_model):
    """llama.cpp takes LongRoPE's long factors when its context (rounded up to 256) exceeds
    the original one, for every position; transformers ("exact") when the sequence does."""
    path = tiny_model("phi4-mini", "Q8_0")  # original context 256, trained 1024
    short = phi3ref.load(path, numerics="ggml", n_ctx=256).logits(TOKENS)
    long = phi3ref.load(path, numerics="ggml", n_ctx=257).logits(TOKENS)  # 512 after rounding
    assert not np.array_equal(short[1:], long[1:])
    exact_short = phi3ref.load(path, numerics="exact", n_ctx=256).logits(TOKENS)
    exact_big_ctx = phi3ref.load(path, numerics="exact", n_ctx=1024).logits(TOKENS)
    assert np.array_equal(exact_short, exact_big_ctx)  # the sequence is short either way


def test_bad_input(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=32)
    with pytest.raises(ValueError, match="token id 40000 is outside the vocabulary"):
        model.logits([1, 40000])
    with pytest.raises(ValueError, match="token id -1"):
        model.logits([-1])
    with pytest.raises(ValueError, match="tokens is empty"):
        model.logits([])
    with pytest.raises(ValueError, match="40 positions do not fit the context of 32"):
        model.logits(list(range(40)))
    model.forward([1, 2, 3], 0)
    with pytest.raises(ValueError, match="start_pos 5 is past the 3 cached positions"):
        model.forward([4], 5)
    with pytest.raises(ValueError, match="numerics must be one of"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), numerics="fast")
    with pytest.raises(ValueError, match="n_ctx must be an integer >= 1"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=0)
    with pytest.raises(ValueError, match="threads must be an integer"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), threads=0)


def test_load_refuses_files_it_cannot_run(tmp_path):
    from phi3ref.synthetic import vocab_path

    with pytest.raises(phi3ref.GGUFError, match="tensor 'token_embd.weight' is missing"):
        phi3ref.load(vocab_path())
    with pytest.raises(phi3ref.GGUFError, match="not a GGUF file"):
        (tmp_path / "x.gguf").write_bytes(b"hello")
        phi3ref.load(tmp_path / "x.gguf")


def test_memory_is_mapped_not_copied(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    w = model.blocks[0].mlp.gate_up
    assert isinstance(w.raw.base, np.memmap) or isinstance(w.raw, np.memmap)


# ---- the other instruction forms: what an ARM CPU (portable form) or an AVX2-only CPU runs
# (conftest.simd_form_child: one child process per form, compiled in that form)


@pytest.mark.slow
@pytest.mark.parametrize("form", simd_form_params())
@pytest.mark.timeout(FORM_TIMEOUT)  # a cold-cache compile in a child
def test_other_simd_forms_compute_the_same_model(form, simd_form_child):
    """Every numerics at every level in a child compiled in another form: its logits equal
    this process's bit for bit ("exact": to float32 rounding), and none of its compiled code holds an intrinsic the
    form's CPUs lack (for the portable form: any x86 one)."""
    done, result, paths = simd_form_child(form)
    tokens = FORM_TOKENS
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("forbidden intrinsics in: []"), done.stdout
    theirs = np.load(result)
    assert len(theirs.files) == 7 * len(paths)
    for i, path in enumerate(paths):
        here = {f"ggml-{level}": phi3ref.load(path, isa=level).logits(tokens) for level in ("avx2", "avx512", "avx512bf16")}
        here.update({numerics: phi3ref.load(path, numerics=numerics).logits(tokens) for numerics in ("exact", "numpy")})
        for level in ("avx2", "avx512"):
            here[f"decode-{level}"] = generation_logits(phi3ref.load(path, isa=level), tokens[:30], tokens[30:])
        for key, value in here.items():
            if key == "exact":
                # the exact kernels let LLVM reassociate their float sums for the target's
                # vector width (8 lanes in the AVX2 form; 16 where LLVM tunes a CPU for 512-bit
                # vectors): the same numbers to float32 rounding, not the same bits
                c = compare(theirs[f"{i}-{key}"], value)
                assert c.max_rel < 1e-5 and c.top1 == 1.0, (path, key, c)
            else:
                assert np.array_equal(theirs[f"{i}-{key}"].view(np.uint32), value.view(np.uint32)), (path, key)


# -- state that cannot be corrupted -----------------------------------------------------------


class _Interrupt(BaseException):
    """Raised from inside a layer, as a Ctrl-C would arrive there."""


def _interrupt_at_layer(model, layer: int):
    """Make layer ``layer`` raise _Interrupt; returns the function that undoes it."""
    original = model.blocks[layer]

    def interrupted(*args, **kwargs):
        raise _Interrupt

    model.blocks[layer] = interrupted
    return lambda: model.blocks.__setitem__(layer, original)


@pytest.mark.parametrize("numerics", ["ggml", "exact"])
@pytest.mark.parametrize("start", [10, 4])  # an append, an overwrite of cached positions
def test_an_interrupted_pass_leaves_tokens_and_cache_in_agreement(numerics, start, tiny_model):
    """Ctrl-C inside forward() once left model.tokens claiming the old context while layer
    0's cache held the new one: the next call returned logits off by 7 (silently)."""
    path = tiny_model("phi3-mini", "Q4_K_M")
    model, clean = phi3ref.load(path, numerics=numerics), phi3ref.load(path, numerics=numerics)
    model.forward(TOKENS[:10], 0)
    clean.forward(TOKENS[:10], 0)
    restore = _interrupt_at_layer(model, 1)  # layer 0 has written its keys by then
    with pytest.raises(_Interrupt):
        model.forward([450, 4799, 338], start)
    restore()
    assert model.tokens == TOKENS[:start]  # an append leaves the model as it was
    assert np.array_equal(model.forward([7254], start), clean.forward([7254], start))


def test_an_interrupted_longrope_recompute_forgets_the_context(tiny_model):
    model = phi3ref.load(tiny_model("phi3.5-mini", "Q4_K_M"), numerics="exact", n_ctx=600)
    model.forward(TOKENS * 15, 0)  # 240 positions: short factors
    restore = _interrupt_at_layer(model, 0)
    with pytest.raises(_Interrupt):
        model.forward(TOKENS * 2, 240)  # crosses 256: every cached key is recomputed first
    restore()
    assert model.tokens == [] and not model.cache_uses_long_rope


def test_threads_take_turns_and_interleaved_streams_are_refused(tiny_model):
    import threading

    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    alone = {s: phi3ref.generate("Hi", model=model, max_tokens=8, seed=s).tokens for s in (1, 2)}
    got = {}
    threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, phi3ref.generate("Hi", model=model, max_tokens=8, seed=s).tokens))
               for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    first = phi3ref.generate("Hi", model=model, max_tokens=8, seed=1, stream=True)
    next(first)
    second = list(phi3ref.generate("Hi", model=model, max_tokens=8, seed=2, stream=True))
    with pytest.raises(phi3ref.ModelBusyError, match="two generations at once on one model"):
        list(first)
    assert "".join(second) == phi3ref.generate("Hi", model=model, max_tokens=8, seed=2).text


def test_a_forked_child_runs_the_model(tiny_model):
    """GNU OpenMP (Numba's default threading layer) killed a child forked after a pass."""
    import multiprocessing

    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    ref = model.logits(TOKENS[:4])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(model.logits(TOKENS[:4])))  # the model travels by fork
    child.start()
    out = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and np.array_equal(out, ref)
    assert np.array_equal(model.logits(TOKENS[:4]), ref)  # and the parent goes on with its threads


def test_a_forked_child_does_not_write_the_parents_cache(tiny_model):
    """The KV cache is a private mapping: a child forked mid-context that runs other tokens
    over the same positions leaves the parent's cache as it was."""
    import multiprocessing

    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    model.forward(TOKENS[:4], 0)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=lambda: model.forward(TOKENS[::-1][:6], 0))  # overwrites positions 0..5 there
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    ref = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    ref.forward(TOKENS[:4], 0)
    assert np.array_equal(model.forward(TOKENS[4:5], 4), ref.forward(TOKENS[4:5], 4))


def _resident_kib(array: np.ndarray) -> int:
    """Rss of the mappings that hold ``array``'s bytes (/proc/self/smaps), KiB."""
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            field = line.split()
            if not field[0].endswith(":"):
                lo, hi = (int(x, 16) for x in field[0].split("-"))
                inside = lo < end and start < hi
            elif inside and field[0] == "Rss:":
                total += int(field[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux's per-mapping resident sizes")
def test_the_kv_cache_becomes_resident_only_where_the_context_reached():
    """A Phi-3-mini-sized cache of 1,024 positions (32 layers, 192 MiB each of keys and
    values): 8 positions written per layer make about 8 positions resident per layer, a
    4 KB page or two more — not the 2 MB huge pages per layer numpy's own zeros would take
    (two thirds of the cache)."""
    from phi3ref.model import _lazy_zeros

    keys = _lazy_zeros((32, 1024, 32, 96), np.uint16)  # (n_layer, n_ctx, n_head_kv, head_dim)
    assert not keys.any() and keys.flags.writeable and keys.flags.c_contiguous
    before = _resident_kib(keys)  # (a neighbouring mapping the kernel merged with this one counts too)
    keys[:, :8] = 1
    written = keys[:, :8].nbytes // 1024
    assert written <= _resident_kib(keys) - before <= written + 32 * 2 * 4


def test_a_child_that_died_holding_numbas_lock_does_not_hang_the_next(tiny_model):
    """Numba's lock around starting its threads is a process-shared semaphore: a forked
    child that died holding it (as one killed by the fuzz harness's timeout did) left every
    later child waiting on it forever, so a 600-case fuzz sample ran for hours. Each child
    now takes locks of its own."""
    import os
    import time

    from numba.np.ufunc import parallel

    model = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))
    ref = model.logits(TOKENS[:4])
    parallel._launch_threads()
    shared = parallel._backend_init_process_lock
    try:
        dead = os.fork()
        if dead == 0:  # dies holding the semaphore it inherited
            try:
                shared.acquire()
            finally:
                os._exit(0)
        os.waitpid(dead, 0)
        read, write = os.pipe()
        nxt = os.fork()
        if nxt == 0:
            try:
                os.close(read)
                ok = np.array_equal(model.logits(TOKENS[:4]), ref)
                os.write(write, b"ok" if ok else b"differs")
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and os.waitpid(nxt, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
        finished = time.monotonic() < deadline
        if not finished:
            os.kill(nxt, 9)
            os.waitpid(nxt, 0)
        answer = os.read(read, 16)
        os.close(read)
        assert finished and answer == b"ok", answer
    finally:
        parallel._backend_init_process_lock = None  # this process's own was poisoned above


@pytest.mark.parametrize("numerics", ["ggml", "exact", "numpy"])
def test_non_finite_activations_are_reported(numerics, tiny_model, tmp_path):
    """An F16 weight of inf once surfaced as NaN logits and numpy's "Probabilities contain
    NaN" at sampling; every numerics now names the layer."""
    from craft import rewrite_gguf

    from phi3ref.gguf_file import GGUFFile

    src = tiny_model("phi3-medium", "F16")
    with GGUFFile(src) as gf:
        info = gf.tensors["blk.1.ffn_down.weight"]
        raw = bytearray(gf.tensor_bytes(info.name).tobytes())
    raw[0:2] = b"\x00\x7c"  # +inf in float16
    path = rewrite_gguf(src, tmp_path / "inf.gguf", tensor_data={info.name: bytes(raw)})
    model = phi3ref.load(path, numerics=numerics)
    for _ in range(2):  # and the model stays usable: the failed pass holds no positions
        with pytest.raises(phi3ref.NonFiniteError, match="l_out-1: the forward pass produced inf .*layer 1's feed-forward"):
            model.forward(TOKENS[:3], 0)
        assert model.tokens == []


def test_careless_calls(tiny_model):
    model = phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=32)
    with pytest.raises(ValueError, match="token id 9223372036854775808 is outside the vocabulary"):
        model.logits([2**63])
    with pytest.raises(TypeError, match="integer token ids"):
        model.logits([1.5])
    with pytest.raises(TypeError, match="start_pos must be an integer"):
        model.forward([1], "0")
    with pytest.raises(ValueError, match="start_pos must be an integer >= 0, got -1"):
        model.forward([1], np.int64(-1))
    for tokens in ([True, False], [1, np.bool_(True)], {1, 2}, {1: 2}, "12", 7, np.array(5)):
        with pytest.raises(TypeError, match="tokens must be a sequence of integer token ids"):
            model.logits(tokens)
    with pytest.raises(TypeError, match="all_logits must be True or False"):
        model.forward([1], 0, all_logits="yes")
    with pytest.raises(TypeError, match="expect_version must be an integer"):
        model.forward([1], 0, expect_version="x")
    assert model.forward(np.array([1, 2], np.int32), np.int64(0)).shape == (model.config.n_vocab,)
    assert phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=np.int64(16), threads=np.int8(1), n_ubatch=np.uint16(8)).n_ctx == 16
    with pytest.raises(ValueError, match="needs a KV cache of .* GiB, more than this machine's"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=10**12)
    with pytest.warns(UserWarning, match="n_ctx=1024 is more than the 512 positions"):
        phi3ref.load(tiny_model("phi3-mini", "Q4_0"), n_ctx=1024)


def test_ctrl_c_inside_a_kernel_is_a_keyboard_interrupt():
    """Python reports a signal handler's exception raised as a Numba kernel returns as a
    chain of SystemErrors; Model passes re-raise the KeyboardInterrupt at its root."""
    from phi3ref.model import _interrupts_as_keyboard_interrupt

    def chained():
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise SystemError("_numba_unpickle returned a result with an exception set") from e
        except SystemError as e:
            raise SystemError("CPUDispatcher(libm_cos_sin) returned a result with an exception set") from e

    with pytest.raises(KeyboardInterrupt), _interrupts_as_keyboard_interrupt():
        chained()
    with pytest.raises(SystemError), _interrupts_as_keyboard_interrupt():
        raise SystemError("something else")


# -- the shape of the code ------------------------------------------------------------------


def _imports(module: str) -> set[str]:
    """What phi3ref/<module>.py imports when it runs (not under ``if TYPE_CHECKING``): its
    sibling modules by name, anything else as ``!package``."""
    import ast

    tree = ast.parse((Path(phi3ref.__file__).parent / f"{module}.py").read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for branch in node.body for n in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("!" + node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {"!" + a.name.split(".")[0] for a in node.names}
    return found


def test_the_transformer_module_imports_no_kernel():
    """phi3ref.model reads top-down without Numba: neither it nor anything it imports runs
    the kernels, Numba or a numerics (those are handed in by phi3ref.loading)."""
    seen, todo = set(), ["model"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [m for m in _imports(module) if not m.startswith("!")]
    assert not seen & {"kernels", "jit", "ggml", "numerics", "loading", "tokenizer", "hub"}, seen
    assert "!numba" not in set().union(*map(_imports, seen))
