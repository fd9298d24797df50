"""Segmentation models: any smp architecture x any smp/timm encoder, optionally fused with Sentinel-2.

`build_model(cfg)` is the one entry point (trainer, predictor, checkpoints, benchmarks). Every model
has the same call: `model(image, s2=None, s2_days=None, s2_pad=None, meta=None) -> dict` with
"logits" (B, num_classes, H, W) for any H, W, and "s2_logits" (B, num_classes, S, S) when fused.

Input bands. The encoder is always created for 3 channels (so smp/timm load their ImageNet RGB
weights unchanged), then its first convolution -- the first `nn.Conv2d` with 3 input channels
found in the encoder, which is the stem for resnets, MiT (SegFormer) and timm encoders -- is
replaced by one with len(bands) inputs: the R, G, B kernels go where R, G, B sit in `bands`, and
every other band (NIR, E, ...) is initialised by `extra_init`:
  mean   -- the mean of the three RGB kernels (an "intensity" filter; default);
  copy   -- the kernel of band `extra_copy_band` (R, G or B);
  random -- normal noise with the standard deviation of the pretrained kernels.
The RGB kernels are kept as they are (no rescaling), so a pretrained model sees RGB exactly as in
ImageNet training. Without pretrained weights the new convolution keeps PyTorch's default init.

Pretrained weights (`encoder_weights`): "imagenet" (or any other smp weight name) downloads through
smp/timm; "none"; or a weights file (src.models.weights: a local .pt/.pth/.bin/.safetensors, or
`hf:<owner>/<name>[:<file>]` from the Hugging Face hub, cached) holding
either the encoder's state dict, a whole smp model's state dict (keys "encoder.*": the encoder is
loaded, decoder/head tensors of matching shape too), or a dict with such a state dict under
"model" / "state_dict" (a flair2-kit checkpoint works). The model is created with no weights and
the file is read without network (an hf: file once it is cached); the trainer prints what was
loaded and skipped. The file's first conv may have 3 inputs (RGB; `extra_init`
then applies) or exactly len(bands) inputs (loaded as is; with 3 bands only for a flair2-kit file,
recognised by its "net." keys, since any other 3-input file is taken as ImageNet-style RGB).

Fusion "utt" (U-T&T): a U-TAE (src/models/utae.py) encodes the S2 series; its last map (at S2 crop
resolution) is projected (1x1 conv) to the width of every aerial encoder stage (read from
`encoder.out_channels`), cut to the aerial footprint (`sample_footprint`: the central H/50 x W/50 S2
pixels, 10.24 for a 512 px image, docs/data-format.md, "Geometry") and resampled to the stage's size; the
map is also pooled through an MLP and projected per stage. Both terms are added to that stage, per sample (the
official baseline used sample 0's pooled vector for the whole batch). The U-TAE's own head gives "s2_logits".
`modality_dropout` zeroes the S2 term of random samples at train time; samples whose dates are all padded get
no S2 term either. `use_metadata` adds an MLP encoding of the "meta" vector (size `meta_dim`) to the deepest
stage.

Early fusion (`s2_early`: none | ndvi | bands, src/models/s2_features.py): monthly S2 features (the NDVI of
each calendar month, or the 10 bands' monthly means) are sampled onto the aerial grid and appended to
the image as extra input channels; the encoder's stem gets that many more inputs (zero kernels under
pretrained weights, so the pretrained network is unchanged at the start). Works with or without "utt";
off when use_s2 is false.

Input size: sides that are not multiples of what the encoder accepts (its output stride; 512 for the
MaxViT-512 attention windows) are reflect-padded bottom/right and the logits cropped back.

`load_for_inference(checkpoint)` rebuilds a trained model from a checkpoint alone (its saved config):
training's re-scoring and prediction both go through it, so they cannot disagree."""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from src.core.checkpoint import load_checkpoint
from src.core.config import from_saved
from src.core.errors import CheckpointError
from src.core.flair import BAND_NAMES, band_indices
from src.core.settings import Settings, check_job
from src.models.s2_features import (
    add_input_channels,
    early_channels,
    early_features,
    sample_footprint,
)
from src.models.utae import S2_CHANNELS, UTAE
from src.models.weights import is_weights_ref, load_state_file

log = logging.getLogger(__name__)

RGB = {"R": 0, "G": 1, "B": 2}  # channel order of ImageNet-pretrained first convolutions
HIDDEN = 64          # width of the pooled-S2 and metadata MLPs


# ------------------------------------------------------------------------------ first convolution
def find_first_conv(encoder: nn.Module) -> tuple[str, nn.Conv2d]:
    """(name, module) of the first nn.Conv2d with 3 input channels: the stem of the encoder."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return name, module
    raise ValueError(f"no 3-channel input convolution found in encoder {type(encoder).__name__}")


def adapt_first_conv(encoder: nn.Module, bands: list[str], mode: str = "mean", copy_band: str = "R",
                     pretrained: bool = True) -> None:
    """Give the encoder's first conv len(bands) inputs, in place (see the module docstring)."""
    _, conv = find_first_conv(encoder)
    w = conv.weight.detach()
    out_ch, _, kh, kw = w.shape
    new = torch.empty(out_ch, len(bands), kh, kw, dtype=w.dtype)
    if not pretrained:
        nn.init.kaiming_uniform_(new, a=math.sqrt(5))  # PyTorch's own Conv2d default init
    else:
        for i, band in enumerate(bands):
            if band in RGB:
                new[:, i] = w[:, RGB[band]]
            elif mode == "mean":
                new[:, i] = w.mean(dim=1)
            elif mode == "copy":
                new[:, i] = w[:, RGB[copy_band]]
            else:
                new[:, i] = torch.randn(out_ch, kh, kw, dtype=w.dtype) * w.std()
    conv.weight = nn.Parameter(new)
    conv.in_channels = len(bands)
    # keep smp's bookkeeping consistent (out_channels[0] is the input itself)
    if hasattr(encoder, "_in_channels"):
        encoder._in_channels = len(bands)
    if isinstance(getattr(encoder, "_out_channels", None), (list, tuple)):
        encoder._out_channels = [len(bands), *list(encoder._out_channels)[1:]]


def _load_weights_file(net: nn.Module, path: str, bands: list[str], mode: str, copy_band: str) -> str:
    """Load a weights file (local or hf:) into `net` (3-channel encoder) and adapt the first conv to
    `bands`; returns a one-line report of what was loaded and skipped."""
    raw = load_state_file(path, strip=("module.", "_orig_mod."))
    kit = any(k.startswith("net.") for k in raw)  # a flair2-kit model (only its smp part is used)
    sd = {k.removeprefix("net."): v for k, v in raw.items()}
    whole = any(k.startswith("encoder.") for k in sd)
    enc_sd = sd
    if whole:
        enc_sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    encoder = net.encoder
    own = encoder.state_dict()
    if not any(k in own for k in enc_sd) and all(k.startswith("model.") for k in own):
        enc_sd = {f"model.{k}": v for k, v in enc_sd.items()}  # a raw timm state dict for a tu- encoder
    conv_name, _ = find_first_conv(encoder)
    conv_key = f"{conv_name}.weight"
    if conv_key not in enc_sd:
        raise ValueError(f"{path}: no weights for the encoder's first convolution {conv_key!r} "
                         f"(is this a state dict for encoder {type(encoder).__name__}?)")
    file_in = enc_sd[conv_key].shape[1]
    rgb_order = list(bands) == ["R", "G", "B"]
    if file_in != 3 and file_in != len(bands):
        raise ValueError(f"{path}: first convolution has {file_in} input channels; expected 3 (RGB) or "
                         f"{len(bands)} (bands {bands})")
    # A 3-input file is RGB (ImageNet order) unless it is a flair2-kit model trained on these 3 bands.
    as_is = file_in == len(bands) and (file_in != 3 or kit)
    if as_is and not rgb_order:
        adapt_first_conv(encoder, bands, pretrained=False)  # same band layout as the file: load as is
    try:
        # nn.Module's own loader: smp encoders override it with incompatible signatures
        missing, unexpected = nn.Module.load_state_dict(encoder, enc_sd, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{path}: weights do not fit encoder {type(encoder).__name__} ({first})") from None
    if missing:
        raise ValueError(f"{path}: no weights for {len(missing)} encoder tensors, e.g. {missing[:3]} "
                         "(a state dict for another encoder?)")
    if not as_is and not rgb_order:
        adapt_first_conv(encoder, bands, mode, copy_band, pretrained=True)
    rest: dict[str, torch.Tensor] = {}
    skipped = list(unexpected)
    if whole:
        target = net.state_dict()
        rest = {k: v for k, v in sd.items() if not k.startswith("encoder.")
                and k in target and target[k].shape == v.shape}
        nn.Module.load_state_dict(net, rest, strict=False)
        skipped += [k for k in sd if not k.startswith("encoder.") and k not in rest]
    conv = "as is" if as_is or rgb_order else f"RGB, extra bands by extra_init={mode}"
    return (f"encoder_weights {path}: loaded {len(enc_sd) - len(unexpected)} encoder tensors (first "
            f"convolution {conv}) and {len(rest)} decoder/head tensors; skipped {len(skipped)} (not in the "
            f"model or another shape{', e.g. ' + ', '.join(skipped[:3]) if skipped else ''})")


def build_aerial(cfg: Settings) -> nn.Module:
    """The plain smp model for cfg's arch/encoder/bands/weights (input len(bands) channels)."""
    bands = [BAND_NAMES[i] for i in band_indices(cfg.bands)]  # canonical upper case
    mode, copy_band = cfg.extra_init, cfg.extra_copy_band
    weights = cfg.pretrained
    local = weights is not None and is_weights_ref(weights)
    try:
        net = smp.create_model(cfg.arch, encoder_name=cfg.encoder,
                               encoder_weights=None if local else weights, in_channels=3,
                               classes=cfg.num_classes)
    except KeyError as err:
        raise ValueError(f"arch {cfg.arch!r} / encoder {cfg.encoder!r}: {err.args[0]}") from None
    except (OSError, RuntimeError, ConnectionError) as err:
        if weights is None or local:
            raise
        why = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"could not get {weights!r} weights for encoder {cfg.encoder!r} "
                         f"({type(err).__name__}: {why}); without network use encoder_weights=none "
                         "or a local file") from None
    if local:  # the report is printed by the trainer (src.models.weights)
        net.weights_report = _load_weights_file(net, weights, bands, mode, copy_band)
    elif bands != ["R", "G", "B"]:
        adapt_first_conv(net.encoder, bands, mode, copy_band, pretrained=weights is not None)
    return net


def size_multiple(net: nn.Module) -> int:
    """Input sides must be multiples of this: the output stride, times the attention window of
    window-partitioned timm encoders (MaxViT `partition_size`), which only fit multiples of it."""
    stride = int(getattr(net.encoder, "output_stride", 32))
    window = 1
    for module in net.encoder.modules():
        size = getattr(module, "partition_size", None)
        if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
            window = max(window, *size)
    return 32 * window if window > 1 else stride


class S2Fusion(nn.Module):
    """U-TAE map -> one additive term per aerial encoder stage (U-T&T), computed per sample."""

    def __init__(self, feat_channels: int, stage_channels: dict[int, int]):
        super().__init__()
        self.pool_mlp = nn.Sequential(nn.Linear(feat_channels, HIDDEN), nn.ReLU(inplace=True),
                                      nn.Linear(HIDDEN, HIDDEN), nn.ReLU(inplace=True))
        stages = stage_channels.items()
        self.crop_proj = nn.ModuleDict({str(i): nn.Conv2d(feat_channels, c, 1) for i, c in stages})
        self.pool_proj = nn.ModuleDict({str(i): nn.Linear(HIDDEN, c) for i, c in stages})

    def forward(self, feats: list[torch.Tensor], s2_map: torch.Tensor, keep: torch.Tensor,
                content: tuple[int, int], padded: tuple[int, int]) -> list[torch.Tensor]:
        pooled = self.pool_mlp(s2_map.mean(dim=(2, 3)))              # (B, HIDDEN): one vector per sample
        keep = keep.to(s2_map.dtype).view(-1, 1, 1, 1)
        feats = list(feats)
        for key, proj in self.crop_proj.items():
            i = int(key)
            f = feats[i]
            hw = tuple(f.shape[-2:])
            # the unpadded image covers the top-left `inside` part of a stage of a padded input
            inside = tuple(max(1, round(hw[k] * content[k] / padded[k])) for k in (0, 1))
            term = sample_footprint(proj(s2_map), content, inside)
            if inside != hw:
                term = F.pad(term, (0, hw[1] - inside[1], 0, hw[0] - inside[0]))
            term = term + self.pool_proj[key](pooled)[:, :, None, None]
            feats[i] = f + keep * term.to(f.dtype)
        return feats


class FlairModel(nn.Module):
    """smp model + optional U-TAE fusion and metadata; forward returns {"logits", ["s2_logits"]}."""

    def __init__(self, cfg: Settings):
        super().__init__()
        fusion = cfg.fusion
        self.net = build_aerial(cfg)
        self.in_channels = len(cfg.bands)
        self.fusion = fusion
        self.use_metadata = cfg.use_metadata
        self.modality_dropout = cfg.modality_dropout
        self.multiple = size_multiple(self.net)
        self.s2_early = cfg.early_s2  # early fusion (src.models.s2_features); "none" when use_s2 is false
        self.early_channels = early_channels(self.s2_early)
        add_input_channels(self.net.encoder, self.in_channels, self.early_channels,
                           pretrained=cfg.pretrained is not None)
        custom_forward = type(self.net).forward is not smp.base.SegmentationModel.forward
        if (fusion != "none" or self.use_metadata) and custom_forward:
            raise ValueError(f"arch {cfg.arch}: fusion/metadata need a plain encoder->decoder->head model")
        channels = list(self.net.encoder.out_channels)
        stages = {i: c for i, c in enumerate(channels) if i > 0 and c > 0}  # [0] is the input itself
        if fusion == "utt":
            self.utae = UTAE(S2_CHANNELS, cfg.utae_widths, cfg.utae_decoder_widths, cfg.ltae_heads,
                             cfg.ltae_d_model, cfg.ltae_d_k, cfg.num_classes)
            self.s2_fusion = S2Fusion(self.utae.out_channels, stages)
        if self.use_metadata:
            self.meta_dim = cfg.meta_dim
            self.meta_mlp = nn.Sequential(nn.Linear(self.meta_dim, HIDDEN), nn.ReLU(inplace=True),
                                          nn.Linear(HIDDEN, channels[-1]))

    def _check(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"image: expected (B,{self.in_channels},H,W) for {self.in_channels} bands, "
                             f"got {tuple(image.shape)}")

    def _s2_keep(self, image: torch.Tensor, s2: torch.Tensor, s2_days: torch.Tensor | None,
                 s2_pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pad, keep): the series' padding mask and which samples get an S2 term (some real date, and
        not dropped by modality_dropout at train time; one draw serves early and U-T&T fusion)."""
        if s2_days is None:
            raise ValueError("fusion model: s2 given without s2_days")
        if s2.shape[0] != image.shape[0]:
            raise ValueError(f"s2 batch {s2.shape[0]} != image batch {image.shape[0]}")
        pad = (torch.zeros(s2.shape[:2], dtype=torch.bool, device=s2.device) if s2_pad is None
               else s2_pad.to(torch.bool))
        keep = ~pad.all(dim=1)                                          # no real date -> no S2 term
        if self.training and self.modality_dropout > 0:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= self.modality_dropout)
        return pad, keep

    def _early(self, image: torch.Tensor, s2: torch.Tensor | None, s2_days: torch.Tensor | None,
               pad: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
        """The image with the monthly S2 channels appended (zeros without S2 or for dropped samples)."""
        b, _, h, w = image.shape
        if s2 is None:
            extra = image.new_zeros(b, self.early_channels, h, w)
        else:
            extra = early_features(s2, s2_days, pad, self.s2_early, (h, w))
            extra = extra * keep.to(extra.dtype).view(-1, 1, 1, 1)
        return torch.cat([image, extra.to(image.dtype)], dim=1)

    def forward(self, image: torch.Tensor, s2: torch.Tensor | None = None,
                s2_days: torch.Tensor | None = None, s2_pad: torch.Tensor | None = None,
                meta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(image)
        h, w = image.shape[-2:]
        pad = keep = None
        if s2 is not None and (self.fusion == "utt" or self.early_channels):
            pad, keep = self._s2_keep(image, s2, s2_days, s2_pad)
        x = self._early(image, s2, s2_days, pad, keep) if self.early_channels else image
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:  # pad bottom/right to a size the encoder accepts; the output is cropped back
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "constant")
        out: dict[str, torch.Tensor] = {}
        if self.fusion == "none" and not self.use_metadata:
            logits = self.net(x)
        else:
            feats = list(self.net.encoder(x))
            if self.fusion == "utt" and s2 is not None:
                s2_map, out["s2_logits"] = self.utae(s2, s2_days, pad)
                feats = self.s2_fusion(feats, s2_map, keep, (h, w), tuple(x.shape[-2:]))
            if self.use_metadata:
                if meta is None:
                    raise ValueError("model built with use_metadata=true needs the meta vector")
                if meta.ndim != 2 or meta.shape[1] != self.meta_dim:
                    raise ValueError(f"meta: expected (B,{self.meta_dim}) (meta_dim), "
                                     f"got {tuple(meta.shape)}")
                feats[-1] = feats[-1] + self.meta_mlp(meta.to(feats[-1].dtype))[:, :, None, None]
            logits = self.net.segmentation_head(self.net.decoder(feats))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out["logits"] = logits[:, :, :h, :w]
        return out


def build_model(cfg: Settings) -> nn.Module:
    """The model of a run's settings: the only entry point trainer and predictors use."""
    return FlairModel(cfg)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       overrides: dict[str, Any] | None = None, job: str = "") -> tuple[nn.Module, Settings]:
    """(model in eval mode on `device`, its settings) from a checkpoint: the settings saved at training time
    (src.core.config.from_saved) with `overrides` on top, checked against what `job` needs before the model
    is built (src.core.settings.check_job).

    The model is built without pretrained weights (they are overwritten anyway and would need the
    network). CheckpointError names the file when it is unreadable or its weights do not fit the model its
    settings build."""
    state = load_checkpoint(path, map_location="cpu")
    cfg = from_saved(state["config"], str(path), overrides)
    check_job(cfg, job, str(path))
    model = build_model(cfg.with_values(encoder_weights="none"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the model its settings build "
                              f"({first})") from None
    return model.to(device).eval(), cfg


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
