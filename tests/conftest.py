import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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
