"""Shared fixtures and the test lanes.

Lanes are pytest markers, registered in pyproject.toml (`--strict-markers` refuses others):
`slow` (subprocess CLI runs, end-to-end runs), `distributed` (several processes: gloo, torchrun),
`browser` (the search page in Debian's Chromium), `cuda` (needs a GPU). Unmarked tests are the
fast lane (`make test-fast`). A test whose tool is missing fails saying what to install, except
the `cuda` lane, which skips with its reason where CUDA is absent.
"""

import contextlib
import os
import socket
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import flava  # noqa: E402

# Two threads a test on the 2-core machines the suite is sized for; under pytest-xdist (`make test`
# runs one worker per core) each worker takes its share of the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(config, items):
    # The modules that start processes first, each kept whole (module fixtures are made once): the
    # workers then end on short tests instead of one of them on a long one (xdist's worksteal
    # hands the waiting tests out from the ends of the queues).
    weight: dict[str, int] = {}
    for item in items:
        key = item.nodeid.split("::")[0]
        weight[key] = weight.get(key, 0) + (3 if "distributed" in item.keywords else "slow" in item.keywords)
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: each module's order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files(tmp_path_factory):
    """Temporary files of the suite and of every process it starts (loader workers' pymp-*,
    torchrun's torchelastic_*) in pytest's temporary tree, which pytest prunes, not in /tmp."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    tempfile.tempdir = None  # read TMPDIR again
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


def require(module: str):
    """`module` imported, or a failure (not a skip) naming what installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pass  # failed outside the handler, so the message stands alone
    pytest.fail(f"{module} is not installed: it is in the test extras (make install, or pip install -e '.[test]')",
                pytrace=False)


def hf_config(image=None, text=None, multimodal=None, codebook=None, **top):
    """A small transformers FlavaConfig; keyword dicts override its sections."""
    from transformers import FlavaConfig

    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    img = dict(enc, image_size=32, patch_size=8, vocab_size=40)
    img.update(image or {})
    txt = dict(enc, vocab_size=99, max_position_embeddings=24)
    txt.update(text or {})
    mm = dict(enc, num_hidden_layers=1)
    mm.update(multimodal or {})
    cb = dict(hidden_size=8, num_blocks_per_group=1, vocab_size=img["vocab_size"])
    cb.update(codebook or {})
    top = dict(dict(hidden_size=mm["hidden_size"], projection_dim=24), **top)
    return FlavaConfig(image_config=img, text_config=txt, multimodal_config=mm, image_codebook_config=cb, **top)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised tokens and unit LayerNorms are tested too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A saved `tiny` model of seeded random weights (for the commands that use a model)."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    flava.FlavaModel(flava.preset("tiny")).save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """Pairs (one row names a missing file; pairs_clean.csv has none), an image folder, text and a
    small random image codebook for the training tests."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "img" / "a").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(16):
        arr = np.full((40, 40, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img" / "a" / f"{i}.png")
        rows.append(f"img/a/{i}.png,a square of colour {i}")
    (root / "pairs_clean.csv").write_text("\n".join(rows) + "\n")
    rows.append("img/a/missing.png,lost")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    (root / "text.txt").write_text("\n".join(f"sentence number {i} about things" for i in range(30)))
    from flava.config import preset
    from flava.config import to_dict
    from flava.io.checkpoint import save_checkpoint

    cfg = preset("tiny")
    cfg.image.vocab_size = cfg.codebook.vocab_size = 64
    cfg.codebook.hidden_size = 8
    save_checkpoint(root / "codebook", to_dict(cfg), {"codebook": flava.FlavaImageCodebook(cfg.codebook).state_dict()})
    return root


def tiny_run(data, pairs: str = "pairs.csv", **fields):
    """A tiny joint run on `train_data`: the demo's preset with its 64-token codebook, batch 4, no
    loader workers; `fields` set top-level fields."""
    from flava.train.presets import demo_config

    cfg = demo_config()
    cfg.model.image.vocab_size = cfg.model.codebook.vocab_size = 64
    cfg.model.codebook.hidden_size = 8
    cfg.data.pairs, cfg.data.images, cfg.data.text = [str(data / pairs)], [str(data / "img")], [str(data / "text.txt")]
    cfg.data.batch_size, cfg.data.num_workers = 4, 0
    cfg.codebook = str(data / "codebook")
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread gains nothing, and on a busy machine its spin-waits made a
    training test ten times slower (measured: 3.6 s vs 39-50 s). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The demo model at a quarter of its width: 3 M parameters instead of 13 M (most of them the text
# vocabulary's, which the tokenizer fixes), checkpoints of 37 MB instead of 150 MB. For the runs whose
# checks hold for any model (a resumed or killed run repeats the uninterrupted one, a stop saves its
# step, a resume reads no source again), which spent their time writing, hashing and reading
# checkpoints; the tests of the model's own arithmetic keep the demo's.
NARROW = {**{f"model.{tower}.{field}": size for tower in ("image", "text", "multimodal")
             for field, size in (("hidden_size", 32), ("mlp_size", 64))}, "model.projection_dim": 32}


def narrow_args() -> list[str]:
    """`--set` arguments giving a `flava pretrain` run the NARROW model."""
    return [a for key, value in NARROW.items() for a in ("--set", f"{key}={value}")]


def narrow(cfg):
    """`cfg` (a TrainConfig) with the NARROW model."""
    for key, value in NARROW.items():
        *path, field = key.split(".")
        target = cfg
        for name in path:
            target = getattr(target, name)
        setattr(target, field, value)
    return cfg


def pretrain_args(data, output, pairs="pairs.csv", batch_size=4) -> list[str]:
    """`flava pretrain` arguments for a tiny run on `train_data`."""
    return ["pretrain", "--output", str(output), "--set", f"codebook={data / 'codebook'}",
            "--set", "model.image.vocab_size=64", "--set", "model.codebook.vocab_size=64",
            "--set", "model.codebook.hidden_size=8", "--set", f'data.pairs=["{data / pairs}"]',
            "--set", f'data.images=["{data / "img"}"]', "--set", f'data.text=["{data / "text.txt"}"]',
            "--set", f"data.batch_size={batch_size}", "--set", "data.num_workers=0", "--set", "log_every=1"]


def proc_state(pid: int) -> str:
    """A process's state letter from /proc (R, S, Z...), "X" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def finished(pid: int) -> bool:
    """Every thread of the process has exited (gone, or a zombie awaiting a reaper). The leader
    turns zombie before its other threads have exited, and they share its open files (a run's
    lock among them) until the last one has: a thread in an fsync is killed only when it returns."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    return all(proc_state(int(t)) in ("X", "Z") for t in threads)


def openers(path: os.PathLike) -> dict[int, list[str]]:
    """The processes with `path` open, each with its threads' states: who holds a lock file."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds):
                found[int(pid)] = [proc_state(int(t)) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """A real gloo process group on 127.0.0.1 for one spawned worker, destroyed after the block."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        yield
    finally:
        dist.destroy_process_group()
