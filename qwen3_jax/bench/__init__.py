"""`qwen3-jax bench`: one module a benchmark (encode, corpus, train, serve_load, device), over the pieces
in `common`. Each prints its figures and returns them; none is imported by the library itself."""
