"""Convert once, load fast: a cache of GGUF checkpoints converted to safetensors directories.

transformers loads a GGUF file by parsing its metadata (the tokenizer vocabulary, entry by
entry) and dequantizing every tensor, reading the file once for the tokenizer, once for the
config and once for the weights: about 40 s for the 135M-parameter default model on a small
CPU. The first load of a GGUF file converts it into a directory of float32 ``model.safetensors``,
``config.json``, ``generation_config.json`` and tokenizer files; later loads read that directory
in about a second.

Layout: ``<cache dir>/models/<gguf stem>-<key>/`` plus a ``.lock`` file per entry. The key
hashes the GGUF file's size, mtime and the SHA-256 of its first 4 MiB, the transformers version
that converted it and this module's format version. An entry is written into a temporary
directory beside its target, synced, and renamed into place while holding the entry's file
lock: a crash leaves no half entry (only a ``.partial`` directory, removed by the next
conversion or by ``cbkernels cache clear``), and a second process converting the same file
waits for the first and then reads its result.

This module imports neither torch nor transformers until a conversion runs.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CACHE_ENV = "CBKERNELS_CACHE_DIR"
FORMAT_VERSION = 1  # bump when an entry's contents change
HEADER_BYTES = 4 << 20
ENTRIES = "models"
MANIFEST = "cbkernels-entry.json"
PARTIAL = ".partial"


def cache_root(override=None) -> Path:
    """``override`` (``--cache-dir``), else ``$CBKERNELS_CACHE_DIR``, else the platform's user
    cache directory: ``$XDG_CACHE_HOME/cbkernels`` or ``~/.cache/cbkernels`` on Linux,
    ``~/Library/Caches/cbkernels`` on macOS, ``%LOCALAPPDATA%\\cbkernels`` on Windows."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cbkernels"


def use_cache_dir(path) -> None:
    """Make ``path`` the cache directory of this process and the processes it starts
    (the ``--cache-dir`` of the commands that load models)."""
    os.environ[CACHE_ENV] = str(Path(path).expanduser())


def transformers_version() -> str:
    try:
        return version("transformers")  # package metadata: no import of transformers
    except PackageNotFoundError:
        return "unknown"


def source_identity(gguf) -> dict:
    """What an entry is keyed by: the file's size, mtime, header hash, and the converter."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        digest.update(f.read(HEADER_BYTES))
    return {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "header_sha256": digest.hexdigest(), "transformers": transformers_version(),
            "format": FORMAT_VERSION}


def entry_name(identity: dict) -> str:
    keyed = {k: identity[k] for k in ("size", "mtime_ns", "header_sha256", "transformers", "format")}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(identity["source"]).stem)
    return f"{stem}-{key}"


def is_complete(entry: Path) -> bool:
    """The manifest is written last, before the rename: an entry with it is whole."""
    return (entry / MANIFEST).is_file()


def _lock(entry: Path):
    from filelock import FileLock

    return FileLock(str(entry) + ".lock")


def converted_gguf(gguf, cache_dir=None) -> Path:
    """The cache entry (a safetensors model directory) of ``gguf``, converting it first when
    the cache does not hold it yet."""
    identity = source_identity(gguf)
    entry = cache_root(cache_dir) / ENTRIES / entry_name(identity)
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    from filelock import Timeout

    lock = _lock(entry)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"cbkernels: waiting for another process converting {Path(gguf).name}", file=sys.stderr)
        lock.acquire()
    try:
        if is_complete(entry):  # converted by the process we waited for
            return entry
        for leftover in entry.parent.glob(f".{entry.name}.*{PARTIAL}"):  # a crashed conversion's
            shutil.rmtree(leftover, ignore_errors=True)
        if entry.exists():  # no manifest: not ours to trust
            shutil.rmtree(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=PARTIAL, dir=entry.parent))
        try:
            convert(Path(gguf), tmp, identity)
            _sync_dir(tmp)
            try:
                os.replace(tmp, entry)
            except OSError:
                if not is_complete(entry):  # lost a race the lock did not prevent: use the winner's
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    _drop_superseded(entry, identity)
    return entry


def _drop_superseded(entry: Path, identity: dict) -> None:
    """Remove entries converted from an earlier version of the same file (same path and
    transformers version; size, mtime or header since changed): nothing can load them again,
    and a reinstalled model would otherwise add a full copy each time."""
    for row in list_entries(entry.parent.parent):
        m = row["manifest"]
        if (m is None or row["path"] == entry or m.get("source") != identity["source"]
                or m.get("transformers") != identity["transformers"]):
            continue
        if (m.get("size"), m.get("mtime_ns"), m.get("header_sha256")) != (
                identity["size"], identity["mtime_ns"], identity["header_sha256"]):
            shutil.rmtree(row["path"], ignore_errors=True)


def _sync_dir(path: Path) -> None:
    """Flush the files to disk before the rename publishes them."""
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def load_gguf(gguf: Path, dtype=None, **kwargs):
    """(model, tokenizer) straight from the GGUF file: the slow path the cache avoids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    kwargs.setdefault("local_files_only", True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=dtype or torch.float32, **kwargs)
    return model, tok


def convert(gguf: Path, out: Path, identity: dict) -> None:
    """Write ``gguf`` as a float32 safetensors model directory with its tokenizer into ``out``."""
    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    print(f"cbkernels: converting {gguf.name} to safetensors, once (about a minute; later loads take "
          f"seconds) into {out.parent}", file=sys.stderr)
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar of ours instead of transformers' loading/writing bars
    try:
        with tqdm(total=3, unit="step", file=sys.stderr, bar_format="{desc} {n}/{total} [{elapsed}]") as bar:
            def stage(text):
                bar.set_description_str(f"converting {gguf.name}: {text}")

            stage("reading tokenizer and weights, dequantizing")
            model, tok = load_gguf(gguf, torch.float32)
            bar.update()
            # The GGUF quantizer marks the model as quantized, which save_pretrained refuses; the
            # weights are already dequantized float32, so the model is saved as a plain one.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            stage("writing model.safetensors")
            model.save_pretrained(out)
            bar.update()
            stage("writing tokenizer")
            tok.save_pretrained(out)
            bar.update()
            stage("done")
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    seconds = time.perf_counter() - start
    manifest = identity | {"torch": torch.__version__, "converted_s": round(seconds, 1),
                           "created": dt.datetime.now().isoformat(timespec="seconds")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"cbkernels: converted {gguf.name} in {seconds:.0f} s", file=sys.stderr)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_entries(cache_dir=None) -> list[dict]:
    """Every entry and leftover partial directory: name, path, bytes, manifest (or None), and
    whether its source file has changed or gone since the conversion (``stale``)."""
    root = cache_root(cache_dir) / ENTRIES
    if not root.is_dir():
        return []
    rows = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        try:
            manifest = json.loads((path / MANIFEST).read_text()) if is_complete(path) else None
        except ValueError:  # damaged by hand: listed as incomplete, removed by clear
            manifest = None
        stale = None
        if manifest is not None:
            src = Path(manifest["source"])
            try:
                stat = src.stat()
                stale = (stat.st_size, stat.st_mtime_ns) != (manifest["size"], manifest["mtime_ns"])
            except OSError:
                stale = True
        rows.append({"name": path.name, "path": path, "bytes": _size(path), "manifest": manifest,
                     "partial": path.name.endswith(PARTIAL), "stale": stale})
    return rows


def clear(cache_dir=None) -> tuple[int, int, list[str]]:
    """Remove every entry, leftover and lock file: (entries removed, bytes freed, names skipped
    because another process is converting them right now)."""
    from filelock import Timeout

    root = cache_root(cache_dir) / ENTRIES
    removed, freed, busy = 0, 0, []
    for row in list_entries(cache_dir):
        # a partial directory is named ".<entry>.<random>.partial"
        owner = row["name"][1:].rsplit(".", 2)[0] if row["partial"] else row["name"]
        lock = _lock(root / owner)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            busy.append(row["name"])
            continue
        try:
            shutil.rmtree(row["path"])
            removed += not row["partial"]
            freed += row["bytes"]
        finally:
            lock.release()
    for lock_file in root.glob("*.lock") if root.is_dir() else ():
        if lock_file.name[:-len(".lock")] not in busy:
            lock_file.unlink(missing_ok=True)
    for empty in (root, root.parent):
        try:
            empty.rmdir()  # only when empty: never anything of the user's
        except OSError:
            break
    return removed, freed, busy
