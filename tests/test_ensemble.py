"""Ensemble maths: TTA views and their inverses, joint aerial/S2 transforms, views stacked into one
forward pass, per-model weights and inputs, checkpoints resolved from run folders (src.prediction.ensemble,
src.prediction.tta)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.core.errors import PredictError
from src.prediction import ensemble as E
from src.prediction import tta as T

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- toy models
class Pointwise(nn.Module):
    """1x1 convs and a pointwise nonlinearity: commutes with every flip/rotation, so TTA is a no-op."""

    def __init__(self, c_in: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(c_in, 16, 1)
        self.b = nn.Conv2d(16, 13, 1)

    def forward(self, image, s2=None, s2_days=None, s2_pad=None, meta=None):
        return {"logits": self.b(torch.tanh(self.a(image)))}


class Spatial(nn.Module):
    """A 3x3 conv: not equivariant, so TTA must change its output (guards against a no-op TTA)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c = nn.Conv2d(5, 13, 3, padding=1)

    def forward(self, image, **kw):
        return {"logits": self.c(image)}


class S2Recorder(nn.Module):
    """Output = pointwise(image) + nearest-upsampled per-pixel S2 mean: equivariant only when the S2 crop
    is flipped/rotated with the image. Records every input it receives."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.img = nn.Conv2d(5, 13, 1)
        self.w = nn.Parameter(torch.randn(13, 1, 1))
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, image, s2=None, s2_days=None, s2_pad=None, meta=None):
        self.seen.append({"image": image.clone(), "s2": s2.clone(), "s2_days": s2_days.clone(),
                          "s2_pad": s2_pad.clone()})
        s2_map = s2.mean(dim=(1, 2))[:, None]  # (N, 1, S, S): mean over dates and bands
        up = nn.functional.interpolate(s2_map, size=image.shape[-2:], mode="nearest")
        return {"logits": self.img(image) + self.w * up}


class Constant(nn.Module):
    """Same logits at every pixel of every patch."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("v", torch.tensor(logits, dtype=torch.float32))

    def forward(self, image, **kw):
        b, _, h, w = image.shape
        return {"logits": self.v[None, :, None, None].expand(b, -1, h, w)}


def _batch(b: int = 3, h: int = 32, w: int = 32, s2: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randn(b, 5, h, w, generator=g), "id": [f"{i:06d}" for i in range(b)]}
    if s2:
        out["s2"] = torch.randn(b, 4, 10, 8, 8, generator=g)
        out["s2_days"] = torch.arange(4).repeat(b, 1)
        out["s2_pad"] = torch.zeros(b, 4, dtype=torch.bool)
    return out


# ------------------------------------------------------------------------------------- TTA level
@pytest.mark.parametrize("level,n", [("none", 1), ("flip", 3), ("d4", 8)])
def test_views_are_distinct_and_invert(level, n):
    x = torch.randn(2, 3, 6, 6)
    vs = T.views(level)
    assert len(vs) == n
    seen = set()
    for v in vs:
        assert torch.equal(v.invert(v.apply(x)), x), v
        seen.add(v.apply(x).numpy().tobytes())
    assert len(seen) == n  # every view is a different picture
    assert vs[0] == T.View()


def test_flip_level_is_identity_hflip_vflip():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    got = [v.apply(x) for v in T.views("flip")]
    assert torch.equal(got[1], x.flip(-1)) and torch.equal(got[2], x.flip(-2))


def test_unknown_level_rejected():
    with pytest.raises(ValueError, match="unknown TTA level"):
        T.views("d8")


@pytest.mark.parametrize("ensemble", ["probs", "logits"])
def test_tta_of_equivariant_model_equals_no_tta(ensemble):
    model = Pointwise().eval()
    batch = _batch()
    ref = E.predict_batch([model], None, batch, "none", ensemble)
    for level in ("flip", "d4"):
        got = E.predict_batch([model], None, batch, level, ensemble)
        assert got.shape == (3, 13, 32, 32)
        assert torch.allclose(got, ref, atol=1e-5), level
    assert torch.allclose(ref.sum(1), torch.ones(3, 32, 32), atol=1e-5)


def test_tta_changes_a_non_equivariant_model_and_averages_the_views():
    model = Spatial().eval()
    batch = _batch()
    ref = E.predict_batch([model], None, batch, "none")
    got = E.predict_batch([model], None, batch, "d4")
    assert not torch.allclose(got, ref, atol=1e-3)
    # by hand: every view through the model on its own, mapped back, probabilities averaged
    with torch.no_grad():
        manual = torch.stack([v.invert(model(v.apply(batch["image"]))["logits"]).softmax(1)
                              for v in T.views("d4")]).mean(0)
    assert torch.allclose(got, manual, atol=1e-5)


def test_views_go_through_the_network_together_and_s2_turns_with_the_image():
    model = S2Recorder().eval()
    batch = _batch(b=2, h=32, w=32, s2=True)
    ref = E.predict_batch([model], None, batch, "none")
    model.seen.clear()
    got = E.predict_batch([model], None, batch, "d4")
    assert len(model.seen) == 1  # one forward pass for all 8 views (V*B rows)
    seen = model.seen[0]
    assert seen["image"].shape[0] == 16 and seen["s2"].shape == (16, 4, 10, 8, 8)
    for k, v in enumerate(T.views("d4")):
        rows = slice(2 * k, 2 * k + 2)
        assert torch.equal(seen["image"][rows], v.apply(batch["image"])), v
        assert torch.equal(seen["s2"][rows], v.apply(batch["s2"])), v
        assert torch.equal(seen["s2_days"][rows], batch["s2_days"])
        assert torch.equal(seen["s2_pad"][rows], batch["s2_pad"])
    # and the model (equivariant only if S2 turns with the image) gives the no-TTA answer
    assert torch.allclose(got, ref, atol=1e-5)


def test_non_square_image_d4_uses_two_stacks():
    model = Pointwise().eval()
    batch = _batch(h=16, w=24)
    ref = E.predict_batch([model], None, batch, "none")
    got = E.predict_batch([model], None, batch, "d4")
    assert got.shape == (3, 13, 16, 24)
    assert torch.allclose(got, ref, atol=1e-5)


# ---------------------------------------------------------------------------------- ensemble level
def test_ensemble_weights_are_applied():
    la = [4.0] + [0.0] * 12
    lb = [0.0, 3.0] + [0.0] * 11
    a, b = Constant(la), Constant(lb)
    pa, pb = torch.tensor(la).softmax(0), torch.tensor(lb).softmax(0)
    batch = _batch(b=2, h=8, w=8)
    got = E.predict_batch([a, b], [3, 1], batch, "d4", "probs")
    want = 0.75 * pa + 0.25 * pb
    assert torch.allclose(got[1, :, 5, 2], want, atol=1e-6)
    got = E.predict_batch([a, b], [1, 3], batch, "none", "logits")
    want = (0.25 * torch.tensor(la) + 0.75 * torch.tensor(lb)).softmax(0)
    assert torch.allclose(got[0, :, 0, 7], want, atol=1e-6)
    # equal weights by default; a zero weight removes a model
    assert torch.allclose(E.predict_batch([a, b], None, batch)[0, :, 0, 0], (pa + pb) / 2, atol=1e-6)
    assert torch.allclose(E.predict_batch([a, b], [0, 2], batch)[0, :, 0, 0], pb, atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        E.predict_batch([a, b], [1], batch)


def test_models_can_get_their_own_inputs():
    three = Pointwise(c_in=3, seed=3).eval()
    five = Pointwise(c_in=5, seed=4).eval()
    b5 = _batch()
    b3 = {**b5, "image": b5["image"][:, :3]}
    got = E.predict_batch([three, five], None, [b3, b5], "flip")
    want = (E.predict_batch([three], None, b3) + E.predict_batch([five], None, b5)) / 2
    assert torch.allclose(got, want, atol=1e-5)


def test_weights_per_run_item_are_split_between_its_checkpoints(tmp_path):
    for f in ("a/fold0", "a/fold1", "b/fold0"):
        (tmp_path / f).mkdir(parents=True)
        (tmp_path / f / "best.pt").write_bytes(b"x")
    paths, w = E.resolve_checkpoints([tmp_path / "a", tmp_path / "b"], [1, 1])
    assert [p.parent.parent.name for p in paths] == ["a", "a", "b"]
    assert w == [0.5, 0.5, 1.0]
    _, w = E.resolve_checkpoints([tmp_path / "a", tmp_path / "b"], [1, 2, 3])
    assert w == [1, 2, 3]
    with pytest.raises(PredictError, match="weights"):
        E.resolve_checkpoints([tmp_path / "a", tmp_path / "b"], [1, 2, 3, 4])
