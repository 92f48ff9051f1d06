"""Turning a model name into a local folder: a folder is used as it is, a hub id is fetched once; and
what identifies a model's weights cheaply, so a result made with other weights is noticed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FINGERPRINT_SAMPLES = 64          # bytes read from each file of a model folder: its head and this many spans
FINGERPRINT_SPAN = 4096

# Only what inference needs: configs, weights, tokenizer and sentence-transformers module files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "1_Pooling/*", "merges.txt", "vocab.json"]


def model_identity(name_or_path: str | os.PathLike) -> str:
    """How a run records its model: a local folder by its resolved path (so `./emb`, `emb` and
    `../x/emb` are one model), a hub id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def resolve_model(name_or_path: str | os.PathLike, *, revision: str | None = None,
                  cache_dir: str | None = None) -> Path:
    """A local checkpoint folder for a path or a Hugging Face hub id such as "Qwen/Qwen3-Embedding-0.6B"."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_local = path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1 or path.exists()
    if looks_local:
        raise FileNotFoundError(f"model folder {text!r} does not exist: pass a checkpoint folder or a hub id")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(
            text, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{text!r} is not in the local Hugging Face cache and the hub cannot be reached (offline?): "
            "download it where there is a network, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{text!r} is neither a local folder nor a model on the hub") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"could not fetch {text!r} from the hub ({err}); pass a local folder") from None


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """A digest of a model folder's files that changes when they do: each file's path under the
    folder, its size, its first 64 KiB (a safetensors header and the config whole) and
    FINGERPRINT_SAMPLES spans of 4 KiB spread over it: about 320 KiB read a file, whatever its size."""
    folder = Path(folder)
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder)}\0{size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 16))
            for offset in range(0, size, max(1, size // FINGERPRINT_SAMPLES)):
                handle.seek(offset)
                digest.update(handle.read(FINGERPRINT_SPAN))
    return digest.hexdigest()
