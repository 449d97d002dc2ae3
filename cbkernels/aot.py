"""Ahead-of-time compile gate: build every kernel config for real GPUs, no GPU needed.

``python -m cbkernels.aot`` compiles each config that the launchers can pick for sm_80 and
sm_90, runs Triton's ptxas with ``-v`` for register and spill counts, and prints a table
headed by the Triton and ptxas versions it ran on (the launchers' choices, and so the configs,
depend on the Triton release: kernels/paged_attention_tiles.version_choices).
It exits non-zero on a compile error, a register spill, or shared memory over the limit.
``--json PATH`` also writes the table as JSON, each row naming its Triton version.

Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Kernel modules under cbkernels.kernels (the --kernel choices) and the module of each that
# exposes ``aot_configs()``: the attention kernel keeps its configs apart from its launcher.
KERNEL_MODULES = ("kv_cache", "paged_attention")
CONFIG_MODULES = {"kv_cache": "kv_cache", "paged_attention": "paged_attention_aot"}
ARCHS = (80, 90)
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Warp size of every NVIDIA target.
WARP_SIZE = 32


@dataclass
class CompileResult:
    kernel: str
    arch: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    mma_sync: int
    wgmma: int
    error: str = ""
    triton: str = ""  # the Triton version that compiled it
    # Static instruction mix of the PTX (each instruction counted once, wherever it sits):
    # global loads (ld.global), async copies to shared memory (cp.async, cp.async.bulk),
    # compares (setp), selects (selp), exp2 (ex2), and every instruction.
    ld_global: int = 0
    cp_async: int = 0
    setp: int = 0
    selp: int = 0
    ex2: int = 0
    instructions: int = 0

    @property
    def ok(self) -> bool:
        limit = SHARED_MEMORY_LIMIT[int(self.arch.removeprefix("sm_"))]
        return not self.error and self.spill_stores == 0 and self.spill_loads == 0 and self.shared_bytes <= limit


def _ptxas_counts(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) as ptxas -v reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        )
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip()[-500:])
    log = proc.stderr + proc.stdout
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=0)
    stores = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


# Opcode families of the instruction mix: CompileResult field -> PTX opcode prefix.
MIX = {"ld_global": "ld.global", "cp_async": "cp.async", "setp": "setp", "selp": "selp", "ex2": "ex2"}


def instruction_mix(ptx: str) -> dict[str, int]:
    """Static counts of MIX's opcode families and of all instructions in ``ptx`` (directives,
    labels, braces and comments are not instructions; a predicate guard is skipped)."""
    opcodes = []
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line[0] in ".{}/" or line.endswith(":"):
            continue
        if line.startswith("@"):  # @%p1 ld.global...: the guard, then the opcode
            line = line.split(None, 1)[1] if " " in line else ""
        if line:
            opcodes.append(line.split(None, 1)[0].rstrip(";"))
    mix = {field: sum(op.startswith(prefix) for op in opcodes) for field, prefix in MIX.items()}
    return mix | {"instructions": len(opcodes)}


def compile_config(config, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(config.signature)
    hinted = [i for i, n in enumerate(names)
              if config.signature[n].startswith("*") or n in config.divisible]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    base = dict(kernel=config.name, arch=f"sm_{arch}", num_warps=config.num_warps,
                num_stages=config.num_stages, triton=triton.__version__)
    try:
        src = ASTSource(fn=config.kernel, signature=config.signature, constexprs=config.constexprs, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, WARP_SIZE),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        ptx = compiled.asm["ptx"]
        regs, stores, loads = _ptxas_counts(ptx, arch)
    except Exception as exc:  # a compile error is a result of the gate, reported per config
        return CompileResult(**base, registers=0, spill_stores=0, spill_loads=0, shared_bytes=0,
                             mma_sync=0, wgmma=0, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return CompileResult(
        **base, registers=regs, spill_stores=stores, spill_loads=loads,
        shared_bytes=int(compiled.metadata.shared),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        **instruction_mix(ptx),
    )


def all_configs(modules=KERNEL_MODULES):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile gate needs real @triton.jit functions: unset TRITON_INTERPRET")
    for name in modules:
        module = importlib.import_module(f"cbkernels.kernels.{CONFIG_MODULES[name]}")
        yield from module.aot_configs()


def _compile_job(job: tuple[str, int, int]) -> CompileResult:
    """One (module, config index, arch) in a worker process: configs hold jit functions, which
    do not pickle, so a worker rebuilds the module's config list and picks its entry."""
    module, index, arch = job
    config = importlib.import_module(f"cbkernels.kernels.{CONFIG_MODULES[module]}").aot_configs()[index]
    return compile_config(config, arch)


def run_gate(archs=ARCHS, modules=KERNEL_MODULES, progress: bool = True, jobs: int = 1) -> list[CompileResult]:
    """Compile every config for every arch it is listed for; ``jobs`` > 1 compiles in that many
    worker processes (the results keep the serial order)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile gate needs real @triton.jit functions: unset TRITON_INTERPRET")
    work = []
    for name in modules:
        for i, c in enumerate(importlib.import_module(f"cbkernels.kernels.{CONFIG_MODULES[name]}").aot_configs()):
            work += [(name, i, a) for a in archs if c.archs is None or a in c.archs]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(work), desc="compiling", unit="config", disable=not progress, file=sys.stderr)
    except ImportError:  # tqdm is a dependency; the gate must still run without it
        bar = None
    results = []
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for r in pool.map(_compile_job, work):
                results.append(r)
                bar is not None and bar.update()
    else:
        for job in work:
            results.append(_compile_job(job))
            bar is not None and bar.update()
    if bar is not None:
        bar.close()
    return results


def versions_line(archs=ARCHS) -> str:
    """What the gate ran on: its results hold for this Triton (and its bundled ptxas) only."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(max(archs))
    return (f"compile gate: triton {triton.__version__}, ptxas {ptxas.version}, "
            f"targets {', '.join(f'sm_{a}' for a in archs)}")


def format_table(results: list[CompileResult]) -> str:
    header = ("kernel", "arch", "warps", "stages", "regs", "spill st/ld", "smem KB", "mma.sync", "wgmma",
              "ldg/cp.async/setp/selp/ex2/all", "status")
    rows = [header]
    for r in results:
        status = "ok" if r.ok else (r.error or "SPILL/SMEM")
        rows.append((r.kernel, r.arch, str(r.num_warps), str(r.num_stages), str(r.registers),
                     f"{r.spill_stores}/{r.spill_loads}", f"{r.shared_bytes / 1024:.1f}",
                     str(r.mma_sync), str(r.wgmma),
                     f"{r.ld_global}/{r.cp_async}/{r.setp}/{r.selp}/{r.ex2}/{r.instructions}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbkernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable)")
    parser.add_argument("--kernel", action="append", choices=KERNEL_MODULES, help="kernel module (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes compiling in parallel (default: one per CPU)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    archs = tuple(args.arch or ARCHS)
    results = run_gate(archs, tuple(args.kernel or KERNEL_MODULES), progress=not args.quiet, jobs=max(args.jobs, 1))
    print(versions_line(archs))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} configs compiled cleanly", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
