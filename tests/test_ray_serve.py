"""Replicas through Ray Serve (``cbkernels.ray_app``) on a local Ray instance: two replicas of
a tiny random Llama (SmolLM2's tokenizer), requests spread over both, one replica killed
while it streams: its requests fail, the other replica's finish, and serving goes on.

Needs the ``ray`` extra (``pip install 'cbkernels[ray]'``); skipped without it. Slow: Ray
and two replicas start in about a minute on a 2-core machine.
"""
import threading
import time

import pytest

from cbkernels.ray_app import REPLICA_HEADER, app, parse_args

pytestmark = pytest.mark.slow
MODEL_NAME = "tiny"


def test_builder_arguments_are_checked():
    assert parse_args({"num_replicas": "2", "num_gpus": "1", "device": "cpu"}) == \
        {"num_replicas": 2, "num_gpus": 1.0, "device": "cpu"}
    with pytest.raises(ValueError, match="unknown option"):
        parse_args({"replicas": "2"})
    with pytest.raises(ValueError, match="num_replicas must be positive"):
        parse_args({"num_replicas": "0"})
    with pytest.raises(ValueError, match="model: no such file"):
        parse_args({"model": "/nonexistent/model"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("ray.serve")
    from cbkernels.models import cached_default_model
    from cbkernels.testing import tiny_llama

    tok = cached_default_model()[1]
    path = tmp_path_factory.mktemp("ray-model")
    tok.save_pretrained(path)
    tiny_llama(vocab=len(tok), max_positions=2048).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(model_dir):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from cbkernels.server.testing import free_port

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="cbkernels-test")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"model": str(model_dir), "num_replicas": "2", "num_cpus": "1", "threads": "1",
                       "num_blocks": "512", "served_model_name": MODEL_NAME}), name="cbkernels", route_prefix="/")
        yield ray, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(client, url, max_tokens, stream=False):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "temperature": 0}
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body, timeout=120)
        return r.status_code, r.headers.get(REPLICA_HEADER), r.json()
    return client.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True), timeout=120)


def test_requests_spread_over_both_replicas(served):
    import httpx

    _, url = served
    replicas, statuses = [], []

    def one():
        with httpx.Client() as c:
            status, replica, _ = _chat(c, url, 4)
            statuses.append(status)
            replicas.append(replica)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 12
    assert len(set(replicas)) == 2, replicas


def test_a_killed_replica_fails_its_requests_and_the_other_keeps_serving(served):
    import httpx

    ray, url = served
    results: dict = {}
    started = threading.Barrier(7)

    def streaming(i):
        outcome = {"replica": None, "done": False, "error": None}
        results[i] = outcome
        try:
            with httpx.Client() as c, _chat(c, url, 200, stream=True) as r:
                outcome["replica"], outcome["status"] = r.headers.get(REPLICA_HEADER), r.status_code
                chunks = r.iter_lines()
                next(chunks)
                started.wait(timeout=60)
                for line in chunks:
                    if line.strip() == "data: [DONE]":
                        outcome["done"] = True
        except Exception as exc:  # noqa: BLE001 - the killed replica's requests
            outcome["error"] = repr(exc)
        finally:
            if started.n_waiting and not started.broken:
                started.abort()

    threads = [threading.Thread(target=streaming, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started.wait(timeout=60)  # every stream has its first chunk
    on = {}
    for outcome in results.values():
        on.setdefault(outcome["replica"], []).append(outcome)
    assert len(on) == 2, results
    victim = sorted(on)[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::cbkernels#cbkernels#{victim}", namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=600)
    survivor = next(r for r in on if r != victim)
    assert all(o["done"] and o["error"] is None for o in on[survivor]), on[survivor]
    assert all(not o["done"] for o in on[victim]), on[victim]  # cut off: an error, never a silent end
    # Serving goes on (the surviving replica now, and Serve starts a replacement).
    with httpx.Client() as c:
        after = [_chat(c, url, 4) for _ in range(4)]
    assert [status for status, _, _ in after] == [200] * 4
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the replacement replica comes up
        from ray import serve

        status = serve.status().applications["cbkernels"].deployments["cbkernels"]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert status.replica_states.get("RUNNING", 0) == 2, status
