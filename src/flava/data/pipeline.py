"""From shards to batches: the order in which records are drawn (what each becomes is `data.samples`).

The order is a pure function of the seed and the draw number, whatever the number of processes.
A source's shards are dealt, in a seeded order per epoch, to `lanes` (a fixed number that divides
the global batch); each draw of a global batch takes the same number of consecutive positions
from every lane, and a lane walks its shards one at a time, each in a seeded order of its own. So
only the shards being read are in memory, start-up reads one shard per lane, and the global
batch of a draw is the same on 1 or N processes: process r reads the r-th block of slots, which
covers its own lanes when N divides the lane count. Every sample's crop and masks come from a
generator seeded by (seed, shard, record, epoch). A record that fails to decode is counted and
replaced by a seeded draw from the same shard, so it shifts nothing else. A stream is resumed
from its draw count and each lane's cursor (the shard it is in), which any number of processes
can take over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataChanged, DataError, FlavaError
from .. import stopping
from ..stopping import prepare_loader_owner, quiet_loader_worker
from .decode import MISSING_IMAGE
from .members import BadSample
from .samples import SampleMaker
from .transforms import lies_channels_last, single_threaded
from .shards import end_pipes, is_remote
from .sources import OUTAGE_S, Source, open_shard, open_waiting, shard_bytes


MAX_LANES = 64
SUBSTITUTE_TRIES = 100
CHANGED = ("the data changed, and a resumed run reads on from its saved positions in the data it was saved with; "
           "resume with that data")
"""Why a resume on other data is refused (`DataChanged`); pretraining adds its way to train on the new data."""
PROBE_SHARDS = 5
SAMPLE_BYTES = {"pairs": 2048, "images": 1024, "text": 1}
"""The least bytes a usable sample takes in a shard: a tar member's header and a block of data for
each of its image and caption; a line of text."""
COUNTED_BYTES = 1 << 20
"""Shards of at most these bytes (or a batch's worth of `SAMPLE_BYTES`) are counted at the start."""
"""Shards a source's probe reads at most (`BatchStream.probe`)."""
POLL_S = 0.5
"""How often the owner of loader workers that have not sent a batch looks for a stop request."""
WORKER_RESTARTS = 3
"""Times one draw's loader workers may die (the OOM killer, a decoder's crash) and be started again."""


AUTO_WORKERS_MAX = 8
"""The most loader workers a kind is given by default on a GPU host (`auto_workers`)."""


def usable_cores() -> int:
    """The cores this process may use: its affinity, within a container's CPU quota (which
    affinity does not show)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _cpu_quota() -> float | None:
    """Cores' worth of CPU time the cgroup allows (v2's cpu.max, else v1's CFS quota); None: no limit."""
    def read(name: str) -> str:
        with open(f"/sys/fs/cgroup/{name}") as f:
            return f.read().strip()

    try:
        quota, period = read("cpu.max").split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = read("cpu/cpu.cfs_quota_us"), read("cpu/cpu.cfs_period_us")
        except OSError:
            return None
    try:
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def auto_workers(shares: dict[str, float]) -> dict[str, int]:
    """Loader workers for each kind a run on a GPU draws (its sources share them), by default: the
    cores this process may use (`usable_cores`), less one for itself, the host's processes sharing
    them (LOCAL_WORLD_SIZE), split by the kinds' `shares` of the steps at the start, from 1 to
    AUTO_WORKERS_MAX a kind. (On the CPU the step needs the cores: one worker a kind.)"""
    cores = usable_cores()
    spare = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)
    total = sum(shares.values()) or 1.0
    return {k: max(1, min(AUTO_WORKERS_MAX, int(spare * share / total))) for k, share in shares.items()}


def choose_lanes(global_batch: int, shards: int, most: int = 0) -> int:
    """Lanes of a stream: the largest divisor of the global batch that is at most the shard count
    and `most` (MAX_LANES when 0). A lane holds one open shard at a time; several lanes put several
    shards into every batch and let processes read disjoint shards."""
    cap = min(global_batch, max(1, shards), most or MAX_LANES)
    return max(d for d in range(1, cap + 1) if global_batch % d == 0)


def per_process_batch(global_batch: int, world: int, what: str) -> int:
    """The batch each of `world` processes draws so that together they keep `global_batch`; a
    DataError when they cannot share it evenly."""
    if global_batch % world:
        fits = [d for d in range(1, min(global_batch, 4 * world) + 1) if global_batch % d == 0]
        raise DataError(f"{what} was saved with a global batch of {global_batch} samples, which {world} processes "
                        f"cannot share evenly: resume on a number of processes that divides it (e.g. "
                        f"{', '.join(map(str, fits[-4:]))}), or change data.batch_size with --override (a new data "
                        "order)")
    return global_batch // world


@dataclass(frozen=True)
class Layout:
    """Which slots of each global draw a process fills, and where each slot reads from."""

    global_batch: int
    lanes: int
    rank: int = 0
    world: int = 1

    @property
    def per_lane(self) -> int:
        return self.global_batch // self.lanes

    @property
    def slots(self) -> range:
        local = self.global_batch // self.world
        return range(self.rank * local, (self.rank + 1) * local)

    def lane(self, slot: int) -> int:
        return slot // self.per_lane

    def lane_position(self, draw: int, slot: int) -> int:
        return draw * self.per_lane + slot % self.per_lane

    def owners(self, workers: int) -> dict[int, int]:
        """Slot -> loader worker: whole lanes per worker when there are enough lanes (each shard is
        read by one worker), else single slots; in runs, so that the workers' parts, taken in turn,
        join in slot order with no reordering copy of the batch."""
        n, slots = max(1, workers), list(self.slots)
        if len({self.lane(s) for s in slots}) >= n:
            # A lane goes where its middle slot falls: whole lanes, the runs balanced by slots (a
            # process's first and last lanes may hold only part of their slots).
            first: dict[int, int] = {}
            last: dict[int, int] = {}
            for i, s in enumerate(slots):
                first.setdefault(self.lane(s), i)
                last[self.lane(s)] = i
            return {s: (first[self.lane(s)] + last[self.lane(s)] + 1) * n // (2 * len(slots)) for s in slots}
        return {s: i * n // len(slots) for i, s in enumerate(slots)}


@dataclass(frozen=True)
class Cursor:
    """Where a lane is: the shard (`ordinal` in its list for `epoch`) that starts at lane position `start`."""

    epoch: int = 0
    ordinal: int = 0
    start: int = 0


class Lane:
    """One lane of a source: its shards in the seeded order of each epoch, one open at a time."""

    def __init__(self, source: Source, lane: int, lanes: int, seed: int, cursor: Cursor | None = None,
                 outage: tuple[float, str] = (OUTAGE_S, "data.outage_minutes")):
        self.source, self.lane, self.lanes, self.seed, self.outage = source, lane, lanes, seed, outage
        self.cursor = cursor or Cursor()
        self._order: tuple[int, np.ndarray] | None = None
        self._open: tuple[Cursor, int, list, np.ndarray] | None = None
        self.opened: dict[int, dict] = {}
        """Shard -> what was rejected when it was indexed, for shards opened and not yet reported."""
        self.met: Counter = Counter()
        """Everything its shards' indexing rejected, for the message when none holds a record."""
        self._met_in: set[int] = set()
        self.failure = ""
        """The first shard that gave no record (`Opened.failure`), for that message too."""

    def _shards(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.shards))
            self._order = epoch, perm[self.lane::self.lanes]
        return self._order[1]

    def at(self, position: int) -> tuple[int, list, int, int]:
        """(shard index, its records, record index, epoch) at lane `position` (never before the cursor)."""
        empty = 0
        while True:
            c = self.cursor
            if self._open is None or self._open[0] != c:
                shard = int(self._shards(c.epoch)[c.ordinal])
                opened = open_waiting(self.source.shards[shard], *self.outage)
                if opened.rejected:
                    self.opened[shard] = dict(opened.rejected)
                    if shard not in self._met_in:  # a shard opened again (each epoch) is counted once
                        self._met_in.add(shard)
                        self.met.update(opened.rejected)
                self.failure = self.failure or opened.failure
                perm = np.random.default_rng([self.seed, c.epoch, shard, 1]).permutation(len(opened.records))
                self._open = c, shard, opened.records, perm
            _, shard, records, perm = self._open
            if position < c.start + len(records):
                return shard, records, int(perm[position - c.start]), c.epoch
            empty = empty + 1 if not records else 0
            if empty > 2 * len(self.source.shards):
                raise no_usable_record(self.source.name, self.met, self.failure, self.source.kind)
            last = c.ordinal + 1 == len(self._shards(c.epoch))
            self.cursor = Cursor(c.epoch + last, 0 if last else c.ordinal + 1, c.start + len(records))


def record_id(shard: int, index: int) -> int:
    return shard << 32 | index


class _Draws(IterableDataset):
    """One item per global draw from each loader worker: the slots it owns and their samples
    collated into one batch (a few large tensors cross the process boundary, not one per
    sample), the failures met, its lanes' cursors and the shards it indexed."""

    def __init__(self, kind: str, source: Source, maker: SampleMaker, layout: Layout, seed: int, draw: int,
                 cursors: dict[int, Cursor], outage: tuple[float, str] = (OUTAGE_S, "data.outage_minutes")):
        self.kind, self.source, self.maker, self.layout, self.seed = kind, source, maker, layout, seed
        self.draw, self.cursors, self.outage = draw, cursors, outage
        self._others: dict[int, list] = {}
        """Shards opened for replacements of bad records (a few, most recent)."""

    def _sample(self, lane: Lane, position: int, bad: list):
        shard, records, k, epoch = lane.at(position)
        try:
            return self.maker(self.kind, records[k], (self.seed, shard, k, epoch))
        except BadSample as e:
            bad.append((e.kind, record_id(shard, k)))
        rng = np.random.default_rng([self.seed, shard, k, epoch, 5])
        for attempt in range(1, SUBSTITUTE_TRIES + 1):
            # A replacement from the same shard (already open); from any shard of the source when
            # that one seems to hold nothing usable.
            where, pool = (shard, records) if attempt <= SUBSTITUTE_TRIES // 5 else \
                self._other(int(rng.integers(len(self.source.shards))))
            if not pool:
                continue
            j = int(rng.integers(len(pool)))
            try:
                return self.maker(self.kind, pool[j], (self.seed, where, j, epoch, attempt))
            except BadSample as e:
                bad.append((e.kind, record_id(where, j)))
        raise DataError(f"{self.source.name}: no usable sample in {SUBSTITUTE_TRIES} records drawn to replace a "
                        f"bad one of shard {self.source.shards[shard].name}")

    def _other(self, shard: int) -> tuple[int, list]:
        cache = self._others
        if shard not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[shard] = open_waiting(self.source.shards[shard], *self.outage).records
        return shard, cache[shard]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        layout = self.layout
        mine = [s for s, w in layout.owners(workers).items() if w == worker]
        lanes = {j: Lane(self.source, j, layout.lanes, self.seed, self.cursors.get(j), self.outage)
                 for j in sorted({layout.lane(s) for s in mine})}
        draw = self.draw
        while True:
            bad: list = []
            out = {s: self._sample(lanes[layout.lane(s)], layout.lane_position(draw, s), bad) for s in mine}
            opened = {}
            for lane in lanes.values():
                opened.update(lane.opened)
                lane.opened = {}
            part = self.maker.collate(self.kind, [out[s] for s in mine]) if mine else None
            if info is not None:
                part = Packed.of(part)
            yield draw, mine, part, {j: lane.cursor for j, lane in lanes.items()}, bad, opened
            draw += 1


class Packed:
    """A batch part's tensors in one buffer, for its way from a loader worker: each tensor crosses
    processes by a file descriptor of its own, sent and mapped one by one (about 0.4 ms each here,
    seven a part: by that count, some 20 ms of the training process a step with eight workers). The
    tensors come back as views of the buffer (any one kept keeps it all); fields sharing a tensor
    still do."""

    ALIGN = 64

    def __init__(self, kind: type, buffer: torch.Tensor, layout: dict, other: dict):
        self.kind, self.buffer, self.layout, self.other = kind, buffer, layout, other

    @classmethod
    def of(cls, part):
        if part is None or not dataclasses.is_dataclass(part):
            return part
        tensors, other, layout, at = {}, {}, {}, 0
        first: dict[int, str] = {}
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if not isinstance(value, torch.Tensor):
                other[f.name] = value
            elif id(value) in first:
                layout[f.name] = first[id(value)]  # the name of the field holding it
            else:
                first[id(value)] = f.name
                # Channels-last pixels travel as their bytes lie (NHWC), not transposed.
                nhwc = lies_channels_last(value)
                tensors[f.name] = value.permute(0, 2, 3, 1) if nhwc else value.contiguous()
                size = value.numel() * value.element_size()
                layout[f.name] = (at, size, value.dtype, tuple(tensors[f.name].shape), nhwc)
                at += -(-size // cls.ALIGN) * cls.ALIGN
        try:  # in shared memory from the start: made elsewhere, it is copied there when sent
            buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(at))
        except (AttributeError, RuntimeError):
            buffer = torch.empty(at, dtype=torch.uint8)
        for name, t in tensors.items():
            start, size = layout[name][:2]
            buffer[start:start + size].view(t.dtype).copy_(t.flatten())
        return cls(type(part), buffer, layout, other)

    def unpacked(self):
        out = dict(self.other)
        for name, where in self.layout.items():
            if not isinstance(where, str):
                at, size, dtype, shape, nhwc = where
                out[name] = self.buffer[at:at + size].view(dtype).view(shape)
                if nhwc:
                    out[name] = out[name].permute(0, 3, 1, 2)
        for name, where in self.layout.items():
            if isinstance(where, str):
                out[name] = out[where]
        return self.kind(**out)


def no_usable_record(name: str, met: Counter, failure: str = "", kind: str = "") -> DataError:
    """A source whose shards hold no record at all: what was met reading them (and one of them, with
    what its reader said), or that they are empty."""
    why = ", ".join(f"{n} {reason}" for reason, n in met.most_common())
    example = f"; e.g. {failure}" if failure else ""
    # Shards of images alone (`flava prepare --images` writes them), read as pairs.
    hint = "; a shard of images without captions is image data" if kind == "pairs" and set(met) == {
        "incomplete tar sample"} else ""
    return DataError(f"{name}: no shard holds a usable record" + (f" (met: {why}{example}){hint}" if why else
                                                                  " (every one is empty)"))


class _WorkerDied(Exception):
    """A loader worker of the draw died; its message says which and how."""


def _death(worker) -> str:
    code = worker.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
    return f"pid {worker.pid}, {how}"


def _forget_worker_pids(it) -> None:
    """Take a loader iterator's workers out of torch's SIGCHLD handler."""
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        _remove_worker_pids(id(it))
        it._worker_pids_set = False


def _unwrapped(e: FlavaError) -> FlavaError:
    """A worker's error as its own one line: the DataLoader re-raises it with the worker's whole
    traceback as its message."""
    text, marker = str(e), f"{type(e).__module__}.{type(e).__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return type(e)(text.rsplit(marker, 1)[1].strip())
    return e


@dataclass
class BatchStream:
    """Batches of one source for one process: draw after draw of the global stream."""

    kind: str
    source: Source
    maker: SampleMaker
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    num_workers: int = 0
    lanes: int = 0
    """The most lanes (see `choose_lanes`); 0: up to MAX_LANES."""
    outage_s: float = OUTAGE_S
    """How long a shard whose store cannot serve it now is waited for (`open_waiting`)."""
    outage_setting: str = "data.outage_minutes"
    """The setting that sets `outage_s`, named when the wait is over."""
    draws: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Draws skipped, by reason (a bad record drawn in three epochs counts three times)."""
    bad: dict[str, set[int]] = field(default_factory=dict)
    """The bad records themselves (`record_id`), by reason (each counted once)."""
    rejected: dict[int, dict] = field(default_factory=dict)
    """Shard -> what its indexing rejected (truncated shards, incomplete samples)."""

    def __post_init__(self) -> None:
        self._lay_out()
        self.cursors: dict[int, Cursor] = {}
        self.notes: list[str] = []
        self._it = None
        self._undo: list | None = None
        """What draws since the latest `snapshot` added to `bad` and `rejected`, to take back."""
        self.earlier: dict[str, int] = {}
        """Samples given before this source's count began, by the name of the source that gave them:
        another source this stream continued from (resume --override of the data), or this one
        before a new batch size started its order again."""
        self.counted_from = 0
        """The draw this source's count begins at."""
        self.probed_size: int | None = None
        """The records of a source of unknown size that `probe` counted (`_count`)."""

    @property
    def samples(self) -> int:
        """Samples this source has given (all processes)."""
        return (self.draws - self.counted_from) * self.layout.global_batch

    @property
    def samples_by_source(self) -> dict[str, int]:
        """Samples given, by the source that gave them (the stream's earlier sources first)."""
        counts = dict(self.earlier)
        counts[self.source.name] = counts.get(self.source.name, 0) + self.samples
        return counts

    def _iterator(self):
        dataset = _Draws(self.kind, self.source, self.maker, self.layout, self.seed, self.draws, dict(self.cursors),
                         (self.outage_s, self.outage_setting))
        # Workers leave SIGTERM/SIGINT to this process, which stops at its step's end (stopping.py).
        if self.num_workers:
            prepare_loader_owner()
        # The loader's own generator: an iterator (re)built on resume must not draw from the global
        # one, which the checkpoint restored for the model's dropout (samples seed themselves).
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None, persistent_workers=False,
                            timeout=POLL_S if self.num_workers else 0,
                            worker_init_fn=quiet_loader_worker if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.seed))
        it = iter(loader)
        # torch's SIGCHLD handler raises wherever this process is when a worker dies (amid a step, a
        # checkpoint's write): a death is found at the draw instead (`_received`) and survived.
        _forget_worker_pids(it)
        return it

    def next_batch(self):
        """The next draw's batch for this process. Loader workers that died (the OOM killer, a
        decoder's crash) are started again from the stream's state, which the draw had not moved:
        the batch is the one they would have given."""
        deaths = 0
        while True:
            try:
                return self._draw()
            except _WorkerDied as e:
                deaths += 1
                if deaths > WORKER_RESTARTS:
                    why = ("SIGKILL is most often the out-of-memory killer: lower data.num_workers or data.batch_size"
                           if "SIGKILL" in str(e) else "a crash reading a record (a decoder's on a damaged image?): "
                           "data.num_workers=0 shows where")
                    raise DataError(f"{self.source.name}: its loader workers died {deaths} times at draw "
                                    f"{self.draws} ({e}); {why}") from None
                print(f"note: {self.source.name}: a loader worker died ({e}); its draw is read again by new workers",
                      file=sys.stderr, flush=True)

    def _draw(self):
        if self._it is None:
            self._it = self._iterator()
        got = []
        for _ in range(max(1, self.num_workers)):
            try:
                if self.num_workers:
                    got.append(self._received())
                else:  # read here: a stop may end the wait wherever it is (stopping.abandonable)
                    with single_threaded(), stopping.interruptible():
                        got.append(next(self._it))
            except BaseException as e:
                # The draw is given up (a failure, a stop): the next one starts a new iterator from
                # the stream's state, as a resumed run would.
                self._drop_iterator()
                if isinstance(e, FlavaError):
                    raise _unwrapped(e) from None
                raise
        # The stream's state moves once every worker's part is in: a draw that failed midway is
        # drawn whole again by a run resumed from the state saved then.
        parts = []
        for draw, slots, part, cursors, bad, opened in got:
            assert draw == self.draws, (draw, self.draws)
            part = part.unpacked() if isinstance(part, Packed) else part
            parts.append((slots, part))
            for j, c in cursors.items():
                if j not in self.cursors or c.start > self.cursors[j].start:
                    self.cursors[j] = c
            for reason, rid in bad:
                self.skipped[reason] += 1
                held = self.bad.setdefault(reason, set())
                if self._undo is not None and rid not in held:
                    self._undo.append((reason, rid))
                held.add(rid)
            if self._undo is not None:
                self._undo += [(None, (shard, self.rejected.get(shard))) for shard in opened]
            self.rejected.update(opened)
        self.draws += 1
        return self.maker.merge(parts)

    def _drop_iterator(self) -> None:
        """Forget the iterator. Its workers are killed first, with the `pipe:` commands they run:
        one may be stuck in the read given up, and the loader's own shutdown would wait up to 10 s
        for each (its SIGTERM is taken as a scheduler's, `stopping.quiet_loader_worker`). Nothing
        they held is read again."""
        it, self._it = self._it, None
        _forget_worker_pids(it)  # else torch's SIGCHLD handler calls their end a failure
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                with contextlib.suppress(OSError):  # held still while the commands it started end
                    os.kill(w.pid, signal.SIGSTOP)
                    end_pipes(w.pid)
                w.kill()

    def _received(self):
        """The next part from the loader's workers, looking every POLL_S whether a stop request
        may end the wait (`stopping.poll`): a signal handler must not raise amid a transfer."""
        while True:
            try:
                return next(self._it)
            except RuntimeError as e:
                if "exited unexpectedly" in str(e):
                    raise _WorkerDied(", ".join(_death(w) for w in self._it._workers if not w.is_alive())) from None
                if not str(e).startswith("DataLoader timed out"):  # the loader's `timeout` passed
                    raise
            stopping.poll()

    def probe(self) -> None:
        """Refuse, before training, a source none of whose records makes a sample: met at a later
        draw it failed the run there (and its resume, at the same draw). Up to SUBSTITUTE_TRIES
        records are tried, drawn at random (seeded) from a few local shards, as the stream draws
        and replaces them: junk listed first (a folder's `__MACOSX/._*.jpg`) does not condemn it.
        Remote shards are not fetched for this (every process would download one whole)."""
        shards = [s for s in self.source.shards if not is_remote(str(getattr(s, "url", "")))]
        if not shards:
            return
        rng = np.random.default_rng([self.seed, 17])
        met: Counter = Counter()
        tried, failure, missing = 0, "", None
        held: dict[int, int] = {}  # records by shard read
        for k in rng.permutation(len(shards))[:PROBE_SHARDS]:
            opened = open_shard(shards[int(k)])
            held[int(k)] = len(opened.records)
            met.update(opened.rejected)
            failure = failure or opened.failure
            share = max(1, SUBSTITUTE_TRIES // min(PROBE_SHARDS, len(shards)))
            for j in rng.permutation(len(opened.records))[:share]:
                try:
                    self.maker(self.kind, opened.records[int(j)], (self.seed, int(k), int(j), 0))
                    self.probed_size = self._count(shards, held)
                    return
                except BadSample as e:
                    met[e.kind] += 1
                    image = getattr(opened.records[int(j)], "image", None)
                    if missing is None and e.kind == MISSING_IMAGE and isinstance(image, Path):
                        missing = image
                tried += 1
        if tried == 0:
            if len(shards) > PROBE_SHARDS:
                return  # the shards drawn are empty: the stream moves on to the others
            raise no_usable_record(self.source.name, met, failure, self.source.kind)
        why = ", ".join(f"{n} {reason}" for reason, n in met.most_common())
        if missing is not None:  # which path was looked for shows where relative ones were read from
            why += f": e.g. {os.path.abspath(missing)} does not exist" + (
                "; a table's relative paths are read from its folder" if self.kind == "pairs" else "")
        raise DataError(f"{self.source.name}: none of {tried} records drawn from it makes a sample ({why}); fix "
                        f"the data or leave the source out")

    def _count(self, shards: list, held: dict[int, int]) -> int | None:
        """The records of a source of unknown size whose shards are all local and were read by the
        probe or are small (`COUNTED_BYTES` between them, or so few bytes that they may hold fewer
        samples than a batch): whether a batch repeats samples. None otherwise: an estimate is not said."""
        if self.source.known_size is not None or len(shards) < len(self.source.shards):
            return None
        rest = [j for j in range(len(shards)) if j not in held]
        sizes = [shard_bytes(shards[j]) for j in rest]
        if None in sizes or sum(sizes) > max(COUNTED_BYTES, self.layout.global_batch * SAMPLE_BYTES.get(self.kind, 1)):
            return None
        return sum(held.values()) + sum(len(open_shard(shards[j]).records) for j in rest)

    def _lay_out(self) -> None:
        g = self.batch_size * self.world
        self.layout = Layout(g, choose_lanes(g, len(self.source.shards), self.lanes), self.rank, self.world)

    def state(self) -> dict:
        return {"draws": self.draws, "global_batch": self.layout.global_batch, "batch_size": self.batch_size,
                "lanes": self.layout.lanes, "shards": len(self.source.shards), "size": self.source.known_size,
                "bytes": self.source.known_bytes, "names": self.source.known_names, "seed": self.seed,
                "digest": self.source.known_digest,
                "cursors": {str(j): [c.epoch, c.ordinal, c.start] for j, c in sorted(self.cursors.items())},
                "skipped": dict(self.skipped), "bad": {k: sorted(v) for k, v in self.bad.items()},
                "rejected": {str(k): v for k, v in self.rejected.items()},
                "source": self.source.name, "earlier": self.earlier, "counted_from": self.counted_from}

    def load_states(self, states: list[dict]) -> None:
        """Continue from the states every process of a run saved, on this run's processes (any
        number, the same global batch)."""
        first = states[0]
        restart = False
        saved = int(first["global_batch"])
        if saved != self.layout.global_batch:
            if int(first.get("batch_size", self.batch_size)) != self.batch_size:
                restart = True  # the batch size itself was changed (resume --override): a new order
            else:  # only the number of processes changed: the run keeps its global batch
                was = self.batch_size
                self.batch_size = per_process_batch(saved, self.world, f"the {self.kind} data ({self.source.name})")
                self._lay_out()
                self.notes.append(f"the {self.kind} data keeps the run's global batch of {saved}: "
                                  f"{self.batch_size} per process on {self.world} (data.batch_size was {was})")
        if not restart and (int(first["shards"]) != len(self.source.shards) or
                            int(first["lanes"]) != self.layout.lanes):
            raise DataChanged(f"the {self.kind} data ({self.source.name}) has {len(self.source.shards)} shards and "
                              f"{self.layout.lanes} lanes but the run was saved with {first['shards']} and "
                              f"{first['lanes']}: {CHANGED}")
        was, now = first.get("size"), self.source.known_size
        if not restart and was is not None and now is not None and int(was) != now:
            # A table or folder of another size under the same shard count: positions saved in it
            # would index other samples, repeating or skipping some.
            raise DataChanged(f"the {self.kind} data ({self.source.name}) holds {now:,} samples but the run was "
                              f"saved with {int(was):,}: {CHANGED}")
        was, now = first.get("bytes"), self.source.known_bytes
        same = str(first.get("source", self.source.name)) == self.source.name
        if not restart and same and was is not None and now is not None and int(was) != now:
            # A file edited in place under the same count of byte ranges or rows: lines move, captions
            # change, and the saved positions would read others, silently. Another source named with
            # --override is a change the user declared: its shape (above) is all positions need.
            raise DataChanged(f"the {self.kind} data ({self.source.name}) holds {now:,} bytes but the run was "
                              f"saved with {int(was):,}: {CHANGED}")
        was, now = first.get("digest"), self.source.known_digest
        if not restart and same and was is not None and now is not None and was != now:
            raise DataChanged(f"the {self.kind} data ({self.source.name}) was edited since the run was saved (as many "
                              f"bytes): {CHANGED}")
        was, now = first.get("names"), self.source.known_names
        if not restart and same and was is not None and now is not None and was != now:
            # A folder's images renamed, added and removed, as many as before: positions index by name.
            raise DataChanged(f"the {self.kind} data ({self.source.name}) holds other files than the run was saved "
                              f"with (as many): {CHANGED}")
        self.seed = int(first.get("seed", self.seed))
        self.draws = int(first["draws"])
        # What the saved source gave stays its own when another is named now (or the order starts again).
        self.earlier = {str(k): int(v) for k, v in first.get("earlier", {}).items()}
        self.counted_from = int(first.get("counted_from", 0))
        was_named = str(first.get("source", self.source.name))  # states before names were saved: this one
        if was_named != self.source.name or restart:
            given = (self.draws - self.counted_from) * saved
            if given:
                self.earlier[was_named] = self.earlier.get(was_named, 0) + given
            self.counted_from = 0 if restart else self.draws
            if not restart:  # --override named it: same-shaped, it is read where the saved one would have been
                self.notes.append(f"the {self.kind} data is now {self.source.name} (the run was saved on {was_named}):"
                                  " the run reads on from its saved positions, in the new data")
        self.cursors, self.bad, self.rejected, self.skipped = {}, {}, {}, Counter()
        self._undo = None
        for r, st in enumerate(states):
            for j, (e, o, s) in st.get("cursors", {}).items():
                if int(j) not in self.cursors or s > self.cursors[int(j)].start:
                    self.cursors[int(j)] = Cursor(int(e), int(o), int(s))
            for reason, ids in st.get("bad", {}).items():
                self.bad.setdefault(reason, set()).update(ids)
            self.rejected.update({int(k): v for k, v in st.get("rejected", {}).items()})
            if r % self.world == self.rank:  # each saved process's draw counts go to exactly one process
                self.skipped.update(st.get("skipped", {}))
        if restart:
            self.notes.append(f"data.batch_size changed from {first['batch_size']} to {self.batch_size}: the "
                              f"{self.kind} data ({self.source.name}) starts a new pass in a new order")
            self.seed += 1_000_003 * (self.draws + 1)
            self.draws, self.cursors = 0, {}
        self._drop_iterator()

    def load_state(self, state: dict) -> None:
        self.load_states([state])

    def snapshot(self) -> tuple:
        """This process's position and counts now, for `restore` (a step given up: `Trainer._undo_point`,
        which takes one each step). The bad records and shard rejections, which grow with the run,
        are not copied: what later draws add to them is logged, to be taken back."""
        self._undo = []
        return self.draws, dict(self.cursors), Counter(self.skipped), self._undo

    def restore(self, snapshot: tuple) -> None:
        """Back to `snapshot`, the latest taken."""
        self.draws, cursors, skipped, undo = snapshot
        if undo is not self._undo:
            raise RuntimeError("a stream is restored to its latest snapshot only")
        self.cursors, self.skipped = dict(cursors), Counter(skipped)
        for reason, added in reversed(undo):
            if reason is not None:
                self.bad[reason].discard(added)
                if not self.bad[reason]:
                    del self.bad[reason]
            elif added[1] is None:
                self.rejected.pop(added[0], None)
            else:
                self.rejected[added[0]] = added[1]
        undo.clear()
        self._drop_iterator()  # it read ahead of the position restored


class KindStream:
    """The batches of one data kind: a source chosen per draw by weight (seeded by the draw), then
    that source's next batch."""

    def __init__(self, kind: str, streams: list[BatchStream], weights: list[float], seed: int,
                 estimated: bool = False):
        if len(streams) != len(weights) or not streams:
            raise DataError(f"the {kind} data needs one weight per source")
        total = float(sum(weights))
        if total <= 0:
            raise DataError(f"the {kind} sources' weights sum to {total}; give at least one a positive weight")
        self.kind, self.streams, self.seed = kind, streams, seed
        # Scaled by the largest first: weights near the float range's end sum past it.
        scaled = np.array(weights, dtype=float) / max(weights)
        self.weights = scaled / scaled.sum()
        self.estimated = estimated
        """Whether the weights are the sources' sizes as estimated at start (`registry.estimated_size`),
        which a resume takes from the state instead: shards without an index are sized from their
        first, which may since have changed."""
        self.draws = 0

    def next_batch(self):
        i = 0 if len(self.streams) == 1 else \
            int(np.random.default_rng([self.seed, self.draws, 13]).choice(len(self.streams), p=self.weights))
        batch = self.streams[i].next_batch()
        self.draws += 1  # only once drawn: a draw that failed is drawn again on resume
        return batch

    @property
    def samples_by_source(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.streams:
            for name, n in s.samples_by_source.items():
                counts[name] = counts.get(name, 0) + n
        return counts

    def state(self) -> dict:
        return {"draws": self.draws, "sources": [s.state() for s in self.streams], "weights": self.weights.tolist()}

    def snapshot(self) -> tuple:
        return self.draws, [s.snapshot() for s in self.streams]

    def restore(self, snapshot: tuple) -> None:
        self.draws, streams = snapshot
        for s, snap in zip(self.streams, streams):
            s.restore(snap)

    def load_states(self, states: list[dict]) -> None:
        if any(len(st["sources"]) != len(self.streams) for st in states):
            raise DataChanged(f"the run was saved with {len(states[0]['sources'])} {self.kind} sources and has "
                              f"{len(self.streams)} now: {CHANGED}")
        self.draws = int(states[0]["draws"])
        if self.estimated and len(states[0].get("weights", ())) == len(self.streams):
            self.weights = np.array(states[0]["weights"], dtype=float)
        for i, s in enumerate(self.streams):
            s.load_states([st["sources"][i] for st in states])
