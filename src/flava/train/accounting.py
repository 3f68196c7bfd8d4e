"""What a run's data streams report: draws skipped, bad records, samples by source, and notes,
for this process or summed over every process (then a collective)."""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist


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
        """Bad records by reason, each counted once however often it was drawn: those rejected when
        a source was listed or a shard indexed, and those this process's streams (or, with
        `everywhere`, any process's) found."""
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
        return dict(total)

    def samples_by_source(self) -> dict[str, dict[str, int]]:
        """Samples drawn so far from each source, by kind (all processes)."""
        return {k: ks.samples_by_source for k, ks in self.streams.items()}
