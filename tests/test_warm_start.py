"""Warm start (init_from) and hf: weights: real checkpoints written by the kit's own code, tiny models,
a Hugging Face cache laid out by hand (HF_HUB_OFFLINE=1: the network is never touched)."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from src import train as T
from src.core.checkpoint import save_checkpoint
from src.core.config import load_settings
from src.core.errors import ConfigError
from src.models.flair_model import build_model
from src.models.weights import apply_init_from, group_counts, init_source, warm_start
from src.training.state import Progress, Schedule, build_nets, checkpoint_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"encoder": "tu-test_resnet", "encoder_weights": "none", "channels_last": False}
UTT = {"fusion": "utt", "use_s2": True, "utae_widths": [8, 8, 16, 16], "utae_decoder_widths": [8, 8, 8, 16],
       "ltae_heads": 2, "ltae_d_model": 16, "ltae_d_k": 4}


def tiny(seed: int = 0, **kw) -> tuple[torch.nn.Module, dict]:
    cfg = load_settings(None, {**TINY, **kw})
    torch.manual_seed(seed)
    return build_model(cfg), cfg


def kit_checkpoint(path: Path, model: torch.nn.Module, cfg: dict, fold: str = "0") -> Path:
    """A checkpoint exactly as src.train writes it (EMA, optimizer, NumPy RNG state, ...)."""
    nets = build_nets(cfg, model, torch.device("cpu"))
    return save_checkpoint(path, checkpoint_state(cfg, fold, nets, Progress(epoch=6), Schedule.of(cfg, 1)))


def same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


# ----------------------------------------------------------------------------- stage 1 -> stage 2
def test_unet_checkpoint_into_utt_loads_the_aerial_branch_exactly(tmp_path):
    unet, cfg = tiny(0)
    path = kit_checkpoint(tmp_path / "s1.pt", unet, cfg, fold="3")
    utt, _ = tiny(1, **UTT)
    fresh = copy.deepcopy(utt.state_dict())
    report = warm_start(utt, str(path))
    after, theirs = utt.state_dict(), unet.state_dict()
    aerial = [k for k in after if k.startswith("net.")]
    assert set(report.loaded) == set(aerial) == set(theirs)
    assert same(after, theirs, aerial)
    fusion = [k for k in after if not k.startswith("net.")]
    assert fusion and set(report.new) == set(fusion) and same(after, fresh, fusion)  # untouched
    assert not report.other_shape and not report.unknown and report.remap == "names as they are"
    text = str(report)
    assert "Unet/tu-test_resnet, fusion=none, 13 classes, fold 3, epoch 6" in text
    assert f"loaded {len(aerial)} of the model's {len(after)} tensors" in text
    assert set(group_counts(report.new)) == {"utae", "s2_fusion"} and "newly initialised" in text
    s2 = torch.rand(2, 3, 10, 8, 8)
    out = utt(torch.randn(2, 5, 64, 64), s2, torch.tensor([[0, 40, 90]] * 2))
    assert out["logits"].shape == (2, 13, 64, 64)


def test_stage_one_into_an_early_fusion_model_widens_the_first_convolution(tmp_path):
    """An aerial U-Net into a model with early S2 channels (s2_early=ndvi: 5 + 12 inputs): the stem keeps
    the file's 5 kernels and starts the 12 new ones at zero, so the warm-started model starts as stage 1."""
    unet, cfg = tiny(0)
    path = kit_checkpoint(tmp_path / "s1.pt", unet, cfg)
    early, _ = tiny(1, **UTT, s2_early="ndvi")
    report = warm_start(early, str(path))
    assert len(report.widened) == 1 and not report.other_shape and "widened" in str(report)
    name = report.widened[0]
    stem, theirs = early.state_dict()[name], unet.state_dict()[name]
    assert stem.shape[1] == theirs.shape[1] + 12
    assert torch.equal(stem[:, :5], theirs) and not stem[:, 5:].any()
    assert set(report.loaded) == set(unet.state_dict())


def test_other_class_count_head_is_skipped_and_reported(tmp_path):
    src, cfg = tiny(0, num_classes=15)
    path = kit_checkpoint(tmp_path / "c15.pt", src, cfg)
    model, _ = tiny(1)
    fresh = copy.deepcopy(model.state_dict())
    report = warm_start(model, str(path))
    heads = {k for k in fresh if k.startswith("net.segmentation_head.")}
    assert {k for k, _, _ in report.other_shape} == heads and heads <= set(report.new)
    name, file_shape, model_shape = report.other_shape[0]
    assert file_shape[0] == 15 and model_shape[0] == 13
    assert same(model.state_dict(), fresh, heads)                       # the head keeps its init
    assert same(model.state_dict(), src.state_dict(), report.loaded) and len(report.loaded) == len(fresh) - 2
    assert f"{name} 15x" in str(report) and "-> 13x" in str(report) and "other shape (2" in str(report)


# ----------------------------------------------------------------------------- file formats and names
def _lightning(sd: dict) -> dict:
    return {"state_dict": {f"model.seg_model.{k}": v for k, v in sd.items()}, "epoch": 3}


@pytest.mark.parametrize("kind, remap", [
    ("ddp_compile", "names as they are"),
    ("smp_model", "names prefixed 'net.'"),
    ("encoder_only", "names prefixed 'net.encoder.'"),
    ("lightning", "names dropped 'model.seg_model', prefixed 'net.'"),
    ("safetensors", "names as they are"),
])
def test_wrappers_and_prefixes_line_up(tmp_path, kind, remap):
    src, _ = tiny(0)
    sd = src.state_dict()
    net = {k.removeprefix("net."): v for k, v in sd.items()}
    path = tmp_path / f"{kind}.pth"
    if kind == "ddp_compile":
        torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, path)
    elif kind == "smp_model":
        torch.save(src.net.state_dict(), path)
    elif kind == "encoder_only":
        torch.save(src.net.encoder.state_dict(), path)
    elif kind == "lightning":
        torch.save(_lightning(net), path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model, _ = tiny(1)
    report = warm_start(model, str(path))
    assert report.remap == remap and not report.unknown and not report.other_shape
    expected = [k for k in sd if k.startswith("net.encoder.")] if kind == "encoder_only" else list(sd)
    assert sorted(report.loaded) == sorted(expected)
    assert same(model.state_dict(), sd, expected)


def test_nothing_matching_and_bad_files_are_one_line_errors(tmp_path):
    model, _ = tiny(0)
    before = copy.deepcopy(model.state_dict())
    torch.save({"backbone.stem.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"init_from: .*other.pt: no tensor matches the model"):
        warm_start(model, str(tmp_path / "other.pt"))
    mit, _ = tiny(0, arch="Segformer", encoder="mit_b0")   # another architecture
    torch.save(mit.state_dict(), tmp_path / "mit.pt")
    with pytest.raises(ConfigError, match=r"mit.pt: only 1 of its \d+ tensors fit the model"):
        warm_start(model, str(tmp_path / "mit.pt"))  # (the 13-class head's bias has the same name and shape)
    with pytest.raises(ConfigError, match=r"init_from: .*gone.pt: weights file not found"):
        warm_start(model, str(tmp_path / "gone.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk.pt: cannot read weights") as err:
        warm_start(model, str(tmp_path / "junk.pt"))
    assert "\n" not in str(err.value)
    assert same(model.state_dict(), before, before)  # nothing was changed by a failed warm start


def test_fold_placeholder_picks_the_same_fold(tmp_path):
    for fold in (0, 1):
        src, cfg = tiny(10 + fold)
        kit_checkpoint(tmp_path / "s1" / f"fold{fold}" / "best.pt", src, cfg, fold=str(fold))
    model, cfg = tiny(5, init_from=str(tmp_path / "s1" / "fold{fold}" / "best.pt"))
    lines: list[str] = []
    report = apply_init_from(model, cfg, "1", lines.append)
    assert report.source == str(tmp_path / "s1" / "fold1" / "best.pt") and "fold 1" in lines[0]
    ref, _ = tiny(11)
    assert same(model.state_dict(), ref.state_dict(), report.loaded)
    assert init_source("{runs_dir}/s1/fold{fold}/best.pt", "all", "R") == "R/s1/foldall/best.pt"
    assert apply_init_from(model, load_settings(None, TINY), "0", lines.append) is None  # init_from unset


# ----------------------------------------------------------------------------- Hugging Face hub (offline)
@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, offline (huggingface_hub reads its settings at import,
    so its constants are patched as well as the environment)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache: Path, repo: str, filename: str) -> Path:
    """The path where `filename` of `repo` lives in the hub cache layout (refs/main -> snapshot)."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    path = root / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_hf_files_come_from_the_cache_offline(hf_cache):
    from safetensors.torch import save_file

    src, cfg = tiny(0)
    sd = src.state_dict()
    tensors = {k: v.contiguous() for k, v in sd.items()}
    save_file(tensors, str(put(hf_cache, "kit/stage1", "model.safetensors")))
    kit_checkpoint(put(hf_cache, "kit/ckpt", "runs/fold2/best.pt"), src, cfg, fold="2")
    torch.save(src.net.state_dict(), put(hf_cache, "ign/unet", "unet_weights.pth"))  # not a default name
    for ref in ("hf:kit/stage1", "hf:kit/ckpt:runs/fold{fold}/best.pt", "hf:ign/unet"):
        model, _ = tiny(1)
        report = warm_start(model, ref, fold="2")
        assert report.source == ref.replace("{fold}", "2") and same(model.state_dict(), sd, report.loaded)
        assert len(report.loaded) == len(sd)
    # encoder_weights=hf: goes through the local-file loader; the trainer's call prints its report
    torch.manual_seed(3)
    model = build_model(load_settings(None, {**TINY, "encoder_weights": "hf:kit/stage1"}))
    assert same(model.state_dict(), sd, sd)
    lines: list[str] = []
    apply_init_from(model, load_settings(None, TINY), "0", lines.append)
    assert len(lines) == 1 and lines[0].startswith("encoder_weights hf:kit/stage1: loaded")
    assert "decoder/head tensors; skipped 0" in lines[0]


def test_hf_missing_offline_is_a_clear_error(hf_cache):
    model, cfg = tiny(0)
    with pytest.raises(ConfigError, match=r"init_from: hf:nobody/nothing: could not get model.safetensors or "
                                          r"pytorch_model.bin from nobody/nothing .*HF_HUB_OFFLINE=1") as err:
        warm_start(model, "hf:nobody/nothing")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"hf:kit/x:w.pt: could not get w.pt from kit/x"):
        build_model(cfg.with_values(encoder_weights="hf:kit/x:w.pt"))
    with pytest.raises(ValueError, match="expected hf:<owner>/<name>"):
        warm_start(model, "hf:no-owner")


# ----------------------------------------------------------------------------- presets and the trainer
@pytest.mark.parametrize("encoder", ["tu-test_resnet", pytest.param("mit_b2", marks=pytest.mark.slow)])
def test_first_place_presets_chain(tmp_path, encoder):
    """Stage 1 (aerial U-Net) -> stage 2 (U-T&T) through the presets' own init_from: with a tiny encoder, and
    with the recipe's MiT-B2 (slow: two 28 M-parameter models)."""
    over = {"encoder": encoder, "encoder_weights": "none", "runs_dir": str(tmp_path)}
    cfg1 = load_settings(CONFIGS / "first_place_stage1.yaml", over)
    torch.manual_seed(0)
    stage1 = build_model(cfg1)
    state = {"model": stage1.state_dict(), "config": cfg1}
    save_checkpoint(tmp_path / cfg1.name / "fold2" / "best.pt", state)
    cfg2 = load_settings(CONFIGS / "first_place_stage2.yaml", over)
    assert (cfg2.fusion, cfg2.loss, cfg2.epochs, cfg1.epochs) == ("utt", "focal", 6, 6)
    stage2 = build_model(cfg2).eval()
    report = apply_init_from(stage2, cfg2, "2", lambda line: None)
    assert set(report.loaded) == set(stage1.state_dict()) and not report.other_shape
    s2 = torch.rand(1, 3, 10, 40, 40)
    with torch.no_grad():
        out = stage2(torch.randn(1, 5, 64, 64), s2, torch.tensor([[0, 40, 90]]))
    assert out["logits"].shape == (1, 13, 64, 64) and out["s2_logits"].shape == (1, 13, 40, 40)


def test_training_run_warm_starts_from_stage_one(synth_folds_dir, tmp_path, capsys):
    """The trainer's call (src.train): stage 2 starts from stage 1's checkpoint of the same fold (fold all:
    no validation pass, to stay fast)."""
    runs = tmp_path / "runs"
    common = ["--fold", "all", "encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64",
              "batch_size=2", "workers=0", "epochs=1", "max_train_batches=1", "precision=fp32",
              "channels_last=false", "tensorboard=false", "oof=false", f"data_dir={synth_folds_dir}",
              f"runs_dir={runs}"]
    T.main([*common, "name=s1"])
    stage2 = [*common, "name=s2", *(f"{k}={v}".replace(" ", "") for k, v in UTT.items())]
    T.main([*stage2, f"init_from={runs}/s1/fold{{fold}}/best.pt"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("init_from "))
    assert f"{runs}/s1/foldall/best.pt" in line and "fusion=none" in line and "(names as they are)" in line
    assert "newly initialised" in out and "utae (" in out
    # a missing stage-1 file is a one-line setting error before the run folder exists
    with pytest.raises(SystemExit) as exit_info:
        T.main([*stage2, "name=s3", f"init_from={runs}/nope/fold{{fold}}/best.pt"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "nope/foldall/best.pt: weights file not found" in err
    assert "\n" not in err and not (runs / "s3").exists()
