"""The native OSoRA CPU kernel (adapters/kernels) against a float64 reference of the formula and against the
torch composition it replaces: member blocks of any width (tails past the 32-column tiles), ranks 1..64,
rows reading shared coefficient rows (prompt chunks), rows of [B, T, k] inputs, and a row's result the same
bit for bit whatever batch it is in. Where no C++ compiler is present these tests are skipped; a model then
serves with the torch path (tested in a subprocess with a compiler that cannot run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from adapters import kernels

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def op():
    f = kernels.osora_apply()
    assert f is not None, kernels.unavailable_reason()  # a compiler is here: the build must work
    return f


def case(sizes, r, M, rows=None, T=1, dtype=torch.float32, seed=0, R=None):
    """Random tensors in the kernel's layout: e = [y | z] (y, z views with the row stride of the fused
    matmul's output), the slot-table cut ca/o (o a strided view), component-major Ublkᵀ."""
    g = torch.Generator().manual_seed(seed)
    n, D = len(sizes), sum(sizes)
    R = R or r
    u = torch.zeros(R * n, D)
    s = 0
    for j, d in enumerate(sizes):
        u.view(R, n, D)[:, j, s:s + d] = torch.randn(R, d, generator=g) * 0.3
        s += d
    n_rows = (M // T) if rows is None else int(max(rows)) + 1
    e = torch.randn(M, D + n * r + 3, generator=g)  # 3 unused columns: z is a strided prefix view
    ca = torch.randn(n_rows, 2, n * r, generator=g)
    table = torch.randn(n_rows, D + 50, generator=g)
    idx = None if rows is None else torch.tensor(rows, dtype=torch.long)
    t = [x.to(dtype) for x in (e, ca, table, u)]
    return t[0], t[1], t[2][:, 7:7 + D], t[3][: n * r], idx


def reference(e, ca, o, u, idx, sizes, r, T):
    """y + U(c ⊙ z) + o ⊙ U(a ⊙ z) in float64, Ublkᵀ dense (zeros off the member blocks)."""
    D, rn = sum(sizes), len(sizes) * r
    y, z = e[:, :D].double(), e[:, D:D + rn].double()
    crow = torch.arange(e.shape[0]) // T if idx is None else idx.repeat_interleave(T)
    c, a, oo = ca[crow, 0].double(), ca[crow, 1].double(), o[crow].double()
    return y + (c * z) @ u.double() + oo * ((a * z) @ u.double())


def torch_path(e, ca, o, u, idx, sizes, r, T):
    """The composition FusedLinear serves with when the kernel is off, on the same inputs."""
    D, rn = sum(sizes), len(sizes) * r
    e = e.clone()
    y, z = e[:, :D], e[:, D:D + rn]
    crow = torch.arange(e.shape[0]) // T if idx is None else idx.repeat_interleave(T)
    zz = z.unsqueeze(-2) * ca[crow]
    q = torch.mm(zz.reshape(-1, rn), u).view(-1, 2, D)
    y.add_(q[:, 0]).addcmul_(o[crow], q[:, 1])
    return y


def run(op, e, ca, o, u, idx, sizes, r, T):
    """The kernel on e viewed as [B, T, W] (B leading rows of T tokens each); returns the updated y [M, D]."""
    e = e.clone()
    D = sum(sizes)
    op(e.view(-1, T, e.shape[-1]) if T > 1 else e, D, ca, o, u, idx, len(sizes), r, sizes)
    return e[:, :D]


def python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter at the repository root (a kernel build may take ~30 s)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)


SHAPES = [([64, 32, 32], 16), ([576, 192, 192], 16), ([1536, 1536], 16), ([40, 8, 24], 3), ([100], 1),
          ([33, 65], 64), ([96, 96], 7)]


@pytest.mark.parametrize("sizes,r", SHAPES)
@pytest.mark.parametrize("M", [1, 5, 32])
def test_float32_matches_reference(op, sizes, r, M):
    e, ca, o, u, idx = case(sizes, r, M)
    got = run(op, e, ca, o, u, idx, sizes, r, 1)
    ref = reference(e, ca, o, u, idx, sizes, r, 1)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, torch_path(e, ca, o, u, idx, sizes, r, 1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sizes,r", SHAPES)
def test_bfloat16_is_as_close_to_the_reference_as_the_torch_path(op, sizes, r):
    """bfloat16: the kernel rounds once (float32 accumulation), the torch path three times; the kernel's
    error is within the torch path's."""
    e, ca, o, u, idx = case(sizes, r, 32, dtype=torch.bfloat16)
    ref = reference(e, ca, o, u, idx, sizes, r, 1)
    err_kernel = (run(op, e, ca, o, u, idx, sizes, r, 1).double() - ref).abs().max().item()
    err_torch = (torch_path(e, ca, o, u, idx, sizes, r, 1).double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err_kernel <= max(err_torch, scale * 2 ** -8), (err_kernel, err_torch, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_rows_and_tokens_per_row(op, dtype):
    """Rows reading coefficient rows through an index (a chunk's tokens share their slot's row) and
    [B, T] inputs (T tokens per coefficient row) equal the reference."""
    sizes, r = [64, 32, 40], 8
    rows = [2, 0, 2, 1, 1, 2]
    for T in (1, 3):
        e, ca, o, u, idx = case(sizes, r, len(rows) * T, rows=rows, T=T, dtype=dtype, seed=T)
        got = run(op, e, ca, o, u, idx, sizes, r, T)
        ref = reference(e, ca, o, u, idx, sizes, r, T)
        tol = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_in_any_batch(op, dtype):
    """Mixed batch = alone at the kernel: a row's output is bit-identical whether it runs alone or at any
    position of a larger batch (rows are taken four at a time; a row's operations never depend on that)."""
    sizes, r = [576, 192, 192], 16
    e, ca, o, u, _ = case(sizes, r, 11, dtype=dtype)
    whole = run(op, e, ca, o, u, None, sizes, r, 1)
    for m in range(11):
        alone = run(op, e[m:m + 1], ca[m:m + 1], o[m:m + 1], u, None, sizes, r, 1)
        assert torch.equal(alone[0], whole[m]), m


def test_coefficients_read_through_strided_views(op):
    """As the model calls it: ca and o are views of one slot table (row stride the table's width, c and a R·n
    apart, only a prefix of R·n used at rank r), rows pick slots, some rows repeat a slot."""
    sizes, r, R = [64, 32, 32], 5, 16
    n, D = len(sizes), 128
    g = torch.Generator().manual_seed(5)
    table = torch.randn(6, 2 * R * n + D + 9, generator=g)
    ca_all = table[:, 4: 4 + 2 * R * n].view(-1, 2, R * n)
    o_all = table[:, 4 + 2 * R * n: 4 + 2 * R * n + D]
    e, _, _, u, _ = case(sizes, r, 7)
    slots = torch.tensor([3, 0, 5, 3, 1, 1, 2])
    got = e.clone()
    op(got, D, ca_all, o_all, u, slots, n, r, sizes)
    ref = reference(e, ca_all[:, :, : n * r].contiguous(), o_all, u, slots, sizes, r, 1)
    torch.testing.assert_close(got[:, :D].double(), ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(got[:, D:], e[:, D:])  # z and the columns after it untouched


def test_bad_arguments_are_errors_not_crashes(op):
    sizes, r = [64, 32], 4
    e, ca, o, u, _ = case(sizes, r, 4)
    D = 96
    with pytest.raises(RuntimeError, match="shapes"):
        op(e, D, ca, o, u, None, 2, r, [64, 31])
    with pytest.raises(RuntimeError, match="shapes"):
        op(e[:, :D + 2].contiguous(), D, ca, o, u, None, 2, r, sizes)  # no room for z
    with pytest.raises(RuntimeError, match="one dtype"):
        op(e, D, ca.double(), o, u, None, 2, r, sizes)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(e, D, ca, o, u.t().contiguous().t(), None, 2, r, sizes)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(e, D, ca.transpose(1, 2).contiguous().transpose(1, 2), o, u, None, 2, r, sizes)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(e[:, 1:], D, ca, o, u, None, 2, r, sizes)
    with pytest.raises(RuntimeError, match="rows"):
        op(e, D, ca, o, u, torch.zeros(3, dtype=torch.long), 2, r, sizes)
    with pytest.raises(RuntimeError, match="bad n, r"):
        op(e, D, ca, o, u, None, 2, 65, sizes)


def test_model_uses_the_kernel_and_can_turn_it_off(tiny_base, tiny_factors):
    from adapters.runtime import AdaptedModel

    m = AdaptedModel(tiny_base, tiny_factors, n_slots=3)
    assert m.kernels == "cpu kernel"
    assert all(g.kernel is not None for g in m.fused)
    m.use_kernels(False)
    assert m.kernels == "off" and all(g.kernel is None for g in m.fused)
    m.use_kernels(True)
    assert all(g.kernel is not None for g in m.fused)


def test_without_a_compiler_the_model_serves_with_the_torch_path(tmp_path):
    """A machine whose compiler cannot run (CXX points nowhere, an empty kernel directory): the model logs
    why, serves OSoRA rows with the torch composition, and its outputs are right."""
    script = """
import torch
from adapters.synthetic import random_adapter
from tests.adapters.conftest import tiny_llama, R_MAX
from adapters.base_model import from_module
from adapters.factors import compute_factors
from adapters.runtime import AdaptedModel
from tests.adapters.test_methods import dense_reference
base = from_module(tiny_llama())
factors = compute_factors(base.targets, R_MAX, progress=False)
m = AdaptedModel(base, factors, n_slots=3)
print("PATH:", m.kernels)
m.load(1, random_adapter("osora", m.spec, factors, 8, seed=1))
g = m.fused[0]
x = torch.randn(2, 1, g.k)
with torch.inference_mode():
    y = g(x, m.batch([1, 0]))
names = {id(l): n for n, l in m.layers.items()}
ref = dense_reference(m, names[id(g.members[0])], 1, x[0])
torch.testing.assert_close(y[0, :, :g.sizes[0]], ref, atol=1e-4, rtol=0)
print("OK")
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "SVDSERVE_KERNEL_DIR": str(tmp_path / "k")}
    out = python(script, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PATH: torch path (" in out.stdout and "OK" in out.stdout, out.stdout
    assert "OSoRA CPU kernel unavailable" in out.stderr


def test_a_build_killed_half_way_does_not_block_later_starts(tmp_path):
    """torch.utils.cpp_extension leaves its `lock` file behind when a build is killed; a later start must
    not wait for it forever. A fresh kernel directory holding such a file: the kernel builds and loads."""
    script = """
from adapters import kernels
d = kernels.kernel_dir() / kernels.module_name()
d.mkdir(parents=True)
(d / "lock").write_text("")
op = kernels.osora_apply()
print("BUILT" if op is not None else "FAILED " + str(kernels.unavailable_reason()))
"""
    env = {**os.environ, "SVDSERVE_KERNEL_DIR": str(tmp_path / "k")}
    out = python(script, env)
    assert out.returncode == 0 and "BUILT" in out.stdout, (out.stdout, out.stderr[-3000:])
    assert "did not finish" in out.stderr


def test_without_avx512_the_torch_path_serves(tmp_path):
    """Built for a CPU without AVX-512 (-mno-avx512f), the kernel would run its scalar loop only, slower than
    the torch composition: the loader says why and returns nothing, and the model serves with the torch path."""
    script = """
from adapters import kernels
kernels.CFLAGS = kernels.CFLAGS + ["-mno-avx512f"]
print("OP", kernels.osora_apply(), kernels.unavailable_reason())
"""
    env = {**os.environ, "SVDSERVE_KERNEL_DIR": str(tmp_path / "k")}
    out = python(script, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OP None no AVX-512" in out.stdout, out.stdout


# ---- bfloat16 on AMX: the products on the tile unit, U (and the Vᵀ rows) packed once -------------------
@pytest.fixture(scope="module")
def amx(op):
    packers = kernels.amx_packers()
    if packers is None:
        pytest.skip("no AMX on this CPU")
    return packers


def run_amx(op, amx, e, ca, o, u, idx, sizes, r, T, x=None, v=None):
    """The kernel on AMX. Without x, z is read from e as on the AVX-512 path; with x [M, k] and the Vᵀ rows v
    [n·r, k], the kernel computes z = Vᵀx itself and e holds y only."""
    e = e.clone()
    D, n = sum(sizes), len(sizes)
    packed = amx[0](u, n, r, sizes)
    if x is None:
        op(e.view(-1, T, e.shape[-1]) if T > 1 else e, D, ca, o, u, idx, n, r, sizes, packed)
        return e[:, :D]
    y = e[:, :D].contiguous()
    op(y.view(-1, T, D) if T > 1 else y, D, ca, o, u, idx, n, r, sizes, packed,
       x.view(-1, T, x.shape[-1]) if T > 1 else x, amx[1](v, n, r))
    return y


def with_x(e, sizes, r, k, seed=0):
    """x [M, k] and component-major Vᵀ rows [n·r, k] (bfloat16); e's z replaced by x·Vᵀ as the fused bfloat16
    matmul would give it (rounded), for the reference and the torch path."""
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(e.shape[0], k, generator=g).bfloat16()
    v = (torch.randn(len(sizes) * r, k, generator=g) / k ** 0.5).bfloat16()
    D = sum(sizes)
    z64 = x.double() @ v.double().T
    e = e.clone()
    e[:, D:D + z64.shape[1]] = (x @ v.T).to(e.dtype)  # the fused matmul's bfloat16 z
    return x, v, z64, e


def reference_z(e, z64, ca, o, u, idx, sizes, r, T):
    """The float64 reference with z = Vᵀx exact (not rounded to bfloat16)."""
    D = sum(sizes)
    e = e.double().clone()
    e[:, D:D + z64.shape[1]] = z64
    return reference(e, ca, o, u, idx, sizes, r, T)


@pytest.mark.parametrize("sizes,r", SHAPES)
def test_amx_is_as_close_to_the_reference_as_the_torch_path(op, amx, sizes, r):
    """On AMX, c·z enters the tile unit as two bfloat16 (hi + lo), so the products keep 16 bits of it: the
    error stays within the torch path's, which rounds c·z to 8 — z read from e, and z computed from x."""
    e, ca, o, u, idx = case(sizes, r, 32, dtype=torch.bfloat16)
    ref = reference(e, ca, o, u, idx, sizes, r, 1)
    err = (run_amx(op, amx, e, ca, o, u, idx, sizes, r, 1).double() - ref).abs().max().item()
    err_torch = (torch_path(e, ca, o, u, idx, sizes, r, 1).double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= max(err_torch, scale * 2 ** -8), (err, err_torch, scale)
    x, v, z64, ez = with_x(e, sizes, r, 72)
    ref = reference_z(ez, z64, ca, o, u, idx, sizes, r, 1)
    err = (run_amx(op, amx, ez, ca, o, u, idx, sizes, r, 1, x, v).double() - ref).abs().max().item()
    err_torch = (torch_path(ez, ca, o, u, idx, sizes, r, 1).double() - ref).abs().max().item()
    assert err <= max(err_torch, scale * 2 ** -8), (err, err_torch, scale)


@pytest.mark.parametrize("M", [1, 16, 17, 40])
def test_amx_matches_the_avx512_tiles_to_a_rounding(op, amx, M):
    """Partial row blocks, one block, blocks split over the threads: within one bfloat16 rounding of y of
    the AVX-512 path (both accumulate in float32, in different orders)."""
    sizes, r = [576, 192, 192], 16
    e, ca, o, u, idx = case(sizes, r, M, dtype=torch.bfloat16, seed=M)
    got = run_amx(op, amx, e, ca, o, u, idx, sizes, r, 1).float()
    avx = run(op, e, ca, o, u, idx, sizes, r, 1).float()
    torch.testing.assert_close(got, avx, atol=0, rtol=2 ** -7)


def test_amx_rank_chunks_and_k_tails(op, amx):
    """r = 40 (three chunks of 16 components, the last partial) and k = 70 (not a multiple of 16): z from x
    equals the reference."""
    sizes, r = [48, 33], 40
    e, ca, o, u, idx = case(sizes, r, 20, dtype=torch.bfloat16, seed=3)
    x, v, z64, ez = with_x(e, sizes, r, 70, seed=3)
    ref = reference_z(ez, z64, ca, o, u, idx, sizes, r, 1)
    got = run_amx(op, amx, ez, ca, o, u, idx, sizes, r, 1, x, v)
    torch.testing.assert_close(got.double(), ref, atol=2 ** -7 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("own_z", [False, True])
def test_amx_shared_rows_and_tokens_per_row(op, amx, own_z):
    sizes, r = [64, 32, 40], 8
    rows = [2, 0, 2, 1, 1, 2]
    for T in (1, 3):
        e, ca, o, u, idx = case(sizes, r, len(rows) * T, rows=rows, T=T, dtype=torch.bfloat16, seed=T)
        if own_z:
            x, v, z64, e = with_x(e, sizes, r, 64, seed=T)
            ref = reference_z(e, z64, ca, o, u, idx, sizes, r, T)
            got = run_amx(op, amx, e, ca, o, u, idx, sizes, r, T, x, v)
        else:
            ref = reference(e, ca, o, u, idx, sizes, r, T)
            got = run_amx(op, amx, e, ca, o, u, idx, sizes, r, T)
        torch.testing.assert_close(got.double(), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("own_z", [False, True])
def test_amx_a_row_gets_the_same_bits_in_any_batch(op, amx, own_z):
    """Mixed batch = alone on AMX: a row alone (one padded block, columns split over the threads) and at
    every place in a batch of 40 (row blocks split over the threads) gets the same bits."""
    sizes, r = [576, 192, 192], 16
    e, ca, o, u, _ = case(sizes, r, 40, dtype=torch.bfloat16)
    x = v = None
    if own_z:
        x, v, _, e = with_x(e, sizes, r, 96)
    whole = run_amx(op, amx, e, ca, o, u, None, sizes, r, 1, x, v)
    for m in range(40):
        xm = None if x is None else x[m:m + 1]
        alone = run_amx(op, amx, e[m:m + 1], ca[m:m + 1], o[m:m + 1], u, None, sizes, r, 1, xm, v)
        assert torch.equal(alone[0], whole[m]), m


def test_amx_bad_arguments_are_errors(op, amx):
    sizes, r = [64, 32], 4
    e, ca, o, u, _ = case(sizes, r, 4, dtype=torch.bfloat16)
    D, n = 96, 2
    packed = amx[0](u, n, r, sizes)
    with pytest.raises(RuntimeError, match="packed"):
        op(e, D, ca, o, u, None, n, r, sizes, packed[:, :3].contiguous())
    with pytest.raises(RuntimeError, match="one dtype|packed"):
        op(e.float(), D, ca.float(), o.float(), u.float(), None, n, r, sizes, packed)
    x = torch.randn(4, 32).bfloat16()
    with pytest.raises(RuntimeError, match="x needs"):
        op(e[:, :D].contiguous(), D, ca, o, u, None, n, r, sizes, packed, x)
    pv = amx[1](torch.randn(n * r, 32).bfloat16(), n, r)
    with pytest.raises(RuntimeError, match="x must"):
        op(e[:, :D].contiguous(), D, ca, o, u, None, n, r, sizes, packed, torch.randn(3, 32).bfloat16(), pv)
    with pytest.raises(RuntimeError, match="packed_v"):
        op(e[:, :D].contiguous(), D, ca, o, u, None, n, r, sizes, packed, torch.randn(4, 48).bfloat16(), pv)
    with pytest.raises(RuntimeError, match="sizes"):
        amx[0](u, n, r, [64, 31])


def test_bfloat16_model_uses_amx(tiny_base, tiny_factors, amx):
    from adapters.runtime import AdaptedModel

    m = AdaptedModel(tiny_base, tiny_factors, n_slots=3, dtype=torch.bfloat16)
    assert m.kernels == "cpu kernel, AMX"
    assert all(g.packed is not None and g.packed_v is not None for g in m.fused)
    m.use_kernels(False)
    assert all(g.packed is None and g.packed_v is None for g in m.fused)
    assert AdaptedModel(tiny_base, tiny_factors, n_slots=3).kernels == "cpu kernel"  # float32: AVX-512
