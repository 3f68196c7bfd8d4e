"""Which checkpoint made a set of vectors: its path, step and a fingerprint of its weights.

Embeddings and indexes record this, and whatever embeds queries against them compares it with
the model it loads. A run directory is not an identity (its newest checkpoint moves on as the
run trains), so the record names the resolved checkpoint directory.

The fingerprint is the SHA-256 of the weight files' contents, so a copied or re-downloaded
checkpoint keeps it and any change of a weight changes it. Hashing is avoided where the digest is
already known: a training checkpoint's checksums.json (written after its weights, at save), a
Hugging Face cache blob (named by its SHA-256), or an earlier record whose file size and
modification time still match. Otherwise the file is read once, in 4 MiB chunks (about a second
per GB); a header-plus-mtime key would be cheaper but would call a copy a different model and
two checkpoints of one shape the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .checkpoint import CHECKSUMS
from .files import sha256_of

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STEP = re.compile(r"^step_0*(\d+)$")


def _weight_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern) if p.is_file()})


def _known_digest(f: Path, checksums: dict, earlier: dict | None) -> str | None:
    st = f.stat()
    if earlier and earlier.get("size") == st.st_size and earlier.get("mtime_ns") == st.st_mtime_ns:
        return earlier.get("sha256")
    recorded = checksums.get(f.name)
    if isinstance(recorded, str) and _HEX64.match(recorded) and \
            (f.parent / CHECKSUMS).stat().st_mtime_ns >= st.st_mtime_ns:
        return recorded
    if f.is_symlink():  # huggingface_hub's cache: snapshots/<commit>/name -> blobs/<sha256>
        blob = Path(os.readlink(f)).name
        if _HEX64.match(blob):
            return blob
    return None


def checkpoint_identity(directory: str | os.PathLike, earlier: dict | None = None) -> dict[str, Any]:
    """{"path", "step", "fingerprint", "files"} of a resolved checkpoint directory; `earlier` (a
    previous identity of the same directory) lets unchanged files skip hashing."""
    d = Path(directory).resolve()
    checksums: dict = {}
    if (d / CHECKSUMS).is_file():
        try:
            checksums = json.loads((d / CHECKSUMS).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            checksums = {}
        checksums = checksums if isinstance(checksums, dict) else {}
    before = (earlier or {}).get("files") or {}
    files = {}
    for f in _weight_files(d):
        digest = _known_digest(f, checksums, before.get(f.name)) or sha256_of(f)
        st = f.stat()
        files[f.name] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    whole = hashlib.sha256("".join(f"{name}:{v['sha256']}\n" for name, v in files.items()).encode()).hexdigest()
    step = _STEP.match(d.name)
    return {"path": str(d), "step": int(step.group(1)) if step else None, "fingerprint": f"sha256:{whole[:32]}",
            "files": files}


def same_checkpoint(a: dict | None, b: dict | None) -> bool:
    return bool(a and b and a.get("fingerprint") and a.get("fingerprint") == b.get("fingerprint"))


def describe_checkpoint(identity: dict | None) -> str:
    """'CKPT (step 40, sha256:ab12...)' for messages."""
    if not identity:
        return "a checkpoint that was not recorded"
    step = f"step {identity['step']}, " if identity.get("step") is not None else ""
    return f"{identity.get('path')} ({step}{str(identity.get('fingerprint'))[:19]})"
