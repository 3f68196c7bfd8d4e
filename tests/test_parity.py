"""Numerical parity with transformers' FLAVA on random weights, through our checkpoint loader."""

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_config, randomize_, require

import flava
from flava.model.codebook import FlavaImageCodebook
from flava.interop import transformers as hf_interop
from flava.loading import load_weights

transformers = require("transformers")

ATOL = 1e-5

CONFIGS = {
    "plain": hf_config(),
    "no-qkv-bias-tanh-gelu": hf_config(
        image=dict(qkv_bias=False, hidden_act="gelu_new", image_size=48, patch_size=16, layer_norm_eps=1e-6),
        text=dict(qkv_bias=False, hidden_act="gelu_new", hidden_size=32, num_attention_heads=2),
        multimodal=dict(num_hidden_layers=2, hidden_act="relu"),
        projection_dim=16,
    ),
    "unequal-widths-no-cls": hf_config(
        image=dict(hidden_size=40, num_attention_heads=5, intermediate_size=64, num_hidden_layers=3),
        text=dict(hidden_size=24, num_attention_heads=3, type_vocab_size=3),
        multimodal=dict(hidden_size=16, num_attention_heads=2, use_cls_token=False),
        logit_scale_init_value=1.5,
    ),
    "grey-no-mask-token-uneven-grid": hf_config(
        image=dict(num_channels=1, mask_token=False, image_size=30, patch_size=8),
        text=dict(max_position_embeddings=12, pad_token_id=3),
    ),
}


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def make_pair(name, tmp_path):
    """A random transformers FlavaModel, saved, and our model loaded from that directory."""
    ref = randomize_(transformers.FlavaModel(CONFIGS[name]), seed=len(name))
    ref.save_pretrained(tmp_path / name)
    return ref, flava.load(tmp_path / name)


def inputs(ref, batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ic, tc = ref.config.image_config, ref.config.text_config
    pixels = torch.randn(batch, ic.num_channels, ic.image_size, ic.image_size, generator=g)
    ids = torch.randint(1, tc.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):  # every row but the first is padded, by a different amount
        mask[i, length - 2 * i:] = 0
        ids[i, length - 2 * i:] = 0
    n = (ic.image_size // ic.patch_size) ** 2
    patch_mask = (torch.rand(batch, n, generator=g) < 0.4) if ic.mask_token else None
    token_types = torch.randint(0, tc.type_vocab_size, (batch, length), generator=g)
    return pixels, ids, mask, patch_mask, token_types


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unimodal_hidden_states_and_embeddings(name, tmp_path):
    ref, ours = make_pair(name, tmp_path)
    pixels, ids, mask, patch_mask, token_types = inputs(ref)
    with torch.no_grad():
        for pm in [None] + ([patch_mask] if patch_mask is not None else []):
            r = ref.image_model(pixel_values=pixels, bool_masked_pos=pm, output_hidden_states=True)
            o = ours.encode_image_tokens(pixels, patch_mask=pm, output_hidden_states=True)
            close(o.last_hidden_state, r.last_hidden_state)
            assert len(o.hidden_states) == len(r.hidden_states)
            for a, b in zip(o.hidden_states, r.hidden_states):
                close(a, b)
            close(o.pre_norm_hidden_state, r.hidden_states[-1])
            close(ours.image_encoder.pooler(o.last_hidden_state), r.pooler_output)

        for tt in (None, token_types):
            r = ref.text_model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
            o = ours.encode_text_tokens(ids, mask, tt, output_hidden_states=True)
            close(o.last_hidden_state, r.last_hidden_state)
            for a, b in zip(o.hidden_states, r.hidden_states):
                close(a, b)

        want_img = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output[:, 0], dim=-1)
        want_txt = F.normalize(ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output[:, 0], dim=-1)
        got_img, got_txt = ours.encode_image(pixels), ours.encode_text(ids, mask)
        assert got_img.shape == (3, ref.config.projection_dim)
        close(got_img, want_img)
        close(got_txt, want_txt)
        close(ours.logit_scale, ref.logit_scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_multimodal_output(name, tmp_path):
    ref, ours = make_pair(name, tmp_path)
    pixels, ids, mask, patch_mask, _ = inputs(ref, batch=4, length=11, seed=1)
    with torch.no_grad():
        for pm in [None] + ([patch_mask] if patch_mask is not None else []):
            r = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask, bool_masked_pos=pm)
            o = ours(pixel_values=pixels, input_ids=ids, attention_mask=mask, patch_mask=pm)
            close(o.multimodal.last_hidden_state, r.multimodal_embeddings)
            close(o.image.last_hidden_state, r.image_embeddings)
            close(o.text.last_hidden_state, r.text_embeddings)
            mm = ours.encode_multimodal(pixels, ids, mask, patch_mask=pm)
            close(mm.last_hidden_state, r.multimodal_embeddings)
            layout = mm.layout
            n_img = r.image_embeddings.shape[1]
            assert layout.length == r.multimodal_embeddings.shape[1]
            assert layout.image_patches.stop - layout.image_patches.start == n_img - 1
            assert layout.text.stop == layout.length


def test_padding_does_not_leak_into_multimodal(tmp_path):
    """Appending padding to a text must not change any real token's multimodal state."""
    ref, ours = make_pair("plain", tmp_path)
    pixels, ids, _, _, _ = inputs(ref, batch=2, length=6)
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 5)], dim=1).long()
    with torch.no_grad():
        short = ours.encode_multimodal(pixels, ids)
        long = ours.encode_multimodal(pixels, padded, mask)
    close(long.last_hidden_state[:, : short.layout.length], short.last_hidden_state)


def test_position_interpolation_matches_transformers(tmp_path):
    ref, ours = make_pair("plain", tmp_path)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        r = ref.image_model(pixel_values=pixels, interpolate_pos_encoding=True)
        o = ours.encode_image_tokens(pixels, interpolate_pos_encoding=True)
        close(o.last_hidden_state, r.last_hidden_state)
        ours.image_encoder.resize(48)  # permanent re-grid, as for fine-tuning at a higher resolution
        close(ours.encode_image_tokens(pixels).last_hidden_state, r.last_hidden_state)


@pytest.mark.parametrize("cb", [dict(), dict(num_groups=2, num_blocks_per_group=2, hidden_size=12)])
def test_codebook_token_ids(cb):
    cfg = hf_config(codebook=cb).image_codebook_config
    ref = randomize_(transformers.FlavaImageCodebook(cfg))
    ours = FlavaImageCodebook(flava.CodebookConfig(
        hidden_size=cfg.hidden_size, num_blocks_per_group=cfg.num_blocks_per_group, num_groups=cfg.num_groups,
        vocab_size=cfg.vocab_size, input_channels=cfg.input_channels,
    ))
    _, _, codebook, unknown = hf_interop.state_dict_from_hf(
        {f"image_codebook.{k}": v for k, v in ref.state_dict().items()}
    )
    assert not unknown
    load_weights(ours, codebook, "codebook", "test")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        close(ours(x), ref(x))
        ids = ours.token_ids(x)
        assert ids.shape == (3, 16)
        assert torch.equal(ids, ref.get_codebook_indices(x).flatten(1))


def test_embedding_fast_paths_equal_the_full_computation():
    """encode_text packs padding away and encode_image updates only CLS in the last block;
    both must equal projecting the full per-token output."""
    torch.manual_seed(0)
    cfg = flava.preset("tiny")
    cfg.text.num_layers = cfg.image.num_layers = 3
    model = randomize_(flava.FlavaModel(cfg))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (5, 12), generator=g)
    mask = torch.ones(5, 12, dtype=torch.long)
    for i, n in enumerate([12, 1, 5, 9, 3]):
        mask[i, n:] = 0
    left = mask.flip(1)  # left padding: token 0 is padding, so packing must not be used
    types = torch.randint(0, 2, (5, 12), generator=g)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        for m, tt in ((mask, None), (mask, types), (left, None), (None, None)):
            full = model.text_embedding(model.encode_text_tokens(ids, m, tt))
            close(model.encode_text(ids, m, tt), full)
        close(model.encode_image(pixels), model.image_embedding(model.encode_image_tokens(pixels)))
