"""The pretraining step without host-device syncs (`flava.syncs`): the static selections equal
boolean indexing, the losses are the same with and without `sync_free()`, and a step run under it
calls no operation that reads device values on the host. On the CPU the last is checked by
recording the operations the step dispatches; tests/test_cuda.py checks it on a GPU with
`torch.cuda.set_sync_debug_mode("error")`."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flava
from flava.config import ObjectivesConfig, preset
from flava.data.batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch
from flava.errors import ConfigError
from flava.objectives.losses import itm_loss, masked_prediction_loss
from flava.objectives.negatives import draw, hard_negatives, same_text
from flava.objectives.pretraining import PretrainingModel
from flava.syncs import is_sync_free, select_positions, sync_free

# Operations whose result or shape depends on values, so that on a GPU the host waits for them.
READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::masked_scatter",
         "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::multinomial", "aten::bincount",
         "aten::histc", "aten::equal", "aten::allclose", "aten::repeat_interleave", "aten::argwhere",
         "aten::lift_fresh"}  # lift_fresh: torch.tensor(host data), a blocking copy to a GPU
INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class HostReads(TorchDispatchMode):
    """Records the operations that would read device values on the host (a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in READS or (name in INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def random_masks():
    g = torch.Generator().manual_seed(0)
    for shape in [(40,), (6, 17), (3, 4, 5)]:
        for p in (0.0, 0.15, 0.5, 1.0):  # none masked ... all masked
            yield torch.rand(shape, generator=g) < p


def test_static_selection_equals_boolean_indexing():
    x = torch.randn(6 * 17 * 60)
    for mask in random_masks():
        values = x[: mask.numel()].view(mask.shape)
        exact, none = select_positions(mask)
        assert none is None and torch.equal(values[exact], values[mask])
        n = int(mask.sum())
        for bound in (n, n + 3, mask.numel(), None):  # the bound exactly reached, loose, everything
            with sync_free():
                index, valid = select_positions(mask, bound)
            size = mask.numel() if bound is None else min(bound, mask.numel())
            assert valid.shape == (size,) and int(valid.sum()) == n and valid[:n].all()
            assert torch.equal(values[index][valid], values[mask])  # the same positions, in order
            assert all(i.shape == (size,) for i in index)
    assert not is_sync_free()


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 11)

    def forward(self, x):
        return self.proj(x)


def test_masked_prediction_loss_is_the_same_sync_free():
    torch.manual_seed(0)
    head = Head()
    for mask in random_masks():
        states = torch.randn(*mask.shape, 8, requires_grad=True)
        labels = torch.where(mask, torch.randint(0, 11, mask.shape), IGNORE_INDEX)

        def run(bound=None):
            head.zero_grad(set_to_none=True)
            states.grad = None
            loss = masked_prediction_loss(states, labels, head, bound)
            loss.backward()
            return loss.detach(), states.grad.clone(), head.proj.weight.grad.clone()

        want = run()
        n = int(mask.sum())
        for bound in (n, n + 5, None):
            with sync_free():
                got = run(bound)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        if n == 0:  # nothing to predict: a zero that still reaches the head's graph
            assert want[0] == 0 and head.proj.weight.grad is not None


def test_draw_is_multinomial_without_its_host_checks():
    g = torch.Generator().manual_seed(3)
    for seed in range(10):
        for shape in [(5, 7), (12, 12), (3, 500)]:
            w = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6)
            w[:, 0] += 1e-3
            want = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
            assert torch.equal(draw(w, torch.Generator().manual_seed(seed)), want)


def test_a_row_without_a_hard_negative_stays_and_is_ignored():
    B = 4
    ids = torch.tensor([[101, 7, 8, 102]] * 3 + [[101, 9, 9, 102]])
    mask = torch.ones_like(ids)
    same = same_text(ids, mask, ids, mask)
    sim = torch.randn(B, B)
    p = hard_negatives(sim, sim.T.clone(), same, torch.Generator().manual_seed(0))
    assert p.labels.shape == (3 * B,) and p.labels[:B].eq(1).all() and p.labels[B:].eq(0).all()
    # Every caption the same: no row finds a negative; they stay, labelled to be ignored.
    ids[3] = ids[0]
    same = same_text(ids, mask, ids, mask)
    p = hard_negatives(sim, sim.T.clone(), same, torch.Generator().manual_seed(0))
    assert p.labels.shape == (3 * B,) and p.labels[:B].eq(1).all() and p.labels[B:].eq(IGNORE_INDEX).all()
    logits = torch.randn(3 * B, 2)
    torch.testing.assert_close(itm_loss(logits, p.labels), torch.nn.functional.cross_entropy(logits[:B], p.labels[:B]))


def test_moving_a_batch_reads_its_counts_on_the_host():
    g = torch.Generator().manual_seed(0)
    patch_mask = torch.rand(3, 16, generator=g) < 0.4
    labels = torch.where(torch.rand(3, 9, generator=g) < 0.3, 5, IGNORE_INDEX)
    ids = torch.full((3, 9), 7)
    pixels = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    pairs = PairBatch(pixels, ids, torch.ones_like(ids), patch_mask, ids, labels).to("cpu")
    assert pairs.masked_patches == int(patch_mask.sum()) and pairs.masked_tokens == int((labels != -100).sum())
    assert ImageBatch(pixels, patch_mask).to("cpu").masked_patches == int(patch_mask.sum())
    assert TextBatch(ids, torch.ones_like(ids), labels).to("cpu").masked_tokens == pairs.masked_tokens
    assert PairBatch(pixels, ids, torch.ones_like(ids), patch_mask, ids, labels).masked_patches is None
    lengths = torch.tensor([9, 4, 1])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    assert TextBatch(ids, mask, labels).to("cpu").text_tokens == 14


def test_packing_with_the_hosts_count_is_packing():
    from flava.model.layers import Packing

    for mask in random_masks():
        if mask.dim() == 2:
            want, got = Packing.from_mask(mask), Packing.from_mask(mask, size=int(mask.sum()))
            assert torch.equal(got.index, want.index) and torch.equal(got.mask, want.mask)


def tiny_config():
    cfg = preset("tiny")
    cfg.text.vocab_size = 300
    cfg.image.vocab_size = cfg.codebook.vocab_size = 64
    return cfg


def batches(cfg, B=6):
    """A pair, image and text batch with padded texts, two of them the same caption."""
    g = torch.Generator().manual_seed(0)
    s, n = cfg.image.image_size, cfg.image.num_patches
    ids = torch.randint(5, 300, (B, 8), generator=g)
    mask = torch.ones(B, 8, dtype=torch.long)
    mask[::3, 5:] = 0
    ids[mask == 0] = 0
    ids[1], mask[1] = ids[0], mask[0]
    labels = torch.where((torch.rand(B, 8, generator=g) < 0.3) & (mask == 1), ids, IGNORE_INDEX)
    masked = ids.masked_fill(labels != IGNORE_INDEX, 103)
    pixels = torch.randint(0, 256, (B, 3, s, s), dtype=torch.uint8, generator=g)
    patch_mask = torch.rand(B, n, generator=g) < 0.4
    return {"pairs": PairBatch(pixels, ids, mask, patch_mask, masked, labels, codebook_pixels=pixels).to("cpu"),
            "images": ImageBatch(pixels, patch_mask, codebook_pixels=pixels).to("cpu"),
            "text": TextBatch(masked, mask, labels).to("cpu")}


@pytest.mark.parametrize("negatives,contrastive", [("swap", "softmax"), ("hard", "sigmoid")])
def test_a_step_reads_nothing_back_under_sync_free(negatives, contrastive):
    cfg = tiny_config()
    torch.manual_seed(0)
    o = ObjectivesConfig(itm_negatives=negatives, itm_negative_probability=0.5, contrastive=contrastive)
    pm = PretrainingModel(cfg, o, codebook=flava.FlavaImageCodebook(cfg.codebook))
    for kind, batch in batches(cfg).items():
        results = {}
        for free in (False, True):
            pm.zero_grad(set_to_none=True)
            with HostReads() as reads, sync_free(free):
                out = pm(batch, torch.Generator().manual_seed(1))
                out.losses.total.backward()
            grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
            results[free] = (out.losses.named(), out.metrics, grads, reads.reads)
        (losses, metrics, grads, reads), (losses_f, metrics_f, grads_f, reads_f) = results[False], results[True]
        assert reads_f == [], (kind, reads_f)
        assert reads, kind  # the recorder sees the reads the CPU form makes
        assert losses.keys() == losses_f.keys() and metrics.keys() == metrics_f.keys()
        assert grads.keys() == grads_f.keys()
        for name in losses:
            torch.testing.assert_close(losses_f[name], losses[name], rtol=1e-6, atol=1e-6, msg=f"{kind} {name}")
        for name in metrics:
            torch.testing.assert_close(metrics_f[name], metrics[name], rtol=1e-6, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads_f[name], grads[name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused_at_start(train_data, tmp_path):
    from flava.train.presets import demo_config
    from flava.train.trainer import Trainer

    cfg = demo_config()
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.model.codebook.hidden_size = 8
    cfg.model.text.vocab_size = 1000
    cfg.data.pairs, cfg.data.text = [str(train_data / "pairs_clean.csv")], [str(train_data / "text.txt")]
    cfg.data.batch_size, cfg.data.num_workers = 4, 0
    cfg.codebook = str(train_data / "codebook")
    with pytest.raises(ConfigError, match=r"tokenizer has 30522 tokens .* model.text.vocab_size=30522"):
        Trainer(cfg, tmp_path / "run")
