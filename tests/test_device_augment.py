"""The device half of the augmentation (src.data.device_augment): D4 identical to the CPU reference, heavy's
photometric transforms with uint8 semantics, normalisation, and a batch that nothing was drawn for left
exactly as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.core.config import load_settings
from src.core.flair import BAND_MEAN, BAND_STD
from src.data.augment import AUG_LEN, Slot, d4
from src.data.device_augment import (
    augment_batch,
    blur_kernels,
    d4_batch,
    device_batch,
    jitter,
    photometric,
    spectral_bands,
    with_band_means,
)

CPU = torch.device("cpu")


def params(b: int) -> torch.Tensor:
    return torch.zeros(b, AUG_LEN)


def test_d4_on_the_device_matches_the_cpu_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 5, 12, 12), dtype=np.uint8)
    mask = rng.integers(0, 13, (8, 12, 12), dtype=np.uint8)
    s2 = rng.random((8, 3, 10, 6, 6)).astype(np.float16)
    valid = rng.random((8, 6, 6)) > 0.3
    k = torch.arange(8)
    for arr, axes in ((image, (1, 2)), (mask, (0, 1)), (s2, (2, 3)), (valid, (0, 1))):
        got = d4_batch(torch.from_numpy(arr), k).numpy()
        for j in range(8):
            np.testing.assert_array_equal(got[j], d4(arr[j], j, axes=axes))
    # the 8 elements are distinct, and joint keys of one batch get the same element
    out = augment_batch({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)},
                        torch.cat([params(8)[:, :Slot.K], k[:, None].float(), params(8)[:, Slot.K + 1:]], 1),
                        load_settings(None, {}))
    assert len({out["image"][j, 0].numpy().tobytes() for j in range(8)}) == 8
    for j in range(8):
        np.testing.assert_array_equal(out["mask"][j].numpy(), d4(mask[j], j))
    with pytest.raises(ValueError, match="square"):
        d4_batch(torch.zeros(2, 1, 4, 6), torch.tensor([0, 1]))


def test_nothing_drawn_leaves_the_batch_exactly_as_it_was():
    image = torch.randint(0, 256, (3, 5, 16, 16), dtype=torch.uint8)
    assert photometric(image, params(3), params(3), (True,) * 4 + (False,)) is image
    warped = params(3)
    warped[:, Slot.WARP:] = 1.0  # heavy's warp slots, after the holes: not a photometric transform
    assert photometric(image, warped, warped, (True,) * 4 + (False,)) is image
    # in a mixed batch, samples without a transform come out with the same grey levels
    p = params(3)
    p[1, Slot.JITTER] = 1
    p[1, Slot.BRIGHT:Slot.BRIGHT + 4] = 0.05
    p[1, Slot.CONTRAST:Slot.GAMMA + 5] = 1.0
    p[1, Slot.MEAN:Slot.MEAN + 5] = 0.5
    p[2, Slot.NOISE_STD], p[2, Slot.NOISE_SEED] = 8.0, 3
    p[1, Slot.BLUR], p[1, Slot.BLUR_SIZE], p[1, Slot.BLUR_PARAM] = 2, 7, 30.0
    p[2, Slot.HOLES:Slot.HOLES + 4] = torch.tensor([2.0, 3.0, 6.0, 9.0])
    out = photometric(image, p, p, (True,) * 4 + (False,))
    assert out.dtype == torch.float32 and torch.equal(out, out.round())
    assert out.min() >= 0 and out.max() <= 255
    assert torch.equal(out[0], image[0].float())
    assert not torch.equal(out[1], image[1].float()) and not torch.equal(out[2], image[2].float())
    assert (out[2, :, 2:6, 3:9] == 0).all()  # the hole, in every band
    again = photometric(image, p, p, (True,) * 4 + (False,))
    assert torch.equal(out, again)  # the noise is a function of the drawn seeds


def test_jitter_is_per_band_monotone_spares_elevation_and_follows_the_formula():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (1, 5, 32, 32), dtype=np.uint8))
    p = params(1)
    p[0, Slot.JITTER] = 1
    p[0, Slot.BRIGHT:Slot.BRIGHT + 5] = torch.tensor([0.08, -0.05, 0.0, 0.02, 0.1])
    p[0, Slot.CONTRAST:Slot.CONTRAST + 5] = torch.tensor([1.2, 0.85, 1.0, 1.1, 1.3])
    p[0, Slot.GAMMA:Slot.GAMMA + 5] = torch.tensor([0.9, 1.2, 1.1, 0.8, 1.0])
    p[0, Slot.MEAN:Slot.MEAN + 5] = torch.tensor([0.4, 0.5, 0.45, 0.3, 0.1])
    spectral = spectral_bands(load_settings(None, {}))
    assert spectral == (True, True, True, True, False)
    out = jitter(image, p, spectral)[0].numpy()
    raw = image[0].numpy()
    np.testing.assert_array_equal(out[4], raw[4])  # elevation untouched
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    for b in range(4):
        order = np.argsort(raw[b].ravel(), kind="stable")
        assert np.all(np.diff(out[b].ravel()[order]) >= 0)
        g, m = np.float32(p[0, Slot.GAMMA + b]), np.float32(p[0, Slot.MEAN + b])
        c, br = np.float32(p[0, Slot.CONTRAST + b]), np.float32(p[0, Slot.BRIGHT + b])
        v = (levels ** g - m ** g) * c + m ** g + br
        lut = np.clip(np.rint(v * 255), 0, 255)
        assert np.abs(out[b] - lut[raw[b]]).max() <= 1  # the CPU lookup table (float32 pow: at most a level)
        assert (out[b] != raw[b]).any()


def test_the_jitter_pivot_is_the_band_mean_of_the_image_it_changes():
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    p = params(2)
    got = with_band_means(p, image)
    expect = image[:, :, ::8, ::8].double().mean(dim=(2, 3)) / 255
    torch.testing.assert_close(got[:, Slot.MEAN:Slot.MEAN + 3].double(), expect)
    assert not p.any() and not got[:, Slot.MEAN + 3:Slot.NOISE_STD].any()  # a copy; unused bands stay 0


def test_blur_kernels_are_normalised_and_shaped():
    p = params(3)
    p[1, Slot.BLUR], p[1, Slot.BLUR_SIZE], p[1, Slot.BLUR_PARAM] = 1, 3, 1.0
    p[2, Slot.BLUR], p[2, Slot.BLUR_SIZE], p[2, Slot.BLUR_PARAM] = 2, 5, 0.0
    k = blur_kernels(p)
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(3))
    assert k[0, 3, 3] == 1 and k[0].count_nonzero() == 1          # identity
    assert k[1, 2:5, 2:5].count_nonzero() == 9 and k[1].count_nonzero() == 9  # 3x3 Gaussian
    assert k[2, 3, 1:6].count_nonzero() == 5 and k[2].count_nonzero() == 5    # horizontal 5-pixel line


def test_device_batch_normalises_in_the_requested_dtype_and_casts_targets():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (2, 5, 8, 8), dtype=np.uint8)
    batch = {"image": torch.from_numpy(raw), "mask": torch.zeros(2, 8, 8, dtype=torch.uint8),
             "s2": torch.ones(2, 3, 10, 4, 4, dtype=torch.float16), "id": ["a", "b"]}
    out = device_batch(batch, load_settings(None, {}), CPU)
    expect = (raw.astype(np.float32) - BAND_MEAN[None, :, None, None]) / BAND_STD[None, :, None, None]
    np.testing.assert_array_equal(out["image"].numpy(), expect)
    assert out["mask"].dtype == torch.int64 and out["s2"].dtype == torch.float32 and "id" not in out
    sub = device_batch({"image": batch["image"][:, [3, 0]]}, load_settings(None, {"bands": ["NIR", "R"],
                                                                                 "norm": "scale"}),
                       CPU, dtype=torch.bfloat16, channels_last=True)
    assert sub["image"].dtype == torch.bfloat16
    assert sub["image"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sub["image"].float(), torch.from_numpy(raw[:, [3, 0]] / np.float32(255)),
                               atol=4e-3, rtol=0)
