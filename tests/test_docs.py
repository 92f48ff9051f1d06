"""Every code block of README.md and docs/ runs here as a reader would run it, one file after the other in
a fresh folder, on the tests' tiny random checkpoints. The hub ids the docs name are served offline from
a local Hugging Face cache holding those checkpoints, so `from_pretrained("Qwen/Qwen3-Embedding-0.6B")`
takes the hub path; the install steps are this suite's own environment. A block the line before it marks
`<!-- doc-test: parse-only: WHY -->` (it needs a TPU VM, a GPU, the network, or minutes of benchmark) is
checked instead of run: bash must parse and every qwen3-jax command in it must be one the CLI accepts;
Python must compile."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_jax.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.S | re.M)
PARSE_ONLY = "<!-- doc-test: parse-only:"
LANGUAGES = {"bash", "python", "text"}        # text: output, a layout or a file's contents, never run
HUB_IDS = {f"Qwen/Qwen3-{kind}-{size}": kind for kind in ("Embedding", "Reranker") for size in ("0.6B", "4B", "8B")}
# What the install steps of a block become here: the suite's environment already holds every extra.
INSTALL = re.compile(r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e \S+ && |^pip install .*$", re.M)
BLOCK_TIMEOUT_S = 300


def code_blocks(page: Path) -> list[tuple[str, str, bool, int]]:
    """(language, code, parse only, line) of each fenced block of `page`."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((match.group(1), match.group(2), before.startswith(PARSE_ONLY),
                       text.count("\n", 0, match.start()) + 1))
    return blocks


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, checkpoint, reranker_folder):
    """A Hugging Face cache holding the tiny embedder and reranker under every published id."""
    root = tmp_path_factory.mktemp("hub")
    for repo, kind in HUB_IDS.items():
        repo_dir = root / ("models--" + repo.replace("/", "--"))
        shutil.copytree(checkpoint if kind == "Embedding" else reranker_folder, repo_dir / "snapshots" / ("0" * 40))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("0" * 40)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_commands(code: str) -> None:
    """Every `qwen3-jax ...` (or `python3 -m qwen3_jax.cli ...`) in a bash block is accepted by the CLI's parser."""
    subprocess.run(["bash", "-n", "-c", code], check=True)
    lexer = shlex.shlex(code.replace("\\\n", " "), posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace_split, lexer.commenters, lexer.whitespace = True, "#", " \t\r"     # a line ends a command
    tokens, commands = list(lexer), []
    for i, token in enumerate(tokens):
        if token == "qwen3-jax" or (token == "qwen3_jax.cli" and tokens[i - 1] == "-m"):
            args = []
            for word, after in zip(tokens[i + 1:], tokens[i + 2:] + [""]):
                if word and set(word) <= set("&|;<>()\n") or (word.isdigit() and after[:1] in ("<", ">")):
                    break                         # the command's end, or a redirection such as 2>&1
                args.append(word)
            commands.append(args)
    for args in commands:
        build_parser().parse_args(args)           # exits (a test failure) on an unknown flag or value


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_code_block_runs(page, hub_cache, tmp_path):
    blocks = code_blocks(page)
    unknown = [(line, language) for language, _, _, line in blocks if language not in LANGUAGES]
    assert not unknown, f"{page.name}: fenced blocks without one of {sorted(LANGUAGES)} at lines {unknown}"
    port = str(_free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "QWEN3_JAX_COMPILE_CACHE": str(hub_cache.parent / "compile-cache")}
    started = []
    try:
        for number, (language, code, parse_only, line) in enumerate(blocks):
            where = f"{page.relative_to(ROOT)}:{line}"
            if language == "text":
                continue
            if parse_only:
                _check_commands(code) if language == "bash" else compile(code, where, "exec")
                continue
            code = INSTALL.sub("", code).replace("8000", port)
            script = tmp_path / f"block-{number}.{'py' if language == 'python' else 'sh'}"
            script.write_text(code if language == "python" else "set -euo pipefail\n" + code, encoding="utf-8")
            log = tmp_path / f"block-{number}.log"
            with open(log, "w") as out:
                process = subprocess.Popen([sys.executable if language == "python" else "bash", str(script)],
                                           cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                started.append(process)
                try:
                    status = process.wait(timeout=BLOCK_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    status = "timed out"
            assert status == 0, f"{where} ({language}) exited {status}:\n{log.read_text()[-3000:]}"
    finally:
        for process in started:                   # a server a block left running in the background
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
