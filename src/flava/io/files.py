"""Files that matter: JSON read with one clear error, and writes that land whole or not at all.

A write goes to a temporary name beside its target, is flushed to disk, then renamed over the
target, so a crash or a full disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FlavaError, OutputError
from .locks import hold


def read_json(path: str | os.PathLike, what: str = "config file", error: type[FlavaError] = ConfigError,
              expect: type | None = None) -> Any:
    """A JSON file, or one `error` naming the file: missing, malformed, or not of type `expect`."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory; name the JSON file")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON ({e})") from None
    if expect is not None and not isinstance(data, expect):
        raise error(f"{what} {path} does not hold a JSON {'object' if expect is dict else expect.__name__}")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp make private files (0600/0700); give what open()/mkdir() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` if the block succeeds,
    removed if it fails. The suffix is kept, so writers that pick a format by name still work."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        _as_if_created(tmp)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def check_not_current(target: str | os.PathLike) -> None:
    """Refuse, before any work, a directory to be replaced whole (`replace_dir`) that is the
    current folder or holds it: renamed away, it would leave a shell standing in a removed folder."""
    if Path.cwd().is_relative_to(Path(target).resolve()):
        raise OutputError(f"--output {target} is the current folder or holds it; name a new folder to write")


NEARLY_FULL_BYTES = 1 << 20
"""Free space below which a failed write is taken for a full disk (`disk_full`)."""


def disk_full(e: BaseException, where: str | os.PathLike) -> OSError | None:
    """A failed write's error as the full disk (or quota) it was: safetensors (SafetensorError: "os
    error 28"), torch.save (RuntimeError: "unexpected pos") and numpy (OSError without errno: "N
    requested and M written") say it in words of their own, which reached users as tracebacks; the
    words of a short write count only with the disk nearly full. None for other errors."""
    from safetensors import SafetensorError

    if not isinstance(e, (OSError, RuntimeError, SafetensorError)) or isinstance(e, OSError) and e.errno is not None:
        return None
    text = str(e)
    for code in (errno.EDQUOT, errno.ENOSPC):
        if os.strerror(code) in text or f"os error {code})" in text:
            return OSError(code, os.strerror(code), str(where))
    if not ("unexpected pos" in text or re.search(r"\d+ requested and \d+ written", text)):
        return None
    try:
        nearly_full = shutil.disk_usage(where).free < NEARLY_FULL_BYTES
    except OSError:
        nearly_full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) if nearly_full else None


def replace_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call fill(tmpdir) then move tmpdir to `target` (replacing it whole); on any failure
    `target` is untouched."""
    check_not_current(target)  # callers check it before their work too
    target = Path(target).absolute()  # `.` has no name to stage beside
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        _as_if_created(tmp, directory=True)
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _as_if_created(f)  # some writers (safetensors) create private files
                fsync_file(f)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        full = disk_full(e, tmp)  # before the staging copy is removed, which frees what it took
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            full.filename = str(target)
            raise full from e
        raise


def left_by_replace(name: str, of: str) -> bool:
    """Whether file name `name` is what a killed `replace_dir` of a directory named `of` left
    beside it: a staging copy or the replaced one."""
    # mkdtemp's name exactly: another output named with this one's as a prefix (`idx.v2` beside
    # `idx`) stages its own folders beside it.
    return name == f".{of}.old" or re.fullmatch(rf"\.{re.escape(of)}\.[a-z0-9_]{{8}}\.tmp", name) is not None


def recover_replaced(target: str | os.PathLike, sweep: bool = True) -> None:
    """Undo what a killed `replace_dir(target, ...)` left: the replaced copy moved back when the
    kill fell between its two renames (the target is then missing), and, with `sweep`, staging
    copies removed (only the directory's one writer may sweep: another writer's may be in use)."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    if sweep and target.parent.is_dir():
        for p in target.parent.iterdir():
            if left_by_replace(p.name, target.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


@contextmanager
def building(target: str | os.PathLike, what: str) -> Iterator[None]:
    """One builder of the directory `target` at a time, for a command that checks it, works, then
    puts its result there (`replace_dir`; evaluate's `place_report`): a lock file beside it
    (`.NAME.lock`) held for the block, so two builds started together cannot both pass the check,
    and what a killed build left beside it swept first (safe now: no other builder of it runs).
    `what` names the option to change. Folders made for the lock are removed again where the build
    left nothing in them."""
    target = Path(target).absolute()  # `.` has no name to put a lock beside
    made = [p for p in target.parents if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with hold(target.parent / f".{target.name}.lock", str(target),
                  f"wait for it to end, or choose another {what}", remove=True):
            recover_replaced(target)
            yield
    finally:
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:  # not empty: the build wrote there
                break


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's contents, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, directory: bool = True) -> None:
    """Refuse, before any work, an output that cannot be written: `path` is a directory to write
    into, or with `directory=False` a file to write. Nothing is created: a file is made and removed
    in the nearest folder that exists on its path. Raises OutputError naming the path and the fix."""
    path = Path(path).absolute()
    if not directory and path.is_dir():
        raise OutputError(f"{path} is a directory; name a file to write")
    nearest = _nearest_folder(path if directory else path.parent)
    if not nearest.is_dir():
        raise OutputError(f"{nearest} is a file; choose another output (a folder of that name would be written)")
    _probe(nearest, path)


def check_output_place(path: str | os.PathLike) -> None:
    """Refuse, before any command's work, an output where nothing can be made: a link to nothing,
    a read-only or virtual file system (/proc), no permission. Probed inside `path` where it is a
    folder, else in the nearest folder on its path; a file in the way is left to the command, which
    knows whether it writes one. A URL (s3://, http://) is refused: it had become a local folder
    named `s3:`."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)):
        raise OutputError(f"{path} is a remote place; outputs are written to a local or mounted directory: write "
                          "there, then copy it (aws s3 sync, rclone), or mount the bucket")
    path = Path(path).absolute()
    for on_path in (path, *path.parents):
        if on_path.exists():
            break
        if on_path.is_symlink():
            raise OutputError(f"{on_path} is a link to {os.readlink(on_path)}, which does not exist; make what it "
                              "names, or choose another output")
    nearest = path if path.is_dir() else _nearest_folder(path.parent)
    if nearest.is_dir():
        _probe(nearest, path)


def _nearest_folder(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(nearest: Path, path: Path) -> None:
    probe = nearest / f".flava-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        e.filename = str(path)  # what the user named, not the probe file made to test it
        raise OutputError(explain_os_error(e)) from None


def refuse_other_files(folder: Path, record: Path, what: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a folder that holds files but not `record`, the file a command
    writes first there (so every folder of its own holds it): a run's folder or one of other
    files, which its own folders would mix with. `what` names what `record` records; `allowed`
    names what may be there before it (a codebook placed for the command to use)."""
    other = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name not in allowed) \
        if folder.is_dir() and not record.is_file() else []
    if other:
        raise ConfigError(f"{folder} already holds other files (e.g. {other[0]}) and no {what}; choose a new or "
                          "empty --output")


def check_new_file(path: str | os.PathLike, inputs: list[str], replace: bool, what: str = "--output") -> None:
    """Refuse, before any work, an output file that is one of the command's `inputs` (named
    files; folders and globs are read for images, never overwritten) and, without `replace`
    (`--replace`), one that exists: what the file held would be lost. Writable first (`check_writable`).
    `what` names the file in the refusals (a file written beside --output says which)."""
    check_writable(path, directory=False)
    path = Path(path)
    if not path.is_file():
        return
    for named in inputs:
        try:
            same = Path(named).is_file() and os.path.samefile(named, path)
        except OSError:  # a name too long, a folder not readable: not this file
            same = False
        if same:
            raise OutputError(f"{what} {path} is an input of this command; name another file to write")
    if not replace:
        raise OutputError(f"{what} {path} exists; name another file, or add --replace to write over it")


def explain_os_error(e: OSError) -> str:
    """One line for a file system error (mostly met writing outputs): the path, the reason, the fix."""
    what = e.filename or "a file"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        fix = "a file is in the way (the path, or a folder on it, is a file): choose another path"
    elif e.errno == errno.EISDIR:
        fix = "a folder is in the way: name a file"
    elif e.errno == errno.ENAMETOOLONG:
        what = what if len(str(what)) <= 80 else f"{str(what)[:77]}..."
        fix = "a file or folder name is at most 255 bytes here: shorten it"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "the disk is full: free some space (what was saved before is kept)"
    elif e.errno == errno.EROFS:
        fix = "its file system is read-only: choose another path"
    elif e.errno == errno.ENOENT:  # met where it was to be made: a virtual file system such as /proc
        fix = "nothing can be made there: choose another path"
    else:
        fix = "this user may not use it: change its permissions or choose another path"
    return f"cannot use {what}: {e.strerror or e}; {fix}"
