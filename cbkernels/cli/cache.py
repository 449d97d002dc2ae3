"""``cbkernels cache``: the converted-model cache (see ``cbkernels.model_cache``).

* ``info``: where the cache is, its entries with their sizes, source files and the
  transformers version that converted them;
* ``clear``: remove every entry (the next load of a GGUF file converts it again).
"""
from __future__ import annotations

import os
from pathlib import Path

from .generate import UsageError


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _root(args) -> Path:
    from ..model_cache import CACHE_ENV, cache_root

    root = cache_root(args.cache_dir)
    if root.exists() and not root.is_dir():
        raise UsageError(f"cache directory is not a directory: {root}")
    args.origin = ("--cache-dir" if args.cache_dir else CACHE_ENV if os.environ.get(CACHE_ENV)
                   else "the user cache directory")
    return root


def _info(args) -> int:
    from ..model_cache import list_entries, transformers_version

    root = _root(args)
    rows = list_entries(root)
    entries = [r for r in rows if r["manifest"] is not None]
    print(f"cache directory: {root} (from {args.origin})")
    print(f"entries: {len(entries)}, {_mb(sum(r['bytes'] for r in rows))} on disk; "
          f"installed transformers {transformers_version()}")
    for row in rows:
        m = row["manifest"]
        if m is None:
            what = "partial conversion (a crashed or running one)" if row["partial"] else "incomplete entry"
            print(f"  {row['name']}  {_mb(row['bytes'])}  {what}")
            continue
        print(f"  {row['name']}  {_mb(row['bytes'])}")
        print(f"    source:       {m['source']} ({_mb(m['size'])})"
              + ("  [changed or gone since: this entry is no longer used]" if row["stale"] else ""))
        print(f"    transformers: {m['transformers']}"
              + ("" if m["transformers"] == transformers_version() else "  [not the installed version: unused]"))
        print(f"    converted:    {m['created']} in {m['converted_s']:.0f} s")
    return 0


def _clear(args) -> int:
    from ..model_cache import clear

    root = _root(args)
    removed, freed, busy = clear(root)
    print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} ({_mb(freed)}) from {root}")
    for name in busy:
        print(f"  kept {name}: another process is converting it")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the cache of converted models",
                       description="GGUF models are converted once to safetensors and kept here; "
                                   "'info' lists the entries, 'clear' removes them.")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--cache-dir", help="cache directory (default: $CBKERNELS_CACHE_DIR, else the user cache "
                                       "directory, e.g. ~/.cache/cbkernels)")
    p.set_defaults(func=lambda args: _info(args) if args.action == "info" else _clear(args))
