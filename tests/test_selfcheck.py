"""phi3ref selfcheck: the report on whether this CPU reproduces llama.cpp bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest

from phi3ref import isa, selfcheck
from phi3ref.cli import main


def test_without_llama_cpp_python_it_says_nothing_was_compared(monkeypatch, capsys):
    from phi3ref import llama_builds

    def missing() -> str:
        raise llama_builds.BuildError("llama-cpp-python is not installed (pip install phi3ref[crosscheck])")

    monkeypatch.setattr(llama_builds, "installed_version", missing)
    assert main(["selfcheck"]) == 3
    out = capsys.readouterr().out
    assert f"level {isa.resolve().name}" in out and "nothing compared: llama-cpp-python is not installed" in out


def test_unknown_weight_type_is_named():
    with pytest.raises(ValueError, match="unknown weight type 'Q9_X'"):
        selfcheck.run(quants=("Q9_X",))


def test_unknown_level_is_named():
    pytest.importorskip("llama_cpp")
    with pytest.raises(ValueError, match="unknown level 'sse2'; one of avx2, avx512, avx512bf16, or 'all'"):
        selfcheck.run(levels=["sse2"], quants=("Q8_0",))


def test_a_level_this_cpu_cannot_run_is_refused(monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(isa, "host_features", lambda: frozenset({"avx", "avx2", "fma", "f16c", "bmi2", "sse4.2"}))
    with pytest.raises(ValueError, match="cannot run llama.cpp built for avx512 .lacks avx512bw"):
        selfcheck.run(levels=["avx512"], quants=("Q8_0",))


RUNNABLE = [lv.name for lv in isa.LEVELS.values() if lv.runs_on(isa.host_features())]
# the installed (native) llama-cpp-python computes at the host's level: no build needed
INSTALLED_IS_HOST_LEVEL = bool(RUNNABLE) and not isa.native_gaps(isa.host_features())


@pytest.mark.crosscheck
@pytest.mark.slow
@pytest.mark.skipif(not RUNNABLE, reason="this CPU runs none of phi3ref's levels")
def test_selfcheck_reports_bit_for_bit(capsys):
    """``phi3ref selfcheck`` against the installed llama-cpp-python where it computes at the
    host's level, else against llama.cpp built for the host's level (as the llama.cpp tests
    build it, cached)."""
    pytest.importorskip("llama_cpp")
    host = isa.host_level().name
    _bit_for_bit(capsys, [] if INSTALLED_IS_HOST_LEVEL else ["--level", host], host)


@pytest.mark.crosscheck
@pytest.mark.slow
@pytest.mark.levels
@pytest.mark.skipif(not RUNNABLE, reason="this CPU runs none of phi3ref's levels")
def test_selfcheck_at_a_built_level(capsys):
    pytest.importorskip("llama_cpp")
    _bit_for_bit(capsys, ["--level", RUNNABLE[0]], RUNNABLE[0])


def _bit_for_bit(capsys, level_flags: list[str], level: str) -> None:
    assert main(["selfcheck", "--json", *level_flags, "--quants", "Q4_K_M"]) == 0
    report = json.loads(capsys.readouterr().out)
    (check,) = report["checks"]
    assert check["bit_exact"] and check["level"] == level and check["first_difference"] is None
    ops = {op["op"]: op for op in check["ops"]}
    assert {"wqkv", "kq", "kq_soft_max", "kqv_out", "ffn_swiglu", "l_out", "result_output"} <= set(ops)
    assert all(op["equal"] == op["tensors"] for op in ops.values())


# a level with 16 lanes for the attention scores whose llama.cpp needs no build here, if any
WIDE = isa.resolve().name if INSTALLED_IS_HOST_LEVEL and isa.resolve().name != "avx2" else None


@pytest.mark.crosscheck
@pytest.mark.slow
@pytest.mark.skipif("avx512" not in RUNNABLE, reason="this CPU cannot run llama.cpp built for avx512")
@pytest.mark.parametrize("theirs", [
    pytest.param("installed", id="installed", marks=pytest.mark.skipif(WIDE is None, reason="the installed llama.cpp is not an AVX-512 level here")),
    pytest.param("avx512", id="built-avx512", marks=pytest.mark.levels),
])
def test_selfcheck_names_the_first_op_that_differs(theirs, tmp_path):
    """phi3ref at avx2 against llama.cpp at an AVX-512 level: the attention scores (8 lanes
    against 16) are the first tensor to differ."""
    pytest.importorskip("llama_cpp")
    from phi3ref.synthetic import write_model

    path = write_model(tmp_path / "m.gguf", preset="phi3-mini", size="heads", quant="Q8_0", seed=5)
    build = None if theirs == "installed" else isa.LEVELS[theirs]
    result = selfcheck._check_one(path, "Q8_0", isa.LEVELS["avx2"], build, None)
    assert not result.bit_exact and result.first_difference == "kq-0"
    ops = {op.op: op for op in result.ops}
    assert ops["attn_norm"].equal >= 1 and ops["kq"].equal < ops["kq"].tensors
    cpu = {"features": [], "level": "avx2", "level_description": "", "runnable_levels": [], "not_reproduced": []}
    check = {**dataclasses.asdict(result), "bit_exact": False, "seconds": 1}
    text = selfcheck.format_report({"cpu": cpu, "llama_cpp_python": "x", "bit_exact": False, "checks": [check]})
    assert "DIFFERS (first at kq-0)" in text


def test_all_levels_on_a_cpu_that_runs_none_is_refused(monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(isa, "host_features", lambda: frozenset({"sse4.2", "avx"}))
    with pytest.raises(ValueError, match="runs none of phi3ref's levels"):
        selfcheck.run(levels=["all"], quants=("Q8_0",))
