"""U-TAE / L-TAE: shapes, padded dates are inert, attention is a proper distribution over real dates."""
from __future__ import annotations

import pytest
import torch

from src.models.utae import LTAE, UTAE, aggregate, day_encoding

S = 16  # S2 crop side for the tests (multiple of 8)


def small_utae(**kw) -> UTAE:
    torch.manual_seed(0)
    args = dict(widths=[16, 16, 32, 32], decoder_widths=[16, 16, 32, 32], heads=4, d_model=32, d_k=4,
                num_classes=13)
    args.update(kw)
    return UTAE(10, **args)


def series(b: int = 2, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, t, 10, S, S, generator=g)
    days = torch.sort(torch.randint(-200, 200, (b, t), generator=g), dim=1).values
    return x, days, torch.zeros(b, t, dtype=torch.bool)


def test_shapes_and_backward():
    model = small_utae().train()
    x, days, pad = series()
    feats, logits = model(x, days, pad)
    assert feats.shape == (2, 16, S, S)
    assert logits.shape == (2, 13, S, S)
    (feats.mean() + logits.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.ltae.query.grad.abs().sum() > 0  # the master queries are trained


def test_paper_settings_shapes():
    model = UTAE(10, [64, 64, 128, 128], [32, 32, 64, 128], heads=16, d_model=256, d_k=4).eval()
    x = torch.rand(1, 3, 10, 40, 40)
    with torch.no_grad():
        feats, logits = model(x, torch.tensor([[10, 40, 90]]))
    assert feats.shape == (1, 32, 40, 40) and logits.shape == (1, 13, 40, 40)


def test_padded_dates_do_not_change_output():
    model = small_utae().eval()
    x, days, pad = series()
    with torch.no_grad():
        ref_f, ref_l = model(x, days, pad)
    # append padding of different lengths per sample, with garbage (NaN, huge) values and days
    extra = 3
    garbage = torch.full((2, extra, 10, S, S), float("nan"))
    garbage[1] = 1e6
    x2 = torch.cat([x, garbage], dim=1)
    days2 = torch.cat([days, torch.tensor([[0, 999, 12345], [7, -5000, 3]])], dim=1)
    pad2 = torch.cat([pad, torch.ones(2, extra, dtype=torch.bool)], dim=1)
    # and one padded date in the middle of sample 0's series
    x2 = torch.cat([x2[:, :2], torch.randn(2, 1, 10, S, S) * 100, x2[:, 2:]], dim=1)
    days2 = torch.cat([days2[:, :2], torch.tensor([[321], [-321]]), days2[:, 2:]], dim=1)
    pad2 = torch.cat([pad2[:, :2], torch.ones(2, 1, dtype=torch.bool), pad2[:, 2:]], dim=1)
    with torch.no_grad():
        f, lg = model(x2, days2, pad2)
    torch.testing.assert_close(f, ref_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(lg, ref_l, atol=1e-5, rtol=0)


def test_date_order_is_irrelevant_but_days_matter():
    """Attention is keyed by day numbers, not by position in the series."""
    model = small_utae().eval()
    x, days, pad = series()
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        ref, _ = model(x, days, pad)
        out, _ = model(x[:, perm], days[:, perm], pad[:, perm])
        shifted, _ = model(x, days + 60, pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (shifted - ref).abs().max() > 1e-4


def test_samples_are_independent_in_eval():
    model = small_utae().eval()
    x, days, pad = series(b=3)
    with torch.no_grad():
        ref, _ = model(x, days, pad)
        x2 = x.clone()
        x2[1] += torch.rand_like(x2[1])
        out, _ = model(x2, days, pad)
    diff = (out - ref).abs().flatten(1).amax(dim=1)
    assert diff[1] > 1e-4 and diff[0] == 0 and diff[2] == 0


def test_all_dates_padded_is_finite_with_gradients():
    model = small_utae().train()
    x, days, pad = series()
    pad[1] = True
    x[1] = float("nan")
    feats, logits = model(x, days, pad)
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ltae_attention_masks():
    torch.manual_seed(0)
    ltae = LTAE(32, d_model=32, heads=4, d_k=4, out_channels=32).eval()
    x = torch.randn(2, 6, 32, 3, 3)
    days = torch.arange(6).repeat(2, 1) * 30
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, :] = True
    out, attn = ltae(x, days, pad)
    assert out.shape == (2, 32, 3, 3) and attn.shape == (2, 4, 6, 3, 3)
    assert (attn[0, :, 4:] == 0).all()
    torch.testing.assert_close(attn[0].sum(dim=1), torch.ones(4, 3, 3))
    assert (attn[1] == 0).all()  # no real date: no attention at all


def test_aggregate_uses_head_masks_per_channel_group():
    x = torch.arange(2.0).view(1, 2, 1, 1, 1).expand(1, 2, 4, 4, 4).clone()  # date 0 -> 0, date 1 -> 1
    attn = torch.zeros(1, 2, 2, 2, 2)
    attn[:, 0, 1] = 1.0  # head 0 looks at date 1
    attn[:, 1, 0] = 1.0  # head 1 looks at date 0
    out = aggregate(x, attn)  # channels 0-1 are head 0's group, 2-3 head 1's
    assert out.shape == (1, 4, 4, 4)
    assert (out[:, :2] == 1).all() and (out[:, 2:] == 0).all()


def test_day_encoding_values():
    pe = day_encoding(torch.tensor([0, 1000]), 4, period=1000.0)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    # dims 0/1 have frequency 1, dims 2/3 frequency 1000**-0.5
    f = 1000.0 ** -0.5
    expect = torch.tensor([torch.sin(torch.tensor(1000.0)), torch.cos(torch.tensor(1000.0)),
                           torch.sin(torch.tensor(1000.0 * f)), torch.cos(torch.tensor(1000.0 * f))])
    torch.testing.assert_close(pe[1], expect)


def test_bad_inputs_are_named():
    model = small_utae()
    x, days, pad = series()
    with pytest.raises(ValueError, match="multiple of 8"):
        model(x[..., :12, :12], days, pad)
    with pytest.raises(ValueError, match="s2_days shape"):
        model(x, days[:, :3], pad)
    with pytest.raises(ValueError, match=r"\(B,T,10,S,S\)"):
        model(x[:, :, :4], days, pad)
    with pytest.raises(ValueError, match="divisible"):
        UTAE(10, [16, 16, 32, 30], [16, 16, 32, 30], heads=4, d_model=32)
