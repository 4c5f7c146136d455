"""SIMD building blocks for the ggml kernels, as Numba intrinsics: the integer products of
the quantized weights, and (below them) the float attention tiles and ggml's vector exp.

Numba does not emit x86's 8-bit multiply-add instructions by itself (its integer loops
widen bytes to 32 or 64 bits), and those instructions are what makes llama.cpp's quantized
dot products fast. The intrinsics here write LLVM IR directly: each one unpacks a weight
block's codes into 32-byte vectors and multiplies them with the 8-bit activation codes of
one token after another, so a weight block is unpacked once per matmul whatever the
number of tokens.

The primitive is ``_dot4``: eight int32 lanes, lane k adding the four products of bytes
4k..4k+3 of an unsigned weight vector and a signed activation vector. That is one
``vpdpbusd`` instruction on CPUs with AVX-512 VNNI (or AVX-VNNI), and exactly the lane
layout ggml's AVX2 kernels get from ``_mm256_maddubs_epi16`` + ``_mm256_madd_epi16`` (which
is why phi3ref can reproduce llama.cpp's per-lane float sums). On other CPUs it is written
as plain LLVM vector arithmetic, which LLVM lowers for any target. All integer sums are
exact (no saturation, no overflow for these block sizes), so the results do not depend on
the instruction chosen; only speed does. ``PHI3REF_SIMD=generic`` forces the portable form
(tests use it); each form is cached by Numba in a folder of its own (below).

Every block kernel is called as ``kernel(w, off, x, xoff, sums, soff, n_in, n_tok, out)``:
the weight row ``w`` (uint8) and the block's byte offset ``off``; the activation codes
``x`` (int8, C-contiguous, ``n_in`` per token) and the block's element offset ``xoff`` in
the first token; the activations' int32 sums of 16 codes (Q8_K's bsums, ``n_in / 16``
per token) and the block's offset ``soff`` in them (unused by Q4_0 / Q8_0); the number of
tokens; and the int32 output ``out``, OUT_STRIDE values per token (layouts below). Scales
and mins are unpacked from the block itself. ``fma32`` and ``half_to_float`` are the two
float operations the kernels need bit-exact: a single-rounding fused multiply-add and the
float16 -> float32 conversion.
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Which instructions the intrinsics below are written with (decided with the kernel cache,
# which keeps each form apart); every choice gives the same integers.
from ..jit import AVX2, FORM, GFNI512, VNNI, VNNI512
from ..quants import QUANT_TYPES

__all__ = [
    "OUT_STRIDE", "ROW_TOKENS", "AVX2", "FORM", "VNNI", "VNNI512", "GFNI512", "fma32", "half_to_float", "float_to_half", "pow2_f64",
    "q4_0_block", "q8_0_block",
    "q4_k_row", "q5_k_row", "q6_k_row", "q4_k_rows_pairs", "q4_k_rows_tiled", "q5_k_rows_tiled", "q6_k_rows_tiled",
    "q4_k_row_tiled", "q5_k_row_tiled", "q6_k_row_tiled", "q4_k_rows8_pairs", "q4_k_rows8_seq_min",
    "q4_k_rows8_tiled", "q5_k_rows8_tiled", "q6_k_rows8_tiled", "scores8", "scores16", "values8", "values16", "scores_tile8", "scores_tile16",
    "values_slot1", "values_slot2", "values_slot3", "values_slot4", "prefetch_elements", "values_tile8", "values_tile16", "TILE_ROWS", "TILE_COLS", "VALUES_BLOCK",
    "exp_chunk8", "exp_chunk16", "max_range",
    "vecdot_f16_8", "vecdot_f16_16", "vecdot_f16_8_keys", "vecdot_f16_16_keys", "VECDOT_KEYS", "f32_bits", "bits_f32",
]

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_I16, _F32 = ir.IntType(16), ir.FloatType()
_V32I8, _V8I32, _V32I32 = ir.VectorType(_I8, 32), ir.VectorType(_I32, 8), ir.VectorType(_I32, 32)
_V64I8, _V16I32, _V32I16, _V8F32 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_I16, 32), ir.VectorType(_F32, 8)

# The block layouts the intrinsics read (phi3ref.quants' one table: ggml-common.h's structs)
_Q4_0, _Q8_0, _Q4_K, _Q5_K, _Q6_K = (QUANT_TYPES[QT[name]] for name in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"))
_K_SCALES = _Q4_K.offset("scales")  # Q4_K and Q5_K: d, dmin, then the 12 bytes of 6-bit scales and mins
assert _K_SCALES == _Q5_K.offset("scales") and _Q4_K.scale_offsets == _Q5_K.scale_offsets


OUT_STRIDE = 16  # int32 outputs per token of every block kernel


# ---- IR helpers ----------------------------------------------------------------------


def _splat(value: int, vtype: ir.VectorType) -> ir.Constant:
    return ir.Constant(vtype, [ir.Constant(vtype.element, value)] * vtype.count)


def _data(context, builder, arrtype, arr) -> ir.Value:
    """The array's data as an i8* (byte addressing; offsets are scaled by the caller)."""
    data = context.make_array(arrtype)(context, builder, arr).data
    return builder.bitcast(data, _I8.as_pointer())


def _load(builder, base: ir.Value, byte_offset: ir.Value, vtype: ir.Type) -> ir.Value:
    ptr = builder.bitcast(builder.gep(base, [byte_offset]), vtype.as_pointer())
    return builder.load(ptr, align=1)


def _store(builder, base: ir.Value, byte_offset: ir.Value, value: ir.Value) -> None:
    ptr = builder.bitcast(builder.gep(base, [byte_offset]), value.type.as_pointer())
    builder.store(value, ptr, align=1)


def _i64(builder, value: ir.Value) -> ir.Value:
    return builder.sext(value, _I64) if value.type.width < 64 else value


def _const(n: int) -> ir.Constant:
    return ir.Constant(_I64, n)


def _pmadd_x86(builder, u: ir.Value, s: ir.Value, words: ir.Value | None) -> ir.Value:
    """AVX2's byte products, 256 bits at a time: vpmaddubsw (u unsigned, s signed <32 x i8>
    -> <16 x i16> pair sums) then vpmaddwd with ``words`` (<16 x i16>; None: ones) -> <8 x i32>,
    lane k the four products of bytes 4k..4k+3 (times their two words)."""
    v16i16 = ir.VectorType(_I16, 16)
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i16, [_V32I8, _V32I8]), "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [v16i16, v16i16]), "llvm.x86.avx2.pmadd.wd")
    return builder.call(maddwd, [builder.call(maddubs, [u, s]), words if words is not None else _splat(1, v16i16)])


def _per_half(builder, fn, *vectors: ir.Value) -> ir.Value:
    """fn applied to the lower and the upper halves of 512-bit vectors (None passes through),
    the two 256-bit results side by side."""
    def half(v, h):
        if v is None:
            return None
        n = v.type.count // 2
        return _shuffle(builder, v, None, list(range(h * n, (h + 1) * n)))
    lo, hi = fn(*(half(v, 0) for v in vectors)), fn(*(half(v, 1) for v in vectors))
    return _shuffle(builder, lo, hi, list(range(2 * lo.type.count)))


def _dot4(builder, acc: ir.Value, u: ir.Value, s: ir.Value) -> ir.Value:
    """acc + (sum of u[4k + e] * s[4k + e], e < 4) in lane k: u unsigned and s signed bytes
    (<32 x i8> with acc <8 x i32>, or <64 x i8> with acc <16 x i32>)."""
    lanes = acc.type.count
    if (VNNI and lanes == 8) or (VNNI512 and lanes == 16):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(acc.type, [acc.type] * 3), f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
        )
        return builder.call(fn, [acc, builder.bitcast(u, acc.type), builder.bitcast(s, acc.type)])
    if AVX2:
        pairs = (lambda a, b: _pmadd_x86(builder, a, b, None))
        return builder.add(acc, pairs(u, s) if lanes == 8 else _per_half(builder, pairs, u, s))
    wide = ir.VectorType(_I32, 4 * lanes)
    products = builder.mul(builder.zext(u, wide), builder.sext(s, wide))
    for e in range(4):
        acc = builder.add(acc, _shuffle(builder, products, None, [4 * k + e for k in range(lanes)]))
    return acc


def _splat_value(builder, value: ir.Value, count: int) -> ir.Value:
    """<count x type>: a runtime scalar in every lane."""
    vtype = ir.VectorType(value.type, count)
    return _shuffle(builder, builder.insert_element(ir.Constant(vtype, None), value, _const(0)), None, [0] * count)


def _half_value(builder, bits: ir.Value) -> ir.Value:
    """float32 from a float16 bit pattern (i16): vcvtph2ps with F16C."""
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), _F32)


def _half(builder, w, off) -> ir.Value:
    return _half_value(builder, _load(builder, w, off, _I16))


def _fma(builder, a, b, c) -> ir.Value:
    """a * b + c rounded once (llvm.fma: the hardware instruction, or libm's fmaf)."""
    name = "llvm.fma.f32" if a.type == _F32 else f"llvm.fma.v{a.type.count}f32"
    return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name), [a, b, c])


def _v8(values: list[int]) -> ir.Constant:
    return ir.Constant(_V8I32, [ir.Constant(_I32, v) for v in values])


def _shuffle(builder, a: ir.Value, b: ir.Value | None, mask: list[int]) -> ir.Value:
    b = ir.Constant(a.type, None) if b is None else b
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _sums4(builder, v0, v1, v2, v3) -> ir.Value:
    """<4 x i32> (sum of v0's lanes, ..., sum of v3's): a shuffle-and-add tree, no extracts."""
    x = builder.add(_shuffle(builder, v0, v1, [0, 1, 2, 3, 8, 9, 10, 11]), _shuffle(builder, v0, v1, [4, 5, 6, 7, 12, 13, 14, 15]))
    y = builder.add(_shuffle(builder, v2, v3, [0, 1, 2, 3, 8, 9, 10, 11]), _shuffle(builder, v2, v3, [4, 5, 6, 7, 12, 13, 14, 15]))
    z = builder.add(_shuffle(builder, x, y, [0, 1, 8, 9, 4, 5, 12, 13]), _shuffle(builder, x, y, [2, 3, 10, 11, 6, 7, 14, 15]))
    # z = [v0 a, v0 b, v2 a, v2 b, v1 a, v1 b, v3 a, v3 b]
    return builder.add(_shuffle(builder, z, None, [0, 4, 2, 6]), _shuffle(builder, z, None, [1, 5, 3, 7]))


def _k_scales_mins(builder, w, off):
    """The eight 6-bit scales and mins of a Q4_K / Q5_K block as two <8 x i32>, from the
    12 bytes of the block's scales (ggml's get_scale_min_k4; the bit diagram is in phi3ref/quants.py):
        j < 4:  scale = b[j] & 63             min = b[j + 4] & 63
        j >= 4: scale = (b[j + 4] & 15) | (b[j - 4] >> 6) << 4
                min   = (b[j + 4] >> 4) | (b[j] >> 6) << 4"""
    b = _load(builder, w, builder.add(off, _const(_K_SCALES)), ir.VectorType(_I8, 16))
    b = builder.zext(b, ir.VectorType(_I32, 16))
    top_sc = builder.shl(builder.lshr(_shuffle(builder, b, None, [0, 1, 2, 3, 0, 1, 2, 3]), _splat(6, _V8I32)), _splat(4, _V8I32))
    top_mn = builder.shl(builder.lshr(_shuffle(builder, b, None, [4, 5, 6, 7, 4, 5, 6, 7]), _splat(6, _V8I32)), _splat(4, _V8I32))
    high = _v8([0] * 4 + [48] * 4)
    low6 = _v8([63] * 4 + [15] * 4)
    sc = builder.or_(builder.and_(_shuffle(builder, b, None, [0, 1, 2, 3, 8, 9, 10, 11]), low6), builder.and_(top_sc, high))
    mn_low = builder.lshr(_shuffle(builder, b, None, [4, 5, 6, 7, 8, 9, 10, 11]), _v8([0] * 4 + [4] * 4))
    mn = builder.or_(builder.and_(mn_low, low6), builder.and_(top_mn, high))
    return sc, mn


def _block_intrinsic(unpack, emit, doc: str):
    """A block-kernel intrinsic from ``unpack(builder, w, off) -> state`` (the block's code
    vectors and scales, unpacked once) and ``emit(builder, state, x_at, sums) -> [(int32
    offset in the token's outputs, value)]`` for one token; ``x_at(i)`` loads the i-th 32
    activation bytes of the block, ``sums`` is the block's 16 activation sums (<16 x i32>)."""

    def typer(typingctx, w, off, x, xoff, sums, soff, n_in, n_tok, out):
        sig = types.void(w, off, x, xoff, sums, soff, n_in, n_tok, out)

        def codegen(context, builder, signature, args):
            w_v, off_v, x_v, xoff_v, s_v, soff_v, n_in_v, n_v, out_v = args
            ta = signature.args
            w_p = _data(context, builder, ta[0], w_v)
            x_p = _data(context, builder, ta[2], x_v)
            s_p = _data(context, builder, ta[4], s_v)
            out_p = _data(context, builder, ta[8], out_v)
            _prefetch(builder, w_p, builder.add(_i64(builder, off_v), _const(PREFETCH_AHEAD)))
            state = unpack(builder, w_p, _i64(builder, off_v))
            xoff, soff, n_in = _i64(builder, xoff_v), _i64(builder, soff_v), _i64(builder, n_in_v)
            with cgutils.for_range(builder, _i64(builder, n_v)) as loop:
                t = loop.index
                x_base = builder.add(xoff, builder.mul(t, n_in))
                # activation sums: Q8_K keeps n_in / 16 int32 per token
                s_base = builder.mul(builder.add(soff, builder.mul(t, builder.sdiv(n_in, _const(16)))), _const(4))

                def x_at(i):
                    return _load(builder, x_p, builder.add(x_base, _const(32 * i)), _V32I8)

                sums = _load(builder, s_p, s_base, ir.VectorType(_I32, 16)) if emit.uses_sums else None
                for j, value in emit(builder, state, x_at, sums):
                    byte = builder.mul(builder.add(builder.mul(t, _const(OUT_STRIDE)), _const(j)), _const(4))
                    _store(builder, out_p, byte, value)
            return context.get_dummy_value()

        return sig, codegen

    typer.__doc__ = doc
    return intrinsic(typer)


def _emitter(uses_sums: bool):
    def deco(fn):
        fn.uses_sums = uses_sums
        return fn

    return deco


def _zero() -> ir.Constant:
    return _splat(0, _V8I32)


# ---- Q4_0: 32 elements, byte j = element j (low nibble) and j + 16 (high nibble), stored +8;
# ---- Q8_0: 32 signed bytes, flipped to unsigned (q + 128).
# The offset comes off per lane as dot4(offset, x), the lanes ggml's kernels hold.


def _unpack_q4_0(builder, w, off):
    packed = _load(builder, w, builder.add(off, _const(_Q4_0.offset("qs"))), ir.VectorType(_I8, 16))
    lo = builder.and_(packed, _splat(0x0F, packed.type))
    hi = builder.lshr(packed, _splat(4, packed.type))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32)))), 8


def _unpack_q8_0(builder, w, off):
    q = _load(builder, w, builder.add(off, _const(_Q8_0.offset("qs"))), _V32I8)
    if AVX2 and not VNNI:  # vpmaddubsw would saturate on q + 128: the signed codes, see _dot4_signed
        return q, None
    return builder.xor(q, _splat(0x80, _V32I8)), 0x80


def _dot4_signed(builder, acc: ir.Value, a: ir.Value, s: ir.Value) -> ir.Value:
    """_dot4 of two signed <32 x i8> by ggml's AVX2 sign trick: |a| (unsigned) times s with
    a's sign (vpsignb). Exact: pairs reach 2 * 128 * 127 < 2^15 (Q8_0 activations are
    within +-127)."""
    sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]), "llvm.x86.avx2.psign.b")
    absolute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8, ir.IntType(1)]), "llvm.abs.v32i8")
    return _dot4(builder, acc, builder.call(absolute, [a, ir.Constant(ir.IntType(1), 0)]), builder.call(sign, [s, a]))


@_emitter(uses_sums=False)
def _emit_q_0(builder, state, x_at, sums):
    codes, offset = state
    x = x_at(0)
    if offset is None:  # signed codes (Q8_0 in the AVX2 form)
        return [(0, _dot4_signed(builder, _zero(), codes, x))]
    lanes = _dot4(builder, _zero(), codes, x)
    return [(0, builder.sub(lanes, _dot4(builder, _zero(), _splat(offset, _V32I8), x)))]


q4_0_block = _block_intrinsic(_unpack_q4_0, _emit_q_0, "Q4_0 block (32): out[16 t + k] = lane k of sum q x (token t).")
q8_0_block = _block_intrinsic(_unpack_q8_0, _emit_q_0, "Q8_0 block (32): out[16 t + k] = lane k of sum q x (token t).")


# ---- float ----------------------------------------------------------------------------------


@intrinsic
def fma32(typingctx, a, b, c):
    """float32 a * b + c rounded once: the hardware fused multiply-add where the CPU has one
    (as ggml's _mm256_fmadd_ps), the C library's fmaf otherwise; same result either way."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)

    return sig, codegen


@intrinsic
def half_to_float(typingctx, bits):
    """The float16 with bit pattern ``bits`` (uint16) as float32 (vcvtph2ps with F16C)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return _half_value(builder, args[0])

    return sig, codegen


@intrinsic
def float_to_half(typingctx, value):
    """The bit pattern (uint16) of float32 ``value`` rounded to the nearest float16 (ties to
    even, overflow to infinity: vcvtps2ph, as numpy's astype(float16)). A plain conversion,
    so LLVM vectorizes loops over it."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return sig, codegen


@intrinsic
def pow2_f64(typingctx, n):
    """2.0 ** n as float64 for -1022 <= n <= 1023, built from its exponent bits (no call,
    so loops over it vectorize)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        bits = builder.shl(builder.add(args[0], _const(1023)), _const(52))
        return builder.bitcast(bits, ir.DoubleType())

    return sig, codegen


@intrinsic
def f32_bits(typingctx, value):
    """The bit pattern of float32 ``value`` as uint32 (a register move, no call)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return sig, codegen


@intrinsic
def bits_f32(typingctx, bits):
    """The float32 with bit pattern ``bits`` (uint32)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)

    return sig, codegen


# ---- one token against a whole row: the GEMV kernels of decoding ----------------------------
# For a single token the tile kernels above spend more time storing and re-reading their
# integer sums than computing them. The row kernels below loop over a row's blocks inside the
# intrinsic, keep the float accumulators in registers and return the row's dot product.
# They take two 32-element sub-blocks per 64-byte vector, and apply the sub-block scales
# inside the multiply-add (vpmaddubsw: pairs of u8 x s8 products to int16, which cannot
# saturate for codes below 64; vpdpwssd: pairs of int16 x scale into the int32 lanes).
# Lane k (< 8) of a 64-byte vector covers bytes 4k..4k+3 of its first 32 and lane 8 + k the
# same bytes of its second 32, so folding the upper eight lanes onto the lower gives exactly
# the eight lanes of ggml's 256-bit kernels. Every integer sum is exact, every float
# operation is that of kernels._simd_token for the same mode, in the same order.


def _vconst(vtype: ir.VectorType, values: list[int]) -> ir.Constant:
    return ir.Constant(vtype, [ir.Constant(vtype.element, v) for v in values])


def _halves(value_lo: int, value_hi: int) -> ir.Constant:
    """<64 x i8>: value_lo in the first 32 bytes, value_hi in the last 32."""
    return _vconst(_V64I8, [value_lo] * 32 + [value_hi] * 32)


def _bit_field(builder, x: ir.Value, shift_lo: int, shift_hi: int, width: int, to: int) -> ir.Value:
    """<64 x i8>: ((x >> shift) & (2^width - 1)) << to in every byte, shift = shift_lo in the
    first 32 bytes and shift_hi in the last 32. With GFNI that is one vgf2p8affineqb: output
    bit i of a byte is the parity of (byte 7 - i of the 8-byte matrix) & input, so the
    matrix has byte 7 - (to + k) = 1 << (shift + k) for k < width and zeros elsewhere."""
    if GFNI512:
        def matrix(shift):
            rows = [0] * 8
            for k in range(width):
                rows[7 - (to + k)] = 1 << (shift + k)
            return rows

        affine = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V64I8, [_V64I8, _V64I8, _I8]), "llvm.x86.vgf2p8affineqb.512"
        )
        return builder.call(affine, [x, _vconst(_V64I8, matrix(shift_lo) * 4 + matrix(shift_hi) * 4), ir.Constant(_I8, 0)])
    field = builder.and_(builder.lshr(x, _halves(shift_lo, shift_hi)), _splat((1 << width) - 1, _V64I8))
    return builder.shl(field, _splat(to, _V64I8)) if to else field


def _twice(builder, v32: ir.Value) -> ir.Value:
    """<64 x i8>: the 32 bytes v32 in both halves."""
    return _shuffle(builder, v32, None, list(range(32)) * 2)


def _madd_scaled(builder, acc: ir.Value, u: ir.Value, s: ir.Value, words: ir.Value) -> ir.Value:
    """acc + lane k: sum over e < 4 of u[4k + e] * s[4k + e] * words[2k + e // 2]; u unsigned
    and s signed <64 x i8>, words <32 x i16>, acc <16 x i32>."""
    if VNNI512:
        pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I16, [_V64I8, _V64I8]), "llvm.x86.avx512.pmaddubs.w.512")
        dpwssd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3), "llvm.x86.avx512.vpdpwssd.512")
        pairs = builder.call(pmadd, [u, s])
        return builder.call(dpwssd, [acc, builder.bitcast(pairs, _V16I32), builder.bitcast(words, _V16I32)])
    if AVX2:
        return builder.add(acc, _per_half(builder, lambda a, b, w: _pmadd_x86(builder, a, b, w), u, s, words))
    v64i32 = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(u, v64i32), builder.sext(s, v64i32))
    pairs = builder.add(_shuffle(builder, products, None, list(range(0, 64, 2))), _shuffle(builder, products, None, list(range(1, 64, 2))))
    scaled = builder.mul(pairs, builder.sext(words, _V32I32))
    return builder.add(acc, builder.add(_shuffle(builder, scaled, None, list(range(0, 32, 2))), _shuffle(builder, scaled, None, list(range(1, 32, 2)))))


def _words(builder, scales: ir.Value, groups: list[int], width: int) -> ir.Value:
    """<32 x i16>: scales[g] for each of ``groups``, repeated ``width`` times each."""
    narrow = builder.trunc(scales, ir.VectorType(_I16, scales.type.count))
    return _shuffle(builder, narrow, None, [g for g in groups for _ in range(width)])


def _fold(builder, acc16: ir.Value) -> ir.Value:
    """<8 x i32>: lanes 0-7 plus lanes 8-15 (the 256-bit kernels' lanes)."""
    return builder.add(_shuffle(builder, acc16, None, list(range(8))), _shuffle(builder, acc16, None, list(range(8, 16))))


def _hsum(builder, v: ir.Value) -> ir.Value:
    """The sum of an integer vector's lanes (exact, so in any order)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.add(_shuffle(builder, v, None, list(range(n))), _shuffle(builder, v, None, list(range(n, 2 * n))))
    return builder.extract_element(v, _const(0))


def _zero16() -> ir.Constant:
    return _splat(0, _V16I32)


# Each type has an unpack (the block's code vectors and scale words, once per block) and an
# ``ints`` (one token's integer sums, in the granularity the accumulation mode asks for:
# "total" for the block, "pairs" of 32-element sub-blocks, or the eight "lanes").


def _min_products(builder, mins, sums):
    """<8 x i32>: min_j * (sum of the activation codes of 32-element sub-block j)."""
    sub_sums = builder.add(_shuffle(builder, sums, None, list(range(0, 16, 2))), _shuffle(builder, sums, None, list(range(1, 16, 2))))
    return builder.mul(mins, sub_sums)


def _sums_of_4(builder, accs: list[ir.Value]) -> ir.Value:
    """<4 x i32>: the lane sums of four <16 x i32>."""
    return _sums4(builder, *(_fold(builder, a) for a in accs))


def _codes_q4_k(builder, w, off) -> list[ir.Value]:
    """Four <64 x i8>: sub-blocks 2p (the low nibbles of 32 bytes) and 2p + 1 (their high nibbles)."""
    return [
        _bit_field(builder, _twice(builder, _load(builder, w, builder.add(off, _const(_Q4_K.offset("qs") + 32 * p)), _V32I8)), 0, 4, 4, 0)
        for p in range(4)
    ]


def _codes_q5_k(builder, w, off) -> list[ir.Value]:
    """As _codes_q4_k (the nibbles of qs) with the fifth bits of the 32 bytes of qh."""
    high = _twice(builder, _load(builder, w, builder.add(off, _const(_Q5_K.offset("qh"))), _V32I8))
    return [
        builder.or_(
            _bit_field(builder, _twice(builder, _load(builder, w, builder.add(off, _const(_Q5_K.offset("qs") + 32 * p)), _V32I8)), 0, 4, 4, 0),
            _bit_field(builder, high, 2 * p, 2 * p + 1, 1, 4),
        )
        for p in range(4)
    ]


def _unpack_row_k(codes_of):
    def unpack(builder, w, off):
        scales, mins = _k_scales_mins(builder, w, off)
        words = [_words(builder, scales, [2 * p, 2 * p + 1], 16) for p in range(4)]
        return codes_of(builder, w, off), words, mins

    return unpack


_unpack_row_q4_k, _unpack_row_q5_k = _unpack_row_k(_codes_q4_k), _unpack_row_k(_codes_q5_k)


# Q6_K: two halves of 128; per half, 64 bytes of low nibbles (ql) and 32 of top bits (qh):
#   element      l        32 + l         64 + l        96 + l       (l < 32)
#   low 4 bits   ql[l]&15 ql[32+l]&15    ql[l]>>4      ql[32+l]>>4
#   top 2 bits   qh[l]&3  (qh[l]>>2)&3   (qh[l]>>4)&3  (qh[l]>>6)&3
# then 16 signed 8-bit scales, one per 16 elements. Codes are used unsigned (0..63) and
# 32 * scale * sum(x) taken off per lane afterwards, as ggml does: lane k loses the terms
# of 16-element groups 2k and 2k + 1 (not its own elements; the total is the same).


def _unpack_row_q6_k(builder, w, off):
    scales = builder.sext(_load(builder, w, builder.add(off, _const(_Q6_K.offset("scales"))), ir.VectorType(_I8, 16)), ir.VectorType(_I32, 16))
    codes, words = [], []
    for half in range(2):
        ql = _load(builder, w, builder.add(off, _const(_Q6_K.offset("ql") + 64 * half)), _V64I8)  # ql0 | ql1
        qh = _twice(builder, _load(builder, w, builder.add(off, _const(_Q6_K.offset("qh") + 32 * half)), _V32I8))
        for pair in range(2):  # low nibbles then high nibbles of ql
            low = _bit_field(builder, ql, 4 * pair, 4 * pair, 4, 0)
            codes.append(builder.or_(low, _bit_field(builder, qh, 4 * pair, 4 * pair + 2, 2, 4)))
            c = 4 * half + 2 * pair  # 32-element chunks c and c + 1, 16-element groups 2c .. 2c + 3
            words.append(_words(builder, scales, [2 * c, 2 * c + 1, 2 * c + 2, 2 * c + 3], 8))
    return codes, words, scales


def _codes_q6_k(builder, w, off) -> list[ir.Value]:
    """Four <64 x i8>: the unsigned 6-bit codes (0..63) of elements 64p .. 64p + 63."""
    return _unpack_row_q6_k(builder, w, off)[0]


def _q6_k_scales(builder, w, off) -> tuple[ir.Value, ir.Value]:
    """Two <8 x i32>: the signed scales of 16-element groups 0..7 and 8..15."""
    scales = builder.sext(_load(builder, w, builder.add(off, _const(_Q6_K.offset("scales"))), ir.VectorType(_I8, 16)), _V16I32)
    return _shuffle(builder, scales, None, list(range(8))), _shuffle(builder, scales, None, list(range(8, 16)))


def _products(builder, state, x_at64, separate: bool) -> list[ir.Value]:
    """scale * q x accumulated in one <16 x i32> per 64 bytes (separate) or in one overall."""
    codes, words, _ = state
    if separate:
        return [_madd_scaled(builder, _zero16(), codes[i], x_at64(i), words[i]) for i in range(4)]
    acc = _zero16()
    for i in range(4):
        acc = _madd_scaled(builder, acc, codes[i], x_at64(i), words[i])
    return [acc]


def _ints_q4_k_q5_k(builder, state, x_at64, sums, grain):
    mins = _min_products(builder, state[2], sums)
    if grain == "pairs":  # (<4 x i32> pair sums of scale * q x, <4 x i32> pair sums of min * sum(x))
        min_pairs = builder.add(_shuffle(builder, mins, None, [0, 2, 4, 6]), _shuffle(builder, mins, None, [1, 3, 5, 7]))
        return _sums_of_4(builder, _products(builder, state, x_at64, True)), min_pairs
    (acc,) = _products(builder, state, x_at64, False)
    return (_fold(builder, acc) if grain == "lanes" else _hsum(builder, acc)), _hsum(builder, mins)


def _ints_q6_k(builder, state, x_at64, sums, grain):
    """ggml's unsigned codes: 32 * scale * sum(x) comes off, lane k losing groups 2k, 2k + 1."""
    (acc,) = _products(builder, state, x_at64, False)
    weighted = builder.mul(state[2], sums)
    bias = builder.add(_shuffle(builder, weighted, None, list(range(0, 16, 2))), _shuffle(builder, weighted, None, list(range(1, 16, 2))))
    lanes = builder.sub(_fold(builder, acc), builder.shl(bias, _splat(5, _V8I32)))
    return (lanes if grain == "lanes" else _hsum(builder, lanes)), None


class _Acc:
    """One token's float accumulators (allocas that LLVM keeps in registers)."""

    def __init__(self, builder):
        self.builder = builder
        zero = ir.Constant(_F32, 0.0)
        self.acc, self.acc_min = cgutils.alloca_once_value(builder, zero), cgutils.alloca_once_value(builder, zero)
        self.lanes = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))

    def fma_into(self, slot, a, b):
        self.builder.store(_fma(self.builder, a, b, self.builder.load(slot)), slot)


# The float steps: kernels._simd_token's operations for each accumulation mode, in its order.
# ``scales`` = (d, dmin) of the weight block as float32, ``dx`` the token's block scale.


def _step_seq_min(builder, acc, ints, scales, dx):
    """Q4_K GEMV: acc = fma(d * dx, isum, acc); acc_min = fma(dmin * dx, msum, acc_min)."""
    isum, msum = (builder.sitofp(v, _F32) for v in ints)
    acc.fma_into(acc.acc, builder.fmul(scales[0], dx), isum)
    acc.fma_into(acc.acc_min, builder.fmul(scales[1], dx), msum)


def _step_pairs(builder, acc, ints, scales, dx):
    """Q4_K repacked GEMM: one fma per pair of sub-blocks, the mins likewise."""
    pairs, min_pairs = ints
    dd, dm = builder.fmul(scales[0], dx), builder.fmul(scales[1], dx)
    for p in range(4):
        acc.fma_into(acc.acc, dd, builder.sitofp(builder.extract_element(pairs, _const(p)), _F32))
        acc.fma_into(acc.acc_min, dm, builder.sitofp(builder.extract_element(min_pairs, _const(p)), _F32))


def _step_lanes(builder, acc, ints, scales, dx):
    """vec_dot: lanes = fma(d * dx, lanes_int, lanes); Q5_K's mins acc_min = fma(-dx * dmin, msum, acc_min)."""
    lanes, msum = ints
    acc.fma_into(acc.lanes, _splat_value(builder, builder.fmul(scales[0], dx), 8), builder.sitofp(lanes, _V8F32))
    if msum is not None:
        acc.fma_into(acc.acc_min, builder.fmul(builder.fneg(dx), scales[1]), builder.sitofp(msum, _F32))


def _step_tiled(builder, acc, ints, scales, dx):
    """Tiled GEMM: r = isum * d; r = fma(-dmin, msum, r) (with mins); acc = fma(r, dx, acc)."""
    isum, msum = ints
    r = builder.fmul(builder.sitofp(isum, _F32), scales[0])
    if msum is not None:
        r = _fma(builder, builder.fneg(scales[1]), builder.sitofp(msum, _F32), r)
    acc.fma_into(acc.acc, r, dx)


def _finish_seq_min(builder, acc):
    return builder.fsub(builder.load(acc.acc), builder.load(acc.acc_min))


def _finish_lanes(builder, acc):
    """hsum_float_8 of the lanes (kernels._hsum8's order), plus acc_min."""
    v = builder.load(acc.lanes)
    e = [builder.extract_element(v, _const(i)) for i in range(8)]
    t0, t1, t2, t3 = (builder.fadd(e[4 + i], e[i]) for i in range(4))
    return builder.fadd(builder.fadd(builder.fadd(t0, t2), builder.fadd(t1, t3)), builder.load(acc.acc_min))


def _finish_acc(builder, acc):
    return builder.load(acc.acc)


_MODES = {  # grain of the integer sums, float step, final sum
    "seq_min": ("total", _step_seq_min, _finish_seq_min),
    "pairs": ("pairs", _step_pairs, _finish_seq_min),
    "lanes": ("lanes", _step_lanes, _finish_lanes),
    "tiled": ("total", _step_tiled, _finish_acc),
}
_TYPES = {  # block bytes, unpack, ints, byte offsets of the float16 d and dmin
    "q4_k": (_Q4_K.type_size, _unpack_row_q4_k, _ints_q4_k_q5_k, _Q4_K.scale_offsets),
    "q5_k": (_Q5_K.type_size, _unpack_row_q5_k, _ints_q4_k_q5_k, _Q5_K.scale_offsets),
    "q6_k": (_Q6_K.type_size, _unpack_row_q6_k, _ints_q6_k, _Q6_K.scale_offsets),
}


# Decoding streams every weight byte once per token, so it runs at the memory's speed, and
# the hardware prefetchers alone do not keep up with rows of a few blocks each (on a 2-core
# Sapphire Rapids-class VM, benchmarks/bench.py --level avx512bf16 printed decode 3.84
# tok/s without these hints and 5.50 with them; 1 KiB ahead did better than 512 bytes or
# 2 KiB). Row and block kernels ask for the cache lines PREFETCH_AHEAD bytes past the block
# they read (the next rows', at a row's end). The eight-row prompt kernels, compute-bound,
# did not gain from it.
PREFETCH_AHEAD = 1024


# the intrinsic's name carries its pointer type: "p0" with LLVM's opaque pointers (LLVM 17+),
# "p0i8" with the typed pointers of older LLVMs (llvmlite before 0.45)
_PREFETCH = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 17 else "llvm.prefetch.p0i8"


def _prefetch(builder, base: ir.Value, byte_offset: ir.Value) -> None:
    """A read hint for the cache line at base + byte_offset (never faults)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), _PREFETCH)
    builder.call(fn, [builder.gep(base, [byte_offset]), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _row_intrinsic(qtype: str, mode: str, n_tok: int):
    """``kernel(w, off, x, xoff, d, doff, sums, soff, n_in, n_blocks, out, ooff, ostride)``:
    ``n_blocks`` weight blocks from byte ``off`` of ``w`` against ``n_tok`` consecutive
    tokens' Q8_K activations (codes ``x`` from element ``xoff``, ``n_in`` per token; float
    scales ``d`` from ``doff``, ``n_in / 256`` per token; int32 sums of 16 codes ``sums``
    from ``soff``, ``n_in / 16`` per token), summed in ``mode``; token t's dot product goes
    to out[ooff + t * ostride]. Each block is unpacked once for all the tokens."""
    block_bytes, unpack, ints_of, scale_offsets = _TYPES[qtype]
    grain, step, finish = _MODES[mode]

    def typer(typingctx, w, off, x, xoff, d, doff, sums, soff, n_in, n_blocks, out, ooff, ostride):
        sig = types.void(w, off, x, xoff, d, doff, sums, soff, n_in, n_blocks, out, ooff, ostride)

        def codegen(context, builder, signature, args):
            w_p, x_p, d_p, s_p, out_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 2, 4, 6, 10))
            off0, xoff, doff, soff, n_in, n_blocks, ooff, ostride = (_i64(builder, args[i]) for i in (1, 3, 5, 7, 8, 9, 11, 12))
            n_sums = builder.sdiv(n_in, _const(16))
            accs = [_Acc(builder) for _ in range(n_tok)]
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                off = builder.add(off0, builder.mul(b, _const(block_bytes)))
                for line in range(0, block_bytes + 63, 64):
                    _prefetch(builder, w_p, builder.add(off, _const(PREFETCH_AHEAD + line)))
                state = unpack(builder, w_p, off)
                scales = [_half(builder, w_p, builder.add(off, _const(o))) for o in scale_offsets]
                for t, acc in enumerate(accs):
                    tt = _const(t)
                    x_base = builder.add(builder.add(xoff, builder.mul(tt, n_in)), builder.mul(b, _const(256)))
                    s_at = builder.add(builder.add(soff, builder.mul(tt, n_sums)), builder.mul(b, _const(16)))
                    sums = _load(builder, s_p, builder.mul(s_at, _const(4)), _V16I32)
                    dx = _load(builder, d_p, builder.mul(builder.add(builder.add(doff, builder.mul(tt, n_blocks)), b), _const(4)), _F32)
                    ints = ints_of(builder, state, lambda i: _load(builder, x_p, builder.add(x_base, _const(64 * i)), _V64I8), sums, grain)
                    step(builder, acc, ints, scales, dx)
            for t, acc in enumerate(accs):
                at = builder.add(ooff, builder.mul(_const(t), ostride))
                _store(builder, out_p, builder.mul(at, _const(4)), finish(builder, acc))
            return context.get_dummy_value()

        return sig, codegen

    typer.__doc__ = f"{qtype.upper()} row against {n_tok} token(s), {mode} sums. " + (_row_intrinsic.__doc__ or "")
    return intrinsic(typer)


ROW_TOKENS = 4  # tokens per call of the multi-token row kernels (ggml's GEMM groups of four)
q4_k_row = _row_intrinsic("q4_k", "seq_min", 1)  # llama.cpp's repacked GEMV
q5_k_row = _row_intrinsic("q5_k", "lanes", 1)  # ggml's vec_dot
q6_k_row = _row_intrinsic("q6_k", "lanes", 1)
q4_k_rows_pairs = _row_intrinsic("q4_k", "pairs", ROW_TOKENS)  # llama.cpp's repacked GEMM
q4_k_rows_tiled = _row_intrinsic("q4_k", "tiled", ROW_TOKENS)  # ggml's tiled K-quant GEMM
q5_k_rows_tiled = _row_intrinsic("q5_k", "tiled", ROW_TOKENS)
q6_k_rows_tiled = _row_intrinsic("q6_k", "tiled", ROW_TOKENS)
q4_k_row_tiled = _row_intrinsic("q4_k", "tiled", 1)
q5_k_row_tiled = _row_intrinsic("q5_k", "tiled", 1)
q6_k_row_tiled = _row_intrinsic("q6_k", "tiled", 1)


# ---- eight rows against a tile of tokens: prefill --------------------------------------------
# llama.cpp's GEMM kernels for repacked weights keep eight rows side by side in a register so
# that the lanes of a product are rows and nothing has to be summed across lanes. The kernel
# below builds that layout per block, in registers, from the unpacked codes of eight rows
# (an 8 x 8 transpose of 8-byte groups) and then uses it for every token of the tile: per
# token and 8 bytes, one broadcast of the activation bytes and one vpdpbusd for eight rows.
# Lanes 2i and 2i + 1 hold row i. The float operations are kernels._simd_token's for the
# mode, each one now on eight rows at once.


def _transpose8(builder, vecs: list[ir.Value], elem: ir.Type) -> list[ir.Value]:
    """Eight vectors read as eight elements of type ``elem`` each (an 8 x 8 matrix, vector i
    = row i) -> the transposed eight (vector g holds element g of every input)."""
    vtype = ir.VectorType(elem, 8)
    v = [builder.bitcast(x, vtype) for x in vecs]
    for step in (4, 2, 1):
        nxt = list(v)
        for i in range(8):
            if i & step == 0:
                a, b = v[i], v[i + step]
                nxt[i] = _shuffle(builder, a, b, [j if j & step == 0 else 8 + j - step for j in range(8)])
                nxt[i + step] = _shuffle(builder, a, b, [j + step if j & step == 0 else 8 + j for j in range(8)])
        v = nxt
    return [builder.bitcast(x, vecs[0].type) for x in v]


# Each sub-block's integer sum is multiplied by its row's scale. With VNNI the byte products
# are summed in 32 bits (vpdpbusd) and then multiplied (vpmulld); without it, as ggml's AVX2
# GEMMs do, they stay in 16 bits across the sub-block's groups (vpmaddubsw, vpaddw) and one
# vpmaddwd with the scale words does the multiply and the widening together: per sub-block
# and token, in two 256-bit halves, 4 vpmaddubsw + 3 vpaddw + 1 vpmaddwd each (16) instead
# of 4 x (vpmaddubsw + vpmaddwd + vpaddd) + vpmulld each (26). Both are the same integers:
# every sum is exact.
I16_MAX = 32767


def _scale_operand(builder, scale8: ir.Value) -> ir.Value:
    """Per block, outside the token loop: row i's scale (lane i of the <8 x i32> ``scale8``)
    laid out for :func:`_dots_scaled` -- int16 words, four per row (the AVX2 form), or int32
    lanes 2i and 2i + 1 (VNNI and the plain form)."""
    if AVX2 and not VNNI512:
        return _shuffle(builder, builder.trunc(scale8, ir.VectorType(_I16, 8)), None, [i // 4 for i in range(32)])
    return _shuffle(builder, scale8, None, [i // 2 for i in range(16)])


def _dots_scaled(builder, pairs: list[tuple[ir.Value, ir.Value]], scale: ir.Value, max_code: int) -> ir.Value:
    """<16 x i32> in _dot4's lanes (2i and 2i + 1: row i): (sum over (u, s) in ``pairs`` of
    u . s) times row i's scale (``scale`` from :func:`_scale_operand`); u unsigned codes of
    at most ``max_code`` and s signed int8 codes, <64 x i8> each."""
    if AVX2 and not VNNI512:
        # the 16-bit partial sums may not overflow: each vpmaddubsw lane adds two products
        assert len(pairs) * 2 * max_code * 128 <= I16_MAX, "the 16-bit sums would overflow"
        v16i16 = ir.VectorType(_I16, 16)
        maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i16, [_V32I8, _V32I8]), "llvm.x86.avx2.pmadd.ub.sw")
        maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [v16i16, v16i16]), "llvm.x86.avx2.pmadd.wd")

        def half(words, *bytes_):
            sums = builder.call(maddubs, [bytes_[0], bytes_[1]])
            for k in range(2, len(bytes_), 2):
                sums = builder.add(sums, builder.call(maddubs, [bytes_[k], bytes_[k + 1]]))
            return builder.call(maddwd, [sums, words])

        return _per_half(builder, half, scale, *(v for pair in pairs for v in pair))
    acc = _zero16()
    for u, s in pairs:
        acc = _dot4(builder, acc, u, s)
    return builder.mul(acc, scale)


def _rows8_intrinsic(qtype: str, mode: str):
    """``kernel(w, r0, q, d, sums, t0, n_tok, acc, out)``: rows r0..r0 + 8 of the K-quant
    weight ``w`` (n_rows, row bytes) against tokens t0..t0 + n_tok of the Q8_K activations
    ``q`` (codes), ``d`` (block scales) and ``sums`` (int32 sums of 16 codes), summed in
    ``mode`` ("pairs", "seq_min" or "tiled"); out[t, r0:r0 + 8] for each token t. ``acc``
    is float32 scratch of 16 per token."""
    layout, codes_of = {"q4_k": (_Q4_K, _codes_q4_k), "q5_k": (_Q5_K, _codes_q5_k), "q6_k": (_Q6_K, _codes_q6_k)}[qtype]
    block_bytes = layout.type_size
    max_code = (1 << layout.code_bits) - 1  # the unsigned codes the kernel multiplies (Q6_K's before -32)
    assert qtype != "q6_k" or mode == "tiled"  # ggml sums Q6_K batches only in the tiled GEMM

    def typer(typingctx, w, r0, q, d, sums, t0, n_tok, acc, out):
        sig = types.void(w, r0, q, d, sums, t0, n_tok, acc, out)

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 4, 7, 8)]
            w_p, q_p, d_p, s_p, acc_p, out_p = (builder.bitcast(a.data, _I8.as_pointer()) for a in arrays)
            row_bytes = builder.extract_value(arrays[0].shape, 1)
            n_in = builder.extract_value(arrays[1].shape, 1)
            n_blocks, n_rows = builder.sdiv(n_in, _const(256)), builder.extract_value(arrays[5].shape, 1)
            r0, t0, n_tok = (_i64(builder, args[i]) for i in (1, 5, 6))
            zero_f = ir.Constant(_V8F32, [0.0] * 8)

            def acc_slot(t, k):  # byte offset of token t's accumulator k (0: acc, 1: acc_min)
                return builder.mul(builder.add(builder.mul(t, _const(16)), _const(8 * k)), _const(4))

            with cgutils.for_range(builder, n_tok) as loop:
                for k in range(2):
                    _store(builder, acc_p, acc_slot(loop.index, k), zero_f)
            with cgutils.for_range(builder, n_blocks) as block_loop:
                b = block_loop.index
                rows = []
                for i in range(8):
                    off = builder.add(builder.mul(builder.add(r0, _const(i)), row_bytes), builder.mul(b, _const(block_bytes)))
                    scales_mins = _q6_k_scales(builder, w_p, off) if qtype == "q6_k" else _k_scales_mins(builder, w_p, off)
                    rows.append((off, codes_of(builder, w_p, off), *scales_mins))
                # codes[p][g]: 8-byte group g of the p-th 64 codes (Q4_K / Q5_K: sub-blocks
                # 2p, 2p + 1; Q6_K: 16-element groups 4p .. 4p + 3), row i in qword i
                codes = [_transpose8(builder, [r[1][p] for r in rows], _I64) for p in range(4)]
                # sc_t[j] lane i = scale j of row i (Q6_K: 16 scales, two 8 x 8 transposes)
                sc_t = [v for part in range(2 if qtype == "q6_k" else 1) for v in _transpose8(builder, [r[2 + part] for r in rows], _I32)]
                sc_w = [_scale_operand(builder, v) for v in sc_t]
                d_at = layout.offset("d")
                dvec, dmin = ir.Constant(_V8F32, None), ir.Constant(_V8F32, None)
                for i, r in enumerate(rows):
                    dvec = builder.insert_element(dvec, _half(builder, w_p, builder.add(r[0], _const(d_at))), _const(i))
                    if qtype != "q6_k":
                        dmin = builder.insert_element(dmin, _half(builder, w_p, builder.add(r[0], _const(layout.offset("dmin")))), _const(i))
                if qtype != "q6_k":
                    mn_t = _transpose8(builder, [r[3] for r in rows], _I32)
                with cgutils.for_range(builder, n_tok) as token_loop:
                    t = token_loop.index
                    tt = builder.add(t0, t)
                    x_base = builder.add(builder.mul(tt, n_in), builder.mul(b, _const(256)))
                    dx = _load(builder, d_p, builder.mul(builder.add(builder.mul(tt, n_blocks), b), _const(4)), _F32)
                    bsums = _load(builder, s_p, builder.mul(builder.add(builder.mul(tt, builder.sdiv(n_in, _const(16))), builder.mul(b, _const(16))), _const(4)), _V16I32)

                    def x_group(p, g):  # the token's 8 codes of group g of the p-th 64, in every qword
                        xq = _load(builder, q_p, builder.add(x_base, _const(64 * p + 8 * g)), _I64)
                        xv = builder.insert_element(ir.Constant(ir.VectorType(_I64, 8), None), xq, _const(0))
                        return builder.bitcast(_shuffle(builder, xv, None, [0] * 8), _V64I8)

                    if qtype == "q6_k":
                        # scale_k * (codes . x) over the 16 groups k, minus ggml's 32 * scale_k * bsum_k
                        total, bias = _zero16(), _splat(0, _V8I32)
                        for k in range(16):
                            p, g = k // 4, 2 * (k % 4)
                            a = _dots_scaled(builder, [(codes[p][g + e], x_group(p, g + e)) for e in range(2)], sc_w[k], max_code)
                            total = builder.add(total, a)
                            bias = builder.add(bias, builder.mul(sc_t[k], _splat_value(builder, builder.extract_element(bsums, _const(k)), 8)))
                        row_totals = builder.add(_shuffle(builder, total, None, list(range(0, 16, 2))), _shuffle(builder, total, None, list(range(1, 16, 2))))
                        isum = builder.sitofp(builder.sub(row_totals, builder.shl(bias, _splat(5, _V8I32))), _V8F32)
                        slot_acc = acc_slot(t, 0)
                        r = builder.fmul(isum, dvec)  # the tiled GEMM's float step, without mins
                        acc_v = _fma(builder, r, _splat_value(builder, dx, 8), _load(builder, acc_p, slot_acc, _V8F32))
                        _store(builder, acc_p, slot_acc, acc_v)
                    else:
                        sub_sums = builder.add(_shuffle(builder, bsums, None, list(range(0, 16, 2))), _shuffle(builder, bsums, None, list(range(1, 16, 2))))
                        pairs, min_pairs = [], []
                        for p in range(4):
                            halves = []
                            for h in range(2):  # sub-blocks 2p + h
                                group_pairs = [(codes[p][g], x_group(p, g)) for g in range(4 * h, 4 * h + 4)]
                                halves.append(_dots_scaled(builder, group_pairs, sc_w[2 * p + h], max_code))
                            both = builder.add(*halves)
                            pairs.append(builder.add(_shuffle(builder, both, None, list(range(0, 16, 2))), _shuffle(builder, both, None, list(range(1, 16, 2)))))
                            min_pairs.append(builder.add(
                                builder.mul(mn_t[2 * p], _splat_value(builder, builder.extract_element(sub_sums, _const(2 * p)), 8)),
                                builder.mul(mn_t[2 * p + 1], _splat_value(builder, builder.extract_element(sub_sums, _const(2 * p + 1)), 8)),
                            ))
                        slot_acc, slot_min = acc_slot(t, 0), acc_slot(t, 1)
                        acc_v, acc_m = _load(builder, acc_p, slot_acc, _V8F32), _load(builder, acc_p, slot_min, _V8F32)
                        dxv = _splat_value(builder, dx, 8)
                        if mode == "pairs":  # one fma per pair of sub-blocks
                            dd, dm = builder.fmul(dvec, dxv), builder.fmul(dmin, dxv)
                            for p in range(4):
                                acc_v = _fma(builder, dd, builder.sitofp(pairs[p], _V8F32), acc_v)
                                acc_m = _fma(builder, dm, builder.sitofp(min_pairs[p], _V8F32), acc_m)
                        else:
                            isum = builder.sitofp(builder.add(builder.add(pairs[0], pairs[1]), builder.add(pairs[2], pairs[3])), _V8F32)
                            msum = builder.sitofp(builder.add(builder.add(min_pairs[0], min_pairs[1]), builder.add(min_pairs[2], min_pairs[3])), _V8F32)
                            if mode == "seq_min":
                                acc_v = _fma(builder, builder.fmul(dvec, dxv), isum, acc_v)
                                acc_m = _fma(builder, builder.fmul(dmin, dxv), msum, acc_m)
                            else:  # tiled
                                r = _fma(builder, builder.fneg(dmin), msum, builder.fmul(isum, dvec))
                                acc_v = _fma(builder, r, dxv, acc_v)
                        _store(builder, acc_p, slot_acc, acc_v)
                        _store(builder, acc_p, slot_min, acc_m)
            with cgutils.for_range(builder, n_tok) as loop:
                t = loop.index
                acc_v = _load(builder, acc_p, acc_slot(t, 0), _V8F32)
                if mode != "tiled":
                    acc_v = builder.fsub(acc_v, _load(builder, acc_p, acc_slot(t, 1), _V8F32))
                at = builder.add(builder.mul(builder.add(t0, t), n_rows), r0)
                _store(builder, out_p, builder.mul(at, _const(4)), acc_v)
            return context.get_dummy_value()

        return sig, codegen

    typer.__doc__ = f"{qtype.upper()}, eight rows against a tile of tokens, {mode} sums. " + (_rows8_intrinsic.__doc__ or "")
    return intrinsic(typer)


q4_k_rows8_pairs = _rows8_intrinsic("q4_k", "pairs")
q4_k_rows8_seq_min = _rows8_intrinsic("q4_k", "seq_min")
q4_k_rows8_tiled = _rows8_intrinsic("q4_k", "tiled")
q5_k_rows8_tiled = _rows8_intrinsic("q5_k", "tiled")
q6_k_rows8_tiled = _rows8_intrinsic("q6_k", "tiled")


# ---- attention: the float16 products in llamafile tinyBLAS's and ggml_vec_dot_f16's orders --
# llama.cpp computes both attention products over its float16 KV cache with llamafile's
# tinyBLAS when the batch has two tokens or more (``kn`` float lanes, 16 with AVX-512 and 8
# with AVX2: lane i takes elements i, i + kn, ... in order, then the lanes are reduced in
# a tree), and with ggml_vec_dot_f16 for one token (four accumulators of ``epr`` lanes over
# steps of 4 * epr elements, reduced as GGML_F16_VEC_REDUCE does, the elements after the
# last whole step added in double). Products of two float16 values are exact in float32, so
# every fused multiply-add of those kernels is a multiply and an add here.

_V16F32 = ir.VectorType(_F32, 16)


def _reduce_halves(builder, lanes: list[ir.Value]) -> ir.Value:
    """Lanes (scalars or vectors, added element-wise) summed as _mm512_reduce_add_ps (16)
    and tinyBLAS's hsum / ggml's hsum_float_8 (8) sum them: the upper half added onto the
    lower until four remain, then (0 + 2) + (1 + 3)."""
    while len(lanes) > 4:
        half = len(lanes) // 2
        lanes = [builder.fadd(lanes[half + i], lanes[i]) for i in range(half)]
    return builder.fadd(builder.fadd(lanes[0], lanes[2]), builder.fadd(lanes[1], lanes[3]))


def _reduce_hadd8(builder, lanes: list[ir.Value]) -> ir.Value:
    """Eight lanes summed as GGML_F32x8_REDUCE's tail does (lo + hi, then two _mm_hadd_ps):
    ((0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7))."""
    t = [builder.fadd(lanes[i], lanes[i + 4]) for i in range(4)]
    return builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))


def _vec_reduce(builder, accs: list[ir.Value]) -> ir.Value:
    """GGML_F16_VEC_REDUCE of four <epr x float> accumulators: (0 + 2) + (1 + 3) lane-wise,
    then the lanes: _mm512_reduce_add_ps for 16, the AVX tree for 8."""
    v = builder.fadd(builder.fadd(accs[0], accs[2]), builder.fadd(accs[1], accs[3]))
    lanes = [builder.extract_element(v, _const(i)) for i in range(v.type.count)]
    return _reduce_halves(builder, lanes) if len(lanes) == 16 else _reduce_hadd8(builder, lanes)


def _store_lane_sums(builder, out_p, ooff: ir.Value, n_valid: ir.Value, lanes: list[ir.Value]) -> None:
    """out[ooff + j] (j < n_valid) = element j of the tree sum of the lane vectors
    (:func:`_reduce_halves`, on every element at once)."""
    total = _reduce_halves(builder, lanes)
    with builder.if_else(builder.icmp_signed("==", n_valid, _const(total.type.count)), likely=True) as (whole, part):
        with whole:
            _store(builder, out_p, builder.mul(ooff, _const(4)), total)
        with part:
            # through memory: extracting a lane at a run-time index makes LLVM redo the whole
            # tree, spilled, for every element
            temp = cgutils.alloca_once(builder, total.type)
            builder.store(total, temp)
            elements = builder.bitcast(temp, _I8.as_pointer())
            with cgutils.for_range(builder, n_valid) as loop:
                offset = builder.mul(loop.index, _const(4))
                _store(builder, out_p, builder.add(builder.mul(ooff, _const(4)), offset), _load(builder, elements, offset, _F32))


def _halves16(builder, v_p, element: ir.Value) -> ir.Value:
    """<16 x float> from sixteen float16 bit patterns at element offset ``element`` (vcvtph2ps)."""
    v16i16, v16half = ir.VectorType(_I16, 16), ir.VectorType(ir.HalfType(), 16)
    return builder.fpext(builder.bitcast(_load(builder, v_p, builder.mul(element, _const(2)), v16i16), v16half), _V16F32)


def _scores_intrinsic(kn: int):
    @intrinsic
    def scores(typingctx, q, qoff, kt, koff, kstride, hd, out, ooff, n_valid):
        sig = types.void(q, qoff, kt, koff, kstride, hd, out, ooff, n_valid)

        def codegen(context, builder, signature, args):
            q_p, k_p, out_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 2, 6))
            qoff, koff, kstride, hd, ooff, n_valid = (_i64(builder, args[i]) for i in (1, 3, 4, 5, 7, 8))
            acc_slots = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(kn)]
            with cgutils.for_range(builder, builder.sdiv(hd, _const(kn))) as loop:
                c0 = builder.mul(loop.index, _const(kn))
                for i in range(kn):
                    element = builder.add(c0, _const(i))
                    qv = _splat_value(builder, _load(builder, q_p, builder.mul(builder.add(qoff, element), _const(4)), _F32), 16)
                    keys = _load(builder, k_p, builder.mul(builder.add(koff, builder.mul(element, kstride)), _const(4)), _V16F32)
                    builder.store(builder.fadd(builder.load(acc_slots[i]), builder.fmul(qv, keys)), acc_slots[i])
            _store_lane_sums(builder, out_p, ooff, n_valid, [builder.load(s) for s in acc_slots])
            return context.get_dummy_value()

        return sig, codegen

    scores.__doc__ = (
        f"Sixteen attention scores in tinyBLAS's order with {kn} lanes: out[ooff + j] (j < n_valid) = the "
        "dot product of q[qoff : qoff + hd] with keys kt[koff + e * kstride + j] (e < hd; float32 keys "
        f"transposed so that sixteen positions are contiguous; hd a multiple of {kn}, as tinyBLAS requires). "
        f"Lane i takes elements i, i + {kn}, ...; each lane is a vector over the sixteen positions, so the "
        "additions are tinyBLAS's, on sixteen positions at once."
    )
    return scores


def _vecdot_f16_code(builder, q_p, qoff: ir.Value, k_p, koffs: list[ir.Value], n: ir.Value, epr: int) -> list[ir.Value]:
    """ggml_vec_dot_f16 of q with each key at koffs (float32 results): four accumulators of
    ``epr`` lanes per key over whole steps of 4 * epr, GGML_F16_VEC_REDUCE, then the
    elements after the last whole step added in double — each key's additions in its own
    order, the keys' chains interleaved so that their latencies overlap."""
    step = 4 * epr
    vtype = ir.VectorType(_F32, epr)
    vi16, vhalf = ir.VectorType(_I16, epr), ir.VectorType(ir.HalfType(), epr)
    whole = builder.sub(n, builder.srem(n, _const(step)))
    slots = [[cgutils.alloca_once_value(builder, ir.Constant(vtype, [0.0] * epr)) for _ in range(4)] for _ in koffs]
    with cgutils.for_range(builder, builder.sdiv(whole, _const(step))) as loop:
        for j in range(4):
            e = builder.add(builder.mul(loop.index, _const(step)), _const(j * epr))
            qv = _load(builder, q_p, builder.mul(builder.add(qoff, e), _const(4)), vtype)
            for key, koff in enumerate(koffs):
                kv = builder.fpext(builder.bitcast(_load(builder, k_p, builder.mul(builder.add(koff, e), _const(2)), vi16), vhalf), vtype)
                builder.store(builder.fadd(builder.load(slots[key][j]), builder.fmul(qv, kv)), slots[key][j])
    totals = [cgutils.alloca_once_value(builder, builder.fpext(_vec_reduce(builder, [builder.load(s) for s in key_slots]), ir.DoubleType()))
              for key_slots in slots]
    with cgutils.for_range(builder, builder.sub(n, whole)) as loop:  # leftovers, in double
        e = builder.add(whole, loop.index)
        qv = _load(builder, q_p, builder.mul(builder.add(qoff, e), _const(4)), _F32)
        for koff, total in zip(koffs, totals):
            kv = _half(builder, k_p, builder.mul(builder.add(koff, e), _const(2)))
            builder.store(builder.fadd(builder.load(total), builder.fpext(builder.fmul(qv, kv), ir.DoubleType())), total)
    return [builder.fptrunc(builder.load(total), _F32) for total in totals]


def _vecdot_f16_intrinsic(epr: int):
    @intrinsic
    def vecdot(typingctx, q, qoff, k, koff, n):
        sig = types.float32(q, qoff, k, koff, n)

        def codegen(context, builder, signature, args):
            q_p, k_p = _data(context, builder, signature.args[0], args[0]), _data(context, builder, signature.args[2], args[2])
            qoff, koff, n = (_i64(builder, args[i]) for i in (1, 3, 4))
            return _vecdot_f16_code(builder, q_p, qoff, k_p, [koff], n, epr)[0]

        return sig, codegen

    vecdot.__doc__ = (
        f"ggml_vec_dot_f16 with {epr}-lane vectors: the dot product of float32 q[qoff : qoff + n] (holding "
        "float16 values) with float16 k[koff : koff + n] (uint16 bit patterns). Four accumulators take "
        f"element 4 * {epr} * t + {epr} * j + i in lane i of accumulator j; they are reduced as "
        f"GGML_F16_VEC_REDUCE does; the n % {4 * epr} elements after the last whole step are added in double, "
        "and the double sum is rounded to float32."
    )
    return vecdot


VECDOT_KEYS = 4  # keys per call of the vecdot_f16_*_keys intrinsics


def _vecdot_f16_keys_intrinsic(epr: int):
    @intrinsic
    def vecdot_keys(typingctx, q, qoff, k, koff, kstride, n, out, ooff, ostride):
        sig = types.void(q, qoff, k, koff, kstride, n, out, ooff, ostride)

        def codegen(context, builder, signature, args):
            q_p, k_p, out_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 2, 6))
            qoff, koff, kstride, n, ooff, ostride = (_i64(builder, args[i]) for i in (1, 3, 4, 5, 7, 8))
            koffs = [builder.add(koff, builder.mul(_const(i), kstride)) for i in range(VECDOT_KEYS)]
            for i, value in enumerate(_vecdot_f16_code(builder, q_p, qoff, k_p, koffs, n, epr)):
                _store(builder, out_p, builder.mul(builder.add(ooff, builder.mul(_const(i), ostride)), _const(4)), value)
            return context.get_dummy_value()

        return sig, codegen

    vecdot_keys.__doc__ = (
        f"ggml_vec_dot_f16 ({epr}-lane vectors, as vecdot_f16_{epr}) of q[qoff : qoff + n] with {VECDOT_KEYS} keys "
        f"k[koff + i * kstride :][:n] (i < {VECDOT_KEYS}), into out[ooff + i * ostride]. Each key's sum is "
        "exactly the single product's; computed together, the double-precision tails of the keys (a chain "
        "of dependent additions each, 32 of them for head_dim 96 with AVX-512) overlap instead of waiting "
        "on one another."
    )
    return vecdot_keys


def _values_intrinsic(kn: int):
    @intrinsic
    def values(typingctx, probs, poff, v, voff, vstride, lo, hi, out, ooff, n_valid):
        sig = types.void(probs, poff, v, voff, vstride, lo, hi, out, ooff, n_valid)

        def codegen(context, builder, signature, args):
            p_p, v_p, out_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 2, 7))
            poff, voff, vstride, lo, hi, ooff, n_valid = (_i64(builder, args[i]) for i in (1, 3, 4, 5, 6, 8, 9))
            acc_slots = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(kn)]
            full_width = builder.icmp_signed("==", n_valid, _const(16))

            def values_at(p, whole: bool):
                base = builder.add(voff, builder.mul(p, vstride))
                if whole:
                    return _halves16(builder, v_p, base)
                vec = ir.Constant(_V16F32, [0.0] * 16)
                for i in range(16):  # element i if it exists (index clamped to the row)
                    element = builder.select(builder.icmp_signed("<", _const(i), n_valid), _const(i), _const(0))
                    vec = builder.insert_element(vec, _half(builder, v_p, builder.mul(builder.add(base, element), _const(2))), _const(i))
                return vec

            def chunk(c0, whole: bool, masked: bool):
                for lane in range(kn):
                    p = builder.add(c0, _const(lane))
                    seen = builder.and_(builder.icmp_signed(">=", p, lo), builder.icmp_signed("<=", p, hi)) if masked else None
                    p_read = builder.select(seen, p, lo) if masked else p  # nothing read outside lo..hi
                    prob = _splat_value(builder, _load(builder, p_p, builder.mul(builder.add(poff, p_read), _const(4)), _F32), 16)
                    total = builder.fadd(builder.load(acc_slots[lane]), builder.fmul(prob, values_at(p_read, whole)))
                    builder.store(builder.select(seen, total, builder.load(acc_slots[lane])) if masked else total, acc_slots[lane])

            first_chunk, last_chunk = builder.sdiv(lo, _const(kn)), builder.sdiv(hi, _const(kn))
            with cgutils.for_range(builder, builder.add(builder.sub(last_chunk, first_chunk), _const(1))) as loop:
                c0 = builder.mul(builder.add(first_chunk, loop.index), _const(kn))
                inside = builder.and_(builder.icmp_signed(">=", c0, lo), builder.icmp_signed("<=", builder.add(c0, _const(kn - 1)), hi))
                with builder.if_else(builder.and_(inside, full_width), likely=True) as (fast, careful):
                    with fast:
                        chunk(c0, whole=True, masked=False)
                    with careful:
                        with builder.if_else(full_width) as (whole, partial):
                            with whole:
                                chunk(c0, whole=True, masked=True)
                            with partial:
                                chunk(c0, whole=False, masked=True)
            _store_lane_sums(builder, out_p, ooff, n_valid, [builder.load(s) for s in acc_slots])
            return context.get_dummy_value()

        return sig, codegen

    values.__doc__ = (
        f"Sixteen attention outputs in tinyBLAS's order with {kn} lanes: out[ooff + i] (i < n_valid) = the "
        "sum over positions p = lo..hi of probs[poff + p] * v[voff + p * vstride + i] (float32 probabilities "
        f"holding float16 values; float16 values as uint16 bit patterns), position p in lane p % {kn}, the "
        "lanes then reduced in tinyBLAS's tree. Each lane is a vector over the sixteen outputs, so all lanes "
        f"stay in registers; positions go {kn} at a time, lanes outside lo..hi left alone. A partial chunk "
        "(n_valid < 16) reads its values one by one, never past the row."
    )
    return values


@intrinsic
def prefetch_elements(typingctx, arr, start, count):
    """A read hint for the cache lines of arr's elements start .. start + count (arr
    C-contiguous; a hint never faults): memory an irregular walk will read soon, which the
    CPU's prefetchers cannot guess."""
    sig = types.void(arr, start, count)

    def codegen(context, builder, signature, args):
        base = _data(context, builder, signature.args[0], args[0])
        size = _const(context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype)))
        begin, n = builder.mul(_i64(builder, args[1]), size), builder.mul(_i64(builder, args[2]), size)
        with cgutils.for_range(builder, builder.sdiv(builder.add(n, _const(63)), _const(64))) as loop:
            _prefetch(builder, base, builder.add(begin, builder.mul(loop.index, _const(64))))
        return context.get_dummy_value()

    return sig, codegen


def _values_slot_intrinsic(n_rows: int):
    @intrinsic
    def values_slot(typingctx, probs, poff, pstride, v, voff, vstride, p0, count, pstep, acc, aoff, astride):
        sig = types.void(probs, poff, pstride, v, voff, vstride, p0, count, pstep, acc, aoff, astride)

        def codegen(context, builder, signature, args):
            p_p, v_p, a_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 3, 9))
            poff, pstride, voff, vstride, p0, count, pstep, aoff, astride = (_i64(builder, args[i]) for i in (1, 2, 4, 5, 6, 7, 8, 10, 11))
            at = [builder.mul(builder.add(aoff, builder.mul(_const(k), astride)), _const(4)) for k in range(n_rows)]
            slots = [cgutils.alloca_once_value(builder, _load(builder, a_p, at[k], _V16F32)) for k in range(n_rows)]
            with cgutils.for_range(builder, count) as loop:
                p = builder.add(p0, builder.mul(loop.index, pstep))
                values = _halves16(builder, v_p, builder.add(voff, builder.mul(p, vstride)))  # converted once for every row
                for k in range(n_rows):
                    at_p = builder.mul(builder.add(builder.add(poff, builder.mul(_const(k), pstride)), p), _const(4))
                    prob = _splat_value(builder, _load(builder, p_p, at_p, _F32), 16)
                    builder.store(builder.fadd(builder.load(slots[k]), builder.fmul(prob, values)), slots[k])
            for k in range(n_rows):
                _store(builder, a_p, at[k], builder.load(slots[k]))
            return context.get_dummy_value()

        return sig, codegen

    values_slot.__doc__ = (
        f"One accumulator slot of ggml_vec_dot_f16 for sixteen outputs of {n_rows} query row(s) of one KV "
        f"head: for k < {n_rows} and i < 16, acc[aoff + k * astride + i] += probs[poff + k * pstride + p] * "
        "v[voff + p * vstride + i] for the positions p = p0, p0 + pstep, ... (count of them), in that order "
        "(float16 values as uint16 bit patterns, probabilities holding float16 values). The accumulators "
        "stay in registers across the positions, and each position's sixteen values are converted once "
        "for all the rows (the query heads of a group share their KV head)."
    )
    return values_slot


# A batch's attention products, several query rows at once. tinyBLAS's order fixes, for each
# output, which products each of its kn lanes adds and in which order; it leaves free which
# outputs are computed together. The tiles below take TILE_ROWS query rows of one head and
# TILE_COLS vectors of sixteen outputs at once, one lane after the other: a lane's
# accumulators (rows x cols vectors) stay in registers while every vector of keys or values
# read serves all rows, and the finished lanes wait in a small array for the tree that ends
# each output. Same additions, same order.
TILE_ROWS = {16: 8, 8: 4}  # query rows per tile for kn lanes (AVX2's 16 registers hold less)
TILE_COLS = {16: 2, 8: 1}  # vectors of sixteen outputs per row (<16 x float> is two AVX2 registers)
VALUES_BLOCK = 128  # positions whose values and probabilities a tile reads while they stay in L1


def _min_max(builder, values: list[ir.Value], signed_op: str) -> ir.Value:
    """The smallest ("<") or largest (">") of the i64 values."""
    best = values[0]
    for v in values[1:]:
        best = builder.select(builder.icmp_signed(signed_op, v, best), v, best)
    return best


def _lane_slot(builder, lane_sums, index: ir.Value) -> ir.Value:
    return builder.gep(lane_sums, [_const(0), index])


def _scores_tile_intrinsic(kn: int, cols: int):
    rows = TILE_ROWS[kn]

    @intrinsic
    def scores_tile(typingctx, q, qoff, qstride, kt, koff, kstride, hd, out, ooff, ostride, n_valid):
        sig = types.void(q, qoff, qstride, kt, koff, kstride, hd, out, ooff, ostride, n_valid)

        def codegen(context, builder, signature, args):
            q_p, k_p, out_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 3, 7))
            qoff, qstride, koff, kstride, hd, ooff, ostride, n_valid = (_i64(builder, args[i]) for i in (1, 2, 4, 5, 6, 8, 9, 10))
            lane_sums = cgutils.alloca_once(builder, ir.ArrayType(_V16F32, rows * cols * kn))
            q_rows = [builder.add(qoff, builder.mul(_const(r), qstride)) for r in range(rows)]
            with cgutils.for_range(builder, _const(kn)) as lane_loop:
                lane = lane_loop.index
                accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(rows * cols)]
                with cgutils.for_range(builder, builder.sdiv(hd, _const(kn))) as loop:
                    element = builder.add(builder.mul(loop.index, _const(kn)), lane)
                    k_row = builder.add(koff, builder.mul(element, kstride))
                    keys = [_load(builder, k_p, builder.mul(builder.add(k_row, _const(16 * c)), _const(4)), _V16F32) for c in range(cols)]
                    for r in range(rows):
                        qv = _splat_value(builder, _load(builder, q_p, builder.mul(builder.add(q_rows[r], element), _const(4)), _F32), 16)
                        for c in range(cols):
                            acc = accs[r * cols + c]
                            builder.store(_fma(builder, qv, keys[c], builder.load(acc)), acc)
                for i, acc in enumerate(accs):
                    builder.store(builder.load(acc), _lane_slot(builder, lane_sums, builder.add(_const(i * kn), lane)))
            for r in range(rows):
                for c in range(cols):
                    i = r * cols + c
                    lanes = [builder.load(_lane_slot(builder, lane_sums, _const(i * kn + e))) for e in range(kn)]
                    valid = builder.sub(n_valid, _const(16 * c))  # outputs of this vector that exist
                    valid = builder.select(builder.icmp_signed(">", valid, _const(16)), _const(16), valid)
                    _store_lane_sums(builder, out_p, builder.add(ooff, builder.add(builder.mul(_const(r), ostride), _const(16 * c))), valid, lanes)
            return context.get_dummy_value()

        return sig, codegen

    scores_tile.__doc__ = (
        f"{rows} rows of {16 * cols} attention scores in tinyBLAS's order with {kn} lanes: "
        f"out[ooff + r * ostride + j] (r < {rows}, j < n_valid <= {16 * cols}) = the dot product of "
        "q[qoff + r * qstride :][:hd] with keys kt[koff + e * kstride + j] (float32 keys transposed, positions "
        f"contiguous, {16 * cols} readable; hd a multiple of {kn}). Lane i takes elements i, i + {kn}, ... in order "
        "(products of float16 values, exact in float32, so a fused multiply-add adds them as tinyBLAS's does); "
        "the lanes are reduced in tinyBLAS's tree."
    )
    return scores_tile


def _values_tile_intrinsic(kn: int, cols: int):
    rows = TILE_ROWS[kn]
    block_chunks = VALUES_BLOCK // kn

    @intrinsic
    def values_tile(typingctx, probs, poff, pstride, v, voff, vstride, ranges, out, ooff, ostride):
        sig = types.void(probs, poff, pstride, v, voff, vstride, ranges, out, ooff, ostride)

        def codegen(context, builder, signature, args):
            p_p, v_p, r_p, out_p = (_data(context, builder, signature.args[i], args[i]) for i in (0, 3, 6, 7))
            poff, pstride, voff, vstride, ooff, ostride = (_i64(builder, args[i]) for i in (1, 2, 4, 5, 8, 9))
            los = [_load(builder, r_p, _const(8 * r), _I64) for r in range(rows)]
            his = [_load(builder, r_p, _const(8 * (rows + r)), _I64) for r in range(rows)]
            lo_min, lo_all = _min_max(builder, los, "<"), _min_max(builder, los, ">")
            hi_max, hi_all = _min_max(builder, his, ">"), _min_max(builder, his, "<")
            p_rows = [builder.add(poff, builder.mul(_const(r), pstride)) for r in range(rows)]
            n_accs = rows * cols
            lane_sums = cgutils.alloca_once(builder, ir.ArrayType(_V16F32, n_accs * kn))
            with cgutils.for_range(builder, _const(n_accs * kn)) as loop:
                builder.store(ir.Constant(_V16F32, [0.0] * 16), _lane_slot(builder, lane_sums, loop.index))
            first_chunk = builder.sdiv(lo_min, _const(kn))
            n_chunks = builder.add(builder.sub(builder.sdiv(hi_max, _const(kn)), first_chunk), _const(1))
            n_blocks = builder.sdiv(builder.add(n_chunks, _const(block_chunks - 1)), _const(block_chunks))

            def add_position(p, accs, masked: bool):
                inside = builder.and_(builder.icmp_signed(">=", p, lo_min), builder.icmp_signed("<=", p, hi_max))
                p_read = builder.select(inside, p, lo_min) if masked else p  # nothing read outside the tile's positions
                base = builder.add(voff, builder.mul(p_read, vstride))
                values = [_halves16(builder, v_p, builder.add(base, _const(16 * c))) for c in range(cols)]
                for r in range(rows):
                    prob = _splat_value(builder, _load(builder, p_p, builder.mul(builder.add(p_rows[r], p_read), _const(4)), _F32), 16)
                    seen = None
                    if masked:
                        seen = builder.and_(builder.icmp_signed(">=", p, los[r]), builder.icmp_signed("<=", p, his[r]))
                    for c in range(cols):
                        acc = builder.load(accs[r * cols + c])
                        total = _fma(builder, prob, values[c], acc)
                        builder.store(builder.select(seen, total, acc) if masked else total, accs[r * cols + c])

            with cgutils.for_range(builder, n_blocks) as block_loop:  # VALUES_BLOCK positions at a time
                c0 = builder.add(first_chunk, builder.mul(block_loop.index, _const(block_chunks)))
                block_len = builder.sub(n_chunks, builder.mul(block_loop.index, _const(block_chunks)))
                block_len = builder.select(builder.icmp_signed(">", block_len, _const(block_chunks)), _const(block_chunks), block_len)
                with cgutils.for_range(builder, _const(kn)) as lane_loop:
                    lane = lane_loop.index
                    slots = [_lane_slot(builder, lane_sums, builder.add(_const(i * kn), lane)) for i in range(n_accs)]
                    accs = [cgutils.alloca_once_value(builder, builder.load(slot)) for slot in slots]
                    with cgutils.for_range(builder, block_len) as loop:  # positions lane, lane + kn, ... in order
                        p = builder.add(builder.mul(builder.add(c0, loop.index), _const(kn)), lane)
                        every_row = builder.and_(builder.icmp_signed(">=", p, lo_all), builder.icmp_signed("<=", p, hi_all))
                        with builder.if_else(every_row, likely=True) as (fast, careful):
                            with fast:
                                add_position(p, accs, masked=False)
                            with careful:
                                add_position(p, accs, masked=True)
                    for acc, slot in zip(accs, slots):
                        builder.store(builder.load(acc), slot)
            for r in range(rows):
                for c in range(cols):
                    i = r * cols + c
                    total = _reduce_halves(builder, [builder.load(_lane_slot(builder, lane_sums, _const(i * kn + e))) for e in range(kn)])
                    _store(builder, out_p, builder.mul(builder.add(ooff, builder.add(builder.mul(_const(r), ostride), _const(16 * c))), _const(4)), total)
            return context.get_dummy_value()

        return sig, codegen

    values_tile.__doc__ = (
        f"{rows} rows of {16 * cols} attention outputs in tinyBLAS's order with {kn} lanes: "
        f"out[ooff + r * ostride + i] (r < {rows}, i < {16 * cols}) = the sum over positions p = lo_r..hi_r of "
        "probs[poff + r * pstride + p] * v[voff + p * vstride + i] (float32 probabilities holding float16 values; "
        f"float16 values as uint16 bit patterns); ranges: int64 (2, {rows}), lo_r = ranges[0, r], hi_r = "
        f"ranges[1, r]. Position p goes to lane p % {kn}, in order; {VALUES_BLOCK} positions at a time, one lane "
        "after the other, each vector of values read serving every row; the lanes are then reduced in tinyBLAS's "
        "tree. Nothing outside the rows' positions is read."
    )
    return values_tile


# ggml_v_expf on a vector, both forms (phi3ref.ggml.kernels has the same per lane, with its
# derivation): the AVX-512 one scales by 2^n with _mm512_scalef_ps (here: exact in double,
# one rounding to float), the AVX2 one builds 2^n from exponent bits. Plain LLVM vector code
# (llvm.fma, selects, integer ops on the bits), so it runs on any CPU with the same result.
def _exp_constant(literal: str, count: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(_F32, count), [float.fromhex(literal)] * count)


def _v_expf(builder, x: ir.Value, scalef: bool) -> ir.Value:
    count = x.type.count
    vf, vi = x.type, ir.VectorType(_I32, count)
    c = lambda literal: _exp_constant(literal, count)  # noqa: E731
    shifter = c("0x1.8p23")
    z = _fma(builder, x, c("0x1.715476p+0"), shifter)
    n = builder.fsub(z, shifter)
    neg_n = builder.fneg(n)
    b = _fma(builder, neg_n, c("0x1.7f7d1cp-20"), _fma(builder, neg_n, c("0x1.62e4p-1"), x))
    u = builder.fmul(b, b)
    high = _fma(builder, _fma(builder, c("0x1.0e4020p-7"), b, c("0x1.573e2ep-5")), u, _fma(builder, c("0x1.555e66p-3"), b, c("0x1.fffdb6p-2")))
    abs_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf]), f"llvm.fabs.v{count}f32")
    abs_n = builder.call(abs_fn, [n])
    zero = ir.Constant(vf, [0.0] * count)
    if scalef:
        j = _fma(builder, high, u, _fma(builder, c("0x1.ffffecp-1"), b, ir.Constant(vf, [1.0] * count)))
        huge = builder.fcmp_ordered(">", abs_n, c("0x1.8p7"))  # |n| > 192
        # j * 2^n, n an integer of at most 192 in magnitude: exact in double, rounded once
        # (n = 0 where |n| <= 192 is false — huge or NaN — so fptosi never meets them)
        vd, vl = ir.VectorType(ir.DoubleType(), count), ir.VectorType(_I64, count)
        n_int = builder.fptosi(builder.select(builder.fcmp_ordered("<=", abs_n, c("0x1.8p7")), n, zero), vl)
        pow2 = builder.bitcast(builder.shl(builder.add(n_int, ir.Constant(vl, [1023] * count)), ir.Constant(vl, [52] * count)), vd)
        scaled = builder.fptrunc(builder.fmul(builder.fpext(j, vd), pow2), vf)
        inf = ir.Constant(vf, [float("inf")] * count)
        alt = builder.select(builder.fcmp_ordered("<=", n, zero), zero, inf)
        return builder.select(huge, alt, scaled)
    j = _fma(builder, high, u, builder.fmul(c("0x1.ffffecp-1"), b))
    e = builder.shl(builder.bitcast(z, vi), ir.Constant(vi, [23] * count))
    k = builder.bitcast(builder.add(e, ir.Constant(vi, [0x3F800000] * count)), vf)
    g = builder.select(builder.fcmp_ordered("<=", n, zero), ir.Constant(vi, [0x82000000 - (1 << 32)] * count), ir.Constant(vi, [0] * count))
    s1 = builder.bitcast(builder.add(g, ir.Constant(vi, [0x7F000000] * count)), vf)
    s2 = builder.bitcast(builder.sub(e, g), vf)
    over = builder.select(builder.fcmp_ordered(">", abs_n, c("0x1.8p7")), builder.fmul(s1, s1), builder.fmul(_fma(builder, s2, j, s2), s1))
    return builder.select(builder.fcmp_ordered(">", abs_n, c("0x1.f8p6")), over, _fma(builder, k, j, k))  # |n| > 126


def _exp_chunk_intrinsic(kn: int, scalef: bool):
    vf = ir.VectorType(_F32, kn)

    @intrinsic
    def exp_chunk(typingctx, x, xoff, out, ooff, mx, c0, lo, hi, n):
        sig = types.float32(x, xoff, out, ooff, mx, c0, lo, hi, n)

        def codegen(context, builder, signature, args):
            x_p, out_p = _data(context, builder, signature.args[0], args[0]), _data(context, builder, signature.args[2], args[2])
            xoff, ooff, c0, lo, hi, n = (_i64(builder, args[i]) for i in (1, 3, 5, 6, 7, 8))
            shift = _splat_value(builder, args[4], kn)
            result = cgutils.alloca_once(builder, vf)
            whole = builder.and_(builder.icmp_signed(">=", c0, lo), builder.icmp_signed("<=", builder.add(c0, _const(kn - 1)), hi))
            with builder.if_else(whole, likely=True) as (inside, edge):
                with inside:
                    val = _v_expf(builder, builder.fsub(_load(builder, x_p, builder.mul(builder.add(xoff, c0), _const(4)), vf), shift), scalef)
                    _store(builder, out_p, builder.mul(builder.add(ooff, c0), _const(4)), val)
                    builder.store(val, result)
                with edge:  # keys outside lo..hi are exactly 0; nothing read outside them
                    xs = ir.Constant(vf, [0.0] * kn)
                    seen = []
                    for i in range(kn):
                        p = builder.add(c0, _const(i))
                        seen.append(builder.and_(builder.icmp_signed(">=", p, lo), builder.icmp_signed("<=", p, hi)))
                        p_read = builder.select(seen[i], p, lo)
                        xs = builder.insert_element(xs, _load(builder, x_p, builder.mul(builder.add(xoff, p_read), _const(4)), _F32), _const(i))
                    val = _v_expf(builder, builder.fsub(xs, shift), scalef)
                    for i in range(kn):
                        element = builder.select(seen[i], builder.extract_element(val, _const(i)), ir.Constant(_F32, 0.0))
                        val = builder.insert_element(val, element, _const(i))
                        p = builder.add(c0, _const(i))
                        with builder.if_then(builder.icmp_signed("<", p, n)):
                            _store(builder, out_p, builder.mul(builder.add(ooff, p), _const(4)), element)
                    builder.store(val, result)
            total = builder.load(result)
            return _reduce_halves(builder, [builder.extract_element(total, _const(i)) for i in range(kn)])

        return sig, codegen

    exp_chunk.__doc__ = (
        f"One step of ggml_vec_soft_max_f32 with {kn} lanes ({'AVX-512' if scalef else 'AVX2'} ggml_v_expf): "
        f"out[ooff + c0 + i] = exp(x[xoff + c0 + i] - mx) for the {kn} keys from c0 (exactly 0 for keys outside "
        "lo..hi, not stored at or past n, not read outside lo..hi); returns their sum, reduced as "
        "_mm512_reduce_add_ps / hsum_float_8 reduce it."
    )
    return exp_chunk


def _max_range_intrinsic():
    @intrinsic
    def max_range(typingctx, x, xoff, lo, hi):
        sig = types.float32(x, xoff, lo, hi)

        def codegen(context, builder, signature, args):
            x_p = _data(context, builder, signature.args[0], args[0])
            xoff, lo, hi = (_i64(builder, args[i]) for i in (1, 2, 3))
            count = builder.add(builder.sub(hi, lo), _const(1))
            count = builder.select(builder.icmp_signed("<", count, _const(0)), _const(0), count)
            whole = builder.sub(count, builder.srem(count, _const(16)))
            best = cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [float("-inf")] * 16))
            with cgutils.for_range(builder, builder.sdiv(whole, _const(16))) as loop:
                v = _load(builder, x_p, builder.mul(builder.add(builder.add(xoff, lo), builder.mul(loop.index, _const(16))), _const(4)), _V16F32)
                old = builder.load(best)
                builder.store(builder.select(builder.fcmp_ordered(">", v, old), v, old), best)
            lanes = builder.load(best)
            top = cgutils.alloca_once_value(builder, builder.extract_element(lanes, _const(0)))
            for i in range(1, 16):
                e, t = builder.extract_element(lanes, _const(i)), builder.load(top)
                builder.store(builder.select(builder.fcmp_ordered(">", e, t), e, t), top)
            with cgutils.for_range(builder, builder.sub(count, whole)) as loop:
                e = _load(builder, x_p, builder.mul(builder.add(builder.add(xoff, lo), builder.add(whole, loop.index)), _const(4)), _F32)
                t = builder.load(top)
                builder.store(builder.select(builder.fcmp_ordered(">", e, t), e, t), top)
            return builder.load(top)

        return sig, codegen

    max_range.__doc__ = (
        "The largest of x[xoff + lo .. xoff + hi] other than NaN (-inf if none), sixteen lanes at a time. "
        "Which of two zeros, or whether a NaN is passed over, may differ from ggml's sequential loop; "
        "softmax's outputs do not (a NaN makes every output NaN either way, and x - (+0) = x - (-0) "
        "except for x = 0, whose exp is 1 either way)."
    )
    return max_range


# ggml pairs them so: 16 lanes with AVX-512's exp, 8 with AVX2's
exp_chunk8, exp_chunk16 = _exp_chunk_intrinsic(8, False), _exp_chunk_intrinsic(16, True)
max_range = _max_range_intrinsic()
scores8, scores16 = _scores_intrinsic(8), _scores_intrinsic(16)
scores_tile8, scores_tile16 = _scores_tile_intrinsic(8, TILE_COLS[8]), _scores_tile_intrinsic(16, TILE_COLS[16])
values_tile8, values_tile16 = _values_tile_intrinsic(8, TILE_COLS[8]), _values_tile_intrinsic(16, TILE_COLS[16])
values8, values16 = _values_intrinsic(8), _values_intrinsic(16)
values_slot1, values_slot2, values_slot3, values_slot4 = (_values_slot_intrinsic(n) for n in (1, 2, 3, 4))
vecdot_f16_8, vecdot_f16_16 = _vecdot_f16_intrinsic(8), _vecdot_f16_intrinsic(16)
vecdot_f16_8_keys, vecdot_f16_16_keys = _vecdot_f16_keys_intrinsic(8), _vecdot_f16_keys_intrinsic(16)
