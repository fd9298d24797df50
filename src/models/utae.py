"""U-TAE: the Sentinel-2 time-series encoder of Sainte Fare Garnot & Landrieu (ICCV 2021).

Written from the paper ("Panoptic Segmentation of Satellite Image Time Series with Convolutional
Temporal Attention Networks"):
1. a convolutional encoder shared by all dates (time folded into the batch) gives a feature pyramid
   per date;
2. at the lowest resolution an L-TAE (lightweight temporal attention encoder) collapses time per
   pixel: channels are split into heads, each head has one learned *master query*, keys come from a
   linear layer of width d_k, the values are the input channels of the head, and a sinusoidal
   encoding of the acquisition day (period T = 1000) is added before attention;
3. the per-head attention masks are upsampled to every skip resolution and collapse time there too
   (attention-guided aggregation: the channels of group g are averaged over dates with head g's mask);
4. a convolutional decoder upsamples back to the input resolution.

Padded dates (`pad` True, what `collate` appends to equalise series lengths) never enter a
computation: the per-date encoder only runs on real dates, the attention puts -inf on padded dates,
and every normalisation is per sample and per date (group norm), so padding cannot leak through
statistics. Deviation from the reference code: the L-TAE input group norm is taken per date rather
than over channels x time, for exactly that reason."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

S2_CHANNELS = 10  # Sentinel-2 bands in the FLAIR #2 super-area arrays
ENCODER_GROUPS = 4  # group norm groups in the per-date encoder (as in the paper)


def _gn(channels: int, groups: int = ENCODER_GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvGN(nn.Sequential):
    """conv -> group norm -> ReLU (per-date encoder: statistics of one date of one sample only)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding), _gn(c_out), nn.ReLU(inplace=True))


class ConvBN(nn.Sequential):
    """conv -> batch norm -> ReLU (decoder: runs after time is collapsed, one map per sample)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class DownBlock(nn.Module):
    """Halve the resolution with a 4x4 stride-2 conv, then two 3x3 convs with a residual link."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.down = ConvGN(c_in, c_in, kernel=4, stride=2, padding=1)
        self.conv1 = ConvGN(c_in, c_out)
        self.conv2 = ConvGN(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.down(x))
        return x + self.conv2(x)


class UpBlock(nn.Module):
    """Double the resolution (transposed conv), concatenate the aggregated skip, two 3x3 convs."""

    def __init__(self, c_in: int, c_out: int, c_skip: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out),
                                nn.ReLU(inplace=True))
        self.skip = ConvBN(c_skip, c_skip, kernel=1)
        self.conv1 = ConvBN(c_out + c_skip, c_out)
        self.conv2 = ConvBN(c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.conv1(torch.cat([x, self.skip(skip)], dim=1))
        return x + self.conv2(x)


def day_encoding(days: torch.Tensor, dim: int, period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal encoding of day numbers: (...,) -> (..., dim); even dims sin, odd dims cos.

    Encoding the actual day (not the index in the series) lets the attention use the calendar,
    so irregular or filtered series stay comparable.
    """
    i = torch.arange(dim, device=days.device, dtype=torch.float32)
    freq = period ** (-2.0 * torch.div(i, 2, rounding_mode="floor") / dim)
    angle = days.to(torch.float32).unsqueeze(-1) * freq
    return torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))


class LTAE(nn.Module):
    """Lightweight Temporal Attention Encoder applied to every pixel of a (B,T,C,h,w) map.

    Returns the time-collapsed map (B, out_channels, h, w) and the attention (B, heads, T, h, w),
    exactly 0 on padded dates and summing to 1 over the real dates of each pixel (all zero for a
    sample with no real date).
    """

    def __init__(self, in_channels: int, d_model: int = 256, heads: int = 16, d_k: int = 4,
                 out_channels: int = 128, period: float = 1000.0, dropout: float = 0.2):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("d_model", d_model),
                            ("out_channels", out_channels)):
            if value % heads:
                raise ValueError(f"L-TAE: {name}={value} must be divisible by heads={heads}")
        self.heads, self.d_k, self.d_model, self.period = heads, d_k, d_model, period
        self.in_norm = nn.GroupNorm(heads, in_channels)
        self.in_proj = nn.Linear(in_channels, d_model)
        self.query = nn.Parameter(torch.randn(heads, d_k) * math.sqrt(2.0 / d_k))  # master queries
        self.key = nn.Linear(d_model, heads * d_k)
        self.mlp = nn.Sequential(nn.Linear(d_model, out_channels), nn.BatchNorm1d(out_channels),
                                 nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.GroupNorm(heads, out_channels)

    def forward(self, x: torch.Tensor, days: torch.Tensor,
                pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c, h, w = x.shape
        n = b * h * w
        seq = x.permute(0, 3, 4, 1, 2).reshape(n * t, c)            # one row per (pixel, date)
        seq = self.in_proj(self.in_norm(seq)).view(b, h * w, t, self.d_model)
        pe = day_encoding(days, self.d_model // self.heads, self.period).repeat(1, 1, self.heads)
        seq = (seq + pe.unsqueeze(1).to(seq.dtype)).view(n, t, self.d_model)

        keys = self.key(seq).view(n, t, self.heads, self.d_k)
        scores = torch.einsum("gd,ntgd->ngt", self.query.to(keys.dtype), keys) / math.sqrt(self.d_k)
        pad_n = pad.repeat_interleave(h * w, dim=0)                  # (n, t), row order b*hw + pixel
        empty = pad_n.all(dim=1, keepdim=True)                       # no real date: avoid 0/0, zero later
        scores = scores.masked_fill((pad_n & ~empty).unsqueeze(1), float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(seq.dtype) * (~pad_n).unsqueeze(1).to(seq.dtype)

        values = seq.view(n, t, self.heads, self.d_model // self.heads)
        out = torch.einsum("ngt,ntgd->ngd", attn, values).reshape(n, self.d_model)
        out = self.out_norm(self.dropout(self.mlp(out)))
        out = out.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        attn = attn.view(b, h, w, self.heads, t).permute(0, 3, 4, 1, 2).contiguous()
        return out, attn


def aggregate(x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Attention-guided temporal aggregation of a skip map.

    x (B,T,C,H,W), attn (B,G,T,h,w) at a lower resolution -> (B,C,H,W): the masks are upsampled to
    (H,W) and channel group g is averaged over time with head g's mask.
    """
    b, t, c, hh, ww = x.shape
    g = attn.shape[1]
    if c % g:
        raise ValueError(f"U-TAE: skip width {c} must be divisible by the number of heads {g}")
    if attn.shape[-2:] != (hh, ww):
        attn = F.interpolate(attn.flatten(1, 2), size=(hh, ww), mode="bilinear", align_corners=False)
        attn = attn.view(b, g, t, hh, ww)
    x = x.view(b, t, g, c // g, hh, ww)
    return torch.einsum("bgthw,btgchw->bgchw", attn, x).reshape(b, c, hh, ww)


class UTAE(nn.Module):
    """U-TAE: (B,T,C,S,S) series + day numbers + padding mask -> (B, dec_widths[0], S, S) features
    and (B, num_classes, S, S) logits of an auxiliary per-pixel head.

    S must be a multiple of 2**(len(widths)-1) (8 with the paper's four levels).
    """

    def __init__(self, in_channels: int = S2_CHANNELS, widths: list[int] = (64, 64, 128, 128),
                 decoder_widths: list[int] = (32, 32, 64, 128), heads: int = 16, d_model: int = 256,
                 d_k: int = 4, num_classes: int = 13, period: float = 1000.0):
        super().__init__()
        widths, decoder_widths = list(widths), list(decoder_widths)
        if len(widths) != len(decoder_widths) or len(widths) < 2:
            raise ValueError(f"U-TAE: utae_widths {widths} and utae_decoder_widths {decoder_widths} "
                             "must have the same length (>= 2)")
        self.in_channels = in_channels
        self.factor = 2 ** (len(widths) - 1)
        self.in_conv = nn.Sequential(ConvGN(in_channels, widths[0]), ConvGN(widths[0], widths[0]))
        self.down = nn.ModuleList(DownBlock(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.ltae = LTAE(widths[-1], d_model=d_model, heads=heads, d_k=d_k, out_channels=decoder_widths[-1],
                         period=period)
        for w in widths[:-1]:
            if w % heads:
                raise ValueError(f"U-TAE: encoder width {w} must be divisible by ltae_heads={heads}")
        self.up = nn.ModuleList(UpBlock(decoder_widths[i], decoder_widths[i - 1], widths[i - 1])
                                for i in range(len(widths) - 1, 0, -1))
        self.out_channels = decoder_widths[0]
        self.head = nn.Sequential(ConvBN(decoder_widths[0], decoder_widths[0]),
                                  nn.Conv2d(decoder_widths[0], num_classes, 1))

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.in_conv(x)]
        for block in self.down:
            maps.append(block(maps[-1]))
        return maps

    def forward(self, x: torch.Tensor, days: torch.Tensor,
                pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"U-TAE: expected s2 of shape (B,T,{self.in_channels},S,S), "
                             f"got {tuple(x.shape)}")
        b, t, c, hh, ww = x.shape
        if hh % self.factor or ww % self.factor:
            raise ValueError(f"U-TAE: S2 crop {hh}x{ww} must be a multiple of {self.factor}")
        if days.shape != (b, t):
            raise ValueError(f"U-TAE: s2_days shape {tuple(days.shape)} does not match s2 (B,T)=({b},{t})")
        pad = torch.zeros(b, t, dtype=torch.bool, device=x.device) if pad is None else pad.to(torch.bool)
        if pad.shape != (b, t):
            raise ValueError(f"U-TAE: s2_pad shape {tuple(pad.shape)} does not match s2 (B,T)=({b},{t})")

        # Per-date encoder on real dates only; padded dates stay exact zeros and are never looked at.
        flat = x.reshape(b * t, c, hh, ww)
        if torch.compiler.is_exporting():
            # ONNX/torch.export cannot trace a data-dependent `nonzero`: encode every date and zero the
            # padded ones (same result, each date is encoded on its own; costs the padded dates' work)
            keep = (~pad).view(b, t, 1, 1, 1)
            maps = [torch.where(keep, f.view(b, t, *f.shape[1:]), 0.0) for f in self._encode(flat)]
        else:
            idx = (~pad).reshape(-1).nonzero().squeeze(1)
            maps = self._encode(flat[idx] if idx.numel() else flat[:1])
            maps = [f.new_zeros((b * t,) + f.shape[1:]).index_copy(0, idx, f[: idx.numel()])
                    .view(b, t, *f.shape[1:]) for f in maps]

        out, attn = self.ltae(maps[-1], days, pad)
        for block, skip in zip(self.up, reversed(maps[:-1])):
            out = block(out, aggregate(skip, attn))
        return out, self.head(out)
