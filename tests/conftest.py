from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/craft.py

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
