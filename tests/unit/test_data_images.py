"""Decoding what real data sets hold: ImageNet's odd files (a CMYK JPEG, a PNG named .JPEG, grayscale JPEGs) decode
to the model's channels; an image past data.max_image_pixels is a bad sample refused before it is decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vimoe_dist.config import load_config
from vimoe_dist.data.baddata import BadSample
from vimoe_dist.data.transforms import SampleDecoder


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def odd_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    return {
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "png_as_jpeg": encode(rgb, "PNG"),
        "gray": encode(rgb.convert("L"), "JPEG"),
        "rgb": encode(rgb, "JPEG"),
    }


def decoder(*extra: str, in_chans: int = 3) -> SampleDecoder:
    cfg = load_config(None, ["model.img_size=16", f"model.in_chans={in_chans}", "model.num_classes=4", *extra])
    return SampleDecoder(cfg, training=False)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_imagenets_odd_files_decode_to_the_models_channels(in_chans):
    dec = decoder(in_chans=in_chans)
    for name, raw in odd_files().items():
        image, label = dec({"__key__": name, "__url__": "s", "jpg": raw, "cls": b"2"})
        assert image.shape == (in_chans, 16, 16) and label == 2, name
        assert bool(image.isfinite().all()), name


def test_an_image_over_max_image_pixels_is_refused_from_its_header():
    """A 36-megapixel PNG of 40 KB decodes to 36 MB (108 MB as RGB), below PIL's bomb limit of 89 megapixels; with
    data.max_image_pixels under its size it is a bad sample and is never decoded."""
    bomb = encode(Image.new("L", (6000, 6000)), "PNG")
    assert len(bomb) < 100_000
    sample = {"__key__": "bomb", "__url__": "s", "png": bomb, "cls": b"0"}
    with pytest.raises(BadSample, match=r"6000x6000 pixels, over data\.max_image_pixels"):
        decoder("data.max_image_pixels=1000000").image(sample)
    assert decoder("data.max_image_pixels=1000000").image({**sample, "png": odd_files()["rgb"]}).size == (24, 20)
