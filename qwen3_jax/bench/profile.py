"""`qwen3-jax bench profile`: where a decoder layer's time goes, read from XLA's own profiler.

One batch of a length mix is laid out as `encode` lays it out, and the compiled layer program (the one
`encode` runs once a layer on a CPU) is run under `jax.profiler`. Every operation XLA executed (a fusion, a
product, a copy) is timed in the trace; each is put in the stage of the model whose `jax.named_scope`
(`model.LAYER_STAGES`) its arithmetic came from, a fusion holding a product in the product's stage.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.bench.common import (bench_models, matmul_gflops, parse_token_range, projection_flops,
                                    synthetic_texts)
from qwen3_jax.model import LAYER_STAGES
from qwen3_jax.packing import TOKENS_PER_TEXT, layout_batch

CONTROL_FLOW = ("while", "conditional", "call")       # their bodies' operations are timed on their own
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = \S+ (\w[\w-]*)\((.*)")
_COMPUTATION = re.compile(r"^%?(\S+) .*\{$")


def stage_of(op_name: str) -> str:
    """The layer stage of an operation's `op_name` metadata ("jit(f)/mlp/gate_up/BTD,DF->BTF/dot_general"
    -> "mlp/gate_up"), "other" outside every stage."""
    parts = op_name.split("/")
    for stage in sorted(LAYER_STAGES, key=len, reverse=True):
        names = stage.split("/")
        if any(parts[i:i + len(names)] == names for i in range(len(parts))):
            return stage
    return "other"


def stages_of_program(hlo_text: str) -> dict[str, str]:
    """Each executed instruction of a compiled program's HLO text -> its stage: a fusion's is its product's
    (where it holds a dot) or else its root's; copies and layout changes XLA added carry no op_name:
    "other"."""
    computations: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            match = _COMPUTATION.match(line)
            current = match.group(1) if match else current
            continue
        match = _INSTRUCTION.match(line)
        if match and current:
            computations[current].append(match.groups())

    def named(rest: str) -> str:
        found = re.search(r'op_name="([^"]+)"', rest)
        return found.group(1) if found else ""

    def fused_stage(computation: str) -> str:
        body = computations.get(computation, [])
        dots = [rest for _, opcode, rest in body if opcode in ("dot", "convolution")]
        chosen = dots[0] if dots else next((rest for _, _, rest in reversed(body) if named(rest)), "")
        return stage_of(named(chosen))

    stages = {}
    for body in computations.values():
        for name, opcode, rest in body:
            called = re.search(r"calls=%([\w.-]+)", rest)
            if opcode in CONTROL_FLOW:
                continue
            stages[name] = fused_stage(called.group(1)) if called and opcode == "fusion" else stage_of(named(rest))
    return stages


def operation_times(trace_folder: Path) -> dict[str, float]:
    """Seconds each executed HLO operation took, summed over the profiled calls (the trace's 'hlo_op' events)."""
    trace = next(trace_folder.rglob("*.trace.json.gz"))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    times: dict[str, float] = collections.Counter()
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        if event.get("ph") == "X" and op:
            times[op] += event["dur"] / 1e6
    return times


def run_profile(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None, dtype: str,
                texts: int | None, tokens: str, long_tail: bool, batch_size: int, repeats: int, attention: str,
                out=print) -> dict:
    """Profiles one decoder layer on the first batch `encode` would run for the mix; prints a stage table."""
    with bench_models(model=model, random=random, layers=layers or 1, tokenizer=tokenizer, dtype=dtype,
                      attention=attention, reference=False, out=out) as (ours, _, _):
        low, high = parse_token_range(tokens)
        corpus = synthetic_texts(ours.tokenizer, texts or 32, low, high, long_tail=long_tail)
        rows = ours.tokenizer.encode(corpus, ours.max_length)
        batch = ours.runner.plan([len(r) for r in rows], token_budget=batch_size * TOKENS_PER_TEXT)[0]
        ids, segments, _ = (jnp.asarray(a) for a in layout_batch(batch, rows, ours.runner.pad_id))
        net = ours.runner.model
        x, context = jax.jit(net.inputs)(ids, segments)
        graphdef, stacked = nnx.split(net.layers)
        one_layer = jax.tree.map(lambda a: a[0], stacked)
        layer = jax.jit(lambda state, x, context: net.apply_layer(graphdef, state, x, context))
        compiled = layer.lower(one_layer, x, context).compile()
        stages = stages_of_program(compiled.as_text())
        compiled(one_layer, x, context).block_until_ready()
        walls = []
        with tempfile.TemporaryDirectory(prefix="qwen3-jax-profile-") as folder:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                for _ in range(repeats):
                    start = time.perf_counter()
                    compiled(one_layer, x, context).block_until_ready()
                    walls.append(time.perf_counter() - start)
            times = operation_times(Path(folder))
        by_stage: dict[str, float] = collections.Counter()
        for op, seconds in times.items():
            if op in stages:
                by_stage[stages[op]] += seconds / repeats
        matmul = matmul_gflops(jnp.dtype(dtype))
        real = int((np.asarray(segments) > 0).sum())
        flops = projection_flops(ours.config, ids.size)
        total = sum(by_stage.values())
        wall = float(np.median(walls))
        out(f"one layer, {dtype}, a batch of {len(batch.rows)} row(s) x {batch.length} tokens ({real} real): "
            f"{wall * 1e3:.1f} ms a call, {total * 1e3:.1f} ms in XLA's operations; plain products {matmul:.0f} GFLOP/s")
        out(f"{'stage':>26} {'ms':>9} {'share':>6} {'GFLOP/s':>8} {'of matmul':>9}")
        result = {"dtype": dtype, "rows": len(batch.rows), "length": batch.length, "real_tokens": real,
                  "layer_ms": wall * 1e3, "operations_ms": total * 1e3, "matmul_gflops": matmul, "stages": {}}
        for stage in (*LAYER_STAGES, "other"):
            seconds = by_stage.get(stage, 0.0)
            rate = flops[stage] / seconds / 1e9 if stage in flops and seconds else None
            result["stages"][stage] = {"ms": seconds * 1e3, "share": seconds / total if total else 0.0,
                                       "gflops": rate}
            shown = f"{rate:8.1f} {rate / matmul:9.2f}" if rate else f"{'':8} {'':9}"
            out(f"{stage:>26} {seconds * 1e3:9.2f} {seconds / total if total else 0:6.1%} {shown}")
        return result
