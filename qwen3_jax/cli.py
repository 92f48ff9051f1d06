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

from qwen3_jax.arguments import Parser
from qwen3_jax.backend import COMPUTE_DTYPES, resolve_dtype
from qwen3_jax.backend import IMPLEMENTATIONS as ATTENTION
from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.compile_cache import enable_compilation_cache, use_default_compilation_cache
from qwen3_jax.config import PRESETS
from qwen3_jax.study.cli import add_study_parser, run_study
from qwen3_jax.textio import counted as _counted


DTYPE_HELP = ("compute dtype (default float32, results equal to transformers'); auto: bfloat16 on GPUs, TPUs and "
              "CPUs with fast bfloat16 products (AMX, AVX-512 BF16), float32 on other CPUs")


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
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


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
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id to start from")
    parser.add_argument("--data", required=True, help="training .jsonl (docs/fine-tuning.md has the line formats)")
    parser.add_argument("--output", required=True, help="run folder: checkpoints, metrics.jsonl, final/, adapter/")
    parser.add_argument("--loss", default="infonce", choices=["infonce", "reranker"],
                        help="infonce: an embedding model, contrastive; reranker: a Qwen3-Reranker's yes/no")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    how.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (alpha / rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA branch")
    parser.add_argument("--lora-targets", default="all-linear",
                        help="all-linear or some of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    parser.add_argument("--hard-negatives", type=int, default=None,
                        help="hard negatives per query (default: the most any line has; fewer are masked)")
    parser.add_argument("--no-batch-negatives", action="store_true",
                        help="only each query's own documents as negatives (ms-swift INFONCE_USE_BATCH=False)")
    parser.add_argument("--include-qq", action="store_true", help="other queries as negatives too")
    parser.add_argument("--include-dd", action="store_true", help="other documents as the positive's negatives")
    parser.add_argument("--false-negative-margin", type=float, default=None,
                        help="leave out negatives more similar than the positive plus this (the report uses 0.1)")
    parser.add_argument("--matryoshka-dims", default=None, help="e.g. 1024,512,256,128: the loss summed over dims")
    parser.add_argument("--instruction", default=None, help="task instruction for queries without their own")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per step over all devices")
    parser.add_argument("--mini-batch-size", type=int, default=None,
                        help="GradCache: embed the step's texts this many at a time (exact gradients)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text, <|endoftext|> included")
    parser.add_argument("--row-length", type=int, default=None,
                        help="pad each step's packed rows to at least this many tokens: steps whose texts fit "
                             "share one compiled program (each new row length compiles the step again)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                        help="learning-rate decay after the warm-up")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps (raised on a finished run: it continues)")
    length.add_argument("--epochs", type=float, help="passes over the data (raised on a finished run: it continues)")
    parser.add_argument("--remat", default="off", choices=["off", "full", "dots"],
                        help="recompute each layer in the backward pass (dots: keep the matrix products)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="compute dtype (auto: bfloat16 where its products are fast); weights and optimizer "
                             "stay float32")
    _mesh_options(parser)
    parser.add_argument("--eval", default=None, help="held-out .jsonl in the same format: recall@1/@10, nDCG@10")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: --save-every)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also write the metrics as TensorBoard events in DIR (pip install \"qwen3-jax[tensorboard]\")")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in --output (its checkpoints included) and start again")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _compile_cache(parser)
    _distributed(parser)
    parser.add_argument("--debug", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwen3-jax", description="Qwen3-Embedding / Reranker in JAX")
    parser.add_argument("--version", action="version", version=f"qwen3-jax {version('qwen3-jax')}")
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed texts")
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

    rerank = commands.add_parser("rerank", help="score documents against a query with a Qwen3-Reranker")
    _common(rerank)
    rerank.add_argument("--query", required=True, help="the query the documents are scored against")
    rerank.add_argument("--input", required=True, help=".txt, .jsonl, .parquet, a folder of them, or - (stdin): the "
                        "documents, read as embed-corpus reads them (blank lines skipped, ids NAME:LINE)")
    rerank.add_argument("--top-k", type=int, default=None, help="print only the K best documents (default: all)")
    rerank.add_argument("--instruction", default=None, help="task instruction (default: web search)")

    bench = commands.add_parser("bench", help="time our encode against sentence-transformers")
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder or hub id")
    which.add_argument("--random", choices=["tiny", "0.6B", "4B", "8B"],
                       help="random weights of a published shape (or the tests' tiny one)")
    which.add_argument("--search", type=int, default=None, metavar="N",
                       help="no model: exact, approximate (--ann-kinds) and quantized search over N synthetic vectors")
    which.add_argument("--suite", choices=["gpu", "mixes", "device"],
                       help="gpu: bf16 0.6B and 4B, batch 32 and 128, 512 tokens; mixes: 0.6B at --dtype on texts of "
                            "5-30, 80-185 and 512 tokens and a 10-4,000 long tail; device: every check a lent GPU "
                            "is for, in one run (the packed kernel, the mixes with it and with cuDNN, training)")
    bench.add_argument("--layers", type=int, default=None, help="with --random: fewer layers")
    bench.add_argument("--tokenizer", default=os.environ.get("QWEN3_TOKENIZER_DIR"),
                       help="with --random: folder of a Qwen3 tokenizer.json (env QWEN3_TOKENIZER_DIR)")
    bench.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    bench.add_argument("--input", help="a .txt or .jsonl of your own texts to time (instead of synthetic ones)")
    bench.add_argument("--texts", type=int, default=None, help="how many texts (default: 32, or all of --input)")
    bench.add_argument("--tokens", default="80-185",
                       help="synthetic texts of N or MIN-MAX tokens each, <|endoftext|> included")
    bench.add_argument("--long-tail", action="store_true", help="log-uniform lengths over --tokens (many short, few long)")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement")
    bench.add_argument("--attention", default="auto", choices=ATTENTION)
    bench.add_argument("--train", action="store_true",
                       help="time training steps (8 queries x 1+3 documents of 256 tokens) against sentence-transformers")
    bench.add_argument("--train-configs", default=None,
                       help="with --train: some of the rows, separated by ';', e.g. 'full, remat;LoRA r=16'")
    bench.add_argument("--corpus", type=int, default=None, metavar="N",
                       help="time embed-corpus on N texts (long-tail lengths over --tokens) and exact search")
    bench.add_argument("--search-vectors", type=int, default=1_000_000,
                       help="with --corpus: random float16 vectors the 1,000 search queries scan (0: no search)")
    bench.add_argument("--width", type=int, default=1024, help="with --search: the vectors' width")
    bench.add_argument("--ann-kinds", default="hnsw,ivf-pq", help="with --search: approximate indexes to build")
    bench.add_argument("--quantized", default="int8,binary", help="with --search: quantized storages to compare")
    bench.add_argument("--ann-ef", default="", help="with --search: also search at these ef values (e.g. 128,256)")
    bench.add_argument("--profile", action="store_true",
                       help="where one decoder layer's time goes, stage by stage, from XLA's profiler (one batch "
                            "of the --tokens mix, at --dtype)")
    bench.add_argument("--serve", action="store_true",
                       help="load-test `qwen3-jax serve` (and Infinity, with --infinity) on loopback at --levels")
    bench.add_argument("--infinity", default=os.environ.get("QWEN3_JAX_INFINITY"),
                       help="with --serve: the infinity_emb executable of its own virtual environment")
    bench.add_argument("--levels", default="1,4,16", help="with --serve: concurrent clients per level")
    bench.add_argument("--requests", type=int, default=60, help="with --serve: at most this many requests a level")
    bench.add_argument("--seconds", type=float, default=180, help="with --serve: at most this long a level")
    bench.add_argument("--max-batch-tokens", type=int, default=None, help="with --serve: the server's batch budget")
    bench.add_argument("--soak", type=int, default=None, metavar="N",
                       help="with --serve: send N mixed requests (within --seconds) and report the server's RSS "
                            "after warm-up, at its peak and at the end, and latency drift")
    bench.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")
    bench.add_argument("--json", help="also write the figures to this file")
    bench.add_argument("--debug", action="store_true")

    convert = commands.add_parser("convert", help="Hugging Face safetensors <-> Orbax checkpoints")
    convert.add_argument("source", help="Hugging Face folder, hub id, or Orbax folder made by this command")
    convert.add_argument("destination", help="output folder (written elsewhere first, renamed at the end)")
    convert.add_argument("--to", required=True, choices=["orbax", "hf"], help="the format to write")
    convert.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                         help="stored dtype (default: keep the source's)")
    convert.add_argument("--max-shard-size", default="5GB", help="--to hf: split files above this size")
    convert.add_argument("--mesh", default=None, help="shard while converting, e.g. model=2")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error")
    convert.add_argument("--debug", action="store_true")

    corpus = commands.add_parser("embed-corpus", help="embed a whole corpus into shards, resumably")
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
    corpus.add_argument("--debug", action="store_true")

    search = commands.add_parser("search", help="exact top-k search of an embed-corpus folder")
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
    search.add_argument("--debug", action="store_true")

    build_ann = commands.add_parser("build-ann", help="build (or bring up to date) an approximate index of an "
                                    "embed-corpus folder")
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
    build_ann.add_argument("--debug", action="store_true")

    evaluation = commands.add_parser("eval", help="score a retrieval set in the BEIR layout (nDCG@10, MAP@100, ...)")
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
    evaluation.add_argument("--debug", action="store_true")

    train = commands.add_parser("train", help="fine-tune an embedding model (contrastive) or a reranker")
    _train_arguments(train)

    export = commands.add_parser("export", help="a training checkpoint as a Hugging Face (and peft) folder")
    export.add_argument("checkpoint", help="OUTPUT/checkpoints/checkpoint_N of a qwen3-jax train run")
    export.add_argument("destination", help="merged Hugging Face folder to write")
    export.add_argument("--adapter", help="LoRA runs: also write the peft adapter folder here")
    export.add_argument("--overwrite", action="store_true", help="replace existing folders")
    export.add_argument("--debug", action="store_true")

    serve = commands.add_parser("serve", help="serve embeddings and reranking over HTTP (OpenAI, TEI, Cohere APIs)")
    serve.add_argument("--model", default=None, help="embedding checkpoint folder or hub id")
    serve.add_argument("--reranker", default=None, help="Qwen3-Reranker folder or hub id (also, or instead)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    serve.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    serve.add_argument("--dim", type=int, default=None, help="MRL dimension of embeddings a request does not size")
    serve.add_argument("--attention", default="auto", choices=ATTENTION)
    _mesh_options(serve)
    serve.add_argument("--max-batch-tokens", type=int, default=None,
                       help="token budget of one batch (default 2048 on the CPU, 16384 on accelerators)")
    serve.add_argument("--max-wait-ms", type=float, default=2.0,
                       help="how long a short queue waits for company before its batch starts")
    serve.add_argument("--max-queue-tokens", type=int, default=None,
                       help="tokens waiting at most; beyond, requests get 429 (default: 16 batches)")
    serve.add_argument("--max-client-batch-size", "--max-texts-per-request", dest="max_client_batch_size", type=int,
                       default=512, help="texts one request may hold")
    serve.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    serve.add_argument("--max-input-chars", type=int, default=None,
                       help="characters per text before tokenizing; longer ones are cut there (truncate) or refused "
                            "(default: 16 x the max length)")
    serve.add_argument("--payload-limit", type=int, default=2_000_000,
                       help="bytes of one request body; larger ones get 413 unread (default 2,000,000, as TEI)")
    serve.add_argument("--read-timeout-s", type=float, default=30.0,
                       help="seconds a client may take to send its whole request body (then 408)")
    serve.add_argument("--graceful-timeout-s", type=float, default=30.0,
                       help="on SIGTERM, seconds to finish the requests in flight before exiting")
    serve.add_argument("--calibration", default=None,
                       help=".txt / .jsonl of texts whose embeddings calibrate int8 and uint8 (default: built-in texts)")
    serve.add_argument("--api-key", default=os.environ.get("QWEN3_JAX_API_KEY"),
                       help="require Authorization: Bearer KEY (env QWEN3_JAX_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the embedding model's name in requests")
    serve.add_argument("--served-reranker-name", default=None, help="the reranker's name in requests")
    _compile_cache(serve)
    serve.add_argument("--debug", action="store_true")

    init = commands.add_parser("init-random", help="write a random-weight checkpoint in the published layout "
                                                   "(offline: try every command without downloading weights)")
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
    init.add_argument("--debug", action="store_true")

    doctor = commands.add_parser("doctor", help="this machine's backend and devices, the attention kernel chosen "
                                 "per dtype, each kernel checked against dense attention here, the compile cache")
    _compile_cache(doctor)
    doctor.add_argument("--debug", action="store_true")

    verify = commands.add_parser("verify", help="compare one checkpoint in transformers and in qwen3-jax")
    verify.add_argument("--model", required=True, help="checkpoint folder or hub id")
    verify.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    verify.add_argument("--strict", action="store_true", help="NaN or Inf in a weight is an error")
    verify.add_argument("--debug", action="store_true")

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


def run_bench(args) -> None:
    from qwen3_jax.bench.encode import run_benchmark, run_mixes, run_suite

    if args.serve:
        import tempfile

        from qwen3_jax.bench.common import bench_checkpoint
        from qwen3_jax.bench.serve_load import run_serve_benchmark, soak

        levels = [int(level) for level in args.levels.split(",")]
        with bench_checkpoint(model=args.model, random=args.random, layers=args.layers, tokenizer=args.tokenizer,
                              out=print) as folder, tempfile.TemporaryDirectory(prefix="qwen3-jax-serve-") as scratch:
            if args.soak:
                result = soak(Path(folder), requests=args.soak, max_seconds=args.seconds, dtype=args.dtype,
                              scratch=Path(scratch))
            else:
                result = run_serve_benchmark(Path(folder), infinity=args.infinity, dtype=args.dtype, levels=levels,
                                             max_requests=args.requests, max_seconds=args.seconds,
                                             max_batch_tokens=args.max_batch_tokens, scratch=Path(scratch))
    elif args.profile:
        from qwen3_jax.bench.profile import run_profile

        result = run_profile(model=args.model, random=args.random, layers=args.layers, tokenizer=args.tokenizer,
                             dtype=args.dtype, texts=args.texts, tokens=args.tokens, long_tail=args.long_tail,
                             batch_size=args.batch_size, repeats=args.repeats, attention=args.attention)
    elif args.train:
        from qwen3_jax.bench.train import run_train_benchmark

        result = run_train_benchmark(model=args.model, random=args.random, layers=args.layers, tokenizer=args.tokenizer,
                                     repeats=args.repeats, reference=not args.no_reference, dtype=args.dtype,
                                     configs=args.train_configs.split(";") if args.train_configs else None)
    elif args.corpus:
        from qwen3_jax.bench.corpus import run_corpus_benchmark

        result = run_corpus_benchmark(model=args.model, random=args.random, layers=args.layers, tokenizer=args.tokenizer,
                                      dtype=args.dtype, documents=args.corpus, tokens=args.tokens,
                                      batch_size=args.batch_size, search_vectors=args.search_vectors)
    elif args.search:
        from qwen3_jax.bench.search import run_search_benchmark

        result = run_search_benchmark(vectors=args.search, width=args.width, kinds=_listed(args.ann_kinds),
                                      quantized=_listed(args.quantized), efs=[int(ef) for ef in _listed(args.ann_ef)])
    elif args.suite == "mixes":
        result = run_mixes(tokenizer=args.tokenizer, layers=args.layers, dtype=args.dtype, texts=args.texts,
                           batch_size=args.batch_size, repeats=args.repeats, attention=args.attention)
    elif args.suite == "device":
        from qwen3_jax.bench.device import run_device_suite

        result = run_device_suite(tokenizer=args.tokenizer, layers=args.layers, repeats=args.repeats, texts=args.texts,
                                  json_path=args.json)
    elif args.suite:
        result = run_suite(tokenizer=args.tokenizer, layers=args.layers, repeats=args.repeats,
                           attention=args.attention)
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
        from qwen3_jax.ray import RayEngine

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

    dims = tuple(int(d) for d in args.matryoshka_dims.split(",")) if args.matryoshka_dims else ()
    config = TrainConfig(
        model=args.model, data=args.data, output=args.output, loss=args.loss,
        lora_rank=None if args.full else args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets, temperature=args.temperature, hard_negatives=args.hard_negatives,
        use_batch=not args.no_batch_negatives, include_qq=args.include_qq, include_dd=args.include_dd,
        false_negative_margin=args.false_negative_margin, matryoshka_dims=dims, instruction=args.instruction,
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, max_length=args.max_length,
        row_length=args.row_length, learning_rate=args.lr, warmup_steps=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, steps=args.steps, epochs=args.epochs,
        remat=args.remat, dtype=args.dtype,
        fsdp=args.fsdp, eval_data=args.eval, eval_every=args.eval_every, save_every=args.save_every, keep=args.keep,
        seed=args.seed, overwrite=args.overwrite, quiet=args.quiet, tensorboard=args.tensorboard)
    train(config, mesh=_mesh(args), out=lambda message: print(message, file=sys.stderr))


def run_export(args) -> None:
    from qwen3_jax.train.run import export_checkpoint

    for name, folder in export_checkpoint(args.checkpoint, args.destination, adapter=args.adapter,
                                          overwrite=args.overwrite).items():
        print(f"wrote {name}: {folder}", file=sys.stderr)


def run_serve(args) -> int:
    from qwen3_jax.serve.server import serve
    from qwen3_jax.serve.settings import ServeSettings

    settings = ServeSettings(
        model=args.model, reranker=args.reranker, host=args.host, port=args.port, dtype=args.dtype, dim=args.dim,
        attention=args.attention, mesh=args.mesh, fsdp=args.fsdp, max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms, max_queue_tokens=args.max_queue_tokens,
        max_client_batch_size=args.max_client_batch_size, max_length=args.max_length,
        max_input_chars=args.max_input_chars, payload_limit=args.payload_limit, read_timeout_s=args.read_timeout_s,
        graceful_timeout_s=args.graceful_timeout_s, calibration=args.calibration, api_key=args.api_key,
        served_model_name=args.served_model_name, served_reranker_name=args.served_reranker_name)
    if args.mesh:                                # JAX is imported only then: the first line comes sooner
        from qwen3_jax.sharding import mesh_of

        mesh = mesh_of(args.mesh)
    else:
        mesh = None
    return serve(settings, mesh=mesh, out=lambda message: print(message, file=sys.stderr, flush=True))


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


def run_verify(args) -> int:
    from qwen3_jax.verify import verify

    return verify(args.model, dtype=args.dtype, strict=args.strict)


COMMANDS = {"embed": run_embed, "embed-corpus": run_embed_corpus, "build-ann": run_build_ann, "search": run_search,
            "rerank": run_rerank, "eval": run_eval, "train": run_train, "export": run_export, "bench": run_bench, "convert": run_convert,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
