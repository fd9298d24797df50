"""build_model: every family runs forward/backward, fusion is per-sample, weights files and band init."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.core.checkpoint import save_checkpoint
from src.core.config import load_settings
from src.core.errors import CheckpointError
from src.core.settings import Settings
from src.models.flair_model import (
    build_model,
    count_parameters,
    find_first_conv,
    load_for_inference,
    load_state_file,
    sample_footprint,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_UTAE = {"utae_widths": [16, 16, 32, 32], "utae_decoder_widths": [16, 16, 32, 32], "ltae_heads": 4,
              "ltae_d_model": 32, "ltae_d_k": 4}


def cfg_for(**kw) -> Settings:
    """Settings without pretrained weights; a fusion model reads S2 (use_s2 follows fusion unless given)."""
    kw.setdefault("use_s2", kw.get("fusion", "none") != "none")
    return load_settings(None, {"encoder_weights": "none", **kw})


def s2_batch(b: int, t: int = 4, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s2 = torch.rand(b, t, 10, size, size, generator=g)
    days = torch.arange(t).repeat(b, 1) * 30 - 100
    return s2, days, torch.zeros(b, t, dtype=torch.bool)


FAMILIES = [("Unet", "resnet18"), ("FPN", "resnet18"), ("DeepLabV3Plus", "resnet18"), ("UPerNet", "resnet18"),
            ("Segformer", "mit_b0"), ("Unet", "tu-mobilenetv3_small_050")]


@pytest.mark.parametrize("arch,encoder", FAMILIES)
def test_families_forward_backward(arch, encoder):
    torch.manual_seed(0)
    model = build_model(cfg_for(arch=arch, encoder=encoder)).train()
    image = torch.randn(2, 5, 64, 96)
    out = model(image)
    assert set(out) == {"logits"}
    assert out["logits"].shape == (2, 13, 64, 96)
    out["logits"].logsumexp(1).mean().backward()
    _, conv = find_first_conv_of(model)
    assert conv.weight.shape[1] == 5 and conv.weight.grad is not None
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_any_input_size_gives_same_size_output():
    """Sides that are not multiples of the output stride are padded inside the model, then cropped."""
    model = build_model(cfg_for(encoder="resnet18", bands=["R", "G", "B"])).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 80, 50))["logits"].shape == (1, 13, 80, 50)
    fused = build_model(cfg_for(encoder="resnet18", fusion="utt", **SMALL_UTAE)).eval()
    with torch.no_grad():
        out = fused(torch.randn(2, 5, 80, 50), *s2_batch(2))
    assert out["logits"].shape == (2, 13, 80, 50) and torch.isfinite(out["logits"]).all()


def find_first_conv_of(model):
    for name, module in model.net.encoder.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            return name, module
    raise AssertionError("no conv")


@pytest.mark.parametrize("arch,encoder", [("Unet", "resnet18"), ("Segformer", "mit_b0")])
def test_fusion_depends_on_s2_of_every_sample(arch, encoder):
    """Regression test for the baseline bug (pooled S2 vector of sample 0 used for the whole batch)."""
    torch.manual_seed(0)
    model = build_model(cfg_for(arch=arch, encoder=encoder, fusion="utt", modality_dropout=0.0,
                                **SMALL_UTAE)).eval()
    image = torch.randn(3, 5, 64, 64)
    s2, days, pad = s2_batch(3)
    with torch.no_grad():
        ref = model(image, s2, days, pad)
        assert ref["logits"].shape == (3, 13, 64, 64) and ref["s2_logits"].shape == (3, 13, 16, 16)
        for i in range(3):
            s2_i = s2.clone()
            s2_i[i] = torch.rand_like(s2_i[i])
            out = model(image, s2_i, days, pad)["logits"]
            diff = (out - ref["logits"]).abs().flatten(1).amax(dim=1)
            assert diff[i] > 1e-5, f"sample {i}'s logits ignore its own S2 series"
            others = [j for j in range(3) if j != i]
            assert (diff[others] == 0).all(), f"S2 of sample {i} leaked into other samples"


def test_fusion_pooled_branch_alone_is_per_sample():
    """The pooled branch on its own (crop projections zeroed) still follows each sample's S2."""
    torch.manual_seed(0)
    model = build_model(cfg_for(fusion="utt", encoder="resnet18", **SMALL_UTAE)).eval()
    for proj in model.s2_fusion.crop_proj.values():
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
    image = torch.randn(2, 5, 64, 64)
    s2, days, pad = s2_batch(2)
    with torch.no_grad():
        ref = model(image, s2, days, pad)["logits"]
        s2[1] = torch.rand_like(s2[1])
        out = model(image, s2, days, pad)["logits"]
    diff = (out - ref).abs().flatten(1).amax(dim=1)
    assert diff[0] == 0 and diff[1] > 1e-5


def test_fusion_padded_dates_and_empty_series():
    torch.manual_seed(0)
    model = build_model(cfg_for(fusion="utt", encoder="resnet18", **SMALL_UTAE)).eval()
    image = torch.randn(2, 5, 64, 64)
    s2, days, pad = s2_batch(2)
    with torch.no_grad():
        ref = model(image, s2, days, pad)
        s2p = torch.cat([s2, torch.full((2, 2, 10, 16, 16), float("nan"))], dim=1)
        daysp = torch.cat([days, torch.tensor([[500, -900], [0, 0]])], dim=1)
        padp = torch.cat([pad, torch.ones(2, 2, dtype=torch.bool)], dim=1)
        out = model(image, s2p, daysp, padp)
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["s2_logits"], ref["s2_logits"], atol=1e-5, rtol=0)
        # a sample with no real date gets no S2 term: same logits as a forward without S2
        pad_empty = pad.clone()
        pad_empty[1] = True
        empty = model(image, s2, days, pad_empty)["logits"]
        no_s2 = model(image)["logits"]
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[1], no_s2[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(empty[0], ref["logits"][0], atol=1e-5, rtol=0)


def test_sample_footprint_geometry():
    """A 512 px image covers the central 10.24 S2 pixels of the 40 px map, centred on its middle."""
    cols = torch.arange(40.0).view(1, 1, 1, 40).expand(1, 1, 40, 40)   # value = S2 column index
    out = sample_footprint(cols, (512, 512), (16, 16))
    k = torch.arange(16.0)
    expect = 19.5 - 5.12 + (k + 0.5) * 10.24 / 16                     # centres of the 16 output columns
    torch.testing.assert_close(out[0, 0, 0], expect)
    torch.testing.assert_close(out[0, 0, :, 3], torch.full((16,), float(expect[3])))
    # a 256 px crop covers half as much, still centred
    out = sample_footprint(cols, (256, 256), (4, 4))
    torch.testing.assert_close(out[0, 0, 0], 19.5 - 2.56 + (torch.arange(4.0) + 0.5) * 5.12 / 4)


def test_meta_dim_default_matches_dataset():
    from src.data.dataset import META_DIM
    assert Settings().meta_dim == META_DIM


def test_modality_dropout():
    torch.manual_seed(0)
    model = build_model(cfg_for(fusion="utt", encoder="resnet18", modality_dropout=1.0, **SMALL_UTAE)).train()
    image = torch.randn(2, 5, 64, 64)
    s2, days, pad = s2_batch(2)
    a = model(image, s2, days, pad)
    b = model(image, torch.rand_like(s2), days, pad)
    torch.testing.assert_close(a["logits"], b["logits"])             # S2 term dropped for every sample
    assert (a["s2_logits"] - b["s2_logits"]).abs().max() > 1e-5       # the auxiliary head still sees S2
    (a["logits"].mean() + a["s2_logits"].mean()).backward()
    model.modality_dropout = 0.0
    c = model(image, torch.rand_like(s2), days, pad)
    assert (c["logits"] - a["logits"]).abs().max() > 1e-5


def test_metadata_branch():
    torch.manual_seed(0)
    model = build_model(cfg_for(encoder="resnet18", use_metadata=True, meta_dim=7)).eval()
    image = torch.randn(2, 5, 64, 64)
    meta = torch.randn(2, 7)
    with torch.no_grad():
        ref = model(image, meta=meta)["logits"]
        meta2 = meta.clone()
        meta2[0] += 1.0
        out = model(image, meta=meta2)["logits"]
    diff = (out - ref).abs().flatten(1).amax(dim=1)
    assert diff[0] > 1e-6 and diff[1] == 0
    with pytest.raises(ValueError, match="meta_dim"):
        model(image, meta=torch.randn(2, 5))
    with pytest.raises(ValueError, match="needs the meta vector"):
        model(image)


def test_bad_settings_are_reported():
    with pytest.raises(ValueError, match="arch 'Nope'"):
        build_model(cfg_for(arch="Nope"))
    with pytest.raises(ValueError, match="bands"):
        build_model(cfg_for(bands=["R", "X"]))
    with pytest.raises(ValueError, match="extra_init"):
        build_model(cfg_for(extra_init="zeros"))
    with pytest.raises(ValueError, match="fusion"):
        build_model(cfg_for(fusion="late"))
    model = build_model(cfg_for(encoder="resnet18"))
    with pytest.raises(ValueError, match=r"\(B,5,H,W\)"):
        model(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------- weights files and band init
def _rgb_model(tmp_path: Path, encoder: str = "resnet18", arch: str = "Unet", whole: bool = True) -> tuple:
    """A 3-band model with random weights saved to a file, as a stand-in for ImageNet weights."""
    torch.manual_seed(1)
    src = build_model(cfg_for(arch=arch, encoder=encoder, bands=["R", "G", "B"]))
    sd = src.net.state_dict() if whole else src.net.encoder.state_dict()
    path = tmp_path / f"{encoder}_{'model' if whole else 'encoder'}.pth"
    torch.save(sd, path)
    return src, path


@pytest.mark.parametrize("mode", ["mean", "copy", "random"])
def test_local_weights_and_extra_band_init(tmp_path, mode):
    src, path = _rgb_model(tmp_path)
    bands = ["NIR", "B", "G", "R", "E"]
    model = build_model(cfg_for(encoder="resnet18", encoder_weights=str(path), bands=bands, extra_init=mode,
                                extra_copy_band="G"))
    ref = src.net.encoder.conv1.weight
    w = model.net.encoder.conv1.weight
    assert w.shape == (ref.shape[0], 5, *ref.shape[2:])
    torch.testing.assert_close(w[:, 1], ref[:, 2])  # B
    torch.testing.assert_close(w[:, 2], ref[:, 1])  # G
    torch.testing.assert_close(w[:, 3], ref[:, 0])  # R
    for extra in (0, 4):
        if mode == "mean":
            torch.testing.assert_close(w[:, extra], ref.mean(dim=1))
        elif mode == "copy":
            torch.testing.assert_close(w[:, extra], ref[:, 1])
        else:
            assert not torch.allclose(w[:, extra], ref.mean(dim=1))
            assert 0.5 < w[:, extra].std() / ref.std() < 2.0
    # every other encoder tensor and (whole-model file) the decoder/head come from the file
    theirs = src.net.state_dict()
    for key, value in model.net.state_dict().items():
        if key != "encoder.conv1.weight":
            torch.testing.assert_close(value, theirs[key], msg=key)
    out = model(torch.randn(1, 5, 64, 64))["logits"]
    assert out.shape == (1, 13, 64, 64)


@pytest.mark.parametrize("arch,encoder", [("Segformer", "mit_b0"), ("Unet", "tu-mobilenetv3_small_050")])
def test_encoder_only_weights_other_families(tmp_path, arch, encoder):
    src, path = _rgb_model(tmp_path, encoder=encoder, arch=arch, whole=False)
    model = build_model(cfg_for(arch=arch, encoder=encoder, encoder_weights=str(path),
                                bands=["R", "G", "B", "NIR"], extra_init="mean"))
    name, ref = find_first_conv(src.net.encoder)
    w = dict(model.net.encoder.named_modules())[name].weight
    assert w.shape[1] == 4
    torch.testing.assert_close(w[:, :3], ref.weight)
    torch.testing.assert_close(w[:, 3], ref.weight.mean(dim=1))
    theirs = src.net.encoder.state_dict()
    for key, value in model.net.encoder.state_dict().items():
        if key != f"{name}.weight":
            torch.testing.assert_close(value, theirs[key], msg=key)
    # the decoder is not in an encoder-only file: it keeps a fresh init
    pairs = zip(model.net.decoder.parameters(), src.net.decoder.parameters())
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_same_band_weights_load_as_is(tmp_path):
    """A file whose first conv already has len(bands) inputs (e.g. a kit checkpoint) is loaded unchanged."""
    torch.manual_seed(2)
    src = build_model(cfg_for(encoder="resnet18", bands=["R", "G", "NIR"]))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # "net." prefix and a checkpoint dict
    model = build_model(cfg_for(encoder="resnet18", bands=["R", "G", "NIR"], encoder_weights=str(path)))
    for (k, a), b in zip(model.state_dict().items(), src.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_bad_weights_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_model(cfg_for(encoder_weights=str(tmp_path / "missing.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        build_model(cfg_for(encoder_weights=str(junk)))
    _, other = _rgb_model(tmp_path, encoder="mit_b0", arch="Segformer", whole=False)
    with pytest.raises(ValueError, match="mit_b0_encoder.pth"):
        build_model(cfg_for(encoder="resnet18", encoder_weights=str(other)))
    assert load_state_file(other)  # the file itself is fine


# ------------------------------------------------------------------------------------- presets
PRESETS = ["unet_r34", "utt_r34", "segformer_b5", "maxvit_unet"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset):
    cfg = load_settings(CONFIGS / f"{preset}.yaml", {"encoder_weights": "none"})
    model = build_model(cfg)
    assert count_parameters(model) > 1_000_000
    if preset in ("unet_r34", "utt_r34"):
        model.eval()
        image = torch.randn(1, len(cfg.bands), 64, 64)
        s2, days, pad = s2_batch(1, size=cfg.s2_size)
        with torch.no_grad():
            out = model(image, s2, days, pad) if cfg.fusion != "none" else model(image)
        assert out["logits"].shape == (1, 13, 64, 64)
        assert ("s2_logits" in out) == (cfg.fusion == "utt")


@pytest.mark.slow
def test_maxvit_pads_to_its_window_multiple():
    """MaxViT-512 windows need sides that are multiples of 512: smaller crops are padded, then cropped."""
    cfg = load_settings(CONFIGS / "maxvit_unet.yaml", {"encoder_weights": "none"})
    model = build_model(cfg).eval()
    assert model.multiple == 512
    with torch.no_grad():
        out = model(torch.randn(1, len(cfg.bands), 96, 64))["logits"]
    assert out.shape == (1, 13, 96, 64)


def test_load_for_inference_rebuilds_the_model(tmp_path):
    cfg = load_settings(None, {"encoder": "resnet18", "encoder_weights": "none", "bands": ["R", "G", "B"]})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": cfg.to_dict()})
    loaded, saved_cfg = load_for_inference(path, "cpu")
    assert saved_cfg == cfg and not loaded.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], model(x)["logits"])
    # weights of another architecture: a clear error naming the file
    other = cfg.with_values(encoder="resnet34")
    save_checkpoint(tmp_path / "bad.pt", {"model": model.state_dict(), "config": other.to_dict()})
    with pytest.raises(CheckpointError, match="bad.pt: weights do not match"):
        load_for_inference(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        load_for_inference(tmp_path / "missing.pt")
