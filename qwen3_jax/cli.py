"""The qwen3-jax command line: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


ATTENTION = ("auto", "dense", "blockwise", "cudnn", "splash")   # qwen3_jax.attention.IMPLEMENTATIONS


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--attention", default="auto", choices=ATTENTION)
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2")
    parser.add_argument("--fsdp", action="store_true", help="also split parameters over the data axis")
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        help="multi-process: host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                        help="multi-process: how many processes (env JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                        help="multi-process: this process's rank (env JAX_PROCESS_ID)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process job found from the environment (TPU pod slices)")
    parser.add_argument("--compile-cache", default=None,
                        help="folder for JAX's persistent compilation cache (env JAX_COMPILATION_CACHE_DIR)")
    parser.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error, not a warning")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3-jax", description="Qwen3-Embedding / Reranker in JAX")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed texts")
    _common(embed)
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="texts to embed")
    source.add_argument("--input", help=".txt (one text a line) or .jsonl with a text field")
    embed.add_argument("--output", help=".npy or .jsonl; default: JSON lines on stdout")
    prompt = embed.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", help="task instruction for queries")
    prompt.add_argument("--prompt-name", help="a prompt of config_sentence_transformers.json, e.g. query")
    embed.add_argument("--dim", type=int, default=None, help="MRL output dimension")

    rerank = commands.add_parser("rerank", help="score documents against a query with a Qwen3-Reranker")
    _common(rerank)
    rerank.add_argument("--query", required=True)
    rerank.add_argument("--input", required=True, help=".txt or .jsonl of documents")
    rerank.add_argument("--top-k", type=int, default=None)
    rerank.add_argument("--instruction", default=None, help="task instruction (default: web search)")

    bench = commands.add_parser("bench", help="time our encode against sentence-transformers")
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder or hub id")
    which.add_argument("--random", choices=["0.6B", "4B", "8B"], help="random weights of a published shape")
    which.add_argument("--suite", choices=["gpu"], help="gpu: bf16 0.6B and 4B, batch 32 and 128, 512 tokens")
    bench.add_argument("--layers", type=int, default=None, help="with --random: fewer layers")
    bench.add_argument("--tokenizer", default=os.environ.get("QWEN3_TOKENIZER_DIR"),
                       help="with --random: folder of a Qwen3 tokenizer.json (env QWEN3_TOKENIZER_DIR)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    bench.add_argument("--input", help="a .txt or .jsonl of your own texts to time (instead of synthetic ones)")
    bench.add_argument("--texts", type=int, default=None, help="how many texts (default: 32, or all of --input)")
    bench.add_argument("--tokens", default="80-185",
                       help="synthetic texts of N or MIN-MAX tokens each, <|endoftext|> included")
    bench.add_argument("--long-tail", action="store_true", help="log-uniform lengths over --tokens (many short, few long)")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--attention", default="auto", choices=ATTENTION)
    bench.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")
    bench.add_argument("--json", help="also write the figures to this file")
    bench.add_argument("--debug", action="store_true")

    convert = commands.add_parser("convert", help="Hugging Face safetensors <-> Orbax checkpoints")
    convert.add_argument("source", help="Hugging Face folder, hub id, or Orbax folder made by this command")
    convert.add_argument("destination", help="output folder (written elsewhere first, renamed at the end)")
    convert.add_argument("--to", required=True, choices=["orbax", "hf"])
    convert.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                         help="stored dtype (default: keep the source's)")
    convert.add_argument("--max-shard-size", default="5GB", help="--to hf: split files above this size")
    convert.add_argument("--mesh", default=None, help="shard while converting, e.g. model=2")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error")
    convert.add_argument("--debug", action="store_true")

    verify = commands.add_parser("verify", help="compare one checkpoint in transformers and in qwen3-jax")
    verify.add_argument("--model", required=True, help="checkpoint folder or hub id")
    verify.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    verify.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error")
    verify.add_argument("--debug", action="store_true")
    return parser


def _mesh(args):
    """Joins the multi-process job first when asked, then builds the --mesh over all its devices."""
    from qwen3_jax.sharding import initialize_distributed, make_mesh, parse_mesh

    if args.coordinator or args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if not args.mesh:
        return make_mesh() if args.coordinator or args.distributed else None
    return make_mesh(**parse_mesh(args.mesh))


def _is_writer() -> bool:
    """Only the first process of a multi-process job writes results."""
    import jax

    return jax.process_index() == 0


def run_embed(args) -> None:
    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.textio import check_output_path, read_texts, write_embeddings

    if args.output:
        check_output_path(args.output)
    ids, texts = read_texts(args.input) if args.input else (list(range(len(args.text))), args.text)
    model = Qwen3Embedder.from_pretrained(args.model, dtype=args.dtype, attention=args.attention,
                                          mesh=_mesh(args), fsdp=args.fsdp, max_length=args.max_length,
                                          strict=args.strict)
    vectors = model.encode(texts, instruction=args.instruction, prompt_name=args.prompt_name, dim=args.dim,
                           batch_size=args.batch_size)
    if not _is_writer():
        return
    if args.output:
        write_embeddings(args.output, ids, vectors)
        print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {args.output}", file=sys.stderr)
    else:
        for record_id, row in zip(ids, vectors):
            print(json.dumps({"id": record_id, "embedding": [round(float(x), 7) for x in row]}))


def run_rerank(args) -> None:
    from qwen3_jax.reranker import Qwen3Reranker
    from qwen3_jax.textio import read_texts

    ids, documents = read_texts(args.input, skip_blank=True)
    kwargs = {"max_length": args.max_length} if args.max_length else {}
    model = Qwen3Reranker.from_pretrained(args.model, dtype=args.dtype, attention=args.attention,
                                          mesh=_mesh(args), fsdp=args.fsdp, strict=args.strict, **kwargs)
    hits = model.rank(args.query, documents, top_k=args.top_k, instruction=args.instruction,
                      batch_size=args.batch_size)
    for hit in hits if _is_writer() else []:
        print(json.dumps({"id": ids[hit["index"]], "score": round(hit["score"], 7), "text": hit["document"]},
                         ensure_ascii=False))


def run_bench(args) -> None:
    from qwen3_jax.bench import run_benchmark, run_suite

    if args.suite:
        result = run_suite(tokenizer=args.tokenizer, layers=args.layers, repeats=args.repeats)
    else:
        result = run_benchmark(model=args.model, random=args.random, layers=args.layers, tokenizer=args.tokenizer,
                               dtype=args.dtype, texts=args.texts, tokens=args.tokens, long_tail=args.long_tail,
                               input=args.input, batch_size=args.batch_size, repeats=args.repeats,
                               attention=args.attention, reference=not args.no_reference)
    if args.json:
        from qwen3_jax.textio import atomic_output

        with atomic_output(args.json) as handle:
            json.dump(result, handle, indent=2)


def run_convert(args) -> None:
    from qwen3_jax.convert import convert
    from qwen3_jax.hub import resolve_model
    from qwen3_jax.sharding import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    done = convert(resolve_model(args.source), args.destination, to=args.to, dtype=args.dtype,
                   max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, strict=args.strict, mesh=mesh)
    print(f"wrote {done}", file=sys.stderr)


def run_verify(args) -> int:
    from qwen3_jax.verify import verify

    return verify(args.model, dtype=args.dtype, strict=args.strict)


COMMANDS = {"embed": run_embed, "rerank": run_rerank, "bench": run_bench, "convert": run_convert,
            "verify": run_verify}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("qwen3-jax: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        if getattr(args, "compile_cache", None):
            from qwen3_jax.runner import enable_compilation_cache

            enable_compilation_cache(args.compile_cache)
        status = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("qwen3-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback under --debug
        if args.debug:
            traceback.print_exc()
        print(f"qwen3-jax: error: {err}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
