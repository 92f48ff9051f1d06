"""The qwen3-jax command line: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from qwen3_jax.arguments import Parser, add_settings, debug_parent, settings_from
from qwen3_jax.backend import COMPUTE_DTYPES, DTYPE_HELP, resolve_dtype
from qwen3_jax.backend import IMPLEMENTATIONS as ATTENTION
from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.compile_cache import enable_compilation_cache, use_default_compilation_cache
from qwen3_jax.config import PRESETS
from qwen3_jax.serve.settings import ServeSettings
from qwen3_jax.textio import counted as _counted


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--attention", default="auto", choices=ATTENTION)
    _mesh_options(parser)
    _distributed(parser)
    _compile_cache(parser)
    parser.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error, not a warning")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal anyway)")


def _mesh_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2")
    parser.add_argument("--fsdp", action="store_true", help="also split parameters over the data axis")


def _compile_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-cache", default=None, metavar="DIR|off",
                        help="folder of JAX's persistent compilation cache, so a rerun compiles nothing (default "
                             "~/.cache/qwen3-jax/xla, env QWEN3_JAX_COMPILE_CACHE; off: none)")


def _distributed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        help="multi-process: host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                        help="multi-process: how many processes (env JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                        help="multi-process: this process's rank (env JAX_PROCESS_ID)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process job found from the environment (TPU pod slices)")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    """`train`'s flags: TrainConfig's fields and its objective's, optimizer's and LoRA's (see
    `arguments.setting` and `arguments.nested`: --full beside --lora-rank), and the flags every sharded,
    compiling, multi-process command shares."""
    from qwen3_jax.train.config import TrainConfig

    add_settings(parser, TrainConfig, required=("length",))
    _mesh_options(parser)
    _compile_cache(parser)
    _distributed(parser)


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    """`qwen3-jax bench BENCHMARK`: one sub-command a benchmark, each with its own options."""
    parents = [debug_parent()]
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    written = argparse.ArgumentParser(add_help=False)
    written.add_argument("--json", help="also write the figures to this file")

    def benchmark(name: str, help: str, model: bool = True):
        """A benchmark's parser, and the (required) group of its --model / --random where it takes a `model`."""
        parser = kinds.add_parser(name, parents=[*parents, written], help=help)
        which = None
        if model:
            which = parser.add_mutually_exclusive_group(required=True)
            which.add_argument("--model", help="checkpoint folder or hub id")
            which.add_argument("--random", choices=["tiny", "0.6B", "4B", "8B"],
                               help="random weights of a published shape (or the tests' tiny one)")
            parser.add_argument("--layers", type=int, default=None, help="with --random: fewer layers")
            _tokenizer(parser)
        return parser, which

    encode, which = benchmark("encode", "our encode against sentence-transformers on the same texts, or a suite of "
                              "them")
    which.add_argument("--suite", choices=["gpu", "mixes"],
                       help="gpu: bf16 0.6B and 4B, batch 32 and 128, 512 tokens; "
                            "mixes: 0.6B at --dtype on texts of 5-30, 80-185 and 512 tokens and a 10-4,000 long tail")
    _dtype(encode)
    encode.add_argument("--input", help="a .txt or .jsonl of your own texts to time (instead of synthetic ones)")
    encode.add_argument("--texts", type=int, default=None, help="how many texts (default: 32, or all of --input)")
    _token_mix(encode)
    encode.add_argument("--batch-size", type=int, default=32)
    _repeats(encode)
    encode.add_argument("--attention", default="auto", choices=ATTENTION)
    _no_reference(encode)

    train, _ = benchmark("train", "training steps (8 queries x 1+3 documents of 256 tokens) against "
                      "sentence-transformers (torch, peft)")
    _dtype(train)
    train.add_argument("--configs", default=None,
                       help="some of the rows, separated by ';', e.g. 'full, remat;LoRA r=16' (default: all)")
    _repeats(train)
    _no_reference(train)

    serve, _ = benchmark("serve", "load-test `qwen3-jax serve` (and Infinity, with --infinity) on loopback at --levels")
    _dtype(serve)
    serve.add_argument("--infinity", default=os.environ.get("QWEN3_JAX_INFINITY"),
                       help="the infinity_emb executable of its own virtual environment (env QWEN3_JAX_INFINITY)")
    serve.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    serve.add_argument("--requests", type=int, default=60, help="at most this many requests a level")
    serve.add_argument("--seconds", type=float, default=180, help="at most this long a level")
    serve.add_argument("--max-batch-tokens", type=int, default=None, help="the server's batch budget")
    serve.add_argument("--instruction", default=None,
                       help="every query in Qwen3's instruction format with this task; ours also runs with "
                            "--no-share-prefixes (as it served before shared prefixes)")
    serve.add_argument("--soak", type=int, default=None, metavar="N",
                       help="instead: send N mixed requests (within --seconds) and report the server's RSS after "
                            "warm-up, at its peak and at the end, and latency drift")

    corpus, _ = benchmark("corpus", "embed-corpus on synthetic texts (long-tail lengths over --tokens), its resume "
                       "check, and exact search")
    _dtype(corpus)
    corpus.add_argument("--texts", type=int, required=True, metavar="N", help="texts to embed")
    corpus.add_argument("--tokens", default="80-185", help="texts of MIN-MAX tokens, <|endoftext|> included")
    corpus.add_argument("--batch-size", type=int, default=32)
    corpus.add_argument("--search-vectors", type=int, default=1_000_000,
                        help="random float16 vectors the 1,000 search queries scan (0: no search)")

    search, _ = benchmark("search", "no model: exact, approximate (--ann-kinds) and quantized search over synthetic "
                          "vectors", model=False)
    search.add_argument("--vectors", type=int, required=True, metavar="N", help="synthetic vectors to search")
    search.add_argument("--width", type=int, default=1024, help="the vectors' width")
    search.add_argument("--ann-kinds", default="hnsw,ivf-pq", help="approximate indexes to build")
    search.add_argument("--quantized", default="int8,binary", help="quantized storages to compare")
    search.add_argument("--ann-ef", default="", help="also search at these ef values, e.g. 128,256 (default: none)")

    device, _ = benchmark("device", "every check a lent accelerator is for, in one run (the packed kernel, the "
                          "mixes with it and with cuDNN, the 512-token suite, training, the server; docs/gpu.md)",
                          model=False)
    device.add_argument("--layers", type=int, default=None, help="fewer layers of each shape (a rehearsal: 1)")
    _tokenizer(device)
    device.add_argument("--texts", type=int, default=None,
                        help="a rehearsal of N texts a part (on a CPU: 8); default: the device run's sizes")
    _repeats(device)

    prefixes, _ = benchmark("prefixes", "the workloads whose texts share a prefix: queries with the card's "
                            "instruction against sentence-transformers, one query against --texts documents with "
                            "the reranker against the model card's transformers code", model=False)
    prefixes.add_argument("--random", choices=["tiny", "0.6B", "4B", "8B"], default="0.6B",
                          help="random weights of this published shape (an embedder's and a reranker's)")
    prefixes.add_argument("--layers", type=int, default=8, help="fewer layers (0: all)")
    _tokenizer(prefixes)
    _dtype(prefixes)
    prefixes.add_argument("--texts", type=int, default=64, help="queries, and documents for the one query")
    _repeats(prefixes)
    prefixes.add_argument("--attention", default="auto", choices=ATTENTION)

    profile, _ = benchmark("profile", "where one decoder layer's time goes, stage by stage, from XLA's profiler (one "
                        "batch of the --tokens mix, at --dtype)")
    _dtype(profile)
    profile.add_argument("--texts", type=int, default=None, help="how many texts (default: 32)")
    _token_mix(profile)
    profile.add_argument("--batch-size", type=int, default=32)
    _repeats(profile)
    profile.add_argument("--attention", default="auto", choices=ATTENTION)


def _tokenizer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=os.environ.get("QWEN3_TOKENIZER_DIR"),
                        help="folder of a Qwen3 tokenizer.json for random weights (env QWEN3_TOKENIZER_DIR; "
                             "default: a small built-in one)")


def _dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)


def _token_mix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="80-185",
                        help="synthetic texts of N or MIN-MAX tokens each, <|endoftext|> included")
    parser.add_argument("--long-tail", action="store_true", help="log-uniform lengths over --tokens (many short, "
                        "few long)")


def _repeats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement")


def _no_reference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")


def _embed_arguments(embed: argparse.ArgumentParser) -> None:
    _common(embed)
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="texts to embed")
    source.add_argument("--input", help=".txt (one text a line), .jsonl, .parquet, a folder of them, or - (stdin, "
                        "one text a line), read as embed-corpus reads it: blank lines skipped, ids NAME:LINE")
    embed.add_argument("--output", help=".npy or .jsonl; default: JSON lines on stdout")
    prompt = embed.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", help="task instruction for queries")
    prompt.add_argument("--prompt-name", help="a prompt of config_sentence_transformers.json, e.g. query")
    embed.add_argument("--dim", type=int, default=None, help="MRL output dimension")
    embed.add_argument("--text-field", default="text", help=".jsonl / Parquet: the text's field")
    embed.add_argument("--id-field", default="id", help=".jsonl / Parquet: the id's field (none: NAME:LINE)")


def _rerank_arguments(rerank: argparse.ArgumentParser) -> None:
    _common(rerank)
    rerank.add_argument("--query", required=True, help="the query the documents are scored against")
    rerank.add_argument("--input", required=True, help=".txt, .jsonl, .parquet, a folder of them, or - (stdin): the "
                        "documents, read as embed-corpus reads them (blank lines skipped, ids NAME:LINE)")
    rerank.add_argument("--top-k", type=int, default=None, help="print only the K best documents (default: all)")
    rerank.add_argument("--instruction", default=None, help="task instruction (default: web search)")


def _convert_arguments(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("source", help="Hugging Face folder, hub id, or Orbax folder made by this command")
    convert.add_argument("destination", help="output folder (written elsewhere first, renamed at the end)")
    convert.add_argument("--to", required=True, choices=["orbax", "hf"], help="the format to write")
    convert.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                         help="stored dtype (default: keep the source's)")
    convert.add_argument("--max-shard-size", default="5GB", help="--to hf: split files above this size")
    convert.add_argument("--mesh", default=None, help="shard while converting, e.g. model=2")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error")


def _embed_corpus_arguments(corpus: argparse.ArgumentParser) -> None:
    corpus.add_argument("--model", required=True, help="checkpoint folder or hub id")
    corpus.add_argument("--input", required=True, help=".txt, .jsonl, .parquet, or a folder of them")
    corpus.add_argument("--output", required=True, help="folder for the shards and manifests")
    corpus.add_argument("--text-field", default="text", help=".jsonl / Parquet: the text's field")
    corpus.add_argument("--id-field", default="id", help=".jsonl / Parquet: the id's field (none: NAME:LINE)")
    prompt = corpus.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", help="task instruction (for a corpus of queries; documents take none)")
    prompt.add_argument("--prompt-name", help="a prompt of config_sentence_transformers.json")
    corpus.add_argument("--dim", type=int, default=None, help="MRL output dimension")
    corpus.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    corpus.add_argument("--output-dtype", default="float32", choices=["float32", "float16", "int8", "binary"],
                        help="how vectors are stored: int8 (ranges calibrated on the input) or binary (sign bits) "
                             "as sentence-transformers' quantize_embeddings writes them")
    corpus.add_argument("--shard-size", type=int, default=10_000, help="records per output shard")
    corpus.add_argument("--batch-size", type=int, default=32)
    corpus.add_argument("--max-length", type=int, default=None)
    corpus.add_argument("--mesh", default=None, help="mesh over this process's devices, e.g. data=8")
    corpus.add_argument("--engine", default="local", choices=["local", "ray"],
                        help="ray: Ray workers, one model each, embed whole shards (pip install \"qwen3-jax[ray]\")")
    corpus.add_argument("--ray-address", default=None, help="--engine ray: the cluster (default: start one here)")
    corpus.add_argument("--workers", type=int, default=2, help="--engine ray: workers, one model each")
    corpus.add_argument("--gpus-per-worker", type=float, default=0, help="--engine ray: 1 on GPU nodes")
    corpus.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES") or 1,
                        help="split the job over this many independent processes (env JAX_NUM_PROCESSES)")
    corpus.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID") or 0,
                        help="this process's part, 0..N-1 (env JAX_PROCESS_ID)")
    corpus.add_argument("--skip-bad", action="store_true", help="write unreadable lines to rejects.jsonl and go on")
    again = corpus.add_mutually_exclusive_group()
    again.add_argument("--update", action="store_true",
                       help="the input changed: embed only the shards whose records changed and the new ones")
    again.add_argument("--overwrite", action="store_true", help="start again, replacing the folder's corpus")
    corpus.add_argument("--quiet", action="store_true", help="no progress bar")
    _compile_cache(corpus)


def _search_arguments(search: argparse.ArgumentParser) -> None:
    search.add_argument("--index", required=True, help="folder written by embed-corpus")
    asked = search.add_mutually_exclusive_group(required=True)
    asked.add_argument("--query", nargs="+", help="query texts")
    asked.add_argument("--queries", help=".txt, .jsonl, .parquet or - (stdin) of queries, read as embed-corpus "
                       "reads them (blank lines skipped, ids NAME:LINE; --query texts: query:N)")
    prompt = search.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", help="task instruction for the queries")
    prompt.add_argument("--prompt-name", help="a prompt of config_sentence_transformers.json, e.g. query")
    search.add_argument("--top-k", type=int, default=10, help="hits per query")
    search.add_argument("--ann", action="store_true", help="take the candidates from the approximate index "
                        "(qwen3-jax build-ann), then score them exactly")
    search.add_argument("--ef", type=int, default=None,
                        help="--ann: candidates looked at per query (hnsw) or lists probed (ivf-pq)")
    search.add_argument("--model", default=None, help="embed the queries with this model (default: the index's)")
    search.add_argument("--show-text", action="store_true",
                        help="give each hit its text, read back from the corpus's input (refused if it changed since)")
    search.add_argument("--batch-size", type=int, default=32)
    _compile_cache(search)


def _build_ann_arguments(build_ann: argparse.ArgumentParser) -> None:
    build_ann.add_argument("--index", required=True, help="folder written by embed-corpus")
    build_ann.add_argument("--kind", default=None, choices=["hnsw", "ivf-pq"],
                           help="HNSW graph (default) or IVF-PQ codes (smaller, coarser)")
    build_ann.add_argument("--metric", default=None, choices=["ip", "l2"], help="default ip")
    build_ann.add_argument("--m", type=int, default=None, help="hnsw: links per vector (default 32)")
    build_ann.add_argument("--ef-construction", type=int, default=None,
                           help="hnsw: candidates kept while linking (default 100)")
    build_ann.add_argument("--ef-search", type=int, default=None,
                           help="default --ef of searches: hnsw candidates (64), ivf-pq lists probed (64)")
    build_ann.add_argument("--lists", type=int, default=None, help="ivf-pq: inverted lists (default 4 * sqrt(vectors))")
    build_ann.add_argument("--code-bytes", type=int, default=None, help="ivf-pq: bytes a vector (default dim / 16)")
    build_ann.add_argument("--quiet", action="store_true")


def _eval_arguments(evaluation: argparse.ArgumentParser) -> None:
    evaluation.add_argument("--model", required=True, help="checkpoint folder or hub id")
    evaluation.add_argument("--data", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels/test.tsv")
    evaluation.add_argument("--split", default="test", help="qrels/SPLIT.tsv (default test)")
    evaluation.add_argument("--instruction", default=None, help="task instruction for the queries")
    evaluation.add_argument("--dim", type=int, default=None, help="MRL output dimension")
    evaluation.add_argument("--top-k", type=int, default=100, help="documents retrieved per query")
    evaluation.add_argument("--rerank", type=int, default=0, help="rescore each query's first R hits with --reranker")
    evaluation.add_argument("--reranker", default=None, help="Qwen3-Reranker folder or hub id (with --rerank)")
    evaluation.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    evaluation.add_argument("--batch-size", type=int, default=32)
    evaluation.add_argument("--output", default=None, help="also write the figures to this .json file")
    _compile_cache(evaluation)


def _export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("checkpoint", help="OUTPUT/checkpoints/checkpoint_N of a qwen3-jax train run")
    export.add_argument("destination", help="merged Hugging Face folder to write")
    export.add_argument("--adapter", help="LoRA runs: also write the peft adapter folder here")
    export.add_argument("--overwrite", action="store_true", help="replace existing folders")


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    """`serve`'s flags: ServeSettings's fields (see `arguments.setting`), and the compile cache's."""
    add_settings(serve, ServeSettings)
    _compile_cache(serve)


def _init_random_arguments(init: argparse.ArgumentParser) -> None:
    init.add_argument("output", help="checkpoint folder to write (written elsewhere first, renamed at the end)")
    init.add_argument("--shape", default="tiny", choices=["tiny", *PRESETS],
                      help="tiny (2 layers of width 64, compiles in seconds) or a published size (default tiny)")
    init.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    init.add_argument("--reranker", action="store_true", help="a Qwen3-Reranker (causal LM with an LM head)")
    init.add_argument("--tie-word-embeddings", action="store_true", help="--reranker: the LM head is the embedding")
    init.add_argument("--tokenizer", default=os.environ.get("QWEN3_TOKENIZER_DIR"),
                      help="folder of a Qwen3 tokenizer.json (env QWEN3_TOKENIZER_DIR; default: a small built-in one)")
    init.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="stored dtype")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    init.add_argument("--quiet", action="store_true", help="no progress bar")


def _doctor_arguments(doctor: argparse.ArgumentParser) -> None:
    _compile_cache(doctor)


def _verify_arguments(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("--model", required=True, help="checkpoint folder or hub id")
    verify.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    verify.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error")


PARSERS = {     # each sub-command: its help, and the function that adds its arguments
    "embed": ("embed texts", _embed_arguments),
    "rerank": ("score documents against a query with a Qwen3-Reranker", _rerank_arguments),
    "bench": ("time our encode, training, server, corpus job and search against the tools people use "
              "(docs/benchmarks.md)", _bench_arguments),
    "convert": ("Hugging Face safetensors <-> Orbax checkpoints", _convert_arguments),
    "embed-corpus": ("embed a whole corpus into shards, resumably", _embed_corpus_arguments),
    "search": ("exact top-k search of an embed-corpus folder", _search_arguments),
    "build-ann": ("build (or bring up to date) an approximate index of an embed-corpus folder", _build_ann_arguments),
    "eval": ("score a retrieval set in the BEIR layout (nDCG@10, MAP@100, ...)", _eval_arguments),
    "train": ("fine-tune an embedding model (contrastive) or a reranker", _train_arguments),
    "export": ("a training checkpoint as a Hugging Face (and peft) folder", _export_arguments),
    "serve": ("serve embeddings and reranking over HTTP (OpenAI, TEI, Cohere APIs)", _serve_arguments),
    "init-random": ("write a random-weight checkpoint in the published layout (offline: try every command without "
                    "downloading weights)", _init_random_arguments),
    "doctor": ("this machine's backend and devices, the attention kernel chosen per dtype, each kernel checked "
               "against dense attention here, the compile cache", _doctor_arguments),
    "verify": ("compare one checkpoint in transformers and in qwen3-jax", _verify_arguments),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The qwen3-jax command: a sub-command for each of PARSERS (its help, the function adding its
    arguments), each taking --debug, and `study`. `command`: the sub-command a command line names, the
    only one whose arguments are added (and whose settings' modules are imported, so `qwen3-jax serve`
    imports no training or study code before its first line); None: every sub-command's."""
    parser = Parser(prog="qwen3-jax", description="Qwen3-Embedding / Reranker in JAX")
    parser.add_argument("--version", action="version", version=f"qwen3-jax {version('qwen3-jax')}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help, arguments) in PARSERS.items():
        named = commands.add_parser(name, parents=[debug_parent()], help=help)
        if command in (None, name):
            arguments(named)
    if command in (None, "study"):
        from qwen3_jax.study.cli import add_study_parser

        add_study_parser(commands)
    return parser


def _mesh(args):
    """Joins the multi-process job first when asked, then builds the --mesh over all its devices."""
    from qwen3_jax.sharding import initialize_distributed, make_mesh, mesh_of

    distributed = _joins_job(args)
    if distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        if getattr(args, "dtype", None) == "auto":
            args.dtype = resolve_dtype("auto")
    if args.mesh:
        return mesh_of(args.mesh)
    return make_mesh() if distributed else None


def _joins_job(args) -> bool:
    """Whether this command joins a multi-process JAX job (which must happen before JAX picks its platform)."""
    return bool(getattr(args, "coordinator", None) or getattr(args, "distributed", False))


def _shows_progress(args) -> bool:
    """A progress bar on stderr when it is a terminal and --quiet is not given."""
    return sys.stderr.isatty() and not args.quiet


def _is_writer() -> bool:
    """Only the first process of a multi-process job writes results."""
    import jax

    return jax.process_index() == 0


def run_embed(args) -> None:
    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.corpus import given_texts, read_corpus
    from qwen3_jax.textio import check_output_path, write_embeddings

    if args.output:
        check_output_path(args.output)
    ids, texts = read_corpus(args.input, text_field=args.text_field, id_field=args.id_field) if args.input \
        else given_texts(args.text, "text")
    model = Qwen3Embedder.from_pretrained(args.model, dtype=args.dtype, attention=args.attention,
                                          mesh=_mesh(args), fsdp=args.fsdp, max_length=args.max_length,
                                          strict=args.strict)
    vectors = model.encode(texts, instruction=args.instruction, prompt_name=args.prompt_name, dim=args.dim,
                           batch_size=args.batch_size, show_progress_bar=_shows_progress(args))
    if not _is_writer():
        return
    if args.output:
        write_embeddings(args.output, ids, vectors)
        print(f"wrote {_counted(len(texts), 'embedding')} of dimension {vectors.shape[1]} to {args.output}",
              file=sys.stderr)
    else:
        for record_id, row in zip(ids, vectors):
            print(json.dumps({"id": record_id, "embedding": row.tolist()}))


def run_rerank(args) -> None:
    from qwen3_jax.reranker import Qwen3Reranker
    from qwen3_jax.corpus import read_corpus

    ids, documents = read_corpus(args.input)
    kwargs = {"max_length": args.max_length} if args.max_length else {}
    model = Qwen3Reranker.from_pretrained(args.model, dtype=args.dtype, attention=args.attention,
                                          mesh=_mesh(args), fsdp=args.fsdp, strict=args.strict, **kwargs)
    hits = model.rank(args.query, documents, top_k=args.top_k, instruction=args.instruction,
                      batch_size=args.batch_size, show_progress_bar=_shows_progress(args))
    for hit in hits if _is_writer() else []:
        print(json.dumps({"id": ids[hit["index"]], "score": hit["score"], "text": hit["document"]},
                         ensure_ascii=False))


def _listed(words: str) -> list[str]:
    return [word for word in words.split(",") if word]


def _source(args) -> dict:
    """The checkpoint a benchmark times: --model, or --random weights of --layers with --tokenizer."""
    return {"model": args.model, "random": args.random, "layers": args.layers, "tokenizer": args.tokenizer}


def bench_encode(args):
    from qwen3_jax.bench.encode import run_benchmark, run_mixes, run_suite

    if args.suite == "mixes":
        return run_mixes(tokenizer=args.tokenizer, layers=args.layers, dtype=args.dtype, texts=args.texts,
                         batch_size=args.batch_size, repeats=args.repeats, attention=args.attention)
    if args.suite == "gpu":
        return run_suite(tokenizer=args.tokenizer, layers=args.layers, repeats=args.repeats, attention=args.attention)
    return run_benchmark(**_source(args), dtype=args.dtype, texts=args.texts, tokens=args.tokens,
                         long_tail=args.long_tail, input=args.input, batch_size=args.batch_size, repeats=args.repeats,
                         attention=args.attention, reference=not args.no_reference)


def bench_train(args):
    from qwen3_jax.bench.train import run_train_benchmark

    return run_train_benchmark(**_source(args), repeats=args.repeats, reference=not args.no_reference,
                               dtype=args.dtype, configs=args.configs.split(";") if args.configs else None)


def bench_serve(args):
    import tempfile

    from qwen3_jax.bench.common import bench_checkpoint
    from qwen3_jax.bench.serve_load import run_serve_benchmark, soak

    levels = [int(level) for level in args.levels.split(",")]
    with bench_checkpoint(**_source(args), out=print) as folder, \
            tempfile.TemporaryDirectory(prefix="qwen3-jax-serve-") as scratch:
        if args.soak:
            return soak(Path(folder), requests=args.soak, max_seconds=args.seconds, dtype=args.dtype,
                        scratch=Path(scratch))
        return run_serve_benchmark(Path(folder), infinity=args.infinity, dtype=args.dtype, levels=levels,
                                   max_requests=args.requests, max_seconds=args.seconds,
                                   max_batch_tokens=args.max_batch_tokens, scratch=Path(scratch),
                                   instruction=args.instruction)


def bench_corpus(args):
    from qwen3_jax.bench.corpus import run_corpus_benchmark

    return run_corpus_benchmark(**_source(args), dtype=args.dtype, documents=args.texts, tokens=args.tokens,
                                batch_size=args.batch_size, search_vectors=args.search_vectors)


def bench_search(args):
    from qwen3_jax.bench.search import run_search_benchmark

    return run_search_benchmark(vectors=args.vectors, width=args.width, kinds=_listed(args.ann_kinds),
                                quantized=_listed(args.quantized), efs=[int(ef) for ef in _listed(args.ann_ef)])


def bench_device(args):
    from qwen3_jax.bench.device import run_device_suite

    return run_device_suite(tokenizer=args.tokenizer, layers=args.layers, repeats=args.repeats, texts=args.texts,
                            json_path=args.json)


def bench_profile(args):
    from qwen3_jax.bench.profile import run_profile

    return run_profile(**_source(args), dtype=args.dtype, texts=args.texts, tokens=args.tokens,
                       long_tail=args.long_tail, batch_size=args.batch_size, repeats=args.repeats,
                       attention=args.attention)


def bench_prefixes(args):
    from qwen3_jax.bench.prefixes import run_prefix_workloads

    return run_prefix_workloads(random=args.random, layers=args.layers or None, tokenizer=args.tokenizer,
                                dtype=args.dtype, texts=args.texts, repeats=args.repeats, attention=args.attention)


BENCHMARKS = {"prefixes": bench_prefixes, "encode": bench_encode, "train": bench_train, "serve": bench_serve, "corpus": bench_corpus,
              "search": bench_search, "device": bench_device, "profile": bench_profile}


def run_bench(args) -> None:
    result = BENCHMARKS[args.benchmark](args)
    if args.json:
        from qwen3_jax.textio import atomic_output

        with atomic_output(args.json) as handle:
            json.dump(result, handle, indent=2)


def run_convert(args) -> None:
    from qwen3_jax.convert import convert
    from qwen3_jax.hub import resolve_model
    from qwen3_jax.sharding import mesh_of

    mesh = mesh_of(args.mesh)
    done = convert(resolve_model(args.source), args.destination, to=args.to, dtype=args.dtype,
                   max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, strict=args.strict, mesh=mesh)
    print(f"wrote {done}", file=sys.stderr)


def run_embed_corpus(args) -> None:
    import jax

    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.corpus import ANN_FOLDER, check_folder_free, check_input, embed_corpus
    from qwen3_jax.sharding import mesh_of

    check_input(args.input, args.output, text_field=args.text_field, id_field=args.id_field)   # before the model loads
    check_folder_free(args.output, args.process_id, args.num_processes)   # another job's: refused at once
    model = engine = None
    if args.engine == "ray":
        from qwen3_jax.corpus import RayEngine

        if args.mesh:
            raise UsageError("--mesh shards one process's model; with --engine ray each worker holds its own")
        whole_number(args.workers, "--workers")
        engine = RayEngine(args.model, workers=args.workers, address=args.ray_address, dtype=args.dtype,
                           max_length=args.max_length, batch_size=args.batch_size, num_gpus=args.gpus_per_worker)
    else:
        mesh = mesh_of(args.mesh, devices=jax.local_devices())
        model = Qwen3Embedder.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, max_length=args.max_length)
    manifest = embed_corpus(model, args.input, args.output, instruction=args.instruction, prompt_name=args.prompt_name,
                            dim=args.dim, output_dtype=args.output_dtype, text_field=args.text_field,
                            id_field=args.id_field, shard_size=args.shard_size, batch_size=args.batch_size,
                            process=args.process_id, num_processes=args.num_processes, quiet=args.quiet,
                            skip_bad=args.skip_bad, update=args.update, overwrite=args.overwrite, engine=engine,
                            model_name=args.model, dtype=args.dtype, out=lambda message: print(message, file=sys.stderr))
    count = sum(entry["count"] for entry in manifest["shards"])
    print(f"{args.output}: {_counted(count, 'embedding')} in {_counted(len(manifest['shards']), 'shard')} "
          f"(process {args.process_id})",
          file=sys.stderr)
    if args.update and args.num_processes == 1 and (Path(args.output) / ANN_FOLDER).is_dir():
        from qwen3_jax.ann import build_ann
        from qwen3_jax.index import Index

        record = build_ann(Index.open(args.output), quiet=args.quiet)
        print(f"{args.output}: approximate index brought up to date ({_counted(record['vectors'], 'vector')})",
              file=sys.stderr)


def run_build_ann(args) -> None:
    import dataclasses

    from qwen3_jax.ann import AnnSettings, ApproximateIndex, build_ann
    from qwen3_jax.index import Index

    index = Index.open(args.index)
    existing = ApproximateIndex.load(index.folder)
    given = {"kind": args.kind, "metric": args.metric, "m": args.m, "ef_construction": args.ef_construction,
             "ef_search": args.ef_search, "lists": args.lists, "code_bytes": args.code_bytes}
    # what is not given stays as the existing index has it (so a rerun only brings it up to date)
    settings = dataclasses.replace(existing.settings if existing else AnnSettings(),
                                   **{name: value for name, value in given.items() if value is not None})
    begun = time.perf_counter()
    record = build_ann(index, settings, quiet=args.quiet)
    print(f"{args.index}: {settings.kind} index of {_counted(record['vectors'], 'vector')} in "
          f"{time.perf_counter() - begun:.1f} s", file=sys.stderr)


def run_search(args) -> None:
    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.corpus import given_texts, read_corpus
    from qwen3_jax.index import Index

    index = Index.open(args.index)
    if args.show_text:
        index.check_texts()                        # before any work
    ids, queries = read_corpus(args.queries) if args.queries else given_texts(args.query, "query")
    settings = index.settings
    model = Qwen3Embedder.from_pretrained(index.query_model(args.model), dtype=settings["dtype"])
    vectors = model.encode(queries, instruction=args.instruction, prompt_name=args.prompt_name, dim=index.dim,
                           batch_size=args.batch_size)
    scores, hits = index.search(vectors, args.top_k, approximate=args.ann, ef=args.ef)
    texts = index.texts({i for row in hits for i in row}) if args.show_text else {}
    for query_id, query, row_scores, row_ids in zip(ids, queries, scores, hits):
        print(json.dumps({"id": query_id, "query": query,
                          "hits": [{"id": i, "score": float(s), **({"text": texts[i]} if texts else {})}
                                   for i, s in zip(row_ids, row_scores)]},
                         ensure_ascii=False))


def run_eval(args) -> None:
    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.evaluation import evaluate_beir, print_table
    from qwen3_jax.reranker import Qwen3Reranker
    from qwen3_jax.textio import atomic_output

    if args.rerank and not args.reranker:
        raise UsageError("--rerank R needs --reranker MODEL")
    if args.output and not args.output.endswith(".json"):
        raise UsageError(f"--output {args.output} must end in .json")
    model = Qwen3Embedder.from_pretrained(args.model, dtype=args.dtype)
    reranker = Qwen3Reranker.from_pretrained(args.reranker, dtype=args.dtype) if args.reranker else None
    results = evaluate_beir(model, args.data, instruction=args.instruction, dim=args.dim, top_k=args.top_k,
                            reranker=reranker, rerank=args.rerank, batch_size=args.batch_size, split=args.split)
    print_table(results)
    if args.output:
        with atomic_output(args.output) as handle:
            json.dump({"model": args.model, "data": args.data, "reranker": args.reranker, "rerank": args.rerank,
                       "instruction": args.instruction, "dim": args.dim, "metrics": results}, handle, indent=2)


def run_train(args) -> None:
    from qwen3_jax.train.run import TrainConfig, train

    config = settings_from(TrainConfig, args, fsdp=args.fsdp)
    train(config, mesh=_mesh(args), out=lambda message: print(message, file=sys.stderr))


def run_export(args) -> None:
    from qwen3_jax.train.run import export_checkpoint

    for name, folder in export_checkpoint(args.checkpoint, args.destination, adapter=args.adapter,
                                          overwrite=args.overwrite).items():
        print(f"wrote {name}: {folder}", file=sys.stderr)


def run_serve(args) -> int:
    from qwen3_jax.serve.server import serve

    if args.mesh:                                # JAX is imported only then: the first line comes sooner
        from qwen3_jax.sharding import mesh_of

        mesh = mesh_of(args.mesh)
    else:
        mesh = None
    return serve(settings_from(ServeSettings, args), mesh=mesh,
                 out=lambda message: print(message, file=sys.stderr, flush=True))


def run_init_random(args) -> None:
    from qwen3_jax.init_random import write_random_checkpoint

    folder = write_random_checkpoint(args.output, args.shape, layers=args.layers, reranker=args.reranker,
                                     tie_word_embeddings=args.tie_word_embeddings, tokenizer=args.tokenizer,
                                     dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
                                     progress=_shows_progress(args))
    kind = "Qwen3-Reranker" if args.reranker else "Qwen3-Embedding"
    print(f"wrote a random-weight {kind} checkpoint of the {args.shape} shape to {folder}", file=sys.stderr)


def run_doctor(args) -> int:
    from qwen3_jax.doctor import doctor

    return doctor()


def run_study(args) -> None:
    from qwen3_jax.study.cli import run_study as study

    study(args)


def run_verify(args) -> int:
    from qwen3_jax.verify import verify

    return verify(args.model, dtype=args.dtype, strict=args.strict)


COMMANDS = {"embed": run_embed, "embed-corpus": run_embed_corpus, "build-ann": run_build_ann, "search": run_search,
            "rerank": run_rerank, "eval": run_eval, "train": run_train, "export": run_export, "bench": run_bench,
            "convert": run_convert,
            "verify": run_verify, "init-random": run_init_random, "serve": run_serve, "doctor": run_doctor,
            "study": run_study}


def convert_to(to: str, argv: list[str], script: str) -> int:
    """`qwen3-jax convert ARGV --to TO` for the convert/ scripts, whose direction is their name: a --to
    of the user's is refused (exit 2), never silently overridden."""
    if any(arg == "--to" or arg.startswith("--to=") for arg in argv):
        other = "orbax_to_hf.py" if to == "orbax" else "hf_to_orbax.py"
        print(f"{script}: error: it always writes {'Orbax' if to == 'orbax' else 'a Hugging Face folder'}; "
              f"drop --to (the other way is convert/{other}, or qwen3-jax convert SOURCE DESTINATION --to ...)",
              file=sys.stderr)
        return 2
    return main(["convert", *argv, "--to", to])


# bench's modes before they were sub-commands: the flag, and the command line that replaced it.
BENCH_BEFORE = {"--model": "bench encode --model", "--random": "bench encode --random",
                "--suite": "bench encode --suite gpu|mixes, or bench device", "--train": "bench train",
                "--train-configs": "bench train --configs", "--serve": "bench serve", "--profile": "bench profile",
                "--corpus": "bench corpus --texts N", "--search": "bench search --vectors N"}


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    before = given[1].split("=")[0] if given[:1] == ["bench"] and len(given) > 1 else None
    if before in BENCH_BEFORE:
        print(f"qwen3-jax bench: error: bench {before} is now `qwen3-jax {BENCH_BEFORE[before]}` (see qwen3-jax "
              "bench --help)", file=sys.stderr)
        return 2
    named = given[0] if given and (given[0] in PARSERS or given[0] == "study") else None
    args = build_parser(named).parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("qwen3-jax: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        if getattr(args, "dtype", None) == "auto" and not _joins_job(args):
            args.dtype = resolve_dtype("auto")     # a job's processes resolve it once they have joined (_mesh)
        if getattr(args, "compile_cache", None):
            enable_compilation_cache(args.compile_cache)
        elif args.command == "bench":
            enable_compilation_cache("off")          # it measures compile times
        else:
            use_default_compilation_cache()
        status = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("qwen3-jax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`qwen3-jax embed ... | head`): stop quietly, as `yes | head` does, with
        # stdout pointed at /dev/null so that Python's own flush at exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UsageError as err:
        if args.debug:
            traceback.print_exc()
        print(f"qwen3-jax: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback under --debug
        if args.debug:
            traceback.print_exc()
        print(f"qwen3-jax: error: {err}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
