"""The U-Net of Salimans & Ho (2022), after the official ``diffusion_distillation/unet.py``.

Conditioned on phi(lambda) = arctan(exp(-lambda/2)) / (pi/2) through a sinusoidal embedding
(scaled by 1000) -> Dense -> SiLU -> Dense. Res blocks apply GroupNorm with scale/shift from the
embedding; BigGAN-style res blocks do the up/down sampling; the last conv of every residual
branch, of every attention block and of the output is zero-initialised.

Optional conditioning, added to the time embedding emb:
- a class embedding (``num_classes`` > 0): emb += E[y]; with ``null_class`` the table has one more
  row, the label ``num_classes``, which stands for "no class" (classifier-free guidance);
- a guidance-weight embedding (``guidance_embedding``, Meng et al. 2023): [g(w), h(w)] =
  Dense(SiLU(Dense(sinusoidal features of w))), and emb += h(w) + g(w) * (E[y] - E[null]) where the
  net has a null class (a per-channel gate on the label's offset from "no class", as the guided
  prediction extrapolates from the unconditional one). The last Dense is zero-initialised, so a net
  that gains the embedding starts as the net it was copied from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pd_core.config import Config
from pd_core.parameterization import output_channels
from pd_core.schedule import network_time_input


@dataclass(frozen=True)
class UNetSpec:
    """Architecture hyper-parameters (the paper's CIFAR-10 net is the default)."""

    in_channels: int = 3  # image channels C
    out_channels: int = 3  # C, or 2C for the `both` parameterization
    image_size: int = 32  # H = W; must be divisible by 2^(levels - 1)
    ch: int = 256  # base channel count
    emb_ch: int = 1024  # time-embedding width
    ch_mult: tuple[int, ...] = (1, 1, 1)  # channel multiplier per resolution level
    num_res_blocks: int = 3  # res blocks per level on the way down (one more on the way up)
    attn_resolutions: tuple[int, ...] = (16, 8)  # resolutions that get self-attention
    num_heads: int = 1  # attention heads (ignored when head_dim is set)
    head_dim: int | None = None  # channels per head (ImageNet 64 uses 64)
    dropout: float = 0.2  # dropout inside res blocks (teacher); students use 0
    resblock_resample: bool = True  # BigGAN-style up/down res blocks (else strided/nearest convs)
    num_classes: int = 0  # >0 adds a class embedding (class-conditional model)
    null_class: bool = False  # one more class-embedding row, label num_classes = "no class" (guidance)
    guidance_embedding: bool = False  # the net also takes the guidance weight w (guided distillation)
    norm_groups: int = 32  # GroupNorm groups (reduced to a divisor of the channels for tiny nets)

    def __post_init__(self) -> None:
        levels = len(self.ch_mult)
        if levels < 1:
            raise ValueError("ch_mult must have at least one level")
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size must be divisible by 2^(levels-1) = {factor} for ch_mult={self.ch_mult}; "
                             f"got {self.image_size}")
        for name in ("in_channels", "out_channels", "ch", "emb_ch", "num_res_blocks", "num_heads", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.null_class and self.num_classes < 1:
            raise ValueError("null_class needs a class-conditional net (num_classes >= 1)")


def unet_spec(cfg: Config, *, in_channels: int, num_classes: int = 0, dropout: float | None = None) -> UNetSpec:
    """The UNetSpec of ``cfg`` for data with ``in_channels`` channels and ``num_classes`` classes.

    Output channels follow the parameterization (2C for ``both``); ``dropout`` defaults to the
    teacher's (model.dropout); a class embedding, with its null class, only when
    model.class_conditional. A teacher never has the guidance embedding (stage 1 adds it).
    """
    m = cfg.model
    return UNetSpec(
        in_channels=in_channels,
        out_channels=output_channels(kind=cfg.diffusion.parameterization, channels=in_channels),
        image_size=cfg.data.image_size,
        ch=m.ch,
        emb_ch=m.resolved_emb_ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        dropout=m.dropout if dropout is None else dropout,
        resblock_resample=m.resblock_resample,
        num_classes=num_classes if m.class_conditional else 0,
        null_class=m.class_conditional and num_classes > 0,
        norm_groups=m.norm_groups,
    )


def spec_to_dict(spec: UNetSpec) -> dict:
    """JSON-able UNetSpec (stored in every checkpoint manifest so a checkpoint describes its net)."""
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> UNetSpec:
    """Inverse of :func:`spec_to_dict`; lists become tuples."""
    return UNetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def timestep_embedding(phi: Tensor, dim: int, *, max_time: float = 1.0) -> Tensor:
    """Sinusoidal embedding of phi * 1000 / max_time: [sin(phi w_k), cos(phi w_k)], w_k = 10000^(-k/(d/2-1))."""
    phi = phi.float() * (1000.0 / max_time)
    half = dim // 2
    steps = torch.arange(half, device=phi.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * steps / max(half - 1, 1))
    args = phi[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


GUIDANCE_TIME_SCALE = 10.0  # w enters the sinusoidal features as w * 1000 / 10 = 100 w


def guidance_features(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the guidance weight: [sin(100 w f_k), cos(100 w f_k)], f_k = 10000^(-k/(d/2-1)).

    The time embedding's features at phi = w / 10: angular frequencies from 100 down to 0.01 per
    unit of w, so weights in the usual range [0, 8] are told apart at every scale.
    """
    return timestep_embedding(w, dim, max_time=GUIDANCE_TIME_SCALE)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> [resample] -> conv -> GroupNorm * (1 + scale) + shift -> SiLU -> dropout -> conv(0)."""

    def __init__(self, in_ch: int, out_ch: int, *, emb_ch: int, dropout: float, groups: int,
                 resample: str | None = None):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.resample = resample  # None, "up" or "down" (internal to the module, never user-facing)

    def _resample(self, h: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(h, 2)
        if self.resample == "up":
            return F.interpolate(h, scale_factor=2.0, mode="nearest")
        return h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions with a zero-initialised output projection."""

    def __init__(self, ch: int, *, num_heads: int, head_dim: int | None, groups: int):
        super().__init__()
        self.heads = ch // head_dim if head_dim else num_heads
        if ch % self.heads:
            raise ValueError(f"attention channels {ch} must be divisible by the number of heads {self.heads}")
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, nh, d, HW)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, nh, HW, d) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class UNet(nn.Module):
    """The paper's U-Net: ``net(z, logsnr, y=None) -> output`` with output channels ``spec.out_channels``."""

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        s = spec
        g = s.norm_groups
        block = dict(emb_ch=s.emb_ch, dropout=s.dropout, groups=g)
        attn = dict(num_heads=s.num_heads, head_dim=s.head_dim, groups=g)
        self.time_mlp = nn.Sequential(nn.Linear(s.ch, s.emb_ch), nn.SiLU(), nn.Linear(s.emb_ch, s.emb_ch))
        rows = s.num_classes + int(s.null_class)
        self.class_emb = nn.Embedding(rows, s.emb_ch) if s.num_classes > 0 else None
        self.guide_mlp = nn.Sequential(nn.Linear(s.ch, s.emb_ch), nn.SiLU(), _zero(nn.Linear(s.emb_ch, 2 * s.emb_ch))) \
            if s.guidance_embedding else None
        self.conv_in = nn.Conv2d(s.in_channels, s.ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs = [s.ch]
        ch, res = s.ch, s.image_size
        for level, mult in enumerate(s.ch_mult):
            for _ in range(s.num_res_blocks):
                out = s.ch * mult
                attend = AttnBlock(out, **attn) if res in s.attn_resolutions else nn.Identity()
                self.down.append(nn.ModuleList([ResBlock(ch, out, **block), attend]))
                ch = out
                skip_chs.append(ch)
            if level != len(s.ch_mult) - 1:
                self.down.append(self._resampler(ch, "down", block))
                skip_chs.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, **block), AttnBlock(ch, **attn), ResBlock(ch, ch, **block)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(s.ch_mult))):
            for _ in range(s.num_res_blocks + 1):
                out = s.ch * mult
                self.up.append(nn.ModuleList([ResBlock(ch + skip_chs.pop(), out, **block),
                                              AttnBlock(out, **attn) if res in s.attn_resolutions else nn.Identity()]))
                ch = out
            if level != 0:
                self.up.append(self._resampler(ch, "up", block))
                res *= 2

        self.norm_out = _norm(ch, g)
        self.conv_out = _zero(nn.Conv2d(ch, s.out_channels, 3, padding=1))

    def _resampler(self, ch: int, direction: str, block: dict) -> nn.Module:
        if self.spec.resblock_resample:
            return ResBlock(ch, ch, resample=direction, **block)
        if direction == "down":
            return nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))

    @staticmethod
    def _run_block(module: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        return module(h, emb) if isinstance(module, ResBlock) else module(h)

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """Output for z (B, C, H, H), logsnr (B,), labels y (B,) int64 and guidance weights w (B,) where the
        spec takes them (y in [0, num_classes], num_classes being the null class when the spec has one)."""
        s = self.spec
        square = z.ndim == 4 and z.shape[2] == z.shape[3]
        if not square or z.shape[1] != s.in_channels or z.shape[2] % 2 ** (len(s.ch_mult) - 1):
            raise ValueError(f"z must have shape (B, {s.in_channels}, H, H) with H divisible by "
                             f"{2 ** (len(s.ch_mult) - 1)}; got {tuple(z.shape)}")
        temb = timestep_embedding(network_time_input(logsnr), s.ch)  # (B, ch), float32
        emb = self.time_mlp(temb.to(self.time_mlp[0].weight.dtype)).to(z.dtype)  # (B, emb_ch), in the net's dtype
        if self.class_emb is not None:
            if y is None:
                raise ValueError("y (class labels, shape (B,)) is required by a class-conditional U-Net")
            emb = emb + self.class_emb(y)
        if self.guide_mlp is not None:
            if w is None:
                raise ValueError("w (guidance weights, shape (B,)) is required by a U-Net with a guidance embedding")
            wemb = guidance_features(w, s.ch)  # (B, ch), float32
            gate, shift = self.guide_mlp(wemb.to(self.guide_mlp[0].weight.dtype)).to(emb.dtype).chunk(2, dim=1)
            emb = emb + shift
            if self.class_emb is not None and s.null_class:
                emb = emb + gate * (self.class_emb(y) - self.class_emb.weight[s.num_classes])
        hs = [self.conv_in(z)]
        for module in self.down:
            if isinstance(module, nn.ModuleList):
                h = module[1](module[0](hs[-1], emb))
            else:
                h = self._run_block(module, hs[-1], emb)
            hs.append(h)
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for module in self.up:
            if isinstance(module, nn.ModuleList):
                h = module[1](module[0](torch.cat([h, hs.pop()], dim=1), emb))  # (B, ch + skip, H, W)
            else:
                h = self._run_block(module, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def paper_cifar10_spec(*, out_channels: int = 3, dropout: float = 0.2) -> UNetSpec:
    """CIFAR-10 U-Net of the paper: ch 256, emb 1024, mult (1,1,1), 3 res blocks, attention at 16 and 8."""
    return UNetSpec(in_channels=3, out_channels=out_channels, image_size=32, ch=256, emb_ch=1024, ch_mult=(1, 1, 1),
                    num_res_blocks=3, attn_resolutions=(16, 8), num_heads=1, dropout=dropout, resblock_resample=True)
