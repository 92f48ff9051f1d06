"""The choices that differ by platform, made once into a `Backend` that the model and its operations
are given: the attention kernel for the model's dtype, and how products and attention are laid out for
XLA's CPU compiler. The maths asks this object, never JAX, which platform it runs on, so a program can
be built here for a platform this machine lacks (the lowering tests build GPU and TPU programs on a CPU).
JAX is imported only where its backend is read, so the command line imports this module without it.
Why each CPU choice pays is in docs/design/numerics.md and docs/design/attention.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from pathlib import Path

from qwen3_jax.checks import UsageError

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "pallas", "cudnn", "splash")
AUTO = {"gpu": "pallas", "tpu": "splash"}          # "auto" on each platform; anywhere else blockwise
KERNEL_PLATFORMS = {"pallas": "gpu", "cudnn": "gpu", "splash": "tpu"}      # kernels built for one platform each
# The longest packed row each kernel is given. dense and splash compute every causal pair of a row,
# texts alike or not, so their rows stay short; blockwise skips the pairs of different texts, so one
# row may hold a whole batch. cuDNN's kernel takes one text a row (see `Backend.packs_rows`).
PACKED_ROW_LIMIT = {"dense": 2048, "splash": 2048, "blockwise": None, "pallas": None}
ACCELERATOR_BLOCK = 256          # the blockwise kernel's query block off the CPU
# CPU features with which XLA multiplies bfloat16 several times faster than float32: Intel's AMX (Sapphire
# Rapids on) and AVX-512 BF16 (Intel Cooper Lake, AMD Zen 4 on). docs/design/numerics.md has the rates.
FAST_BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
DTYPE_HELP = ("compute dtype (default float32, results equal to transformers'); auto: bfloat16 on GPUs, TPUs and "
              "CPUs with fast bfloat16 products (AMX, AVX-512 BF16), float32 on other CPUs")


def resolve_implementation(impl: str, platform: str | None = None) -> str:
    """The kernel `impl` names; "auto" is a pure function of the platform (default: JAX's backend):
    the packed Pallas kernel on GPUs, splash on TPUs, blockwise elsewhere, in every dtype. Nothing is
    tried out: `qwen3-jax doctor` checks each kernel on a device, and a kernel that fails there is an
    error that names --attention."""
    if impl not in IMPLEMENTATIONS:
        raise UsageError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    return AUTO.get(platform or _default_platform(), "blockwise")


def _default_platform() -> str:
    """JAX's backend on this machine ("cpu", "gpu" or "tpu")."""
    import jax

    return jax.default_backend()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of this machine's CPU as Linux lists them (none elsewhere)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), ()))


def resolve_dtype(dtype: str, platform: str | None = None, flags: frozenset[str] | None = None) -> str:
    """A compute dtype's name, "auto" resolved: bfloat16 on GPUs and TPUs and on CPUs whose matrix units
    multiply it fast (FAST_BFLOAT16_CPU_FLAGS), float32 on other CPUs. The choice is said once on stderr."""
    if dtype != "auto":
        return dtype
    platform = platform or _default_platform()
    fast = [flag for flag in FAST_BFLOAT16_CPU_FLAGS if flag in (cpu_flags() if flags is None else flags)]
    if platform != "cpu" or fast:
        why = f"on {platform}" if platform != "cpu" else f"this CPU multiplies it fast ({', '.join(fast)})"
        _say_once(f"qwen3-jax: dtype auto: bfloat16, {why}; --dtype float32 gives results equal to transformers' "
                  "float32")
        return "bfloat16"
    _say_once("qwen3-jax: dtype auto: float32, this CPU has no fast bfloat16 products (AMX or AVX-512 BF16)")
    return "float32"


@functools.cache
def _say_once(message: str) -> None:
    print(message, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the maths does differently on one platform (see `resolve`)."""

    platform: str                           # "cpu", "gpu" or "tpu"
    attention: str                          # the attention kernel, resolved (never "auto")
    half_products_in_float32: bool = False  # bf16/fp16 products leave the matrix unit in float32
    materialise_gradients: bool = False     # a projection's incoming gradient is computed before its products
    weight_gradients_in_float32: bool = False   # weight gradients from float32 operands, the smaller one left
    attention_row_by_row: bool = False      # dense and blockwise attention loop over each data shard's rows
    blockwise_block: int | None = ACCELERATOR_BLOCK     # None: by the row's mean text length
    layer_by_layer: bool = False            # inference on one device runs a layer at a time (layer_by_layer.py)

    @classmethod
    def resolve(cls, attention: str = "auto", platform: str | None = None) -> "Backend":
        """The choices for `platform` (default: JAX's backend, read here and nowhere in the maths)."""
        platform = platform or _default_platform()
        cpu = platform == "cpu"
        return cls(platform, resolve_implementation(attention, platform), half_products_in_float32=cpu,
                   materialise_gradients=cpu, weight_gradients_in_float32=cpu, attention_row_by_row=cpu,
                   blockwise_block=None if cpu else ACCELERATOR_BLOCK, layer_by_layer=cpu)

    @property
    def packs_rows(self) -> bool:
        """Whether the attention kernel handles several texts per row (all but cuDNN's fused kernel)."""
        return self.attention != "cudnn"

    @property
    def packed_row_limit(self) -> int | None:
        """The longest row of packed texts to give the attention kernel (None: any length)."""
        return PACKED_ROW_LIMIT.get(self.attention)


@contextlib.contextmanager
def kernel_named_on_failure(backend: Backend):
    """A failure to lower, compile or run a device kernel becomes an error that names --attention."""
    try:
        yield
    except Exception as error:
        if backend.attention not in KERNEL_PLATFORMS:
            raise
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise RuntimeError(f"the {backend.attention} attention kernel failed on this {backend.platform} device "
                           f"({type(error).__name__}: {first}); run `qwen3-jax doctor`, and choose another kernel "
                           "with --attention (blockwise runs everywhere)") from error
