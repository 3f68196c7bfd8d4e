"""What a run's data streams report: draws skipped, bad records, samples by source, and notes,
for this process or summed over every process (then a collective)."""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist

from ..data.registry import missing_files, missing_shards
from ..data.sources import listing_said


class DataAccounting:
    """Counts over the streams of every data kind a run draws from."""

    def __init__(self, streams: dict, world: int):
        self.streams, self.world = streams, world

    def _from_processes(self, mine, everywhere: bool) -> list:
        """[mine], or every process's value when `everywhere` (a collective then)."""
        if not everywhere or self.world == 1:
            return [mine]
        values = [None] * self.world
        dist.all_gather_object(values, mine)
        return values

    def batch_streams(self):
        return [(k, i, s) for k, ks in self.streams.items() for i, s in enumerate(ks.streams)]

    def notes(self) -> list[str]:
        return [n for _, _, s in self.batch_streams() for n in s.notes]

    def skipped(self, everywhere: bool = False) -> dict[str, int]:
        """Draws skipped by reason (a bad record drawn in three epochs counts three times), by this
        process's streams or, with `everywhere`, by every process's."""
        mine: Counter = Counter()
        for _, _, s in self.batch_streams():
            mine.update(s.skipped)
        total: Counter = Counter()
        for counts in self._from_processes(dict(mine), everywhere):
            total.update(counts)
        return dict(total)

    def bad_records(self, everywhere: bool = False) -> dict[str, int]:
        return self.bad_records_where(everywhere)[0]

    def bad_records_where(self, everywhere: bool = False) -> tuple[dict[str, int], dict[str, str]]:
        """Bad records by reason, each counted once however often it was drawn: those rejected when
        a source was listed or a shard indexed, and those this process's streams (or, with
        `everywhere`, any process's) found; and for each reason a shard's indexing gave (a missing
        or unreadable shard, a truncated one, a sample without its image) one such shard, the first
        in the order of the run's sources and their shards (not of when it was met): where to look."""
        streams = self.batch_streams()
        mine = ({(k, i, reason): indices for k, i, s in streams for reason, indices in s.bad.items()},
                {(k, i, shard): counts for k, i, s in streams for shard, counts in s.rejected.items()})
        union: dict[tuple, set[int]] = {}
        shards: dict[tuple, dict] = {}
        for bad, rejected in self._from_processes(mine, everywhere):
            for key, indices in bad.items():
                union.setdefault(key, set()).update(indices)
            shards.update(rejected)
        total: Counter = Counter()
        for _, _, s in streams:
            total.update(s.source.listing_rejected)
        for counts in shards.values():
            total.update(counts)
        for (_, _, reason), indices in union.items():
            total[reason] += len(indices)
        order = {(k, i): n for n, (k, i, _) in enumerate(streams)}
        sources = {(k, i): s.source for k, i, s in streams}
        where: dict[str, str] = {}
        for k, i, shard in sorted(shards, key=lambda key: (order[key[:2]], key[2])):
            for reason in shards[k, i, shard]:
                where.setdefault(reason, sources[k, i].shards[shard].name)
        return dict(total), where

    def samples_by_source(self) -> dict[str, dict[str, int]]:
        """Samples drawn so far from each source, by kind (all processes)."""
        return {k: ks.samples_by_source for k, ks in self.streams.items()}


def stream_size(stream) -> int | None:
    """A stream's samples where known at the start: listed, indexed or counted by its probe."""
    return stream.source.known_size if stream.source.known_size is not None else stream.probed_size


def source_notes(streams: dict, global_batch: int, named=lambda kind, source: f"data.{kind} {source.name}",
                 batch_setting: str = "data.batch_size") -> list[str]:
    """What is wrong with a source that the run goes on with: bad rows and missing image files or
    shards (skipped and counted), and fewer samples than a batch, which repeats samples within
    every batch (among pairs, a repeated pair is a negative of itself to the contrastive objective).
    `named(kind, source)`: how a note names the source; `batch_setting`: the batch size's setting."""
    notes = []
    for kind, ks in streams.items():
        for stream in ks.streams:
            name = named(kind, stream.source)
            notes += [f"{name}: {said}" for said in listing_said(stream.source)]
            if gone := missing_shards(stream.source):
                shards = stream.source.shards
                notes.append(f"{name}: {len(gone):,} of its {len(shards):,} shards "
                             f"{'does' if len(gone) == 1 else 'do'} not exist (e.g. "
                             f"{shards[gone[0]].url}); they hold nothing, and are counted as missing when reached")
            size = stream_size(stream)
            missing, checked = missing_files(stream.source)
            if missing:
                share = f"{missing:,} of its {checked:,} image files" if checked == size else \
                    f"{missing:,} of {checked:,} image files looked for (a sample of its {size:,})"
                notes.append(f"{name}: {share} do not exist; those samples are skipped "
                             "and counted" + (" (a table's relative paths are read from its folder)"
                                              if kind == "pairs" else ""))
            usable = size if size is None or not missing else round(size * (checked - missing) / checked)
            if usable is not None and usable < global_batch:
                harm = " (a pair twice in a batch is its own negative to the contrastive objective)" \
                    if kind == "pairs" else ""
                holds = f"holds {usable:,} sample{'s' if usable != 1 else ''}" if usable == size else \
                    f"holds about {usable:,} usable sample{'s' if usable != 1 else ''}"
                notes.append(f"{name} {holds}, fewer than a batch of {global_batch:,}: every batch repeats "
                             f"samples{harm}; give more data or a smaller {batch_setting}")
    return notes
