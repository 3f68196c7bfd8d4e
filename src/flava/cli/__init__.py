"""`flava <command>`: the command-line entry point; one module per command."""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import sys
import time

from rich.console import Console

from .. import __version__, stopping
from ..errors import FlavaError
from ..io.files import check_output_place, explain_os_error
from . import (ablate, classify, codebook, config, demo, embed, evaluate, export, finetune, index, info, init, predict,
               prepare, pretrain, search, serve)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich would exit with 1 itself; `main` ends every command alike, plain print()s included.
        del self._buffer[:]  # what the closed pipe did not take is not written to the next stdout
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


# Piped output (make, CI logs) gets room for the results tables instead of the 80-column default.
console = _Console(highlight=False, width=None if sys.stdout.isatty() else 110)

WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC,
                errno.EDQUOT, errno.ENAMETOOLONG}

# What a Unix tool killed by SIGPIPE reports (128 + 13): `flava search ... | head` ends as `yes | head` does.
BROKEN_PIPE_EXIT = 128 + getattr(signal, "SIGPIPE", 13)

COMMANDS = (demo, init, prepare, pretrain, ablate, evaluate, embed, index, search, classify, finetune, predict, serve,
            export, codebook, config, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flava", description="FLAVA, the vision-and-language foundation model: pretrain it (with its image "
        "codebook), evaluate it on a suite of tasks, embed, index, search and classify with it, fine-tune it into "
        "task models that predict, serve it over HTTP with a web page, and move checkpoints to and from "
        "transformers.")
    parser.add_argument("--version", action="version", version=f"flava {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def entry() -> int:
    """The `flava` console script and `python -m flava.cli`: `main`, after which nothing is left but
    the process's teardown, which a signal ends at once with the command's exit code."""
    code = main()
    stopping.end_with(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    # Commands that stop at their own boundaries on SIGTERM/SIGINT say so with `graceful` (True: at
    # a step; else how they acknowledge a stop) and what a stop at once leaves with `leaves` (or as
    # they save: `stopping.tell_saves`); the others end at once on either, saying so.
    graceful = getattr(args, "graceful", False)
    handling = stopping.terminable(args.command)
    if graceful:
        handling = stopping.handling(graceful if isinstance(graceful, str) else stopping.AT_A_STEP,
                                     getattr(args, "leaves", ""))
    try:
        with handling:
            if getattr(args, "output", None):
                check_output_place(args.output)
            args.run(args, console)
        sys.stdout.flush()  # here, not at exit: a reader gone away is then caught below
    except BrokenPipeError:
        if not _stdout_gone():  # another pipe (a worker's) broke: not the reader's leaving, not to be hidden
            raise
        _silence_stdout()
        return BROKEN_PIPE_EXIT
    except FlavaError as e:
        if os.environ.get("FLAVA_DEBUG"):
            raise
        print(f"flava {args.command}: error: {e}", file=sys.stderr)
        return 2
    except stopping.Stopped as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops alike: one says so
            print(f"flava {args.command}: {e.message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # Writing where one cannot (a file in the way, no permission, a full disk) is the user's
        # to fix; other OS errors (a missing input is checked before any work) are not caught.
        if os.environ.get("FLAVA_DEBUG") or e.errno not in WRITE_ERRORS:
            raise
        print(f"flava {args.command}: error: {explain_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, stopping.Interrupted):
            print(f"flava {args.command}: stopped at once by a second {stopping.name(e.signum)} {e.after:.0f} s "
                  f"after the first; {e.saves}", file=sys.stderr)
            return stopping.exit_code(e.signum)
        print(f"flava {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130
    return 0


def _stdout_gone() -> bool:
    """Whether stdout's reader has closed it (`| head`)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # no descriptor, so no pipe of its own to break
        return False
    if not hasattr(select, "poll"):  # Windows: take the recipe's word for it
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at devnull: what is still buffered for the closed pipe would raise again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout without a descriptor (io.UnsupportedOperation is both)
        pass
