"""bn_adapt=domain: BatchNorm statistics re-estimated per test domain, on copies; the figures match a hand
computation, the trained model is never touched, a killed run resumes to the same files, models without
BatchNorm are left alone, and predict.json refuses a resume with another setting."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from src.core.config import load_settings
from src.core.errors import ConfigError, PredictError
from src.core.files import read_label
from src.core.settings import Settings
from src.data.normalize import normalize
from src.models.batchnorm import Estimate, batchnorm_layers, has_batchnorm
from src.prediction import passes as PP
from src.prediction import stores as predstore
from src.prediction.bn_adapt import adapt_batchnorm, estimate_rows
from src.prediction.ensemble import Ensemble
from src.scoring.submission import validate
from tests.test_predict import Conv1x1

torch.set_num_threads(1)


class ConvBN(nn.Module):
    """conv -> BatchNorm -> ReLU -> dropout -> 1x1 conv to 13 classes, on the 5 normalised bands."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(5, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout2d(0.5)
        self.head = nn.Conv2d(6, 13, 1)

    def forward(self, image, **kw):
        return {"logits": self.head(self.drop(torch.relu(self.bn(self.conv(image)))))}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- the maths
def test_statistics_are_the_cumulative_average_of_the_batch_statistics():
    model = ConvBN().eval()
    before = _state(model)
    gen = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(n, 5, 12, 12, generator=gen) * 2 + 3} for n in (3, 3, 1)]
    adapted = adapt_batchnorm(model, batches)
    with torch.no_grad():
        ys = [model.conv(b["image"]) for b in batches]
    want_mean = torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0)
    want_var = torch.stack([y.var((0, 2, 3), unbiased=True) for y in ys]).mean(0)
    assert torch.allclose(adapted.bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(adapted.bn.running_var, want_var, rtol=1e-5)
    assert int(adapted.bn.num_batches_tracked) == 3
    # every other tensor is the trained one; the original is untouched and still in eval mode
    after = adapted.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("bn.running")
               and not k.endswith("num_batches_tracked"))
    assert _same(_state(model), before) and not model.training
    assert not adapted.training and not any(m.training for m in adapted.modules())
    # the adapted copy predicts with the new statistics (dropout off: deterministic)
    x = batches[0]["image"]
    with torch.no_grad():
        z = (model.conv(x) - want_mean[None, :, None, None]) / (want_var[None, :, None, None] + 1e-5).sqrt()
        want = model.head(torch.relu(z * model.bn.weight[None, :, None, None]
                                     + model.bn.bias[None, :, None, None]))
        assert torch.allclose(adapted(x)["logits"], want, atol=1e-4)
        assert torch.equal(adapted(x)["logits"], adapted(x)["logits"])


def test_the_first_batchnorm_of_a_real_model_gets_its_inputs_statistics():
    from src.models.flair_model import build_model

    cfg = load_settings(None, {"encoder": "resnet18", "encoder_weights": "none", "use_s2": False,
                             "fusion": "none"})
    model = build_model(cfg).eval()
    before = _state(model)
    first = batchnorm_layers(model)[0]
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(2, 5, 64, 64, generator=gen) + k} for k in range(2)]
    with torch.no_grad():
        for b in batches:  # what the first BatchNorm is fed does not depend on any BatchNorm statistics
            model(b["image"])
    hook.remove()
    adapted = adapt_batchnorm(model, batches)
    bn = batchnorm_layers(adapted)[0]
    assert torch.allclose(bn.running_mean, torch.stack([y.mean((0, 2, 3)) for y in seen]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([y.var((0, 2, 3)) for y in seen]).mean(0), rtol=1e-4)
    assert _same(_state(model), before)
    assert has_batchnorm(model) and not has_batchnorm(Conv1x1())


def test_a_batch_with_non_finite_statistics_is_left_out():
    """One patch of inf (a broken S2 file, an fp16 overflow) would make every average inf: it is left out."""
    model = ConvBN().eval()
    gen = torch.Generator().manual_seed(2)
    good = [{"image": torch.randn(3, 5, 12, 12, generator=gen) + 1} for _ in range(2)]
    bad = {"image": good[0]["image"].clone()}
    bad["image"][1, 2, 3, 4] = float("inf")
    want = adapt_batchnorm(model, good)
    got = adapt_batchnorm(model, [good[0], bad, good[1]])
    assert torch.equal(got.bn.running_mean, want.bn.running_mean)
    assert torch.equal(got.bn.running_var, want.bn.running_var) and int(got.bn.num_batches_tracked) == 2
    with Estimate(copy.deepcopy(model)) as est:  # nothing usable: the statistics the model came with
        assert est.feed(est.model, bad["image"]) is False and est.left_out == 1
    assert torch.equal(est.model.bn.running_var, model.bn.running_var)


def test_a_layer_with_one_value_per_channel_keeps_its_statistics():
    class Pooled(nn.Module):  # a global-pooling branch (as in DeepLabV3's ASPP) fed one patch at a time
        def __init__(self):
            super().__init__()
            self.pool, self.bn = nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(5)

        def forward(self, image, **kw):
            return {"logits": self.bn(self.pool(image))}

    model = Pooled().eval()
    adapted = adapt_batchnorm(model, [{"image": torch.randn(1, 5, 8, 8)}])
    assert torch.equal(adapted.bn.running_mean, model.bn.running_mean)
    adapted = adapt_batchnorm(model, [{"image": torch.randn(4, 5, 8, 8) + 2}])
    assert (adapted.bn.running_mean > 1).all()


def test_settings_and_estimate_rows():
    assert Settings(bn_adapt="domain", bn_adapt_patches=0).bn_adapt_patches == 0
    with pytest.raises(ConfigError, match="bn_adapt: expected"):
        Settings(bn_adapt="batch")
    with pytest.raises(ConfigError, match="bn_adapt_patches"):
        Settings(bn_adapt_patches=-1)
    import pandas as pd

    rows = pd.DataFrame({"id": [str(i) for i in range(10)]})
    assert estimate_rows(rows, 0) is rows and estimate_rows(rows, 10) is rows
    assert estimate_rows(rows, 4)["id"].tolist() == ["0", "3", "6", "9"]  # spread over the domain


# ---------------------------------------------------------------------------------------- prediction
def _cfg(**kw) -> Settings:
    return Settings(**{"use_s2": False, "workers": 0, "batch_size": 2, "tta": "none", "precision": "fp32",
                       "channels_last": False, "bn_adapt": "domain", **kw})


def _run(index_df, out, model, **kw) -> list[str]:
    logs: list[str] = []
    PP.run_prediction(Ensemble([model], [_cfg(**kw)], [1.0]), index_df, PP.Target(out), log=logs.append)
    return logs


def _preds(folder) -> dict[str, np.ndarray]:
    return {p.name[5:-4]: read_label(p) for p in sorted(folder.glob("PRED_*.tif"))}


def test_predict_by_domain_resumes_to_the_same_files(synth_index, tmp_path, monkeypatch):
    from src.data.dataset import FlairDataset

    test = synth_index["test"]
    domains = test["domain"].unique().tolist()
    assert len(domains) == 2
    model = ConvBN().eval()
    before = _state(model)
    logs = _run(test, tmp_path / "once", model)
    assert validate(tmp_path / "once", test["id"].tolist())["files"] == len(test)
    n = (test["domain"] == domains[0]).sum()
    assert any(f"domain {domains[0]}: BatchNorm statistics re-estimated on {n} of its {n}" in s for s in logs)
    assert _same(_state(model), before) and not model.training
    # by hand: the domain's patches in the loader's batches, then its first patch through the adapted copy
    rows = test[test["domain"] == domains[1]].reset_index(drop=True)
    ds = FlairDataset(rows, _cfg(), train=False, labels=False)
    images = [normalize(ds[i]["image"][None], _cfg()) for i in range(len(rows))]
    batches = [{"image": torch.cat(images[i:i + 2])} for i in range(0, len(images), 2)]
    adapted = adapt_batchnorm(model, batches)
    with torch.no_grad():
        want = adapted(images[0])["logits"][0].argmax(0).numpy()
    once = _preds(tmp_path / "once")
    assert np.array_equal(once[rows["id"].iloc[0]], want)
    # without adaptation the same model predicts otherwise
    _run(test, tmp_path / "none", model, bn_adapt="none")
    assert any(not np.array_equal(a, once[k]) for k, a in _preds(tmp_path / "none").items())

    # killed after the first batch of the first domain (2 of its patches written), then resumed
    real, calls = Ensemble.predict, [0]

    def dies_on_second_batch(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(Ensemble, "predict", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(test, tmp_path / "killed", model)
    assert len(_preds(tmp_path / "killed")) == 2
    monkeypatch.setattr(Ensemble, "predict", real)
    logs = _run(test, tmp_path / "killed", model)
    # the partly done domain is re-estimated on all its patches, not on the 4 still to write
    assert any(f"domain {domains[0]}: BatchNorm statistics re-estimated on {n} of its {n}" in s for s in logs)
    resumed = _preds(tmp_path / "killed")
    assert resumed.keys() == once.keys() and all(np.array_equal(resumed[k], once[k]) for k in once)
    assert _same(_state(model), before)

    # another setting is refused on resume; a cap is part of the setup too
    (tmp_path / "killed" / f"PRED_{test['id'].iloc[0]}.tif").unlink()
    with pytest.raises(PredictError, match="bn_adapt differs"):
        _run(test, tmp_path / "killed", model, bn_adapt="none")
    with pytest.raises(PredictError, match="bn_adapt_patches differs"):
        _run(test, tmp_path / "killed", model, bn_adapt_patches=4)
    logs = _run(test, tmp_path / "capped", model, bn_adapt_patches=4)
    assert any(f"re-estimated on 4 of its {n}" in s for s in logs)


def test_models_without_batchnorm_are_left_alone(synth_index, tmp_path):
    test = synth_index["test"].iloc[:4]
    logs = _run(test, tmp_path / "domain", Conv1x1().eval())
    assert any("has no BatchNorm layer" in s for s in logs)
    assert not any("re-estimated" in s for s in logs)
    _run(test, tmp_path / "none", Conv1x1().eval(), bn_adapt="none")
    a, b = _preds(tmp_path / "domain"), _preds(tmp_path / "none")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a manifest written before bn_adapt existed was made without it: resuming with none is accepted
    manifest = tmp_path / "none" / predstore.MANIFEST
    fields = json.loads(manifest.read_text())
    del fields["bn_adapt"]
    manifest.write_text(json.dumps(fields))
    (tmp_path / "none" / f"PRED_{test['id'].iloc[0]}.tif").unlink()
    _run(test, tmp_path / "none", Conv1x1().eval(), bn_adapt="none")
    with pytest.raises(ConfigError, match="domain column"):
        _run(test.drop(columns="domain"), tmp_path / "nodomain", ConvBN().eval())
