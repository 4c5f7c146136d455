"""The ggml package (llama.cpp's arithmetic) against naive numpy references: activation
quantization, every matmul path (the SIMD forms bit-identical to the plain scalar kernel),
attention products, exp, softmax, float16 rounding, RMSNorm, RoPE and SwiGLU."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses

import numpy as np
import pytest
from conftest import FORM_TIMEOUT, simd_form_params
from gguf import GGMLQuantizationType as QT
from test_kernels import BLOCK_TYPES, N_IN, THREADS, random_weight

from phi3ref import QUANT_TYPES, dequantize, isa, kernels, quantize
from phi3ref.ggml import kernels as ggml_kernels
from phi3ref.ggml import ops as ggml_ops
from phi3ref.loading import numerics_named
from phi3ref.weights import Weight

def reference_activations(x: np.ndarray, act: int):
    """ggml's activation conversion, written element by element from ggml's C."""
    n_tok, n_in = x.shape
    if act == ggml_kernels.ACT_Q8_K:
        q = np.zeros((n_tok, n_in), np.int8)
        d = np.zeros((n_tok, n_in // 256), np.float32)
        for t in range(n_tok):
            for b in range(n_in // 256):
                blk = x[t, 256 * b : 256 * b + 256]
                i = int(np.argmax(np.abs(blk)))  # first of the largest magnitudes
                if blk[i] == 0:
                    continue
                iscale = np.float32(-127) / blk[i]
                for j in range(256):
                    q[t, 256 * b + j] = min(127, int(np.rint(np.float32(iscale * blk[j]))))
                d[t, b] = np.float32(1) / iscale
        bsums = q.reshape(n_tok, -1, 16).astype(np.int32).sum(-1)
        return q, d, bsums
    q = np.zeros((n_tok, n_in), np.int8)
    d = np.zeros((n_tok, n_in // 32), np.float32)
    s = np.zeros((n_tok, n_in // 32), np.float32)
    for t in range(n_tok):
        for b in range(n_in // 32):
            blk = x[t, 32 * b : 32 * b + 32]
            amax = np.float32(np.abs(blk).max())
            inv = np.float32(127) / amax if amax else np.float32(0)
            codes = [int(np.rint(np.float32(v * inv))) for v in blk]
            q[t, 32 * b : 32 * b + 32] = codes
            dd = np.float32(amax / np.float32(127))
            d[t, b] = np.float16(dd)
            s[t, b] = np.float16(dd * np.float32(sum(codes)))
    return q, d, s


@pytest.mark.parametrize("act", [ggml_kernels.ACT_Q8_0, ggml_kernels.ACT_Q8_1, ggml_kernels.ACT_Q8_K], ids=["Q8_0", "Q8_1", "Q8_K"])
def test_quantize_activations_matches_reference(act):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, N_IN)) * rng.choice([0.01, 1, 30], size=(3, 1))).astype(np.float32)
    x[1, :256] = 0  # an all-zero block
    q, d, s = ggml_kernels.quantize_activations(x, act)
    rq, rd, rs = reference_activations(x, act)
    assert np.array_equal(q, rq)
    assert np.array_equal(d, rd)
    if act != ggml_kernels.ACT_Q8_0:
        assert np.array_equal(s, rs)


def ggml_reference(raw: np.ndarray, qtype: QT, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ggml dot product computed from dequantized weights and dequantized activations
    in float64 (algebraically the same as ggml's integer formula), and a magnitude scale."""
    act = ggml_kernels.activation_type(int(qtype))
    q, d, s = ggml_kernels.quantize_activations(x, act)
    w = dequantize(raw, qtype).astype(np.float64)
    block = 256 if act == ggml_kernels.ACT_Q8_K else 32
    x_deq = q.astype(np.float64) * np.repeat(d.astype(np.float64), block, axis=1)
    ref = x_deq @ w.T
    if act == ggml_kernels.ACT_Q8_1:
        # x = d q + m: ggml takes the m term through s = fp16(d_x * sum(q_x)), not sum(x_deq)
        m_bytes = raw.reshape(-1, QUANT_TYPES[qtype].type_size)[:, 2:4]  # each block's float16 m
        mins = np.frombuffer(m_bytes.tobytes(), "<f2").astype(np.float64).reshape(raw.shape[0], -1)  # (rows, blocks)
        exact_sums = x_deq.reshape(x.shape[0], -1, 32).sum(-1)  # (tokens, blocks)
        ref += (s.astype(np.float64) - exact_sums) @ mins.T
    return ref, np.abs(x_deq) @ np.abs(w).T


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_ggml_matmul_matches_reference(qtype, n_tokens):
    raw = random_weight(qtype, 29, 5)
    x = np.random.default_rng(6).standard_normal((n_tokens, N_IN)).astype(np.float32)
    out = numerics_named("ggml").matmul(Weight("w", raw, qtype, (29, N_IN)), x)
    ref, scale = ggml_reference(raw, qtype, x)
    assert (np.abs(out - ref) <= 2e-6 * scale + 1e-30).all()


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_ggml_float_weights(qtype):
    """F16 / BF16 weights: ggml converts the activations to the weight's type first."""
    rng = np.random.default_rng(7)
    w32 = rng.standard_normal((11, N_IN)).astype(np.float32)
    raw = quantize(w32, qtype)
    x = rng.standard_normal((2, N_IN)).astype(np.float32)
    out = numerics_named("ggml").matmul(Weight("w", raw, qtype, (11, N_IN)), x)
    if qtype == QT.F16:
        xr = x.astype(np.float16).astype(np.float64)
    elif qtype == QT.BF16:
        xr = dequantize(quantize(x, QT.BF16), QT.BF16).astype(np.float64)
    else:
        xr = x.astype(np.float64)
    ref = xr @ dequantize(raw, qtype).astype(np.float64).T
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-4)
    if qtype != QT.F32:  # the rounding of the activations is visible
        assert not np.allclose(out, x.astype(np.float64) @ dequantize(raw, qtype).astype(np.float64).T, rtol=1e-7, atol=1e-7)


SIMD_TYPES = [QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def check_simd_path(qtypes=SIMD_TYPES, threads: int = THREADS) -> None:
    """The SIMD kernels give exactly the plain kernel's floats: every accumulation mode
    (row counts that llama.cpp repacks and not, 1 to 70 tokens across token tiles)."""
    rng = np.random.default_rng(8)
    for qtype in qtypes:
        for rows in (40, 36):
            for scale in (0.05, 5.0):
                raw = quantize(rng.standard_normal((rows, N_IN)).astype(np.float32) * scale, qtype)
                for n_tokens in (1, 2, 3, 4, 5, 7, 8, 13, 70):
                    x = (rng.standard_normal((n_tokens, N_IN)) * scale * 10).astype(np.float32)
                    assert_simd_equals_plain(raw, qtype, x, threads, (qtype.name, rows, n_tokens, scale))
        check_extreme_codes(qtype, threads)


def assert_simd_equals_plain(raw: np.ndarray, qtype, x: np.ndarray, threads: int, where) -> None:
    """matmul_ggml (the SIMD paths) and matmul_ggml_unpacked give the same float bits."""
    q, d, s = ggml_kernels.quantize_activations(x, ggml_kernels.activation_type(int(qtype)))
    fast = np.empty((x.shape[0], raw.shape[0]), np.float32)
    plain = np.empty_like(fast)
    ggml_kernels.matmul_ggml(raw, int(qtype), q, d, s, fast, kernels.F16_TABLE, True, threads)
    ggml_kernels.matmul_ggml_unpacked(raw, int(qtype), q, d, s, plain, kernels.F16_TABLE, True, threads)
    assert np.array_equal(fast.view(np.uint32), plain.view(np.uint32)), where


def with_max_codes(raw: np.ndarray, qtype) -> np.ndarray:
    """The blocks of ``raw`` (rows, row bytes) with every code bit set (the largest code of
    the type everywhere), scales and d as they were."""
    layout = QUANT_TYPES[qtype]
    blocks = raw.copy().reshape(-1, layout.type_size)  # (rows x blocks per row, block bytes)
    for name, size in layout.code_fields:
        blocks[:, layout.offset(name):layout.offset(name) + size] = 0xFF
    return blocks.reshape(raw.shape)


def check_extreme_codes(qtype, threads: int = THREADS) -> None:
    """The largest integer sums the kernels can meet: every weight code at its maximum against
    activations that all quantize to -127 (a constant row: Q8_K's largest magnitude), so that
    a partial sum kept in too narrow an integer (16 bits without VNNI) saturates or wraps and
    shows here."""
    rng = np.random.default_rng(9)
    for rows in (40, 36):
        raw = with_max_codes(quantize(rng.standard_normal((rows, N_IN)).astype(np.float32), qtype), qtype)
        for n_tokens in (1, 4, 9):
            signs = np.where(np.arange(n_tokens) % 2 == 0, -1, 1).astype(np.float32)
            x = np.repeat(signs[:, None], N_IN, axis=1)  # (tokens, N_IN): constant rows of -1 and 1
            assert_simd_equals_plain(raw, qtype, x, threads, (qtype.name, rows, n_tokens, "extreme codes"))


@pytest.mark.parametrize("qtype", SIMD_TYPES, ids=lambda t: t.name)
def test_simd_path_is_bit_identical(qtype):
    check_simd_path([qtype])


@pytest.mark.slow
@pytest.mark.parametrize("form", simd_form_params())
@pytest.mark.timeout(FORM_TIMEOUT)  # a cold-cache compile in a child
def test_other_simd_forms_are_bit_identical(form, simd_form_child):
    """The other instruction forms of phi3ref.ggml.simd (portable; AVX2 without VNNI) give the
    same results: check_simd_path in a child process compiled in that form."""
    done, _, _ = simd_form_child(form)
    assert "simd path: bit-identical" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_fma32_rounds_once():
    a, c = np.float32(1 + 2.0**-12), np.float32(-1)
    # a * a = 1 + 2^-11 + 2^-24 needs 25 bits: one rounding keeps the 2^-24, two lose it
    assert ggml_kernels.fma_f32(a, a, c) == np.float32(2.0**-11 + 2.0**-24)
    assert np.float32(a * a) + c == np.float32(2.0**-11)


# ---- attention, exp, softmax: per instruction-set level ---------------------------------

LEVELS = [isa.LEVELS["avx2"], isa.LEVELS["avx512"]]  # the two forms of everything below


def reduce_tree(v: np.ndarray) -> np.ndarray:
    """_mm512_reduce_add_ps (16 lanes) / tinyBLAS's hsum of 8 over the last axis: the upper
    half added onto the lower until four remain, then (0 + 2) + (1 + 3)."""
    while v.shape[-1] > 4:
        half = v.shape[-1] // 2
        v = v[..., half:] + v[..., :half]
    return (v[..., 0] + v[..., 2]) + (v[..., 1] + v[..., 3])


def tinyblas_reference(a: np.ndarray, b: np.ndarray, kn: int) -> np.ndarray:
    """a @ b.T per batch (a: (batch, m, k), b: (batch, n, k), k a multiple of kn) in
    tinyBLAS's kn lanes: lane i adds the products of elements i, i + kn, ... in order."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    acc = np.zeros((a.shape[0], a.shape[1], b.shape[1], kn), np.float32)
    for s in range(0, a.shape[2], kn):
        acc += a[:, :, None, s : s + kn] * b[:, None, :, s : s + kn]
    return reduce_tree(acc)


def vecdot_f16_reference(a: np.ndarray, b: np.ndarray, epr: int) -> np.ndarray:
    """a @ b.T per batch as ggml_vec_dot_f16 with epr-lane vectors: four accumulators over
    steps of 4 epr elements, (0 + 2) + (1 + 3), the lanes reduced (the tree for 16, the AVX
    hadd order for 8), the elements after the last whole step added in double."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    k, step = a.shape[2], 4 * epr
    whole = k - k % step
    acc = np.zeros((4, a.shape[0], a.shape[1], b.shape[1], epr), np.float32)
    for s in range(0, whole, step):
        for j in range(4):
            e = s + j * epr
            acc[j] += a[:, :, None, e : e + epr] * b[:, None, :, e : e + epr]
    v = (acc[0] + acc[2]) + (acc[1] + acc[3])
    if epr == 16:
        total = reduce_tree(v)
    else:
        total = ((v[..., 0] + v[..., 4]) + (v[..., 1] + v[..., 5])) + ((v[..., 2] + v[..., 6]) + (v[..., 3] + v[..., 7]))
    total = total.astype(np.float64)
    for e in range(whole, k):
        total += (a[:, :, None, e] * b[:, None, :, e]).astype(np.float64)
    return total.astype(np.float32)


@pytest.mark.parametrize("level", LEVELS, ids=str)
@pytest.mark.parametrize("head_dim", [96, 40, 128, 36])
@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one-token"])
def test_attention_products_match_reference(level, head_dim, batched):
    """kq and kqv as llama.cpp sums them at each level: tinyBLAS for a batch when the shape
    allows it (scores: head_dim a multiple of the lanes; values: of 4), ggml_vec_dot_f16
    otherwise, against numpy lane references; then with causal key ranges."""
    rng = np.random.default_rng(9)
    n_ctx, n_kv, end, rows = 300, 3, 261, 21  # rows: two tiles of 8 (five of 4) and the rest one by one
    k_cache = rng.standard_normal((n_ctx, n_kv, head_dim)).astype(np.float16)
    v_cache = rng.standard_normal((n_ctx, n_kv, head_dim)).astype(np.float16)
    q = rng.standard_normal((n_kv, rows, head_dim)).astype(np.float16).astype(np.float32)
    keys = k_cache[:end].transpose(1, 0, 2)  # (n_kv, end, head_dim)
    kn = level.lanes
    if batched and head_dim % kn == 0:
        expected_scores = tinyblas_reference(q, keys, kn)
    else:
        expected_scores = vecdot_f16_reference(q, keys, kn)
    assert np.array_equal(ggml_ops.attention_scores(q, k_cache, end, level, batched=batched), expected_scores)
    probs = rng.random((n_kv, rows, end)).astype(np.float16).astype(np.float32)
    values = v_cache[:end].transpose(1, 2, 0)  # (n_kv, head_dim, end)
    # llama.cpp's KV view is a multiple of 256 positions: the vec_dot form has no tail there
    padded = np.zeros((n_kv, rows, 512), np.float32)
    padded[:, :, :end] = probs
    padded_values = np.zeros((n_kv, head_dim, 512), np.float32)
    padded_values[:, :, :end] = values
    if batched and head_dim % 4 == 0:
        expected_values = tinyblas_reference(padded, padded_values, kn)
    else:
        expected_values = vecdot_f16_reference(padded, padded_values, kn)
    assert np.array_equal(ggml_ops.attention_values(probs, v_cache, end, level, batched=batched), expected_values)

    # causal ranges (rows cycle over 3 tokens): the keys a row sees are computed exactly,
    # the others left out; values add only the positions seen
    last = np.arange(end - 3, end)
    first = np.maximum(last - 40, 0)
    seen = (np.arange(end) >= first[:, None]) & (np.arange(end) <= last[:, None])  # (3, end)
    seen_rows = np.broadcast_to(np.tile(seen, (rows // 3, 1)), (n_kv, rows, end))
    ranged = ggml_ops.attention_scores(q, k_cache, end, level, batched=batched, first=first, last=last)
    assert np.array_equal(ranged[seen_rows], expected_scores[seen_rows])
    assert np.all((ranged[~seen_rows] == -np.inf) | (ranged[~seen_rows] == expected_scores[~seen_rows]))
    masked = np.zeros_like(padded)
    masked[:, :, :end] = np.where(seen_rows, probs, np.float32(0))
    reference = tinyblas_reference if (batched and head_dim % 4 == 0) else vecdot_f16_reference
    got = ggml_ops.attention_values(probs, v_cache, end, level, batched=batched, first=first, last=last)
    assert np.array_equal(got, reference(masked, padded_values, kn))


def hexf(literal: str) -> np.float32:
    return np.float32(float.fromhex(literal))


def fma_reference(a, b, c):
    """float32 a * b + c, one rounding (the float32 product is exact in float64)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def v_expf_reference(x: np.ndarray, level) -> np.ndarray:
    """ggml_v_expf, written from ggml's C with numpy: the AVX-512 form (_mm512_scalef_ps)
    or the AVX2 one (2^n from exponent bits, split where |n| > 126)."""
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        r = hexf("0x1.8p23")
        z = fma_reference(x, hexf("0x1.715476p+0"), r)
        n = z - r
        b = fma_reference(-n, hexf("0x1.7f7d1cp-20"), fma_reference(-n, hexf("0x1.62e4p-1"), x))
        u = b * b
        poly = fma_reference(fma_reference(hexf("0x1.0e4020p-7"), b, hexf("0x1.573e2ep-5")), u,
                             fma_reference(hexf("0x1.555e66p-3"), b, hexf("0x1.fffdb6p-2")))
        if level.exp_scalef:
            j = fma_reference(poly, u, fma_reference(hexf("0x1.ffffecp-1"), b, np.float32(1)))
            res = np.ldexp(j, np.nan_to_num(np.clip(n, -300, 300)).astype(np.int32)).astype(np.float32)
            return np.where(np.abs(n) > 192, np.where(n <= 0, np.float32(0), np.float32(np.inf)), res).astype(np.float32)
        j = fma_reference(poly, u, hexf("0x1.ffffecp-1") * b)
        e = z.view(np.uint32) << np.uint32(23)
        k = (e + np.float32(1).view(np.uint32)).view(np.float32)
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
        s1 = (g + np.uint32(0x7F000000)).view(np.float32)
        s2 = (e - g).view(np.float32)
        special = np.where(np.abs(n) > 192, s1 * s1, fma_reference(s2, j, s2) * s1)
        return np.where(np.abs(n) > 126, special, fma_reference(k, j, k)).astype(np.float32)


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_expf_matches_ggml_vector_loop(level):
    """Whole vectors through the level's polynomial, the tail through the C library's expf."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, 37)) * 30).astype(np.float32)
    x[0, :5] = [-np.inf, 0, 150, -100, 88.5]  # masked, exact, overflowing, |n| > 126 both ways
    x[1, 3] = np.nan
    x[2, :4] = [-87.5, -89.0, 87.9, -103.5]  # around the split scale and subnormal results
    out = ggml_ops.expf(x, level)
    full = 37 - 37 % level.lanes
    assert np.array_equal(out[:, :full], v_expf_reference(x[:, :full], level), equal_nan=True)
    assert np.isnan(out[1, 3]) and out[0, 0] == 0 and out[0, 1] == 1 and out[0, 2] == np.inf
    tail = np.array([[libm.expf(float(v)) for v in row] for row in x[:, full:]], np.float32)
    assert np.array_equal(out[:, full:], tail)
    # the two forms are different functions (not only different widths)
    wide = (rng.standard_normal(4096) * 20).astype(np.float32)
    assert not np.array_equal(v_expf_reference(wide, LEVELS[0]), v_expf_reference(wide, LEVELS[1]))


def softmax_reference(x: np.ndarray, level) -> np.ndarray:
    """ggml_soft_max with the numpy polynomial, rows padded to whole vectors with -inf."""
    n, kn = x.shape[-1], level.lanes
    width = -(-n // kn) * kn
    padded = np.full((*x.shape[:-1], width), -np.inf, dtype=np.float32)
    padded[..., :n] = x
    e = v_expf_reference(padded - padded.max(axis=-1, keepdims=True), level)
    total = reduce_tree(e.reshape(*e.shape[:-1], width // kn, kn)).astype(np.float64).sum(axis=-1)
    return (e * (1.0 / total).astype(np.float32)[..., None])[..., :n]


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_softmax_matches_reference(level):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((7, 45)) * 8).astype(np.float32)
    x[:, 30:] = -np.inf  # masked
    x[3, 0] = 90.0  # a dominating score
    out = ggml_ops.softmax(x, level)
    assert np.array_equal(out, softmax_reference(x, level))
    assert np.allclose(out.sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_softmax_mask_ranges_equal_an_added_minus_inf_mask(level):
    """Rows cycle over the tokens; token t sees keys first[t]..last[t]: the same numbers as
    adding llama.cpp's -inf mask to the scores, keys outside exactly 0."""
    rng = np.random.default_rng(12)
    n_tok, n_keys = 5, 53
    x = (rng.standard_normal((3, n_tok, n_keys)) * 6).astype(np.float32)  # (heads, tokens, keys)
    last = np.array([17, 18, 30, 47, 52])
    first = np.maximum(last - 20, 0)  # a sliding window: chunks of masked keys on both sides
    keys = np.arange(n_keys)
    allowed = (keys >= first[:, None]) & (keys <= last[:, None])
    masked = np.where(allowed, x, np.float32(-np.inf))
    out = ggml_ops.softmax(x, level, first, last)
    assert np.array_equal(out, softmax_reference(masked, level))
    assert np.all(out[:, ~allowed] == 0)


def test_float16_rounding_and_store():
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((6, 70)) * np.logspace(-9, 5, 70)).astype(np.float32)
    x[0, :4] = [65520.0, -7e4, np.inf, 6e-8]  # rounds to inf, overflows, stays, subnormal
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    cache = np.zeros((8, 70), np.float16)
    ggml_ops.store_f16(cache[2:8], x)
    assert np.array_equal(cache[2:8].view(np.uint16), expected.view(np.uint16))
    assert np.array_equal(ggml_ops.round_to_f16(x.copy()), expected.astype(np.float32))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ggml_ops.round_to_f16(x[:, ::2])
    with pytest.raises(ValueError, match="cannot write"):
        ggml_ops.store_f16(cache[:3], x)


def test_rms_norm_matches_ggml_order():
    """Squares in float32 summed in double in order, mean rounded to float32, (x * scale) * w."""
    rng = np.random.default_rng(14)
    x = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    w = rng.standard_normal(300).astype(np.float32)
    eps = np.float32(1e-5)
    expected = np.empty_like(x)
    for r in range(4):
        total = 0.0
        for v in (x[r] * x[r]).astype(np.float64):
            total += v
        scale = np.float32(1) / np.sqrt(np.float32(total / 300) + eps)
        expected[r] = (x[r] * scale) * w
    assert np.array_equal(ggml_ops.rms_norm(x, w, eps), expected)


@pytest.mark.parametrize("n_rot", [16, 12])
def test_rope_matches_fused_reference(n_rot):
    """NEOX pairs (i, i + n_rot/2) with the first product fused into the addition; dims
    from n_rot on (partial rotary) copied."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    theta = rng.random((3, n_rot // 2)).astype(np.float32) * 6
    cos, sin = np.cos(theta), np.sin(theta)
    half = n_rot // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:n_rot]
    expected = x.copy()
    expected[..., :half] = fma_reference(x1, c, -(x2 * s))
    expected[..., half:n_rot] = fma_reference(x1, s, x2 * c)
    out = ggml_ops.rope(x, cos, sin, n_rot)
    assert np.array_equal(out, expected)
    qkv = np.concatenate([x.reshape(3, 32), rng.standard_normal((3, 8)).astype(np.float32)], axis=1)
    assert np.array_equal(ggml_ops.rope(qkv[:, :32].reshape(3, 2, 16), cos, sin, n_rot), out)  # a strided view, as the model passes


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_swiglu_matches_ggml_vector_loop(level):
    """silu(gate) * up with the level's vector exp on whole vectors of gate, libm's expf on
    the rest (n_ff = 37: two or four vectors and five scalars)."""
    rng = np.random.default_rng(16)
    n_ff = 37
    gate_up = (rng.standard_normal((3, 2 * n_ff)) * 4).astype(np.float32)
    gate, up = gate_up[:, :n_ff], gate_up[:, n_ff:]
    expected = gate / (np.float32(1) + ggml_ops.expf(-gate, level)) * up
    assert np.array_equal(ggml_ops.swiglu(gate_up, n_ff, level), expected)


def test_attention_ops_refuse_what_their_kernels_would_read_out_of_bounds():
    """Shapes, end and key ranges are checked before a kernel indexes with them unchecked."""
    level = LEVELS[0]
    k_cache = np.zeros((8, 2, 16), np.float16)
    q = np.zeros((2, 3, 16), np.float32)
    with pytest.raises(ValueError, match="end=9 is outside the cache's 8 positions"):
        ggml_ops.attention_scores(q, k_cache, 9, level, batched=True)
    with pytest.raises(ValueError, match="does not match a cache"):
        ggml_ops.attention_scores(q[:1], k_cache, 4, level, batched=True)
    with pytest.raises(ValueError, match="0 <= first <= last and first < 4"):
        ggml_ops.attention_values(np.zeros((2, 3, 4), np.float32), k_cache, 4, level, batched=True,
                                  first=np.array([-1]), last=np.array([3]))
    for first, last in ((3, 2), (4, 5)):  # an empty range; keys that start past the last one
        with pytest.raises(ValueError, match="0 <= first <= last and first < 4"):
            ggml_ops.attention_scores(q, k_cache, 4, level, batched=True, first=np.array([first]), last=np.array([last]))
    with pytest.raises(ValueError, match="probabilities of 5 positions for end=4"):
        ggml_ops.attention_values(np.zeros((2, 3, 5), np.float32), k_cache, 4, level, batched=True)
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array"):
        ggml_ops.attention_scores(q, k_cache, 4, level, batched=True, out=np.empty((2, 3, 5), np.float32))
    buffer = np.zeros(96, np.float32)
    with pytest.raises(ValueError, match="out must not overlap q"):  # its kernel is compiled noalias
        ggml_ops.attention_scores(buffer.reshape(2, 3, 16), k_cache, 4, level, batched=True, out=buffer[:24].reshape(2, 3, 4))
    with pytest.raises(ValueError, match="0 <= first <= last"):
        ggml_ops.softmax(np.zeros((3, 4), np.float32), level, np.array([-2]), np.array([1]))
    with pytest.raises(ValueError, match="one key index per token"):
        ggml_ops.softmax(np.zeros((3, 4), np.float32), level, np.array([0, 1]), np.array([1]))
    mismatched = dataclasses.replace(level, exp_scalef=not level.exp_scalef)
    with pytest.raises(ValueError, match="pair 16 lanes with the AVX-512 ggml_v_expf"):
        ggml_ops.softmax(np.zeros((3, 16), np.float32), mismatched)


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_softmax_in_place_equals_a_fresh_array(level):
    x = (np.random.default_rng(15).standard_normal((4, 40)) * 5).astype(np.float32)
    kept = x.copy()
    fresh = ggml_ops.softmax(x, level, np.array([3]), np.array([37]))
    assert np.array_equal(x, kept)  # not in place: the scores are left alone
    assert ggml_ops.softmax(x, level, np.array([3]), np.array([37]), in_place=True) is x
    assert np.array_equal(x, fresh)


@pytest.mark.parametrize("level", LEVELS, ids=str)
def test_attention_tiles_with_causal_ranges_from_key_0(level):
    """A prompt's causal ranges (every row from key 0, each to its own position: the rows of
    a tile see very different keys), a context shorter than a tile's keys, and a head
    smaller than a tile's outputs."""
    rng = np.random.default_rng(16)
    kn = level.lanes
    for head_dim, end, n_tok in ((16, 20, 20), (64, 300, 37)):
        n_kv, n_ctx = 2, end + 5
        k_cache = rng.standard_normal((n_ctx, n_kv, head_dim)).astype(np.float16)
        v_cache = rng.standard_normal((n_ctx, n_kv, head_dim)).astype(np.float16)
        q = rng.standard_normal((n_kv, n_tok, head_dim)).astype(np.float16).astype(np.float32)
        last = np.arange(end - n_tok, end)
        first = np.zeros(n_tok, np.int64)
        seen = np.arange(end)[None, :] <= last[:, None]  # (n_tok, end)
        seen_rows = np.broadcast_to(seen, (n_kv, n_tok, end))
        keys = k_cache[:end].transpose(1, 0, 2)  # (n_kv, end, head_dim)
        got = ggml_ops.attention_scores(q, k_cache, end, level, batched=True, first=first, last=last)
        assert np.array_equal(got[seen_rows], tinyblas_reference(q, keys, kn)[seen_rows])
        probs = np.where(seen_rows, rng.random((n_kv, n_tok, end)), 0).astype(np.float16).astype(np.float32)
        width = -(-end // 256) * 256  # llama.cpp's KV view: zero probabilities past the keys
        padded = np.zeros((n_kv, n_tok, width), np.float32)
        padded[:, :, :end] = probs
        padded_values = np.zeros((n_kv, head_dim, width), np.float32)
        padded_values[:, :, :end] = v_cache[:end].transpose(1, 2, 0)
        got = ggml_ops.attention_values(probs, v_cache, end, level, batched=True, first=first, last=last)
        assert np.array_equal(got, tinyblas_reference(padded, padded_values, kn))


def test_scores_scratch_is_not_handed_out_while_a_view_of_it_lives():
    """GgmlNumerics reuses one array for the scores of each attention; a pass still holding
    the last one (a hook running another model on the same numerics) gets it left alone."""
    from phi3ref.ggml.numerics import GgmlNumerics

    numerics = GgmlNumerics(LEVELS[0])
    held = numerics._scores_buffer((2, 3, 5))
    other = numerics._scores_buffer((2, 3, 5))
    assert not np.shares_memory(held, other)
    del held, other
    first = numerics._scores_buffer((2, 3, 5))
    address = first.__array_interface__["data"][0]
    del first
    again = numerics._scores_buffer((2, 3, 4))  # smaller, not a quarter: the same memory
    assert again.__array_interface__["data"][0] == address
