"""phi3ref's cache folder: one place for everything phi3ref makes once and keeps.

``$PHI3REF_CACHE``, else ``$XDG_CACHE_HOME/phi3ref``, else ``~/.cache/phi3ref``. It holds
the compiled Numba kernels (``kernels/``, :mod:`phi3ref.jit`), llama.cpp built per
instruction-set level (``llama.cpp-<version>/``, :mod:`phi3ref.llama_builds`) and the
Phi-4 vocabularies (``vocab/``, :mod:`phi3ref.tiktoken_vocab`). A user folder, not the
package's own: a read-only install (a system site-packages, a container image) still
caches its kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """phi3ref's cache folder: $PHI3REF_CACHE, else $XDG_CACHE_HOME/phi3ref, else ~/.cache/phi3ref."""
    if os.environ.get("PHI3REF_CACHE"):
        return Path(os.environ["PHI3REF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi3ref"
