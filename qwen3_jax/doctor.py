"""`qwen3-jax doctor`: what this machine runs, and whether each attention kernel is right on it.

Prints JAX's version, the backend and its devices, the kernel `--attention auto` picks in each dtype,
then compiles every kernel this platform has (Pallas and splash run interpreted off their own
devices) on packed rows of the published head layout and compares it with dense attention, values and
gradients; last, the compile cache's folder and what it holds. Exits 1 when a kernel that "auto"
would pick is wrong or does not compile here: choose another with --attention.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.attention import attention, dense_attention
from qwen3_jax.backend import KERNEL_PLATFORMS, Backend, resolve_implementation

DTYPES = ("float32", "bfloat16")
KERNELS = {"cpu": ("dense", "blockwise", "pallas", "splash"), "gpu": ("dense", "blockwise", "pallas", "cudnn"),
           "tpu": ("dense", "blockwise", "splash")}
TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2}


def _packed_inputs(dtype: str, one_text_a_row: bool):
    """q [2, 256, 16, 128], k, v [2, 256, 8, 128] and segments of texts 7..120 tokens long (or one a row)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 256, 16, 128), dtype)
    k, v = (jax.random.normal(key, (2, 256, 8, 128), dtype) for key in keys[1:])
    if one_text_a_row:
        segments = (jnp.arange(256) < jnp.array([[200], [256]])).astype(jnp.int32)
    else:
        bounds = np.cumsum([0, 7, 120, 33, 64, 16])
        row = np.zeros(256, np.int32)
        for text, (start, stop) in enumerate(zip(bounds, bounds[1:])):
            row[start:stop] = text + 1
        segments = jnp.asarray(np.stack([row, row[::-1].copy()]))
    return q, k, v, segments


def difference_from_dense(impl: str, q, k, v, segments) -> dict:
    """How far `impl` is from dense attention on this device (a kernel of another platform runs
    interpreted): the largest |difference| of the outputs over real tokens, of the q, k, v gradients for
    one random output gradient, and the largest |gradient| for scale; each side's values and gradients
    come from one vjp, all of it one compiled program."""
    backend = Backend.resolve(impl)
    interpret = KERNEL_PLATFORMS.get(impl, backend.platform) != backend.platform

    @jax.jit
    def compare(q, k, v, segments):
        real = (segments > 0)[..., None, None]                        # padding outputs are unspecified
        d_out = jnp.where(real, jax.random.normal(jax.random.PRNGKey(1), q.shape, q.dtype), 0)
        got, got_backward = jax.vjp(lambda *x: attention(*x, segments, backend=backend, interpret=interpret), q, k, v)
        want, want_backward = jax.vjp(lambda *x: dense_attention(*x, segments), q, k, v)
        as32 = lambda x: x.astype(jnp.float32)
        pairs = list(zip(got_backward(d_out), want_backward(d_out)))
        return {"max_abs_value_diff": jnp.abs(jnp.where(real, as32(got) - as32(want), 0)).max(),
                "max_abs_gradient_diff": jnp.max(jnp.stack([jnp.abs(as32(a) - as32(b)).max() for a, b in pairs])),
                "gradient_scale": jnp.max(jnp.stack([jnp.abs(as32(b)).max() for _, b in pairs]))}

    return {name: float(value) for name, value in compare(q, k, v, segments).items()}


def check_kernel(impl: str, dtype: str) -> tuple[float, float]:
    """(the largest difference from dense attention, values and gradients relative to their scale,
    seconds to compile and run) of one kernel on this device; raises what the kernel raises."""
    started = time.perf_counter()
    found = difference_from_dense(impl, *_packed_inputs(dtype, one_text_a_row=impl == "cudnn"))
    worst = max(found["max_abs_value_diff"], found["max_abs_gradient_diff"] / (found["gradient_scale"] or 1.0))
    return worst, time.perf_counter() - started


def doctor(out=print) -> int:
    """Prints the report described in the module docstring; returns the exit status."""
    backend = jax.default_backend()
    devices = jax.devices()
    out(f"jax {jax.__version__}; backend {backend}: {len(devices)} x {devices[0].device_kind} "
        f"({jax.process_count()} process(es))")
    chosen = resolve_implementation("auto")
    out(f"--attention auto picks: {chosen} (in every dtype)")
    status = 0
    for impl in KERNELS.get(backend, KERNELS["cpu"]):
        for dtype in DTYPES:
            how = " (interpreted: not this platform's kernel)" if KERNEL_PLATFORMS.get(impl, backend) != backend else ""
            try:
                worst, seconds = check_kernel(impl, dtype)
            except Exception as error:  # noqa: BLE001 - the report names every kernel's failure
                wrong, line = True, f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            else:
                wrong = not worst <= TOLERANCE[dtype]
                line = f"{'WRONG' if wrong else 'ok'}: max difference from dense {worst:.1e} (values and gradients), " \
                       f"{seconds:.1f} s to compile and run"
            if wrong and chosen == impl:
                status = 1
                line += f" -- 'auto' picks it for {dtype}: choose another with --attention"
            out(f"  {impl:>9} {dtype:>8}{how}: {line}")
    out(_cache_report())
    return status


def _cache_report() -> str:
    if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
        return "compile cache: off"
    folder = Path(jax.config.jax_compilation_cache_dir)
    entries = [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    size = sum(path.stat().st_size for path in entries)
    return f"compile cache: {folder} ({len(entries)} files, {size / 2 ** 20:.1f} MiB)"
