"""Finding model files: local paths, or the Hugging Face Hub through ``huggingface_hub``
(its cache, its progress bars, ``HF_HUB_OFFLINE``)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["DEFAULT_REPO", "DEFAULT_FILE", "DEMO", "HubError", "demo_path", "resolve_model"]

# The model of the Rust/Candle tutorial phi3ref starts from.
DEFAULT_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"
DEFAULT_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
KNOWN_FILES = {DEFAULT_REPO: DEFAULT_FILE}
# Where a GGUF repository's tokenizer.json lives (the original model's repository)
BASE_REPOS = {DEFAULT_REPO: "microsoft/Phi-3-mini-4k-instruct"}
# The name of the model that ships with phi3ref: a small Phi-3 trained on Python's
# documentation (phi3ref.training), for running everything offline.
DEMO = "demo"


def demo_path() -> Path:
    """The bundled demo model (``phi3ref/data/demo.gguf``; how it was made: :mod:`phi3ref.training`)."""
    return Path(str(resources.files("phi3ref") / "data" / "demo.gguf"))


class HubError(RuntimeError):
    """A file could not be fetched from the Hub; the message says which and what to do."""


def _looks_like_repo(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.endswith(".gguf")


def resolve_model(
    model: str | os.PathLike[str], *, filename: str | None = None, revision: str | None = None, file_flag: str = "filename=",
) -> Path:
    """A local path to a GGUF file: ``model`` itself when it exists, else the bundled demo
    model for ``"demo"`` (:data:`DEMO`), else a Hub ``repo_id`` whose ``filename``
    (default: the repository's known file) is downloaded or taken from the cache.
    ``FileNotFoundError`` for a missing local path, :class:`HubError` when the Hub cannot
    deliver. ``file_flag`` is how messages tell the caller to name a file (the
    command line says ``--file``)."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a Hub repository id, got {model!r:.80}")
    if filename is not None and not isinstance(filename, str):
        raise TypeError(f"filename must be a str, got {filename!r:.80}")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str, got {revision!r:.80}")
    if str(model) == "":
        raise FileNotFoundError("the model path is empty (a .gguf path, a Hub repository id, or 'demo')")
    path = Path(model)
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for the file system, ...
        raise FileNotFoundError(f"{str(path)[:200]}: not a usable path ({e.strerror})") from None
    if exists:
        if path.is_dir():
            if filename:
                return _regular_file(path / filename)
            ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
            if len(ggufs) == 1:
                return ggufs[0]
            listed = f" ({', '.join(p.name for p in ggufs[:5])}{', ...' if len(ggufs) > 5 else ''})" if ggufs else ""
            raise FileNotFoundError(f"{path} is a folder with {len(ggufs)} .gguf files{listed}: name one with {file_flag}")
        return _regular_file(path)
    name = str(model)
    if name == DEMO:
        if filename is not None or revision is not None:
            raise ValueError(f"{file_flag.rstrip('=')} and the revision name a file of a Hub repository; the demo model has none")
        return demo_path()
    if not _looks_like_repo(name):
        raise FileNotFoundError(f"{name}: no such file (nor a Hub repository id like {DEFAULT_REPO})")
    filename = filename or KNOWN_FILES.get(name)
    if filename is None:
        raise ValueError(f"{name}: which .gguf file of this Hub repository? name it with {file_flag}")
    return Path(_download(name, filename, revision))


def _regular_file(path: Path) -> Path:
    """``path``, refused unless it is a regular file (not a folder, a device or a pipe)."""
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file" if not path.exists() else "not a regular file"
        raise FileNotFoundError(f"{path}: {what}, not a .gguf file")
    return path


def _download(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except Exception as e:  # offline, unreachable, missing file, gated repository ...
        raise HubError(
            f"could not get {filename} from the Hugging Face Hub repository {repo_id}"
            f"{f' (revision {revision})' if revision else ''}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"Download it where you have a connection, then pass its local path, e.g. "
            f"phi3ref.load('/path/to/{filename}') or `phi3ref generate --model /path/to/{filename}`. "
            f"Offline, HF_HUB_OFFLINE=1 takes files already in the Hugging Face cache without retrying the network; "
            f"`phi3ref generate --model demo` runs the small demo model that ships with phi3ref (trained on Python's documentation)."
        ) from e


def tokenizer_json(repo_id: str, revision: str | None = None) -> Path:
    """The ``tokenizer.json`` of a GGUF repository's base model (downloaded or cached)."""
    base = BASE_REPOS.get(repo_id, repo_id)
    return Path(_download(base, "tokenizer.json", revision))
