"""``cbkernels selfcheck`` checks every public kernel, and a broken one shows up FAILED."""
import torch

import cbkernels
from cbkernels.cli.selfcheck import run_selfcheck

KERNELS = ("scatter_kv", "gather_kv", "copy_blocks", "paged_attention")


def test_every_public_kernel_is_checked_and_agrees():
    rows = run_selfcheck("cpu", torch.float32)
    names = {name.split()[0] for name, _, _ in rows}
    assert set(KERNELS) <= set(cbkernels.__all__) and names == set(KERNELS)
    assert all(ok for _, _, ok in rows), rows


def test_a_broken_kernel_fails_its_row(monkeypatch):
    monkeypatch.setattr(cbkernels.ops, "copy_blocks", lambda k_cache, v_cache, mapping: None)
    rows = {name: ok for name, _, ok in run_selfcheck("cpu", torch.float32)}
    assert rows["copy_blocks"] is False and rows["gather_kv"] is True
