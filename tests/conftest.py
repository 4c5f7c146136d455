from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/craft.py

from phi3ref import isa  # noqa: E402
from phi3ref.testing import PRESETS, write_model  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path):
    """tiny_model(preset, quant) -> path of a synthetic model, written once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(preset: str = "phi3-mini", quant: str = "Q4_K_M") -> Path:
        key = (preset, quant)
        if key not in cache:
            cache[key] = write_model(model_dir / f"{preset}-{quant}.gguf", preset=preset, quant=quant, seed=1)
        return cache[key]

    return get


ALL_PRESETS = list(PRESETS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long fuzz campaigns run only when a -m expression names them (pytest -m fuzz)."""
    if "fuzz" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a long fuzz campaign: run with -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)


# The instruction forms phi3ref.simd compiles to besides this CPU's own, each run in a child
# process with a cold Numba cache of its own (so the form is compiled there): the portable
# form (ARM, any CPU without VNNI: no x86 intrinsic at all) and the AVX2 form (Haswell to
# Zen 3: vpmaddubsw, no AVX-512, VNNI or GFNI). ``forbidden``: x86 intrinsics (llvm.x86.*)
# that form's code must not call, by substring.
SIMD_FORMS = {
    "generic": dict(env={"PHI3REF_SIMD": "generic"}, flags=(False, False, False, False), forbidden=("",)),
    "avx2": dict(env=isa.haswell_numba_env(), flags=(False, False, False, True),
                 forbidden=("avx512", "vgf2p8", "vpdpbusd")),
}


def simd_form_params() -> list:
    """pytest params over SIMD_FORMS, the AVX2 form skipped where the CPU has no AVX2."""
    avx2 = isa.LEVELS["avx2"].runs_on(isa.host_features()) if isa.is_x86() else False
    return [
        pytest.param(name, id=name, marks=pytest.mark.skipif(name == "avx2" and not avx2, reason="this CPU has no AVX2"))
        for name in SIMD_FORMS
    ]


def simd_form_env(name: str, numba_cache: Path) -> dict[str, str]:
    """The environment of a child process that compiles phi3ref in form ``name``."""
    import os

    env = {**os.environ, **SIMD_FORMS[name]["env"], "NUMBA_CACHE_DIR": str(numba_cache)}
    env.pop("PHI3REF_ISA", None)
    return env
