"""`cbkernels serve` as a real process: typed mistakes exit 2 with one line, the API key comes
from the environment, a server reachable from the network without a key is warned about,
and SIGTERM drains (in-flight requests end with an error event after --drain-timeout), then
exits 0. The process serves a tiny random Llama saved next to the SmolLM2 tokenizer, so it
starts in seconds."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from cbkernels.cli import main
from cbkernels.server.runner import exposure_warning
from cbkernels.server.testing import free_port


@pytest.mark.parametrize("argv,needle", [
    (["--port", "70000"], "--port"),
    (["--block-size", "3"], "--block-size"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--num-blocks", "0"], "--num-blocks"),
    (["--drain-timeout", "nan"], "--drain-timeout"),
    (["--model", "/no/such/model"], "--model"),
    (["--api-key", " "], "--api-key"),
    (["--target-itl-ms", "0"], "--target-itl-ms"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, needle):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("cbkernels serve: error:")


def test_serve_help_is_fast_to_start():
    """--help imports none of torch, transformers, FastAPI, uvicorn (they load when serving starts)."""
    probe = ("import json, sys\nfrom cbkernels.cli import main\ntry:\n    main(['serve', '--help'])\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             "print(json.dumps([code] + [m in sys.modules for m in ('torch', 'transformers', 'fastapi', 'uvicorn')]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, False, False, False, False], proc.stderr
    assert "--max-queue" in proc.stdout and "--api-key" in proc.stdout


@pytest.mark.parametrize("host,key,warns", [("0.0.0.0", None, True), ("192.168.1.7", None, True), ("::", None, True),
                                            ("0.0.0.0", "k", False), ("127.0.0.1", None, False),
                                            ("::1", None, False), ("localhost", None, False)])
def test_warning_for_a_server_open_to_the_network(host, key, warns):
    warning = exposure_warning(host, key)
    assert (warning is not None) == warns
    if warns:
        assert host in warning and "API key" in warning


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with the SmolLM2 tokenizer's vocabulary, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cbkernels.models import cached_default_model

    _, tok = cached_default_model()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_model_dir):
    port, key = free_port(), "env-key-123"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the server runs as a user would
    env.update(CBKERNELS_API_KEY=key, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cbkernels", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--num-blocks", "300", "--drain-timeout", "1",
                             "--served-model-name", "tiny", "--target-itl-ms", "1000"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from CBKERNELS_API_KEY
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=auth).json()["data"]] == ["tiny"]
        assert "cbkernels_target_itl_ms 1000.0" in httpx.get(url + "/metrics", headers=auth).text  # the flag reached the engine
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None  # generating
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]  # cancelled after the drain timeout, not cut off
        assert error["code"] == "shutting_down" and set(error) == {"message", "type", "param", "code"}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert "Shutting down" in proc.stderr.read()
