"""Measures how much host memory loading a checkpoint takes: peak RSS growth over the checkpoint's bytes.

    python convert/load_memory.py --random 0.6B            # writes a random bf16 checkpoint of that shape
    python convert/load_memory.py --model /path/to/Qwen3-Embedding-0.6B

The checkpoint is written (by `qwen3-jax init-random`'s writer, no torch) by one process and loaded by a
fresh one, so the figure is the loader's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def high_water_bytes() -> int:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(folder: Path) -> dict:
    import jax

    from qwen3_jax.loader import load_model

    jax.numpy.zeros(1).block_until_ready()          # start the runtime before the baseline
    before = high_water_bytes()
    model = load_model(folder, dtype="bfloat16", param_dtype="bfloat16")
    jax.block_until_ready(model.embed[...])
    peak = high_water_bytes()
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"checkpoint_bytes": weights, "rss_before": before, "rss_peak": peak,
            "growth_over_checkpoint": (peak - before) / weights}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a local checkpoint folder")
    which.add_argument("--random", choices=["0.6B", "4B", "8B"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        from qwen3_jax.init_random import write_random_checkpoint

        write_random_checkpoint(Path(args.write), args.random, overwrite=True)
        return 0
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp)
        if args.random:  # in its own process, so the measuring one starts small
            subprocess.run([sys.executable, __file__, "--random", args.random, "--write", str(folder)], check=True)
        run = subprocess.run([sys.executable, __file__, "--random", "0.6B", "--measure", str(folder)],
                             capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"checkpoint: {result['checkpoint_bytes'] / gib:.3f} GiB (bf16 -> bf16 parameters)")
    print(f"peak RSS:   {result['rss_before'] / gib:.3f} GiB before loading, {result['rss_peak'] / gib:.3f} GiB peak")
    print(f"growth:     {result['growth_over_checkpoint']:.3f} x the checkpoint's bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
