"""make export (src.export, src.deploy.export): slim checkpoint and ONNX model, checked against PyTorch on
CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from src.core.checkpoint import find_checkpoints, save_checkpoint
from src.core.config import load_settings
from src.deploy.export import export_checkpoint, slim_state
from src.export import main
from src.models.flair_model import build_model, load_for_inference
from src.prediction.onnx_file import ONNX_ATOL, OnnxModel, example_inputs

ROOT = Path(__file__).resolve().parents[1]


def training_checkpoint(path: Path, **over) -> Path:
    """A best.pt as src.train writes it: EMA weights, raw weights, EMA state, optimizer moments, history."""
    cfg = load_settings(ROOT / "configs/demo.yaml", over)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sd = model.state_dict()
    return save_checkpoint(path, {"model": sd, "raw_model": sd, "ema": {"module": sd, "updates": 3},
                                  "config": cfg.to_dict(), "fold": 0, "epoch": 2, "best_miou": 0.42,
                                  "history": [{"epoch": 2}], "optimizer": opt.state_dict()})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    ckpt = training_checkpoint(tmp_path_factory.mktemp("runs") / "fold0" / "best.pt", use_s2=False,
                               fusion="none")
    return export_checkpoint(ckpt, "fp16", onnx=True, size=64)


def test_slim_checkpoint_loads_and_predicts_like_best(exported):
    best, slim = Path(exported["checkpoint"]), Path(exported["slim"])
    state = torch.load(slim, weights_only=False)
    assert set(state) == {"model", "config", "meta"} and state["meta"]["epoch"] == 2
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float16}
    assert slim.stat().st_size < best.stat().st_size / 5
    assert find_checkpoints([slim]) == [slim]  # make predict RUNS=.../best.slim.pt takes it as given
    full, cfg = load_for_inference(best)
    small, _ = load_for_inference(slim)  # load_state_dict copies fp16 into the float32 parameters
    assert all(p.dtype == torch.float32 for p in small.parameters())
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in full.state_dict().items()}
    assert all(torch.equal(small.state_dict()[k], v) for k, v in rounded.items())
    inputs = example_inputs(cfg, batch=2, size=64)
    with torch.no_grad():
        a, b = OnnxModel(full, cfg)(**inputs), OnnxModel(small, cfg)(**inputs)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.99
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()  # fp16 weights: ~1e-3 relative per weight


def test_onnx_matches_pytorch_on_cpu(exported):
    import onnxruntime as ort

    assert exported["onnx_max_diff"] < ONNX_ATOL
    model, cfg = load_for_inference(exported["checkpoint"])
    session = ort.InferenceSession(exported["onnx"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    image = torch.randint(0, 256, (3, 5, 64, 64)).float()  # raw band values; another batch
    got = session.run(["logits"], {"image": image.numpy()})[0]
    with torch.no_grad():
        want = OnnxModel(model, cfg)(image).numpy()
    assert got.shape == (3, 13, 64, 64) and np.abs(got - want).max() < ONNX_ATOL


def test_slim_keeps_tensors_fp16_cannot_hold():
    state = {"model": {"w": torch.tensor([1.0, 2.0]), "big": torch.tensor([1e6]), "n": torch.tensor(3)},
             "config": {"bands": ["R"]}}
    slim = slim_state(state)
    assert slim["model"]["w"].dtype == torch.float16 and slim["model"]["n"].dtype == torch.int64
    assert slim["model"]["big"].dtype == torch.float32 and slim["meta"]["kept_float32"] == ["big"]


def test_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and err.count("\n") == 0 and "nowhere" in err


@pytest.mark.slow
def test_onnx_fusion_model_matches_pytorch(tmp_path):
    """U-T&T: image + S2 series (dynamic batch and dates, padded dates included) through onnxruntime."""
    import onnxruntime as ort

    ckpt = training_checkpoint(tmp_path / "best.pt")  # demo.yaml: fusion utt
    report = export_checkpoint(ckpt, "bf16", onnx=True, size=64)
    assert report["onnx_max_diff"] < ONNX_ATOL
    names = [i.name for i in ort.InferenceSession(report["onnx"]).get_inputs()]
    assert names == ["image", "s2", "s2_days", "s2_pad"]


def test_early_fusion_model_takes_s2_in_onnx_and_is_refused_by_infer(tmp_path):
    """fusion=none with s2_early=ndvi still reads S2 (as input channels): the ONNX model takes the series,
    and whole-orthophoto inference (no S2) refuses it instead of predicting with empty channels."""
    import onnxruntime as ort

    from src.core.errors import ConfigError
    from src.prediction.ensemble import load_ensemble

    ckpt = training_checkpoint(tmp_path / "best.pt", fusion="none", s2_early="ndvi")
    report = export_checkpoint(ckpt, "fp16", onnx=True, size=64)
    assert report["onnx_max_diff"] < ONNX_ATOL
    assert [i.name for i in ort.InferenceSession(report["onnx"]).get_inputs()][:2] == ["image", "s2"]
    with pytest.raises(ConfigError, match="s2_early=ndvi"):
        load_ensemble([ckpt], torch.device("cpu"), job="infer", log=lambda s: None)


def _swap_head_rows(weights: dict[str, torch.Tensor]) -> str:
    """Swap the classes 1 and 6 rows of the last 13-output convolution (the head) in place; its key."""
    key = [k for k, v in weights.items() if v.ndim == 4 and v.shape[0] == 13][-1]
    weights[key] = weights[key][[0, 6, 2, 3, 4, 5, 1, *range(7, 13)]].clone()
    return key


def test_a_broken_slim_checkpoint_fails_the_export_and_is_removed(tmp_path, monkeypatch, capsys):
    """Two head channels swapped in the slim weights: the check on real patches must fail, not just print."""
    import src.deploy.export as E

    ckpt = training_checkpoint(tmp_path / "fold0" / "best.pt", use_s2=False, fusion="none")

    def broken(state, dtype=torch.float16, source=""):
        out = slim_state(state, dtype, source)
        _swap_head_rows(out["model"])
        return out

    monkeypatch.setattr(E, "slim_state", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", str(ckpt), "--size", "64", "--no-onnx"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and err.count("\n") == 0, err
    assert "best.slim.pt: class agreement" in err and "file removed" in err
    assert not (tmp_path / "fold0" / "best.slim.pt").exists()


def test_a_broken_onnx_file_fails_the_export_and_is_removed(tmp_path, monkeypatch, capsys):
    import onnx
    from onnx import numpy_helper

    import src.prediction.onnx_file as E

    ckpt = training_checkpoint(tmp_path / "fold0" / "best.pt", use_s2=False, fusion="none")
    written = E.export_onnx

    def broken(wrapper, inputs, path):
        written(wrapper, inputs, path)
        model = onnx.load(str(path))
        heads = [t for t in model.graph.initializer if len(t.dims) == 4 and t.dims[0] == 13]
        w = numpy_helper.to_array(heads[-1]).copy()
        w[[1, 6]] = w[[6, 1]]
        heads[-1].CopyFrom(numpy_helper.from_array(w, heads[-1].name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(E, "export_onnx", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", str(ckpt), "--size", "64"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and err.count("\n") == 0, err
    assert "best.onnx: class agreement" in err and "vs PyTorch" in err and "file removed" in err
    assert not (tmp_path / "fold0" / "best.onnx").exists()
    assert (tmp_path / "fold0" / "best.slim.pt").is_file()  # the slim file passed its own check
