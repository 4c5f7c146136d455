"""phi3ref.diverge: the first op where two runtimes part. Against saved arrays here; against
llama.cpp and transformers in the crosscheck tier (tests/test_crosscheck_llama_cpp.py,
tests/test_crosscheck_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

import phi3ref
from phi3ref.diverge import NAME_MAP, diverge
from phi3ref.hooks import PER_LAYER

TOKENS = list(range(300, 330))


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tiny_model("phi3-medium", "Q4_K_M")
    _, cache = phi3ref.load(path).run_with_cache(TOKENS)
    return path, cache, tmp_path_factory.mktemp("dumps")


@pytest.mark.parametrize("altered,how", [("Qcur-1", "rope"), ("kq-1", "scale"), ("ffn_up-0", "weights"), ("result_norm", "norm")])
def test_the_altered_op_is_named(saved, altered, how):
    """A runtime whose RoPE is wrong parts at Qcur, one with a wrong score scale at kq: the
    first point past the tolerance is the one altered, whatever follows it."""
    path, cache, folder = saved
    theirs = {name: value.copy() for name, value in cache.items()}
    if how == "rope":  # one head's rotation off by a sign
        theirs[altered][:, 1, : theirs[altered].shape[2] // 2] *= -1
    elif how == "scale":
        theirs[altered] *= 1.1
    else:
        theirs[altered] += 1e-2 * np.abs(theirs[altered]).max()
    np.savez(folder / f"{altered}.npz", **theirs)
    result = diverge(path, folder / f"{altered}.npz", tokens=TOKENS)
    op, _, layer = altered.rpartition("-")
    assert result.first is not None and result.first.name == altered
    assert (result.first.op, result.first.layer) == ((op, int(layer)) if op else (altered, None))
    assert all(e.equal for e in result.table[: result.table.index(result.first)])
    assert result.as_json()["first"]["name"] == altered and f"first divergence: {altered}" in result.format()


def test_agreeing_sides_and_a_directory_of_arrays(saved):
    path, cache, folder = saved
    (folder / "dir").mkdir()
    for name, value in cache.items():
        np.save(folder / "dir" / f"{name}.npy", value)
    result = diverge(path, folder / "dir", tokens=TOKENS)
    assert result.first is None and len(result.table) == len(cache) and all(e.equal for e in result.table)
    assert "the two sides agree" in result.format()
    partial = {k: v for k, v in cache.items() if not k.startswith("Vcur")}
    np.savez(folder / "partial.npz", **partial)
    assert diverge(path, folder / "partial.npz", tokens=TOKENS).skipped == [k for k in cache if k.startswith("Vcur")]


def test_bad_arguments(saved, tmp_path):
    path, cache, folder = saved
    np.savez(tmp_path / "shape.npz", **{"wqkv-0": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"wqkv-0: \(30, 384\) here, \(3,\) on the other side"):
        diverge(path, tmp_path / "shape.npz", tokens=TOKENS)
    with pytest.raises(ValueError, match="give a text or token ids"):
        diverge(path, tmp_path / "shape.npz")
    (tmp_path / "notes.txt").write_text("not arrays")
    with pytest.raises(ValueError, match="neither llama.cpp, transformers"):
        diverge(path, tmp_path / "notes.txt", tokens=TOKENS)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        diverge(path, tmp_path / "missing.npz", tokens=TOKENS)
    with pytest.raises(ValueError, match="tolerance must be"):
        diverge(path, tmp_path / "shape.npz", tokens=TOKENS, tolerance=-1)
    # files numpy reads only by unpickling, or not at all, are refused naming them
    np.savez(tmp_path / "objects.npz", **{"wqkv-0": np.array([{"a": 1}], dtype=object)})
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    for name in ("objects.npz", "broken.npz"):
        with pytest.raises(ValueError, match=f"{name}: not an array file numpy can read without unpickling"):
            diverge(path, tmp_path / name, tokens=TOKENS)
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    from phi3ref.crosscheck import compare_runtimes

    with pytest.raises(ValueError, match="objects.npy: not an array file numpy can read without unpickling"):
        compare_runtimes(path, tmp_path / "objects.npy", tokens=TOKENS)
    # a header that claims gigabytes (a small file, or a deflated member that inflates) is
    # refused before anything is read or allocated
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)})
    with pytest.raises(ValueError, match="huge.npy: not an array file .* .logits claims more bytes than the file holds."):
        compare_runtimes(path, tmp_path / "huge.npy", tokens=TOKENS)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "wqkv-0.npy").write_bytes((tmp_path / "huge.npy").read_bytes())
    with pytest.raises(ValueError, match="wqkv-0 claims more bytes than the file holds"):
        diverge(path, tmp_path / "folder", tokens=TOKENS)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, **{"wqkv-0": np.zeros((20000, 20000), np.float32)})  # 1.6 GB inflated, 1.5 MB on disk
    assert bomb.stat().st_size < 5e6
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"wqkv-0: \(30, 384\) here, \(20000, 20000\) on the other side"):
        diverge(path, bomb, tokens=TOKENS)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # kB: the member was never inflated
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="text.npy: not an array file .* .logits holds <U1, not numbers."):
        compare_runtimes(path, tmp_path / "text.npy", tokens=TOKENS)


def test_the_name_map_covers_every_hook_point():
    assert set(NAME_MAP) == {"inp_embd", *PER_LAYER, "result_norm", "result_output"}


def test_nothing_in_common_is_an_error(saved, tmp_path):
    path, _, _ = saved
    np.savez(tmp_path / "other.npz", **{"layer0.mlp": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="none of its tensors is named like a phi3ref hook point"):
        diverge(path, tmp_path / "other.npz", tokens=TOKENS)
