"""One rank of the tensor-parallel tests, launched by tests/test_tensor_parallel.py through
``torchrun --nproc-per-node 2`` (gloo). Usage: ``tp_worker.py SPEC_JSON OUT_DIR``.

SPEC_JSON names the saved tiny models and the scenarios; each rank writes what it saw
(tokens, errors, every step's schedule and free blocks, cache bytes) to OUT_DIR/rank<r>.json
and the test compares the ranks with each other and with single-process runs.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.distributed import DistributedConfig

from cbkernels import BatchConfig, Engine


def gen_config(spec: dict) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=spec["max_new_tokens"], eos_token_id=None, pad_token_id=0,
                            do_sample=spec.get("do_sample", False), stop_strings=spec.get("stop_strings"))


def load(path: str):
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2),
                                                dtype=torch.float32).eval()


def record_steps(engine) -> list:
    """Every schedule of ``engine``: free blocks when it started, request ids, token counts."""
    log: list = []
    schedule = engine.scheduler.schedule

    def logged():
        free = engine.cache.get_num_free_blocks()
        batch = schedule()
        log.append([free, [r.request_id for r in batch.requests], list(batch.num_tokens), len(batch.preempted)])
        return batch

    engine.scheduler.schedule = logged
    return log


def outputs(outs) -> list:
    return [{"id": o.request_id, "tokens": list(o.generated_tokens), "error": o.error, "status": o.status.value,
             "finish_reason": o.finish_reason}
            for o in outs]


def run_generate(model, scenario: dict, rank: int) -> dict:
    """SPMD: every rank calls generate with the same prompts."""
    tokenizer = AutoTokenizer.from_pretrained(scenario["model"]) if scenario.get("stop_strings") else None
    engine = Engine(model, BatchConfig(**scenario["config"]), tokenizer=tokenizer)
    steps = record_steps(engine)
    outs = engine.generate(scenario["prompts"], gen_config(scenario))
    m = engine.metrics()
    result = {"outputs": outputs(outs), "steps": list(steps), "cache_bytes": engine.cache.kv.numel() * engine.cache.kv.element_size(),
              "size_bytes": engine.cache.size.bytes, "preemptions": m["preemptions"],
              "prefix_hit_rate": m["prefix_hit_rate"], "free_after": engine.cache.get_num_free_blocks(),
              "num_blocks": engine.cache.num_blocks, "backend": engine.backend, "async_steps": m["async_steps"]}
    if scenario.get("sample"):  # sampled without a seed: rank 0's seed reaches every rank
        result["sampled"] = outputs(engine.generate(scenario["prompts"], GenerationConfig(
            max_new_tokens=scenario["max_new_tokens"], eos_token_id=None, pad_token_id=0, do_sample=True,
            temperature=1.5)))
    engine.stop()
    return result


def run_serving_cancel(model, scenario: dict, rank: int) -> dict:
    """Rank 0 serves (start / add_request / stream / cancel / stop); rank 1 follows."""
    engine = Engine(model, BatchConfig(**scenario["config"]))
    steps = record_steps(engine)
    result: dict = {}
    if rank == 0:
        engine.start()
        gc = gen_config(scenario)
        ids = [engine.add_request(p, gc) for p in scenario["prompts"]]
        victim = ids[0]
        seen = 0
        for _ in engine.stream(victim):  # cancel once it has decoded a few tokens
            seen += 1
            if seen == 3:
                engine.cancel(victim)
        for rid in ids[1:]:
            list(engine.stream(rid))
        result["outputs"] = outputs([engine.pop_result(i) for i in ids])
        time.sleep(1.5)  # idle long enough for one heartbeat
        engine.stop()
    else:
        engine.start()
        try:
            engine.add_request(scenario["prompts"][0], gen_config(scenario))
        except RuntimeError as exc:
            result["refused"] = str(exc)
        engine.stop()  # returns when rank 0 stops the group
        result["loop_error"] = repr(engine.loop_error) if engine.loop_error else None
    result.update(steps=steps, free_after=engine.cache.get_num_free_blocks(), num_blocks=engine.cache.num_blocks,
                  leftover=len(engine.requests) if rank else None)
    return result


def run_fault(model, scenario: dict, rank: int) -> dict:
    """An exception on rank 1 only, inside attention (``where='attention'``) or in host
    sampling (``'sampling'``), at one step of a generate call; then a second call."""
    engine = Engine(model, BatchConfig(**scenario["config"]))
    steps = record_steps(engine)
    if rank == 1:
        at = scenario["fault_step"]
        if scenario["where"] == "attention":
            run_layer = engine.attention.run_layer

            def faulty(*args, **kwargs):
                if engine.num_steps == at:
                    raise RuntimeError("injected attention fault")
                return run_layer(*args, **kwargs)

            engine.attention.run_layer = faulty
        else:
            sample_on_host = engine.runner.sample_on_host

            def faulty_sample(step):
                if engine.num_steps == at:
                    raise RuntimeError("injected sampling fault")
                return sample_on_host(step)

            engine.runner.sample_on_host = faulty_sample
    first = engine.generate(scenario["prompts"], gen_config(scenario))
    second = engine.generate(scenario["prompts"], gen_config(scenario))
    engine.stop()
    return {"first": outputs(first), "second": outputs(second), "steps": steps,
            "free_after": engine.cache.get_num_free_blocks(), "num_blocks": engine.cache.num_blocks}


def run_sizing(model, scenario: dict, rank: int) -> dict:
    """Auto-sized caches: each rank's own byte cap (rank 1 the smaller), one agreed block count."""
    engine = Engine(model, BatchConfig(**scenario["config"], max_cache_bytes=scenario["cap_bytes"][rank]))
    result = {"num_blocks": engine.cache.num_blocks, "how": engine.cache.size.how,
              "block_bytes": engine.cache.size.block_bytes}
    engine.stop()
    return result


def run_bad_tp(path: str) -> dict:
    model = load(path)
    try:
        Engine(model, BatchConfig(backend="torch", num_blocks=16))
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


RUNNERS = {"generate": run_generate, "serving_cancel": run_serving_cancel, "fault": run_fault, "sizing": run_sizing}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    out_dir = sys.argv[2]
    torch.set_num_threads(1)
    models: dict = {}
    results: dict = {}
    rank = -1
    for scenario in spec["scenarios"]:
        start = time.perf_counter()
        if scenario["kind"] == "bad_tp":
            results[scenario["name"]] = run_bad_tp(scenario["model"])
        else:
            if scenario["model"] not in models:
                models[scenario["model"]] = load(scenario["model"])
            model = models[scenario["model"]]
            rank = dist.get_rank()
            results[scenario["name"]] = RUNNERS[scenario["kind"]](model, scenario, rank)
        results[scenario["name"]]["seconds"] = time.perf_counter() - start
    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
