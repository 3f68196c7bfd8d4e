"""Host-device syncs: whether the step may read values that live on the device.

Reading a value an accelerator computed (`.item()`, `bool(t)`, or a shape that depends on the
data: boolean indexing, `nonzero`) makes the host wait until the device has finished everything
queued before it; the host can then no longer run ahead, and the device idles while the next work
is queued. Inside `sync_free()` the model and the losses take shape-static forms: sizes the host
already knows (counts the batch read before it left the host: masked patches and tokens, real
text tokens), padding masked where no such count exists (the multimodal encoder's, which depends
on the ITM negatives), no checks of values. Outside it they read where that is cheaper: on the CPU
a read costs nothing and data-dependent shapes do less work, so the trainer turns it on for
accelerators only.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_SYNC_FREE = contextvars.ContextVar("flava_sync_free", default=False)


@contextlib.contextmanager
def sync_free(enabled: bool = True):
    """Within the block (when `enabled`), nothing reads device values on the host."""
    token = _SYNC_FREE.set(enabled)
    try:
        yield
    finally:
        _SYNC_FREE.reset(token)


def is_sync_free() -> bool:
    return _SYNC_FREE.get()


def select_positions(mask: torch.Tensor, bound: int | None = None
                     ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The positions where `mask` is set, in row-major order, as one index tensor per dimension
    (for `x[index]`), and which of them are real.

    Outside `sync_free()` they are exactly `mask.nonzero(as_tuple=True)` and the second value is
    None. Inside, their number is `bound` (at least the count, known on the host; all positions
    when None): the set positions first, then position 0 again, with the [bound] validity mask
    saying which entries are real.
    """
    if not is_sync_free():
        return mask.nonzero(as_tuple=True), None
    size = mask.numel() if bound is None else min(bound, mask.numel())
    flat = torch.nonzero_static(mask.reshape(-1), size=size, fill_value=-1).squeeze(1)
    valid = flat >= 0
    # Not torch.unravel_index: it copies the shape to the device from pageable memory, a sync.
    rest, index = flat.clamp_min(0), []
    for n in reversed(mask.shape[1:]):
        index.append(rest % n)
        rest = rest // n
    return (rest, *reversed(index)), valid
