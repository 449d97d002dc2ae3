"""The engine's malloc setup on the CPU (cbkernels.engine.cpu_malloc): freed memory stays
mapped, so a step's large temporaries stop faulting in fresh pages, unless the process
already chose its allocator."""
import os
import subprocess
import sys

import pytest

from cbkernels.engine import cpu_malloc


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_thresholds_raised_through_mallopt():
    libc = FakeLibc()
    status = cpu_malloc.keep_freed_memory(environ={}, libc=libc)
    assert status.startswith("glibc")
    assert sorted(libc.calls) == [(-3, cpu_malloc.THRESHOLD), (-1, cpu_malloc.THRESHOLD)]


def test_a_refused_mallopt_is_reported():
    assert "refused" in cpu_malloc.keep_freed_memory(environ={}, libc=FakeLibc(result=0))


@pytest.mark.parametrize("environ, named", [
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc"),
])
def test_the_users_own_allocator_setting_is_left_alone(environ, named):
    libc = FakeLibc()
    status = cpu_malloc.keep_freed_memory(environ=environ, libc=libc)
    assert libc.calls == [] and status.startswith("left as configured") and named in status


_FAULTS = """
import resource, sys, torch
from cbkernels.engine.cpu_malloc import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20)  # 64 MiB, above glibc's largest automatic mmap threshold
    x.fill_(1.0)
    objects = [object() for _ in range(3)]  # small blocks allocated meanwhile, as a step does
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([faults() for _ in range(30)][20:]))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_64_mib_block_is_reused_without_page_faults():
    """Measured, not assumed: with glibc's defaults every 64 MiB temporary faults in its 16,384
    pages again; with freed memory kept the heap settles (after a few blocks, while freed
    neighbours coalesce) and the last ten faults in nothing new."""
    default, kept = _faults("default"), _faults("keep")
    assert default > 10 * 10_000, default
    assert kept < 1_000, kept


def test_engine_on_cpu_reports_its_malloc_setup():
    code = ("from cbkernels.engine import Engine, BatchConfig\nfrom cbkernels.testing import tiny_llama\n"
            "print(Engine(tiny_llama(), BatchConfig(num_blocks=16)).metrics()['cpu_malloc'])")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="131072")
    user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert plain.stdout.strip().startswith("glibc")
    assert user.stdout.strip() == "left as configured (MALLOC_TRIM_THRESHOLD_ set in the environment)"
