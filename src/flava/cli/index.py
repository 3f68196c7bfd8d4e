"""`flava index`: a FAISS index over `flava embed` output (or more embeddings added to one)."""

from __future__ import annotations

import argparse

from rich.console import Console


def add(sub) -> None:
    p = sub.add_parser("index", help="build a FAISS vector index from `flava embed` output, or add to one")
    p.add_argument("--embeddings", required=True, help="a `flava embed` output directory")
    p.add_argument("--output", required=True, help="the index directory")
    p.add_argument("--add", action="store_true", help="add these embeddings to the existing index at --output")
    p.add_argument("--memory", help="memory budget for the index, e.g. 4GB (default 16GB); above 100k vectors an "
                   "approximate index is chosen to fit it")
    p.add_argument("--which", choices=("image", "text"), help="for pair embeddings: index the image vectors "
                   "(default) or the text vectors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from ..errors import InputError
    from ..retrieval.index import add_embeddings, build_index

    if args.add:
        if args.memory is not None:  # the index keeps the kind it was built as
            raise InputError("--memory chooses the kind of a new index; an index keeps its kind when added to: "
                             "leave out --memory with --add, or build a new index from all the embeddings")
        done = add_embeddings(args.output, args.embeddings, args.which)
        skipped = f"; skipped {done.skipped} item{'s' * (done.skipped != 1)} already in the index" \
            if done.skipped else ""
        were = "s changed since they were" if done.changed != 1 else " changed since it was"
        changed = (f"; {done.changed} item{were} indexed: added again; rebuild the index to drop the old vectors"
                   if done.changed else "")
        # How the images held were told unchanged or changed: exactly, or by a vector another device moves.
        unknown = "no file size and time recorded"
        judged = ("" if not (done.by_file or done.by_vector) else f"; changes judged by vector ({unknown})"
                  if not done.by_file else "; changes judged by file size and time" if not done.by_vector
                  else f"; changes judged by file size and time ({done.by_file}) and by vector ({done.by_vector}: "
                       f"{unknown})")
        console.print(f"added {done.added} vector{'s' * (done.added != 1)} of {args.embeddings} to {args.output}: "
                      f"{len(done.index)} vectors ({done.index.factory}){skipped}{changed}{judged}", soft_wrap=True)
        return
    built = build_index(args.embeddings, args.output, args.memory, args.which)
    index = built.index
    # An image of several captions is one item: its vector comes back once.
    item = "an image" if index.modality == "image" else "a text"
    repeats = (f"; {built.skipped} row{'s' * (built.skipped != 1)} naming {item} an earlier row named left out"
               if built.skipped else "")
    console.print(f"indexed {len(index)} {index.modality} vectors of {index.dim} dimensions in {args.output} "
                  f"({index.factory}; model {index.model}){repeats}", soft_wrap=True)
