"""One BLAS setting for every entry point: the same config, seed and data give the same bits.

OpenBLAS picks its kernels by CPU (Haswell on an AVX2 machine, SkylakeX on an AVX-512 one, ...),
and the kernels round a long float sum differently; with its Haswell kernels the number of
threads changes the rounding too (the products of the first layer split their work another way).
So catnet chooses both before NumPy loads OpenBLAS, in every process that imports ``pipeline``
first (each ``python -m pipeline...`` command, the DVC stages, every sweep's jobs, which inherit
the environment): ``OPENBLAS_CORETYPE=Haswell`` on an x86-64 CPU that has AVX2 (the kernels
dvc.lock's hashes were made with) and ``OPENBLAS_NUM_THREADS=1`` (the number a parallel sweep's
jobs must use anyway, so that they do not oversubscribe the cores). A value already in the
environment is kept (``pipeline.reproduce`` sets a run's own); what a run really used is
recorded (``describe``: tag ``catnet.blas``) and is part of its identity
(pipeline/tracking/reuse.py), and ``check`` says when it is not the choice made here.

Nothing here imports NumPy: this module runs before it loads.
"""

from __future__ import annotations

import os
import platform

KERNEL = "Haswell"  # OpenBLAS's AVX2 kernels: every x86-64 CPU of the last decade has them
THREADS = 1


def has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 and FMA (the Haswell kernels' instructions), as
    Linux reports them; False when it cannot tell (then OpenBLAS picks for itself)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def choose(environ=os.environ) -> None:
    """Set the kernel (where the CPU has it) and the thread count, unless the environment names
    them: before NumPy is imported, or it has no effect."""
    if not environ.get("OPENBLAS_NUM_THREADS"):  # unset or empty: OpenBLAS would choose
        environ["OPENBLAS_NUM_THREADS"] = str(THREADS)
    if has_avx2() and not environ.get("OPENBLAS_CORETYPE"):
        environ["OPENBLAS_CORETYPE"] = KERNEL


def in_use() -> list[dict]:
    """threadpoolctl's report of the BLAS libraries NumPy uses (the thread count as it is now)."""
    from threadpoolctl import threadpool_info

    return [i for i in threadpool_info() if i.get("user_api") == "blas"]


def describe() -> str:
    """The BLAS that computes this process's numbers: ``openblas 0.3.31.188.0 Haswell 1 threads``."""
    found = [" ".join(str(part) for part in (i.get("internal_api"), i.get("version"), i.get("architecture"))
                      if part) + f" {i.get('num_threads')} threads" for i in in_use()]
    return "; ".join(found) or "no BLAS found"


def settle() -> str | None:
    """Hold OpenBLAS to the chosen thread count even where NumPy was loaded before ``choose``
    (a test, a notebook), and return ``check()``: what still differs (a kernel is chosen only
    at load)."""
    wanted = os.environ.get("OPENBLAS_NUM_THREADS", "")
    if wanted.isdigit() and any(str(i.get("num_threads")) != wanted for i in in_use()):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=int(wanted), user_api="blas")
    return check()


def check() -> str | None:
    """None when OpenBLAS runs the kernel and thread count chosen here (or the environment's own
    choice); else why not, in one sentence (NumPy was loaded before ``choose``, a CPU without the
    kernel, a BLAS other than OpenBLAS)."""
    libs = in_use()
    if not libs:
        return None
    wanted_kernel = os.environ.get("OPENBLAS_CORETYPE")
    wanted_threads = os.environ.get("OPENBLAS_NUM_THREADS")
    for lib in libs:
        if lib.get("internal_api") != "openblas":
            return f"NumPy uses {lib.get('internal_api')}, not OpenBLAS: its sums may round otherwise"
        kernel = str(lib.get("architecture") or "")
        if wanted_kernel and kernel.lower() != wanted_kernel.lower():
            return (f"OpenBLAS runs its {kernel} kernels, not OPENBLAS_CORETYPE={wanted_kernel} (NumPy was "
                    "loaded before catnet chose, or the CPU lacks them)")
        if wanted_threads and str(lib.get("num_threads")) != wanted_threads:
            return (f"OpenBLAS uses {lib.get('num_threads')} threads, not OPENBLAS_NUM_THREADS={wanted_threads} "
                    "(NumPy was loaded before catnet chose)")
    return None
