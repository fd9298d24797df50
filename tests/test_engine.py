"""The ONNX Runtime engine of predict and infer (src.prediction.onnx_engine, src.prediction.onnx_file): same
outputs as PyTorch on the synthetic test set, the checked export and its stamp, and who stays on torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from src.core.checkpoint import save_checkpoint
from src.core.config import load_settings
from src.core.errors import PredictError
from src.models.flair_model import build_model, load_for_inference
from src.predict import main as predict_main
from src.prediction.ensemble import load_ensemble
from src.prediction.onnx_engine import EXPORT_PAYS, OnnxRunner, use_engine
from src.prediction.onnx_file import Stamp, is_current, onnx_path, stamp_path

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SIDE = 64  # export and check windows of the unit tests (the CLI test predicts whole 512 px patches)


def checkpoint(path: Path, data_dir: Path, seed: int = 0, **over) -> Path:
    """An untrained demo-config model saved as a run's best.pt (the engine never looks at the weights)."""
    cfg = load_settings(ROOT / "configs/demo.yaml", {"use_s2": False, "fusion": "none",
                                                    "data_dir": str(data_dir), **over})
    torch.manual_seed(seed)
    return save_checkpoint(path, {"model": build_model(cfg).state_dict(), "config": cfg.to_dict()})


def engines(ckpts: list[Path], work: int, **over) -> tuple[list[str], list[str]]:
    """(engine of each model, the lines said) for a job of `work` images of SIDE px."""
    lines: list[str] = []
    ens = load_ensemble([str(p) for p in ckpts], CPU, overrides=over, log=lambda s: None)
    ens = use_engine(ens, work, SIDE, "predict", lines.append)
    return ["onnx" if isinstance(m, OnnxRunner) else "torch" for m in ens.models], lines


def preds(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: tifffile.imread(p) for p in sorted(folder.glob("PRED_*.tif"))}


def test_onnx_engine_predicts_the_test_set_like_torch(synth_data_dir, tmp_path, capsys):
    """`make predict ENGINE=onnx` exports once, says so, and agrees with PyTorch on >= 99.9% of the pixels of
    the synthetic test set (3 M pixels, predictions of several classes)."""
    ckpt = checkpoint(tmp_path / "run" / "best.pt", synth_data_dir)
    common = ["--runs", str(ckpt), "--split", "test", f"data_dir={synth_data_dir}", "workers=0"]
    predict_main(["--out", str(tmp_path / "torch"), *common, "engine=torch"])
    predict_main(["--out", str(tmp_path / "onnx"), *common, "engine=onnx"])
    out = capsys.readouterr().out
    assert "engine torch (engine=torch)" in out and f"model 1: exported {onnx_path(ckpt)} (once" in out
    assert "engine onnx" in out.split("exported")[1]
    want, got = preds(tmp_path / "torch"), preds(tmp_path / "onnx")
    assert len(want) == 12 and want.keys() == got.keys()
    classes = np.unique(np.concatenate([v.ravel() for v in want.values()]))
    agree = np.mean([np.mean(got[k] == want[k]) for k in want])
    assert len(classes) >= 3 and agree >= 0.999, (classes, agree)
    stamp = Stamp.read(onnx_path(ckpt))
    assert stamp is not None and stamp.size == 512 and stamp.agreement >= 0.999


def test_auto_exports_when_it_pays_and_never_uses_a_stale_file(synth_data_dir, tmp_path):
    ckpt = checkpoint(tmp_path / "run" / "best.pt", synth_data_dir)
    used, lines = engines([ckpt], EXPORT_PAYS - 1)  # auto (the default): too few images to pay for an export
    assert used == ["torch"] and "too few for exporting one to pay" in lines[0]
    assert not onnx_path(ckpt).exists()
    used, lines = engines([ckpt], EXPORT_PAYS)
    assert used == ["onnx"] and "exported" in lines[0] and "(once" in lines[0]
    assert is_current(ckpt, onnx_path(ckpt), load_for_inference(ckpt)[1], SIDE)
    used, lines = engines([ckpt], 1)  # a current export is used however small the job
    assert used == ["onnx"] and "checked" in lines[0]

    checkpoint(ckpt, synth_data_dir, seed=1)  # retrained: same path, other weights
    used, lines = engines([ckpt], 1)
    assert used == ["torch"] and "no checked best.onnx" in lines[0]
    used, lines = engines([ckpt], 1, engine="onnx")
    assert used == ["onnx"] and "replacing a stale one" in lines[0]

    with open(onnx_path(ckpt), "ab") as f:  # the file changed after its check
        f.write(b"\0")
    assert engines([ckpt], 1)[0] == ["torch"]
    assert engines([ckpt], 1, engine="torch")[1] == ["predict: engine torch (engine=torch)"]


def test_a_model_onnx_cannot_take_stays_on_torch_and_says_why(synth_data_dir, tmp_path):
    aerial = checkpoint(tmp_path / "a" / "best.pt", synth_data_dir)
    meta = checkpoint(tmp_path / "m" / "best.pt", synth_data_dir, use_metadata=True)
    used, lines = engines([aerial, meta], 1, engine="onnx")
    assert used == ["onnx", "torch"]
    assert lines[1].startswith("predict: model 2: engine torch: metadata models")
    used, lines = engines([aerial], 1, engine="onnx", precision="bf16")
    assert used == ["torch"] and "precision=bf16 runs in PyTorch" in lines[0]
    assert not stamp_path(onnx_path(meta)).exists()


def test_a_mixed_ensemble_feeds_each_engine_its_inputs(synth_data_dir, synth_index, tmp_path):
    """An ONNX model (raw band values) and a PyTorch one (normalised) in one ensemble: the same probabilities
    as the all-PyTorch ensemble, within the export's tolerance."""
    from src.data.loader import prediction_loader

    ckpts = [checkpoint(tmp_path / f"r{s}" / "best.pt", synth_data_dir, seed=s) for s in (0, 1)]
    ens = load_ensemble([str(p) for p in ckpts], CPU, overrides={"workers": 0}, log=lambda s: None)
    rows = synth_index["test"].head(2)
    batch = next(iter(prediction_loader(rows, ens.settings, ens.cfg)[0]))["batches"]
    batch = [{**b, "image": b["image"][..., :SIDE, :SIDE]} for b in batch]  # windows of the export's side
    want = ens.predict(ens.feed(batch), "flip")
    onnx_first = use_engine(ens.with_models(ens.models[:1]).with_settings(ens.cfg.with_values(engine="onnx")),
                            1, SIDE, "predict", lambda s: None)
    mixed = ens.with_models([onnx_first.models[0], ens.models[1]])
    assert mixed.takes_raw == [True, False] and "engine onnx+torch" in mixed.describe("flip")
    got = mixed.predict(mixed.feed(batch), "flip")
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4


def test_engine_onnx_off_the_cpu_is_refused(synth_data_dir, tmp_path):
    ckpt = checkpoint(tmp_path / "run" / "best.pt", synth_data_dir)
    ens = load_ensemble([str(ckpt)], torch.device("meta"), overrides={"engine": "onnx"}, log=lambda s: None)
    with pytest.raises(PredictError, match="engine=onnx runs onnxruntime on the CPU"):
        use_engine(ens, 1, SIDE, "predict", lambda s: None)
    assert use_engine(ens.with_settings(ens.cfg.with_values(engine="auto")), 10**6, SIDE, "predict",
                      lambda s: None).models == ens.models  # auto off the CPU: torch, nothing exported
