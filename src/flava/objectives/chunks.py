"""A batch's losses in equal chunks that add up to the whole batch's (`optim.contrastive_chunks`):
the memory of a chunk, the contrastive loss of the whole batch.

The contrastive loss couples every row of the (global) batch, so it cannot be summed over
chunks; GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup") computes it exactly in three steps:

1. `plan_chunks`, without autograd: each chunk's contrastive embeddings, keeping the random
   state each pass started from;
2. `plan_chunks`: the contrastive loss of the whole batch on those embeddings as leaves, gathered
   over processes as the unchunked loss is, and its gradient with respect to them and to the
   loss's own parameters (the logit scale; SigLIP's scale and bias);
3. `PretrainingModel.forward(part, generator, chunk)`, once per chunk with autograd: the
   embeddings again from the same random state (so dropout replays alike), whose surrogate
   sum(embedding * cached gradient) back-propagates the loss through the chunk's encoders; the
   loss's own parameters' term rides on the last chunk. Its value is the batch's loss / chunks.

The other objectives run on each chunk as on a batch of their own, except that each divides its
chunk's sum by the whole batch's count of entries (`Objective.count`: masked positions, ITM
rows), counted in step 1, so the chunks' losses add up exactly to the batch's means. ITM's
negatives are drawn among the chunk's rows (of every process), in step 1, chunk by chunk from
the step's generator. So wherever an objective does not couple rows (MIM, MLM; MMM and ITM
without negatives) the chunked step's gradient is the unchunked one's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..distributed import world
from ..errors import InputError
from .negatives import ItmPairs
from .registry import active


@dataclass
class Chunk:
    """What one chunk's pass needs beyond its rows."""

    counts: dict[str, torch.Tensor]
    """The whole batch's count of entries of each chunk-separable objective, over every process."""
    device: torch.device
    rng: tuple | None = None
    """The random state its cached embedding pass started from (CPU, and CUDA on a GPU)."""
    embedding_grads: tuple[torch.Tensor, torch.Tensor] | None = None
    """The weighted contrastive loss's gradient with respect to this chunk's image and text
    embeddings (None: no contrastive loss in this batch)."""
    scale_grad: torch.Tensor | None = None
    """Its gradient with respect to the (clamped) logit scale; on the last chunk only."""
    head_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """Its gradient with respect to its head's parameters, by name; on the last chunk only."""
    loss: torch.Tensor | None = None
    """The chunk's share of the batch's weighted contrastive loss (the loss / chunks)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """The contrastive loss's metrics over the whole batch."""
    itm_pairs: ItmPairs | None = None
    """ITM's pairs for the chunk, drawn in step 1."""

    def replay(self, states) -> None:
        """Compute the chunk's contrastive embeddings first, from the random state of their cached
        pass; the rest of the pass continues the random stream where it was."""
        if self.embedding_grads is None:
            return
        after = _rng_state(self.device)
        _set_rng_state(self.rng, self.device)
        try:
            states.embeddings
        finally:
            _set_rng_state(after, self.device)

    def contrastive_loss(self, states, head) -> torch.Tensor:
        """The chunk's term of the contrastive loss: its value is the chunk's share of the batch's
        loss, its gradient the batch loss's through this chunk (and, on the last chunk, through
        the loss's own parameters)."""
        image, text = states.embeddings
        grad_image, grad_text = self.embedding_grads
        surrogate = (image.float() * grad_image).sum() + (text.float() * grad_text).sum()
        if self.scale_grad is not None:
            surrogate = surrogate + (states.logit_scale.float() * self.scale_grad).sum()
        for name, g in self.head_grads.items():
            surrogate = surrogate + (getattr(head, name).float() * g).sum()
        return surrogate - surrogate.detach() + self.loss


class _Cached:
    """What a contrastive loss reads of a batch's states, with the embeddings and the logit scale
    as leaves of their own."""

    def __init__(self, pm, image: torch.Tensor, text: torch.Tensor):
        self.embeddings = (image.detach().requires_grad_(), text.detach().requires_grad_())
        self.logit_scale = pm.logit_scale().detach().requires_grad_()
        self.objectives = pm.objectives
        self.metrics: dict[str, torch.Tensor] = {}


class _Leaves:
    """A head's parameters as leaves, read by name as the loss reads the head's."""

    def __init__(self, head):
        self.leaves = {} if head is None else {n: p.detach().requires_grad_() for n, p in head.named_parameters()}

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["leaves"][name]
        except KeyError:
            raise AttributeError(name) from None


def plan_chunks(pm, parts: list, generator: torch.Generator | None = None) -> list[Chunk]:
    """Steps 1 and 2 for a batch given as equal `parts` (`batch.rows`, each moved on its own so
    that its counts are its own): each part's `Chunk`, in order. Every process must call this
    alike (it gathers and reduces over processes)."""
    if len({len(p) for p in parts}) > 1:
        raise InputError(f"a batch's chunks must hold as many rows each; got {', '.join(str(len(p)) for p in parts)}")
    made = [pm.states(part, generator, contrastive_only=True) for part in parts]
    states, records = [s for s, _ in made], active(pm.objectives, (made[0][1],))
    device = pm.model.device
    separable = [r for r in records if r.count is not None]
    contrastive = [r for r in records if r.count is None]
    rngs = []
    with torch.no_grad():
        if contrastive:
            for s in states:
                rngs.append(_rng_state(device))
                s.embeddings  # noqa: B018 (computed and kept)
        # Record by record, chunk by chunk: ITM's negatives are drawn here, in this order.
        counts = [sum(r.count(s).float() for s in states) for r in separable]
        counts = torch.stack(counts) if counts else torch.zeros(0, device=device)
        if world().size > 1 and len(separable):
            dist.all_reduce(counts)
    plan = [Chunk(dict(zip([r.name for r in separable], counts)), device, rng=rngs[i] if rngs else None,
                  itm_pairs=s.__dict__.get("itm_pairs")) for i, s in enumerate(states)]
    if contrastive:
        _cache_gradients(pm, contrastive[0], states, plan)
    return plan


def _cache_gradients(pm, record, states, plan: list[Chunk]) -> None:
    """Step 2: the weighted contrastive loss over the whole batch and its gradients, into `plan`."""
    cached = _Cached(pm, torch.cat([s.embeddings[0] for s in states]), torch.cat([s.embeddings[1] for s in states]))
    head = _Leaves(getattr(pm.heads, record.name) if record.head is not None else None)
    loss = getattr(pm.objectives, record.weight) * record.loss(cached, head)
    inputs = [*cached.embeddings, cached.logit_scale, *head.leaves.values()]
    grads = [None if g is None else g.float()
             for g in torch.autograd.grad(loss, inputs, allow_unused=True)]
    size = len(states[0].batch)
    zero = torch.zeros_like(cached.embeddings[0], dtype=torch.float32)
    image, text = (g if g is not None else zero for g in grads[:2])
    for i, chunk in enumerate(plan):
        rows = slice(i * size, (i + 1) * size)
        chunk.embedding_grads = (image[rows], text[rows])
        chunk.loss = loss.detach() / len(plan)
        chunk.metrics = cached.metrics
    plan[-1].scale_grad = grads[2]
    plan[-1].head_grads = {n: g for n, g in zip(head.leaves, grads[3:]) if g is not None}


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
