"""Test setup: 8 fake CPU devices, set before jax is imported anywhere, and fewer compiles.

Most tests are compile-bound (tiny shapes), so this session's tests share one persistent
compilation cache (a fresh temporary directory: identical programs built by different tests or
`train` calls compile once); `RT_TEST_XLA_CACHE=0` turns it off. LLVM optimisation level 0 would
save another third of the CPU time but changes the rounding of some programs, which breaks tests
that hold two equal computations bitwise equal (the checkpoint round trip), so it is not used.

`RT_TEST_CPU_TIMES=path.tsv` also writes each test's CPU seconds (this process and its children,
all threads) next to its wall seconds: on a loaded machine CPU time is the stable measure.
"""

import atexit
import os
import resource
import shutil
import tempfile
import time

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)

if os.environ.get("RT_TEST_XLA_CACHE", "1") != "0":
    _cache_dir = tempfile.mkdtemp(prefix="rt_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _cache_dir)  # this process only, not children
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

_CPU_TIMES_PATH = os.environ.get("RT_TEST_CPU_TIMES")


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if _CPU_TIMES_PATH:

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        """Time setup + call + teardown of one test, in CPU and wall seconds."""
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        yield
        cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
        with open(_CPU_TIMES_PATH, "a") as f:
            f.write(f"{cpu:.2f}\t{wall:.2f}\t{item.nodeid}\n")
