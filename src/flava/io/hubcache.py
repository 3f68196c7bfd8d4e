"""Models named by Hugging Face hub id ("facebook/flava-full"), resolved through huggingface_hub's
cache as transformers resolves them: downloaded when the network allows, read from the cache
alone when HF_HUB_OFFLINE is set."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# owner/name, as the hub spells repository ids; a local path that exists always wins.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_SMALL_FILES = ["*.json", "*.txt"]


def looks_like_hub_id(name: str | os.PathLike) -> bool:
    name = str(name)
    return bool(HUB_ID.match(name)) and not Path(name).exists() and ".." not in name


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str | None:
    """Read at every call (huggingface_hub reads its environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _has_weights(path: Path) -> bool:
    return any((path / name).is_file() for name in WEIGHT_FILES)


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of a hub model (config, weights, processor and tokenizer
    files); safetensors weights are preferred, a .bin is fetched only when a repository has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = cache_dir() or "the Hugging Face cache"
    local_only = offline()

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), allow_patterns=patterns,
                                      local_files_only=local_only))

    try:
        path = fetch(_SMALL_FILES + ["*.safetensors"])
        if not _has_weights(path) and not local_only:
            path = fetch(_SMALL_FILES + ["pytorch_model*.bin"])
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE is set" if local_only else "the hub could not be reached")
        raise CheckpointError(
            f"model {repo_id!r} is not in {where} and {how}; download it where the network is allowed "
            f"(`huggingface-cli download {repo_id}`, or run once without HF_HUB_OFFLINE), or name a local directory"
        ) from None
    except GatedRepoError:
        raise CheckpointError(f"model {repo_id!r} is gated on the hub; accept its terms and log in "
                              f"(`huggingface-cli login`), or name a local directory") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise CheckpointError(f"model {repo_id!r} does not exist on the hub (or is private); check the name, or "
                              f"name a local directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"model {repo_id!r} could not be downloaded ({type(e).__name__}: {e}); "
                              f"check the network, or set HF_HUB_OFFLINE=1 to use the cache only") from None
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model {repo_id!r} in {path} has no config.json; it is not a FLAVA checkpoint")
    if not _has_weights(path):
        raise CheckpointError(f"model {repo_id!r} in {path} has no weights file ({', '.join(WEIGHT_FILES)}); "
                              f"the download was incomplete: run it again without HF_HUB_OFFLINE")
    return path
