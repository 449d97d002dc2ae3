"""Bad input to the KV-cache kernels: a ValueError naming the argument, before any launch."""
import pytest
import torch

import cbkernels
from cbkernels.ops import torch_path as _torch_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any launch (Triton or torch path) during these tests is a failure: checks come first."""
    import cbkernels.kernels.kv_cache as kv

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched on invalid input")

    for name in ("launch_scatter_kv", "launch_gather_kv", "launch_copy_blocks"):
        monkeypatch.setattr(kv, name, launched)
    for name in ("scatter_kv", "gather_kv", "copy_blocks"):
        monkeypatch.setattr(_torch_ops, name, launched)


def caches(dtype=torch.float16, shape=(4, 8, 2, 16)):
    return torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE)


def rows(n=3, dtype=torch.float16, shape=(2, 16)):
    return torch.zeros((n, *shape), dtype=dtype, device=DEVICE)


def slots(values=(0, 1, 2), dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


SCATTER_CASES = {
    "key dtype": (lambda: (rows(dtype=torch.float32), rows(), *caches(), slots()), "key"),
    "integer key": (lambda: (rows().long(), rows().long(), *caches(), slots()), "key"),
    "value dtype": (lambda: (rows(), rows(dtype=torch.bfloat16), *caches(), slots()), "value"),
    "key shape": (lambda: (rows(shape=(3, 16)), rows(shape=(3, 16)), *caches(), slots()), "key"),
    "value shape": (lambda: (rows(), rows(n=4), *caches(), slots()), "value"),
    "key ndim": (lambda: (rows().flatten(1), rows().flatten(1), *caches(), slots()), "key"),
    "key not contiguous": (lambda: (rows(shape=(16, 2)).transpose(1, 2), rows(), *caches(), slots()), "key"),
    "k_cache not a tensor": (lambda: (rows(), rows(), None, caches()[1], slots()), "k_cache"),
    "k_cache ndim": (lambda: (rows(), rows(), caches()[0][0], caches()[1][0], slots()), "k_cache"),
    "v_cache shape": (lambda: (rows(), rows(), caches()[0], caches(shape=(5, 8, 2, 16))[1], slots()), "v_cache"),
    "v_cache dtype": (lambda: (rows(), rows(), caches()[0], caches(torch.float32)[1], slots()), "v_cache"),
    "cache not contiguous": (lambda: (rows(), rows(), *(c.transpose(0, 1) for c in caches(shape=(8, 4, 2, 16))), slots()), "k_cache"),
    "slot dtype": (lambda: (rows(), rows(), *caches(), slots(dtype=torch.float32)), "slot_mapping"),
    "slot count": (lambda: (rows(), rows(), *caches(), slots((0, 1))), "slot_mapping"),
    "slot past the cache": (lambda: (rows(), rows(), *caches(), slots((0, 1, 4 * 8))), "slot_mapping"),
    "slot ndim": (lambda: (rows(), rows(), *caches(), slots().view(3, 1)), "slot_mapping"),
}


@pytest.mark.parametrize("case", SCATTER_CASES, ids=list(SCATTER_CASES))
def test_scatter_kv_rejects(case):
    make, argument = SCATTER_CASES[case]
    with pytest.raises(ValueError, match=argument):
        cbkernels.scatter_kv(*make())


def tables(values=((0, 1),), dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


GATHER_CASES = {
    "table dtype": (lambda: (*caches(), tables(dtype=torch.int64), slots((9,))), "block_tables"),
    "table ndim": (lambda: (*caches(), tables()[0], slots((9,))), "block_tables"),
    "table too narrow": (lambda: (*caches(), tables(), slots((17,))), "block_tables"),
    "table entry out of range": (lambda: (*caches(), tables(((0, 4),)), slots((9,))), "block_tables"),
    "negative table entry": (lambda: (*caches(), tables(((-1, 0),)), slots((3,))), "block_tables"),
    "seq_lens count": (lambda: (*caches(), tables(), slots((3, 4))), "seq_lens"),
    "seq_lens dtype": (lambda: (*caches(), tables(), slots((3,), torch.float32)), "seq_lens"),
    "negative seq_lens": (lambda: (*caches(), tables(), slots((-3,))), "seq_lens"),
    "cache dtype": (lambda: (*caches(torch.int32), tables(), slots((3,))), "k_cache"),
}


@pytest.mark.parametrize("case", GATHER_CASES, ids=list(GATHER_CASES))
def test_gather_kv_rejects(case):
    make, argument = GATHER_CASES[case]
    with pytest.raises(ValueError, match=argument):
        cbkernels.gather_kv(*make())


COPY_CASES = {
    "mapping shape": (lambda: (*caches(), torch.tensor([[0, 1, 2]], device=DEVICE)), "block_mapping"),
    "mapping dtype": (lambda: (*caches(), torch.tensor([[0.0, 1.0]], device=DEVICE)), "block_mapping"),
    "block out of range": (lambda: (*caches(), torch.tensor([[0, 4]], device=DEVICE)), "block_mapping"),
    "duplicate destination": (lambda: (*caches(), torch.tensor([[0, 2], [1, 2]], device=DEVICE)), "block_mapping"),
    "destination reused as source": (lambda: (*caches(), torch.tensor([[0, 1], [1, 2]], device=DEVICE)), "block_mapping"),
    "mismatched caches": (lambda: (caches()[0], caches(shape=(4, 8, 1, 16))[1], torch.tensor([[0, 1]], device=DEVICE)), "v_cache"),
}


@pytest.mark.parametrize("case", COPY_CASES, ids=list(COPY_CASES))
def test_copy_blocks_rejects(case):
    make, argument = COPY_CASES[case]
    with pytest.raises(ValueError, match=argument):
        cbkernels.copy_blocks(*make())


def test_device_mismatch_is_rejected():
    """Tensors on another device (meta stands in for a second device on a CPU-only machine)."""
    k_cache, v_cache = caches()
    other = "meta"
    with pytest.raises(ValueError, match="key"):
        cbkernels.scatter_kv(rows().to(other), rows().to(other), k_cache, v_cache, slots())
    with pytest.raises(ValueError, match="slot_mapping"):
        cbkernels.scatter_kv(rows(), rows(), k_cache, v_cache, slots().to(other))
    with pytest.raises(ValueError, match="block_tables"):
        cbkernels.gather_kv(k_cache, v_cache, tables().to(other), slots((3,)))
