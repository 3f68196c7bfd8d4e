"""`flava serve`: the HTTP API and search page over a model, an index and a task model."""

from __future__ import annotations

import argparse
import errno
import socket

from rich.console import Console

from ..io.runs import MODEL_HELP


def add(sub) -> None:
    p = sub.add_parser("serve", help="serve search, embeddings and classification over HTTP, with a web page")
    p.add_argument("--model", help=MODEL_HELP + " (default: the model the index was built with)")
    p.add_argument("--index", help="a vector index made by `flava index`, to search")
    p.add_argument("--allow-other-model", dest="allow_other_model", action="store_true",
                   help="serve --index with a --model that is not the checkpoint that made it (searches then "
                        "compare two models; a warning says so)")
    p.add_argument("--task", help="a fine-tuned task model directory, for /predict")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--int8", action="store_true", help="quantize the model's linear layers to int8 (CPU)")
    p.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=10.0,
                   help="largest image upload accepted, in MiB (default 10)")
    p.add_argument("--max-k", dest="max_k", type=int, default=1000,
                   help="most results one search may ask for (default 1000; a search without k gets 12)")
    p.add_argument("--max-classes", dest="max_classes", type=int, default=1000,
                   help="most class names one /classify may send (default 1000)")
    p.add_argument("--queue-timeout", dest="queue_timeout", type=float, default=30.0,
                   help="seconds a request may wait for the model before it is answered 503 (default 30)")
    p.add_argument("--header-timeout", dest="header_timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers before it is closed (default 10)")
    p.add_argument("--body-timeout", dest="body_timeout", type=float, default=30.0,
                   help="seconds a request body may stall before it is answered 408 (default 30)")
    p.add_argument("--threads", type=int, help="CPU threads per model call or search (default: torch's, one per "
                   "core); fewer leave cores to concurrent requests and other processes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    import uvicorn

    from ..errors import ConfigError

    if not (args.model or args.index or args.task):
        raise ConfigError("nothing to serve; give --model, --index or --task")
    if args.max_upload_mb <= 0 or args.max_k < 1:
        raise ConfigError("--max-upload-mb must be positive and --max-k at least 1")
    if args.max_classes < 2:
        raise ConfigError(f"--max-classes must be at least 2; got {args.max_classes}")
    for name in ("queue_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1; got {args.threads}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port number; use 1 to 65535, or 0 for a free one")
    # Bound here, before loading, not by uvicorn: a busy port is one clear message at once, and
    # --port 0 prints the port it got.
    if args.host.startswith("[") and args.host.endswith("]"):  # an IPv6 address as URLs write it
        args.host = args.host[1:-1]
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # proto=IPPROTO_TCP: accepted connections inherit it, and asyncio sets TCP_NODELAY only on
    # sockets that say they are TCP; without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        # Listening before "listening on" is printed: a client that connects between the message and
        # uvicorn's start waits in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        # No interface of this machine has that address, or no such name: the host is at fault, not the port.
        if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
            scope = " (a link-local IPv6 address names its interface: fe80::1%eth0)" \
                if args.host.lower().startswith("fe80:") and "%" not in args.host else ""
            raise ConfigError(f"cannot listen on {args.host} ({e.strerror}): it is no address of this machine{scope}; "
                              "choose another --host (127.0.0.1 for this machine only, 0.0.0.0 for every "
                              "interface)") from None
        where = f"[{args.host}]" if family == socket.AF_INET6 else args.host
        raise ConfigError(f"cannot listen on {where}:{args.port} ({e.strerror}); choose another --port") from None
    try:
        app = build_app(args, console)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    console.print(f"flava serve: listening on http://{shown}:{port}/  (Ctrl-C stops)", soft_wrap=True)
    from ..serve.http import timed_protocol

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                           http=timed_protocol(args.header_timeout)))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has already shut down; it re-raises the signal once it is done
    finally:
        sock.close()
    console.print("flava serve: stopped")


def build_app(args: argparse.Namespace, console: Console):
    import torch

    from .. import load
    from ..errors import ConfigError
    from ..serve.app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    index = task = model = None
    model_name = load_from = args.model
    int8 = args.int8
    if args.index:
        from ..retrieval.index import VectorIndex, query_model

        index = VectorIndex.open(args.index)
        if not (model_name or index.model or index.checkpoint):
            raise ConfigError(f"the index {args.index} does not record which model made it; pass --model")
        load_from, warning = query_model(index, args.model, args.allow_other_model)
        model_name = model_name or index.model
        if warning:
            console.print(warning, style="bold red")
        console.print(f"index: {args.index} ({len(index):,} {index.modality}s, {index.dim} dimensions)")
        if index.int8 is not None and index.int8 != int8:  # queries embedded as its vectors were
            if int8:
                raise ConfigError(f"the index {args.index} holds float embeddings (embed without --int8): serve it "
                                  "without --int8, or build an index of --int8 embeddings")
            int8 = True
            console.print(f"note: the index {args.index} holds int8 embeddings (embed --int8): the model is served "
                          "int8 on the CPU, as --int8 serves it, so that queries are embedded as its vectors were")
    device = "cuda" if torch.cuda.is_available() and not int8 else None
    if args.task:
        from .. import load_task

        task = load_task(args.task, device=device)  # beside the embedding model, not on the CPU
        console.print(f"task model: {args.task} ({task.task})")
    if model_name:
        model = load(load_from, quantize="int8" if int8 else None, device=device)
        console.print(f"model: {model_name}{' (int8)' if int8 else ''}")
    return create_app(model, index, task, model_name=model_name,
                      max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k,
                      max_classes=args.max_classes, queue_timeout=args.queue_timeout, body_timeout=args.body_timeout)
