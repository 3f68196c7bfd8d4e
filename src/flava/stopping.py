"""Graceful stop: SIGTERM (what schedulers send before SIGKILL) and SIGINT (Ctrl-C) ask a long
command to stop at its next natural boundary (a training step, a prepared unit, an embedded
part), save what it has and exit with one line; a second signal stops at once.

The command's process installs the handlers (`handling`); loops poll `requested()` (this process)
or `agreed()` (every process of a torch.distributed group, at step boundaries only), save, and
raise `Stopped`, which the CLI prints as one line with exit code 128 + the signal number (143 for
SIGTERM, 130 for SIGINT). A wait that holds no state of its own (a batch being drawn, which moves its
stream only once it is whole) may be given up (`abandonable`): a stalled read then delays no stop,
which a scheduler's grace period (often 30 s) would not wait for. Pool processes ignore both
signals and end when their owner is gone (`ignore_in_worker`); DataLoader workers ignore SIGINT
and, after SIGTERM, serve until their owner shuts them down or is gone (`quiet_loader_worker`): a
signal sent to the whole process group prints no worker tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0
"""A repeat within this time of the first signal is the same request: a launcher (torchrun) forwards
the scheduler's SIGTERM to processes that the scheduler signals itself."""

_owner: int | None = None  # the pid that installed the handlers: forked children defer to it
_signum = 0
_first = 0.0
_abandonable = False
_interrupt = False
_saves = ""
"""What a stop at once leaves and how to go on (`tell_saves`, `saved`); '': the command does not say."""
_go_on = ""

AT_A_STEP = "stopping at the next step, after saving"
"""How a training command acknowledges a stop; commands that work in other units say theirs (`handling`)."""
_said = AT_A_STEP


BEFORE_FIRST_STEP = "before the first step"
"""A training run's `Stopped.at` when it stopped while its first batch was awaited: nothing saved."""


def stopped_before_first_step(signum: int) -> "Stopped":
    return Stopped(signum, f"stopped by {name(signum)} {BEFORE_FIRST_STEP}; nothing to save: run the same command "
                           "again to start it", BEFORE_FIRST_STEP)


class Stopped(Exception):
    """A command stopped on request after saving what it had; `message` says where and how to go on."""

    def __init__(self, signum: int, message: str, at: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message
        self.at = at
        """Where it stopped, for a caller that words the message its own way (e.g. 'at step 7')."""

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class Abandoned(BaseException):
    """A stop request that came during an `abandonable` wait, which it ended. A BaseException: no
    reader's `except Exception` may take it for a bad record."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """A second signal: the command stops at once, without saving."""

    def __init__(self, signum: int, after: float = 0.0):
        super().__init__(signum)
        self.signum, self.after = signum, after
        """`after`: seconds since the first signal."""
        self.saves = _saves or "nothing was saved since the last save"
        """What it leaves: the command's last save and how to go on from it."""


def tell_saves(now: str, go_on: str = "") -> None:
    """For a stop at once: what the command leaves until it saves (`now`), and how to go on from a
    save it makes (`saved`; none: it names no saves). Without it the stop says only that nothing was
    saved since the last save."""
    global _saves, _go_on
    _saves, _go_on = now, go_on


def tell_saves_of_a_run(resumed: bool, what: str, resumed_from: str) -> None:
    """`tell_saves` for a command that saves a resumable state (`what`: "the run") and continues
    it with --resume; `resumed_from`: what a resumed one goes back to until it saves."""
    go_on = "continue with the same command and --resume"
    if resumed:
        tell_saves(f"nothing was saved since {resumed_from}: {go_on}", go_on)
    else:
        tell_saves(f"nothing was saved: run the same command again to start {what}", go_on)


@contextlib.contextmanager
def saves_told(now: str, go_on: str = "") -> Iterator[None]:
    """`tell_saves` for a part of a command that saves on its own terms (a codebook a pretraining
    run trains first); what the command had told comes back after it."""
    global _saves, _go_on
    before = _saves, _go_on
    tell_saves(now, go_on)
    try:
        yield
    finally:
        _saves, _go_on = before


def saved(path) -> None:
    """The command saved `path` (a checkpoint, or words naming it): a stop at once names it."""
    global _saves
    if _go_on:
        _saves = f"saved {path}: {_go_on}"


def name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


# Python runs a signal's handler only once the main thread is back in Python code: during a long
# operation of a step (a large matmul, a collective) a stop was acknowledged late, and a second signal
# in the same operation was lost (CPython records one pending call per signal number). So the C-level
# handler's wakeup descriptor (signal.set_wakeup_fd) also carries each signal to a thread, which
# notes when it came and acknowledges the first at once; the handler, when it runs, judges them all.
_lock = threading.RLock()  # the handler may run in the main thread while it holds the lock
_arrivals: list[tuple[int, float]] = []
"""The stop signals of this `handling` block as they came: (number, time.monotonic())."""
_wakeup = -1
"""The read end of the wakeup pipe of the current `handling` block (-1: none)."""
_owed: list[int] = []
"""Signals counted by the handler before their byte reached the pipe (delivered to another thread)."""


def _take_arrivals() -> None:
    """Move the signals waiting in the wakeup pipe into `_arrivals`, timed now; the first of all
    becomes the request and is acknowledged. Called with `_lock` held."""
    global _signum, _first
    try:
        data = os.read(_wakeup, 512)
    except (BlockingIOError, OSError, ValueError):
        data = b""
    now = time.monotonic()
    for s in data:
        if s in _owed:
            _owed.remove(s)
        elif s in SIGNALS:
            _arrivals.append((s, now))
    if _arrivals and not _signum:
        _signum, _first = _arrivals[0][0], _arrivals[0][1]
        _acknowledge(_signum)


def _acknowledge(signum: int) -> None:
    # Said at once (a step or a part may take a while), on stdout: a stop's one line is stderr's.
    # os.write, not print: the main thread may be inside a print. Not when stdout was closed at
    # start: descriptor 1 may be a file this process opened since. Under torchrun, which sends a
    # signal on to every process of its node, the node's first process alone says it.
    if sys.__stdout__ is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        with contextlib.suppress(OSError, ValueError):
            os.write(sys.__stdout__.fileno(), f"\n{name(signum)}: {_said}; send it again (Ctrl-C) to stop at "
                                              f"once\n".encode())


def _watch(wakeup: int, done: threading.Event) -> None:
    import select

    while not done.is_set():
        with contextlib.suppress(OSError, ValueError):
            select.select([wakeup], [], [])
        with _lock:
            if not done.is_set():
                _take_arrivals()


def _handle(signum: int, frame) -> None:
    if os.getpid() != _owner:  # a forked child before its worker_init: its owner decides
        return
    with _lock:
        _take_arrivals()
        if not _arrivals:  # delivered to another thread, its byte not yet written: count it now
            _arrivals.append((signum, time.monotonic()))
            _owed.append(signum)
            _take_arrivals()
        first = _arrivals[0][1]
        again = next((a for a in _arrivals[1:] if a[1] - first >= REPEAT_WINDOW_S), None)
    if again is not None:
        raise Interrupted(again[0], again[1] - first)
    if _interrupt:
        raise Abandoned(_signum)


def _forget_wakeup() -> None:
    """In a forked child: its signals are its own, not to be carried to its parent's watcher."""
    global _wakeup
    if _wakeup >= 0:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        _wakeup = -1


os.register_at_fork(after_in_child=_forget_wakeup)


@contextlib.contextmanager
def handling(said: str = AT_A_STEP, leaves: str = "") -> Iterator[None]:
    """Stop requests are recorded (not fatal) inside the block, in the main thread of this process;
    the previous handlers come back after it (the CLI runs inside tests' processes too). `said`: how
    the command acknowledges one at once (where it stops, what it keeps); `leaves`: what a stop at
    once leaves and how to go on (`tell_saves`' `now`)."""
    global _owner, _signum, _first, _said, _saves, _go_on, _wakeup

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    owner, outer = _owner, _wakeup
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    with _lock:
        _owner, _signum, _first, _said, _saves, _wakeup = os.getpid(), 0, 0.0, said, leaves, read
        _arrivals.clear()
        _owed.clear()
    done = threading.Event()
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read, done), name="flava-signal-watch", daemon=True)
    watcher.start()
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(previous_fd)
        done.set()
        with contextlib.suppress(OSError):
            os.write(write, b"\0")  # wakes the watcher, which sees `done`
        watcher.join(5)
        with _lock:
            _owner, _signum, _saves, _go_on, _wakeup = owner, 0, "", "", outer
            _arrivals.clear()
        os.close(read)
        os.close(write)


@contextlib.contextmanager
def terminable(command: str) -> Iterator[None]:
    """For a command without stopping points of its own (evaluate, index, ...): inside the block,
    in the main thread, SIGTERM ends the process at once, as Python's default did, but saying so in
    one line (`flava COMMAND: stopped by SIGTERM after N s`) with exit code 143. Not by raising: an
    exception raised in a callback from C++ (matplotlib's) came out as another one, a traceback.
    The previous handler comes back after the block."""
    # Only over Python's default: a program that calls `main` with a handler of its own keeps it.
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    began = time.perf_counter()

    def terminate(signum, _frame) -> None:
        try:
            sys.stdout.flush()
            print(f"flava {command}: stopped by {name(signum)} after {time.perf_counter() - began:.0f} s",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):  # a reader gone, a stream closed
            pass
        os._exit(exit_code(signum))

    before = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def requested() -> int:
    """The signal number of this process's stop request, 0 when there is none."""
    return _signum if os.getpid() == _owner else 0


@contextlib.contextmanager
def abandonable() -> Iterator[None]:
    """A wait that a stop request of this process may end, raising `Abandoned` (at the start too,
    for a request already made): only for work whose end leaves no state half-changed, the caller
    saving what it had before it. How the wait is ended is the waiter's: `poll` where it wakes up
    now and then, `interruptible` where it runs in this process alone."""
    global _abandonable
    before, _abandonable = _abandonable, True
    try:
        poll()
        yield
    finally:
        _abandonable = before


def poll() -> None:
    """Inside `abandonable`: `Abandoned` if a stop was requested."""
    if _abandonable and (signum := requested()):
        raise Abandoned(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside `abandonable`: a stop request raises `Abandoned` from its handler, wherever the main
    thread is in the block. Not around a transfer from another process (a loader worker's batch),
    which an exception cut midway would leave that process to complain of."""
    global _interrupt
    before, _interrupt = _interrupt, _abandonable  # before the poll: a request between them is not lost
    try:
        poll()
        yield
    finally:
        _interrupt = before


def agreed() -> int:
    """The stop request as every process sees it: the largest signal number any process of the
    torch.distributed group received (one all_reduce: every process must call it at the same step
    boundaries), so all stop at the same step. This process's request without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested()
    nccl = dist.get_backend() == "nccl"  # NCCL reduces device tensors only
    t = torch.tensor([requested()], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


ORPHAN_POLL_S = 0.5
"""How often a pool process looks whether its owner is still there."""


_ending = False
"""Whether `end_with` was called: the process is past its command."""


def end_with(code: int) -> None:
    """For the `flava` process once its command has ended and said how: SIGTERM or SIGINT during
    the interpreter's teardown (loader workers joined, files closed) ends it at once with the
    command's exit code, where a second Ctrl-C printed a traceback from the loader's cleanup and a
    SIGTERM turned a finished run's exit 0 into 143. Past the exit handlers, where Python puts
    back the default handlers of the signals it handled (and a signal then ended a finished run
    with 143), they are ignored until the process has ended (`ignored_at_the_end`)."""
    global _ending

    def now(*_) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader gone, a stream closed
                pass
        os._exit(code)

    for s in SIGNALS:
        signal.signal(s, now)
    _ending = True


def ignored_at_the_end() -> None:
    """The last exit handler (`flava/__init__` registers it before any other): past it Python keeps
    an ignored signal ignored through its finalization, and resets handled ones to their defaults."""
    if _ending and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def ignore_in_worker(*_) -> None:
    """A pool process's init: SIGTERM and SIGINT are for its owner, which finishes or abandons the
    worker's work and shuts it down (a worker killed by a signal makes its owner fail with a
    traceback instead). An owner killed outright (SIGKILL, the OOM killer) cannot: the worker then
    ends by itself within a second, where it had waited for work for ever."""
    import threading

    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    owner = os.getppid()

    def watch() -> None:
        while os.getppid() == owner:
            time.sleep(ORPHAN_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="flava-orphan-watch", daemon=True).start()


OWNER_POLL_S = 0.2
"""How often a loader worker told to end (SIGTERM) looks whether its owner is still there."""
_loader_owner = 0  # the pid of the process a loader worker serves
_owner_exiting = None
"""A multiprocessing Event the owner sets as it exits (`prepare_loader_owner`): its exit joins its
workers (multiprocessing's own exit handler), so one told to end must not wait for it to be gone."""


def prepare_loader_owner() -> None:
    """In a process about to start loader workers (forked: they inherit the event): set the event
    at its exit, before multiprocessing's handler, registered earlier, ends and joins them."""
    global _owner_exiting
    if _owner_exiting is None:
        import atexit
        import multiprocessing

        _owner_exiting = multiprocessing.Event()
        atexit.register(_owner_exiting.set)


def _serve_while_owner_lives(signum: int, frame) -> None:
    import threading

    if any(t.name == "flava-owner-watch" for t in threading.enumerate()):
        return

    def watch() -> None:
        while os.getppid() == _loader_owner and not (_owner_exiting is not None and _owner_exiting.is_set()):
            time.sleep(OWNER_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="flava-owner-watch", daemon=True).start()


def quiet_loader_worker(*_) -> None:
    """A torch DataLoader worker's init: SIGINT (Ctrl-C reaches the whole process group) is for its
    owner. SIGTERM reaches it from a launcher or scheduler that signals the group while its owner
    runs on to the step where it stops: under torchrun that is the next step every process syncs
    at, up to `log_every` steps later, and the owner draws batches until then (a worker gone
    sooner fails the run without a checkpoint). So the worker keeps serving; its owner shuts it
    down as usual when it stops, and it ends by itself (status 0, which no owner takes for a
    failure) once its owner is gone. A worker stuck past DataLoader's own shutdown, which sends
    SIGTERM too, ends when it frees itself or its owner exits (its owner joins it then)."""
    global _loader_owner
    _loader_owner = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _serve_while_owner_lives)
