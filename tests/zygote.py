"""Python processes for the tests without Python's start-up: forked from a process that imported
torch, torch._dynamo (which every optimizer imports) and flava's CLI once.

A `flava` command costs about 4 s of CPU before its first line of work, most of it those imports,
and the suite starts about a hundred. Here each test worker keeps one such process (the zygote);
`Process(...)` and `python(...)` ask it to fork a child, which takes the command's environment, folder
and output files and runs `python ARGS` the way the interpreter would (`-m module`, `-c code` or a
script path), and ends as the interpreter ends a program (`_end_as_python`): an uncaught exception
through sys.excepthook, SystemExit's code, threads joined, atexit, standard streams flushed, a
KeyboardInterrupt as SIGINT. It then leaves by os._exit, without the interpreter's teardown of
its modules: dropping the references of every object it inherited writes to each page of the
zygote's heap, a copy-on-write copy of it (0.25 s or more a child, and the suite forks hundreds).
The child is a real process: its own pid, signals, exit status, files and child processes.

What it does not redo is reading the environment at import: a command whose environment differs
from the zygote's in anything but the variables read while a command runs (`AT_RUN`) is started as
a plain subprocess instead. So is a command asked for with `plain=True` (a resume test's
uninterrupted run: children share the zygote's hash seed, which a real process draws anew, so a
result that depended on set order would match across children), and everything when
FLAVA_TEST_PLAIN_PROCESSES=1. What the preload printed is written again at the start of each
child's output, as a real process prints it.

`spawn` is torch.multiprocessing.spawn's work and `Ranks` torchrun's (a command as the processes of
one group) with children forked the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

# What most commands import, `flava pretrain`'s lazily imported training loop and its TensorBoard
# writer among them (0.9 s of each pretraining child's start).
PRELOAD = ("torch", "torch._dynamo", "flava.cli", "matplotlib.pyplot", "flava.train.run", "torch.utils.tensorboard")
# Variables read while a command runs, not at import: pytest sets PYTEST_CURRENT_TEST per test;
# torch's inductor writes TORCHINDUCTOR_CACHE_DIR into the test process the first time it looks for its
# cache (its other settings are read when the preload imports it); `Ranks` sets the process group's; the
# S3 test names its store's credentials. KMP_* are read by none: scikit-learn, once an evaluation has
# imported it, sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK in the test process for Intel's OpenMP,
# which nothing here loads (torch and scikit-learn bring GNU's libgomp). A command whose environment
# differs from the zygote's in any other is started as a plain process (FSSPEC_* among them: fsspec,
# which TensorBoard's writer imports, reads them at import).
AT_RUN = ("TMPDIR", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
          "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FLAVA_", "PYTEST_",
          "TORCHINDUCTOR_CACHE_DIR", "KMP_")


# --------------------------------------------------------------------------- the zygote process


def _serve(requests: int, replies: int) -> dict:
    """Fork a child for each request line; report each child's pid, and its exit code once reaped.
    Returns only in a child, with its request."""
    buffer = b""
    children = set()
    while True:
        ready, _, _ = select.select([requests], [], [], 0.02)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            children.discard(pid)
            os.write(replies, (json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n").encode())
        if not ready:
            continue
        chunk = os.read(requests, 1 << 16)
        if not chunk:  # the test worker is gone
            os._exit(0)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                os.close(requests)
                os.close(replies)
                return request
            children.add(pid)
            os.write(replies, (json.dumps({"pid": pid, "id": request["id"]}) + "\n").encode())


def _become(request: dict, printed: tuple[bytes, bytes]) -> None:
    """In the child: the request's files, folder and environment, what the preload printed, fresh
    random states (a real process draws its own), then `python ARGS`."""
    import runpy
    import tempfile
    import types

    import numpy as np
    import torch

    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for target, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], write),
                                (2, request["stderr"], write)):
        if path is None:  # stderr into stdout
            os.dup2(1, target)
            continue
        fd = os.open(path, flags, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    for fd, data in zip((1, 2), printed):
        os.write(fd, data)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # TMPDIR read again
    torch.seed()
    np.random.seed()
    args = request["args"]

    def program() -> None:
        if args[0] == "-m":
            sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *args[2:]], ""
            main = types.ModuleType("__main__")  # its own: what it defines pickles, as in `python -c`
            sys.modules["__main__"] = main
            exec(compile(args[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv, sys.path[0] = list(args), str(Path(args[0]).resolve().parent)
            runpy.run_path(args[0], run_name="__main__")

    _end_as_python(program)


def _end_as_python(program) -> None:
    """Run `program`, then end the process as CPython ends one after its program (Py_RunMain and
    Py_FinalizeEx, in their order) up to the teardown of modules, which os._exit skips."""
    import atexit
    import threading
    import traceback

    interrupted = False
    try:
        program()
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
        if not isinstance(code, int):  # a message: said, and status 1
            print(code, file=sys.stderr)
            code = 1
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        try:
            sys.excepthook(type(e), e, e.__traceback__)
        except BaseException:
            traceback.print_exception(e)
        code = 1
    threading._shutdown()  # non-daemon threads joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception as e:  # as the interpreter says a failed flush at exit, and exits 120
            code = 120
            with contextlib.suppress(Exception):
                os.write(2, f"Exception ignored in: {stream!r}\n{type(e).__name__}: {e}\n".encode())
    if interrupted:  # an unhandled Ctrl-C ends the process by SIGINT, as the shell expects
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _zygote_main() -> None:
    import gc
    import importlib
    import tempfile

    replies = os.dup(1)
    # What the imports print goes to files (not the replies), to be written again in each child.
    captured = [tempfile.TemporaryFile() for _ in range(2)]
    keep_err = os.dup(2)
    for fd, f in zip((1, 2), captured):
        os.dup2(f.fileno(), fd)
    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.flush()  # nothing buffered for a child to write again
    sys.stderr.flush()
    printed = []
    for f in captured:
        f.seek(0)
        printed.append(f.read())
        f.close()
    os.dup2(keep_err, 2)
    os.close(keep_err)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    # The preloaded objects out of the collector's reach: a child's collections (its exit's among
    # them) would otherwise walk, and so copy, every page of the zygote's heap (1.1 s per exit).
    gc.freeze()
    os.write(replies, b'{"ready": true}\n')
    request = _serve(0, replies)
    _become(request, tuple(printed))  # in the child: its exceptions and SystemExit end it as they end `python`


# --------------------------------------------------------------------------- the test side


class Zygote:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env)
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.pids: dict[int, int] = {}  # request id -> pid
        self.codes: dict[int, int] = {}
        self.requests = 0
        self.dead = False
        if not self.process.stdout.readline():
            raise RuntimeError(f"the test zygote did not start (exit {self.process.wait()})")
        threading.Thread(target=self._read, daemon=True, name="zygote-replies").start()

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                reply = json.loads(line)
                with self.changed:
                    if "pid" in reply:
                        self.codes.pop(reply["pid"], None)  # a pid used again: not the old child's end
                        self.pids[reply["id"]] = reply["pid"]
                    else:
                        self.codes[reply["exited"]] = reply["code"]
                    self.changed.notify_all()
        finally:  # gone: no more replies, so nobody waits for one
            with self.changed:
                self.dead = True
                self.changed.notify_all()

    def fork(self, args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str | None) -> int:
        with self.lock:
            self.requests += 1
            request = {"id": self.requests, "args": args, "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        with self.changed:
            if not self.changed.wait_for(lambda: request["id"] in self.pids or self.dead, timeout=30):
                raise RuntimeError("the test zygote did not fork")
            if self.dead:
                raise RuntimeError(f"the test zygote ended (exit {self.process.wait()})")
            return self.pids.pop(request["id"])

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.codes or self.dead, timeout=timeout)
            if pid not in self.codes and self.dead:
                raise RuntimeError(f"the test zygote ended (exit {self.process.wait()}) before reporting pid {pid}")
            return self.codes.get(pid)

    def takes(self, env: dict[str, str]) -> bool:
        """Whether a child can run with `env`: it differs only in what is read while a command runs."""
        names = set(env) | set(self.env)
        return all(n.startswith(AT_RUN) for n in names if env.get(n) != self.env.get(n))


_zygote: Zygote | None = None
_started_for = -1


def _the_zygote(env: dict[str, str]) -> Zygote | None:
    global _zygote, _started_for
    if os.environ.get("FLAVA_TEST_PLAIN_PROCESSES") == "1":
        return None
    if _zygote is None or _started_for != os.getpid() or _zygote.dead or _zygote.process.poll() is not None:
        _zygote, _started_for = Zygote({**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}), os.getpid()
    return _zygote if _zygote.takes(env) else None


class Process:
    """A started `python ARGS` (a forked child, or a `subprocess.Popen`) with its output in files:
    as much of Popen as the tests use."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, stdout: Path | None = None,
                 stderr: Path | None = None, merge: bool = False, cwd: Path | None = None, plain: bool = False):
        import tempfile

        self.args, env = list(args), dict(os.environ if env is None else env)
        if stdout is None:
            stdout = Path(tempfile.mkdtemp(prefix="process-")) / "stdout"
        if stderr is None and not merge:
            stderr = stdout.with_name(stdout.name + ".err")
        self.stdout, self.stderr = Path(stdout), (Path(stderr) if stderr else None)
        where = str(cwd or os.getcwd())
        for path in (self.stdout, self.stderr):  # there from the start, as Popen's files are
            if path is not None:
                path.write_bytes(b"")
        self._popen, self._pid, self.returncode = None, 0, None
        zygote = None if plain else _the_zygote(env)
        if zygote is not None:
            self._zygote = zygote
            self._pid = zygote.fork(self.args, env, where, str(self.stdout), str(self.stderr) if self.stderr else None)
            return
        with open(self.stdout, "w") as out, open(self.stderr or os.devnull, "w") as err:
            self._popen = subprocess.Popen([sys.executable, *args], env=env, cwd=where, stdout=out,
                                           stderr=subprocess.STDOUT if merge else err)

    @property
    def pid(self) -> int:
        return self._popen.pid if self._popen else self._pid

    def _code(self, timeout: float | None) -> int | None:
        if self._popen:
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self._zygote.exit_code(self._pid, timeout)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._code(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._code(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired([sys.executable, *self.args], timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended since the poll (its peer's failure ended it): nothing to signal
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        return (self.stdout.read_text(errors="replace"),
                self.stderr.read_text(errors="replace") if self.stderr else "")

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Its end and output, as Popen's (text=True); killed when it outlives `timeout`."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self.output()


def python(args: list[str], env: dict[str, str] | None = None, timeout: float = 300,
           cwd: Path | None = None, plain: bool = False) -> subprocess.CompletedProcess:
    """`python ARGS` to its end, its output captured: `subprocess.run(..., capture_output=True, text=True)`."""
    process = Process(args, env, cwd=cwd, plain=plain)
    out, err = process.communicate(timeout)
    return subprocess.CompletedProcess([sys.executable, *args], process.returncode, out, err)


# `fn(rank, *args)` in a forked child, `fn` and `args` pickled by the test (`fn` by reference: its
# test module is imported again in the child, from the tests' folder).
_SPAWNED = """
import pickle, sys
folder, rank = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
with open(folder + "/call.pkl", "rb") as f:
    fn, args = pickle.load(f)
fn(rank, *args)
"""


class Results:
    """What spawned children hand back, as `mp.Manager().dict()` would hold it: a child's
    `results[key] = value` pickles the value into a file of its own, read by the test."""

    def __init__(self):
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="results-"))

    def __setitem__(self, key, value) -> None:
        import pickle

        (self.folder / f"{key}.pkl").write_bytes(pickle.dumps(value))

    def __getitem__(self, key):
        import pickle

        return pickle.loads((self.folder / f"{key}.pkl").read_bytes())


def _start_all(start, count: int) -> list[Process]:
    """`start(i)` for each i; when one cannot start, those already started are killed (they would
    wait for it to join their group)."""
    children: list[Process] = []
    try:
        for i in range(count):
            children.append(start(i))
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        raise
    return children


def _wait_all(children: list[Process], timeout: float) -> tuple[int | None, str] | None:
    """Wait for every child to exit 0; None when they did. When one fails, or time runs out, the
    others are killed (they would wait for it in a collective): the failed child (None when time
    ran out) and what ended it, with every child's output (the first to fail is often one that lost
    its peer, not the cause)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        codes = [c.poll() for c in children]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is None and all(code == 0 for code in codes):
            return None
        if failed is not None or time.monotonic() > deadline:
            for child in children:
                child.kill()
                child.wait()
            why = f"rank {failed} exited with {codes[failed]}" if failed is not None else \
                f"rank {codes.index(None)} did not end within {timeout:g} s"
            return failed, why + "".join(f"\n--- rank {r}:\n{c.output()[0]}" for r, c in enumerate(children))
        time.sleep(0.02)


def spawn(fn, args: tuple, nprocs: int, timeout: float = 300) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)` with children forked from the zygote: no
    interpreter start or imports (about 3 s of CPU each)."""
    import pickle
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="spawn-"))
    (folder / "call.pkl").write_bytes(pickle.dumps((fn, args)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    tests = str(Path(__file__).resolve().parent)
    children = _start_all(lambda rank: Process(["-c", _SPAWNED, str(folder), str(rank), tests], env,
                                               stdout=folder / f"{rank}.out", merge=True), nprocs)
    failed = _wait_all(children, timeout)
    if failed is not None:
        raise AssertionError(f"{fn.__qualname__}: {failed[1]}")


class Ranks:
    """`python ARGS` as the `world` processes of one process group, forked from the zygote with
    the environment torchrun gives its workers: torchrun's work without the start of torchrun and
    of each worker. What it cannot give: the ranks share the zygote's hash seed, where torchrun's
    each draw their own (a collective issued in set order would agree here and hang there), so
    tests of the launch itself start torchrun. As much of Process as the tests use: the ranks'
    output, rank 0's first."""

    def __init__(self, args: list[str], world: int, env: dict[str, str]):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        group = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}
        self.args = args
        self.children = _start_all(
            lambda r: Process(args, {**env, **group, "RANK": str(r), "LOCAL_RANK": str(r)}, merge=True), world)
        self.returncode: int | None = None

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        failed = _wait_all(self.children, 300 if timeout is None else timeout)
        if failed is not None and failed[0] is None:  # killed, as Process.communicate does
            raise subprocess.TimeoutExpired([sys.executable, *self.args], timeout)
        self.returncode = 0 if failed is None else self.children[failed[0]].returncode
        return "".join(c.output()[0] for c in self.children), ""


if __name__ == "__main__":
    _zygote_main()
