"""`qwen3-jax bench BENCHMARK`: one module a benchmark (encode, corpus, search, train, serve_load, device,
profile), over the pieces in `common`. Each prints its figures and returns them; none is imported by the
library itself."""
