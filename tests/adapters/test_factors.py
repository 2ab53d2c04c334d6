"""The SVD factor cache: canonical signs, the reconstruction, reload, and stale or corrupt files rebuilt."""

from __future__ import annotations

import os

import torch

from adapters.factors import canonical_svd, load_or_build_factors


def test_canonical_signs_and_reconstruction():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    f = canonical_svd(w, 32)
    pivot = f.U.abs().argmax(dim=0)
    assert (f.U[pivot, torch.arange(32)] > 0).all()
    torch.testing.assert_close(f.U @ torch.diag(f.S) @ f.V.T, w, atol=1e-4, rtol=0)
    assert (f.S[:-1] >= f.S[1:]).all()
    # the same weight with flipped-sign SVD inputs gives identical factors
    g = canonical_svd(-(-w), 8)
    assert torch.equal(g.U, f.U[:, :8]) and torch.equal(g.V, f.V[:, :8])


def test_cache_reload_and_rebuild(tmp_path, tiny_base):
    d = str(tmp_path)
    first = load_or_build_factors(tiny_base.targets, tiny_base.fingerprint, 8, d, progress=False)
    (path,) = [os.path.join(d, n) for n in os.listdir(d)]
    mtime = os.stat(path).st_mtime_ns
    again = load_or_build_factors(tiny_base.targets, tiny_base.fingerprint, 8, d, progress=False)
    assert os.stat(path).st_mtime_ns == mtime  # loaded, not rebuilt
    for n in first:
        assert torch.equal(first[n].U, again[n].U) and torch.equal(first[n].S, again[n].S)
    # corrupt a byte in the tensor data: detected by the checksum and rebuilt
    with open(path, "r+b") as fh:
        fh.seek(-5, os.SEEK_END)
        fh.write(b"\x13\x37\x13\x37\x13")
    rebuilt = load_or_build_factors(tiny_base.targets, tiny_base.fingerprint, 8, d, progress=False)
    assert torch.equal(rebuilt[n].V, first[n].V)
    # truncated file: rebuilt
    with open(path, "r+b") as fh:
        fh.truncate(100)
    rebuilt = load_or_build_factors(tiny_base.targets, tiny_base.fingerprint, 8, d, progress=False)
    assert torch.equal(rebuilt[n].S, first[n].S)


def test_different_rank_or_weights_get_another_cache(tmp_path, tiny_base):
    d = str(tmp_path)
    load_or_build_factors(tiny_base.targets, tiny_base.fingerprint, 8, d, progress=False)
    load_or_build_factors(tiny_base.targets, tiny_base.fingerprint, 4, d, progress=False)
    load_or_build_factors(tiny_base.targets, "another-model", 8, d, progress=False)
    assert len(os.listdir(d)) == 3
