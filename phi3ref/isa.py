"""Which llama.cpp build ``numerics="ggml"`` reproduces: the x86 instruction-set level.

llama.cpp compiles its CPU backend for one instruction set (a native build: the host's),
and some of its float sums depend on it. In the llama.cpp that llama-cpp-python 0.3.36
vendors, for what a Phi-3 model runs (docs/model.md has the table, per operation):

* the quantized matrix products (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, ...) sum the same way with
  AVX2 and with AVX-512, VNNI or not: their kernels are 256-bit, or per output element
  the same as the 256-bit ones; only Q2_K is repacked with AVX-512 and not without;
* the attention products over the float16 KV cache (llamafile's tinyBLAS for a batch of
  tokens, ``ggml_vec_dot_f16`` for one) have 16 float lanes with AVX-512, 8 with AVX2, and
  reduce them in different trees;
* softmax and SwiGLU evaluate exp with an AVX-512 polynomial (``_mm512_scalef_ps``) or an
  AVX2 one (2^n built from exponent bits), 16 or 8 values at a time;
* float weights (F32 / F16 / BF16) are summed in 16 or 8 lanes; with AVX512-BF16, BF16
  products go through ``vdpbf16ps``.

A :class:`Level` states those choices once; the ggml kernels read them from it. The level
is picked once per model: ``load(..., isa="avx2")``, else the environment variable
``PHI3REF_ISA``, else what a native llama.cpp build on this CPU would use
(:func:`host_level`). Which *instructions* phi3ref itself runs (VNNI, GFNI, 512-bit
vectors, or portable code with ``PHI3REF_SIMD=generic``) is a separate matter of speed:
every level is computed bit for bit the same on any CPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

__all__ = ["LEVELS", "Level", "host_features", "host_level", "haswell_numba_env", "is_x86", "native_gaps", "resolve", "runnable_level", "ENV_VAR", "REPORTED_FEATURES"]

ENV_VAR = "PHI3REF_ISA"

# llama.cpp's CMake options for a non-native x86 build (ggml/CMakeLists.txt); each level
# switches on its own on top of GGML_NATIVE=OFF with everything else off.
_X86_OPTIONS = (
    "SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI",
    "AMX_TILE", "AMX_INT8", "AMX_BF16",
)


@dataclass(frozen=True)
class Level:
    """One llama.cpp x86 build, as far as its float arithmetic goes."""

    name: str
    description: str
    variants: tuple[str, ...]  # llama.cpp's CPU variants (GGML_CPU_ALL_VARIANTS) that compute this way
    options: tuple[str, ...]  # the GGML_* CMake options switched on for a build at this level
    features: frozenset[str]  # CPU features (LLVM's names) that build needs to run
    lanes: int  # float lanes of tinyBLAS and of ggml's F32 / F16 vector loops
    exp_scalef: bool  # ggml_v_expf: the AVX-512 form (_mm512_scalef_ps) or the AVX2 one
    bf16_dot: bool  # BF16 products through vdpbf16ps (AVX512-BF16)
    repack_q2_k: bool  # Q2_K weights repacked 8x8 (llama.cpp does it only with AVX-512)

    @property
    def cmake_args(self) -> list[str]:
        """CMake arguments for a llama.cpp build at this level (GGML_NATIVE off)."""
        return ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{o}={'ON' if o in self.options else 'OFF'}" for o in _X86_OPTIONS]

    def runs_on(self, features: set[str] | frozenset[str]) -> bool:
        """Whether a CPU with ``features`` can execute llama.cpp built at this level."""
        return self.features <= set(features)

    def __str__(self) -> str:
        return self.name


_AVX2 = frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "sse4.2"})
_AVX512 = _AVX2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}

LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level(
            name="avx2",
            description="AVX2 + FMA + F16C (with or without AVX-VNNI)",
            variants=("haswell", "alderlake"),
            options=("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
            features=_AVX2,
            lanes=8,
            exp_scalef=False,
            bf16_dot=False,
            repack_q2_k=False,
        ),
        Level(
            name="avx512",
            description="AVX-512 F/CD/VL/DQ/BW (with or without VNNI, VBMI, GFNI)",
            variants=("skylakex", "cannonlake", "cascadelake", "icelake"),
            options=("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
            features=_AVX512,
            lanes=16,
            exp_scalef=True,
            bf16_dot=False,
            repack_q2_k=True,
        ),
        Level(
            name="avx512bf16",
            description="AVX-512 with AVX512-BF16 (Zen 4, Cooper Lake); differs from avx512 on BF16 weights only",
            variants=("cooperlake", "zen4"),
            options=("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
            features=_AVX512 | {"avx512bf16"},
            lanes=16,
            exp_scalef=True,
            bf16_dot=True,
            repack_q2_k=True,
        ),
    )
}


# the CPU features that decide a llama.cpp build's kernels, as reports list them
REPORTED_FEATURES = frozenset({
    "sse4.2", "avx", "f16c", "fma", "avx2", "bmi2", "avxvnni", "avx512f", "avx512cd", "avx512vl", "avx512dq",
    "avx512bw", "avx512vnni", "avx512vbmi", "avx512bf16", "avx512fp16", "gfni", "amx-tile", "amx-int8", "amx-bf16",
})


def is_x86() -> bool:
    """Whether this machine is x86-64 (the only architecture whose ggml sums phi3ref follows)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def native_gaps(features: set[str] | frozenset[str]) -> list[str]:
    """What a native llama.cpp build on a CPU with ``features`` computes that no phi3ref
    level reproduces (empty: phi3ref's :func:`host_level` is that build's arithmetic)."""
    gaps = []
    if not LEVELS["avx2"].runs_on(features):
        gaps.append(
            "this CPU lacks AVX2/FMA/F16C (or is not x86): a native llama.cpp build sums in its own orders "
            "(NEON, dotprod, i8mm, or scalar), which phi3ref does not follow; phi3ref computes the avx2 level"
        )
    if {"amx-int8", "avx512vnni"} <= set(features):
        gaps.append(
            "this CPU has AMX: a native llama.cpp build multiplies Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K and IQ4_XS "
            "weights with its AMX kernels, which phi3ref does not follow; compare against llama.cpp built for a "
            "phi3ref level (phi3ref.llama_builds, `phi3ref selfcheck --level`)"
        )
    if "avx512fp16" in features:
        gaps.append(
            "this CPU has AVX512-FP16: a native llama.cpp build takes its float16 vector paths (simd-mappings.h), "
            "which phi3ref does not follow; F16 weights differ from the first matrix product on"
        )
    return gaps


# LLVM's feature set of a Haswell CPU (AVX2, FMA, F16C, BMI2; no AVX-512, VNNI or GFNI)
_HASWELL_FEATURES = (
    "+64bit,+aes,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+invpcid,+lzcnt,+mmx,+movbe,"
    "+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt"
)


def haswell_numba_env() -> dict[str, str]:
    """Environment variables that make a new process compile phi3ref's kernels for an
    AVX2-only CPU (Haswell) whatever this CPU is: how tests and benchmarks run the
    instruction forms of such CPUs on a wider machine (give it its own NUMBA_CACHE_DIR)."""
    return {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": _HASWELL_FEATURES}


def host_features() -> frozenset[str]:
    """The host CPU's features, by LLVM's names (``avx2``, ``avx512f``, ``avx512bf16``, ...)."""
    import llvmlite.binding as llvm

    flat = llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in flat.split(",") if f.startswith("+"))


def host_level(features: set[str] | frozenset[str] | None = None) -> Level:
    """The level a native llama.cpp build on this CPU computes in (``-march=native``): the
    widest level the CPU runs. On a CPU without AVX2 (x86 without it, ARM, ...) llama.cpp
    sums in yet other orders that phi3ref does not reproduce; phi3ref then computes the
    ``avx2`` level (see docs/model.md, "Other CPUs")."""
    if features is None:
        features = host_features() if is_x86() else frozenset()
    for name in ("avx512bf16", "avx512", "avx2"):
        if LEVELS[name].runs_on(features):
            return LEVELS[name]
    return LEVELS["avx2"]


def resolve(isa: str | Level | None = None) -> Level:
    """The level for a model: ``isa`` (a name or a Level), else $PHI3REF_ISA, else
    :func:`host_level`. ``ValueError`` names the choices for an unknown name."""
    if isinstance(isa, Level):
        return isa
    source = "isa"
    if isa is None:
        isa, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if isa is None:
        return host_level()
    if not isinstance(isa, str) or isa.lower() not in LEVELS:
        raise ValueError(f"{source} must be one of {', '.join(LEVELS)}, got {isa!r}")
    return LEVELS[isa.lower()]


def runnable_level(name: str | Level, features: frozenset[str] | None = None) -> Level:
    """The level ``name`` (any case), checked to run on this CPU (``features``: the host's):
    ``ValueError`` naming the choices for an unknown name, or what the CPU lacks."""
    if isinstance(name, str) and name.lower() in LEVELS:
        level = LEVELS[name.lower()]
    elif isinstance(name, Level):
        level = name
    else:
        raise ValueError(f"unknown level {name!r}; one of {', '.join(LEVELS)}")
    features = (host_features() if is_x86() else frozenset()) if features is None else features
    if not level.runs_on(features):
        raise ValueError(f"this CPU cannot run llama.cpp built for {level.name} (lacks {', '.join(sorted(level.features - features))})")
    return level
