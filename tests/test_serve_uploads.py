"""`flava serve`'s uploads decode to the very pixels the CLI gets from the same file (one decoding
path, `open_image`), and an upload refused for its shape is named in the error."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import flava
from flava.data.processor import load_image
from flava.retrieval.embed import Embedder
from flava.retrieval.index import VectorIndex, index_from_arrays
from flava.serve.app import create_app
from flava.serve.requests import decode_images
from test_serve import app_in_a_thread

RNG = np.random.default_rng(0)
WIDE = RNG.integers(0, 65536, (24, 32), dtype=np.uint16)  # the full 16-bit range: PIL's convert clips it at 255


def _palette_with_transparency() -> Image.Image:
    im = Image.fromarray(RNG.integers(0, 4, (24, 32), dtype=np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250])
    im.info["transparency"] = 2
    return im


# (mode as the file opens, suffix, the image written): every mode the CLI reads, the deep ones above 8 bits.
CASES = [
    ("I;16", ".png", lambda: Image.fromarray(WIDE)),
    ("I", ".tif", lambda: Image.fromarray(WIDE.astype(np.int32) * 3)),
    ("F", ".tif", lambda: Image.fromarray(RNG.random((24, 32), dtype=np.float32))),
    ("CMYK", ".jpg", lambda: Image.fromarray(RNG.integers(0, 256, (24, 32, 4), dtype=np.uint8), "CMYK")),
    ("LA", ".png", lambda: Image.fromarray(RNG.integers(0, 256, (24, 32, 2), dtype=np.uint8), "LA")),
    ("RGBA", ".png", lambda: Image.fromarray(RNG.integers(0, 256, (24, 32, 4), dtype=np.uint8), "RGBA")),
    ("P", ".png", _palette_with_transparency),
    ("1", ".png", lambda: Image.fromarray(RNG.random((24, 32)) > 0.5)),
    ("RGB", ".jpg", lambda: Image.fromarray(RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8))),
]


@pytest.mark.parametrize("mode,suffix,make", CASES, ids=[c[0] for c in CASES])
def test_an_upload_decodes_to_the_pixels_the_cli_reads_from_the_file(tmp_path, mode, suffix, make):
    path = tmp_path / f"image{suffix}"
    make().save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file holds the mode this case is about
    served = decode_images([(path.name, path.read_bytes())])[0]
    cli = load_image(path)  # what `flava embed`, `classify` and `search --image` decode a file with
    assert served.mode == cli.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(served), np.asarray(cli))


@pytest.fixture(scope="module")
def app_root(tmp_path_factory):
    """A tiny random model, a 16-bit PNG and an index of the CLI's embedding of it."""
    root = tmp_path_factory.mktemp("uploads")
    torch.manual_seed(0)
    model = flava.FlavaModel(flava.preset("tiny"))
    Image.fromarray(WIDE).save(root / "deep.png")
    Image.fromarray(np.asarray(load_image(root / "deep.png"))).save(root / "cli.png")  # the CLI's pixels, 8-bit
    others = RNG.integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
    vectors = Embedder(model).images([root / "deep.png", *others])
    index_from_arrays(vectors, None, root / "index", model="tiny", modality="image")
    return root, model


def test_a_16_bit_upload_is_embedded_searched_and_classified_as_the_cli_does(app_root):
    root, model = app_root
    deep, cli = (root / "deep.png").read_bytes(), (root / "cli.png").read_bytes()
    app = create_app(model, VectorIndex.open(root / "index"))
    with app_in_a_thread(app) as client:
        status, body, _ = client.post_form("/embed", files=[("image", "deep.png", deep)])
        assert status == 200, body
        np.testing.assert_allclose(body["embeddings"], Embedder(model).images([root / "deep.png"]), atol=1e-5)
        status, body, _ = client.post_form("/search", {"k": 2}, [("image", "deep.png", deep)])
        assert status == 200 and body["results"][0]["position"] == 0, body
        assert body["results"][0]["score"] == pytest.approx(1, abs=1e-4)
        fields = {"classes": "red, green, blue", "templates": "short"}
        got, want = (client.post_form("/classify", fields, [("image", name, data)])
                     for name, data in [("deep.png", deep), ("cli.png", cli)])
        assert got[0] == want[0] == 200 and got[1]["results"] == want[1]["results"]


def test_an_upload_of_extreme_aspect_ratio_is_named_in_the_error(app_root):
    root, model = app_root
    buf = io.BytesIO()
    Image.new("RGB", (5000, 10), (200, 40, 40)).save(buf, "JPEG")
    app = create_app(model, VectorIndex.open(root / "index"))
    with app_in_a_thread(app) as client:
        for status, body, _ in [client.post_form("/embed", files=[("image", "wide.jpg", buf.getvalue())]),
                                client.post_form("/search", files=[("image", "wide.jpg", buf.getvalue())])]:
            assert status == 400, body
            assert body["error"] == ("upload 'wide.jpg' is 5000x10 pixels, one side over 100 times the other; "
                                     "crop it closer to square")
