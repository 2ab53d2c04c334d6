"""Native CPU kernels for the adapter path, compiled on first use with the machine's C++ compiler.

`osora_apply()` returns the fused OSoRA update of one fused group (osora_cpu.cpp; its formula and layout are
`FusedLinear._osora`'s), or None when it cannot be had: no C++ compiler or ninja, a failed build, a CPU
without AVX-512 (the kernel's tiles are AVX-512; its scalar loop alone is slower than torch), or not wanted
(`kernels=False` / `--cpu-kernels off`). Callers then use the torch composition of the same formula,
which stays the reference the kernel is tested against (tests/adapters/test_kernels.py).

The build uses -march=native, so the compiled module is named after a hash of its source, torch's version
and this CPU's feature flags, and lives under $SVDSERVE_KERNEL_DIR (default ~/.cache/svdserve/kernels): a
different CPU or torch builds its own, a restart loads the built one (~30 s to build on 2 cores, once).
`python -m adapters kernels` builds it ahead of time (the Docker image does).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger("svdserve.kernels")

SOURCE = Path(__file__).with_name("osora_cpu.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "osora" -> module, or the reason it is unavailable (str)


def kernel_dir(directory: str | None = None) -> Path:
    return Path(directory or os.environ.get("SVDSERVE_KERNEL_DIR") or Path.home() / ".cache" / "svdserve" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def module_name() -> str:
    import torch

    key = "\n".join([SOURCE.read_text(), torch.__version__, " ".join(CFLAGS), _cpu_flags()])
    return "svdserve_osora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _ninja_on_path() -> None:
    """torch builds with the `ninja` executable; the PyPI package puts it next to the interpreter, which is not
    on PATH when the server is started as .venv/bin/python without activating the venv."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _build(directory: str | None):
    import torch.utils.cpp_extension as ext

    _ninja_on_path()
    name = module_name()
    build = kernel_dir(directory) / name
    build.mkdir(parents=True, exist_ok=True)
    # One build at a time across processes (replicas, workers starting together), under a lock the kernel
    # releases when its holder dies. torch's own lock is a plain file that a build killed half-way leaves
    # behind, after which every later start would wait for it forever; holding ours, no live build owns it.
    with open(build / ".svdserve-build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        if not (build / f"{name}.so").exists():
            log.info("building the OSoRA CPU kernel in %s (once per CPU and torch version)", build)
        return ext.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                        build_directory=str(build), verbose=False)


def osora_apply(directory: str | None = None):
    """The compiled `osora_apply(e, D, ca, o, u, rows, n, r, sizes)` (arguments: osora_cpu.cpp), or None (logged once).
    Built in (or loaded from) `directory` (default: `kernel_dir()`) on the first call of the process."""
    with _lock:
        got = _loaded.get("osora")
        if got is None:
            try:
                got = _build(directory)
                if not got.vectorized():  # its scalar loop would be slower than the torch composition
                    got = "no AVX-512 on this CPU (the kernel's tiles need it)"
            except Exception as e:  # no compiler, no ninja, a compile error: the torch path serves
                got = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            if isinstance(got, str):
                log.warning("OSoRA CPU kernel unavailable (%s); serving with the torch path", got)
            _loaded["osora"] = got
    return None if isinstance(got, str) else got.osora_apply


def amx_packers(directory: str | None = None):
    """(`osora_pack`, `osora_pack_v`) of the compiled module, which pack a fused group's Ublkᵀ and its Vᵀ rows
    (bfloat16) into the tiles `osora_apply(..., packed=, x=, packed_v=)` multiplies on AMX; None where the
    kernel is unavailable or this CPU (or the OS) gives no AMX: bfloat16 then runs on the AVX-512 tiles."""
    if osora_apply(directory) is None:
        return None
    module = _loaded["osora"]
    return (module.osora_pack, module.osora_pack_v) if module.amx() else None


def unavailable_reason() -> str | None:
    got = _loaded.get("osora")
    return got if isinstance(got, str) else None
