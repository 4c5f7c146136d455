"""phi3ref.isa: which llama.cpp build's arithmetic ggml numerics follow."""

from __future__ import annotations

import numpy as np
import pytest

import phi3ref
from phi3ref import isa

AVX2 = {"sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"}
SKYLAKE_X = AVX2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
ZEN4 = SKYLAKE_X | {"avx512vnni", "avx512vbmi", "avx512bf16", "gfni"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx-tile", "amx-int8", "amx-bf16", "avxvnni", "avx512fp16"}


@pytest.mark.parametrize("features,level", [
    (AVX2, "avx2"), (AVX2 | {"avxvnni"}, "avx2"), (SKYLAKE_X, "avx512"), (SKYLAKE_X | {"avx512vnni", "gfni"}, "avx512"),
    (ZEN4, "avx512bf16"), (SAPPHIRE_RAPIDS, "avx512bf16"), (set(), "avx2"), ({"sse4.2", "avx"}, "avx2"),
])
def test_host_level_is_the_widest_level_the_cpu_runs(features, level):
    assert isa.host_level(features).name == level


def test_native_gaps_name_what_is_not_reproduced():
    assert isa.native_gaps(AVX2) == [] and isa.native_gaps(ZEN4) == []
    amx, fp16 = isa.native_gaps(SAPPHIRE_RAPIDS)
    assert "AMX" in amx and "Q4_K" in amx and "AVX512-FP16" in fp16
    (other,) = isa.native_gaps(set())
    assert "NEON" in other and "avx2 level" in other


def test_levels_build_without_native_or_amx():
    for level in isa.LEVELS.values():
        args = level.cmake_args
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args
        assert ("-DGGML_AVX512=ON" in args) == (level.lanes == 16)
        assert ("-DGGML_AVX512_BF16=ON" in args) == level.bf16_dot
        assert level.runs_on(level.features) and not level.runs_on(level.features - {"avx2"})


def test_resolve_by_argument_environment_or_host(monkeypatch):
    monkeypatch.delenv(isa.ENV_VAR, raising=False)
    assert isa.resolve() == isa.host_level()
    assert isa.resolve("AVX2") is isa.LEVELS["avx2"]
    assert isa.resolve(isa.LEVELS["avx512"]) is isa.LEVELS["avx512"]
    monkeypatch.setenv(isa.ENV_VAR, "avx512")
    assert isa.resolve() is isa.LEVELS["avx512"] and isa.resolve("avx2") is isa.LEVELS["avx2"]


def test_unknown_levels_are_named(monkeypatch, tiny_model):
    with pytest.raises(ValueError, match=r"isa must be one of avx2, avx512, avx512bf16, got 'sse2'"):
        isa.resolve("sse2")
    monkeypatch.setenv(isa.ENV_VAR, "neon")
    with pytest.raises(ValueError, match=r"PHI3REF_ISA must be one of .*got 'neon'"):
        phi3ref.load(tiny_model("phi3-mini", "Q8_0"))
    monkeypatch.delenv(isa.ENV_VAR)
    with pytest.raises(ValueError, match=r"isa must be one of"):
        phi3ref.load(tiny_model("phi3-mini", "Q8_0"), isa=16)


def test_the_model_computes_at_the_level_it_was_given(tiny_model):
    """Levels differ where llama.cpp's builds do: the attention products' lanes, exp."""
    path = tiny_model("phi3-mini", "F16")
    tokens = list(range(100, 140))
    traces = {name: phi3ref.load(path, isa=name).trace(tokens) for name in ("avx2", "avx512")}
    assert phi3ref.load(path, isa="avx2").numerics.level is isa.LEVELS["avx2"]
    for name, bound in (("wqkv-0", 1e-6), ("kq-0", 1e-3), ("kq_soft_max-0", 1e-3), ("result_output", 2e-3)):  # rounding only
        a, b = traces["avx2"][name], traces["avx512"][name]
        assert not np.array_equal(a, b), name
        assert np.abs(a - b).max() <= bound * np.abs(b).max(), name
    assert np.array_equal(traces["avx2"]["attn_norm-0"], traces["avx512"]["attn_norm-0"])
