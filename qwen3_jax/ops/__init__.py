"""What the model calls but does not spell out: hand-written gradients and backend-dependent products.

The model (`model.py`) reads as the Qwen3 decoder; each piece here is one operation it uses, with its
custom VJP and the choices that depend on the backend, each tested against `jax.grad` of the plain
version (tests/test_ops_grad.py). Attention kernels live in `qwen3_jax/attention/`.
"""
