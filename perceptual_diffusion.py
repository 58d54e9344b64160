"""
Diffusion Model with Perceptual Loss (Lin & Yang, arXiv 2401.00110): a reference implementation in one file.

The paper's claim: samples drawn *without* classifier-free guidance look unrealistic because of the MSE
objective, not because of sampling temperature. Training with a *self-perceptual* objective -- the distance
between mid-block features of a frozen copy of an MSE-trained diffusion model, evaluated on a re-noised real
image and a re-noised predicted image -- gives realistic samples without guidance.

The file reads top to bottom beside the papers:
  1. noise schedule with zero terminal SNR    (Common Diffusion, Lin et al. 2023, Alg. 1)
  2. v-prediction parameterization            (Common Diffusion, sec. 3.2)
  3. the model: a small class-conditional UNet
  4. the objectives: v-MSE and self-perceptual (Perceptual Loss paper, Alg. 1)
  5. DDIM sampling, trailing timesteps, classifier-free guidance with rescale (Common Diffusion, sec. 3.3-3.4)
  6. data, checkpoints and training (one plain function; DDP when launched by torchrun)
  7. evaluation: Frechet distance, conditional accuracy, Inception Score
  8. the paper's comparison in one command
  9. command line

Run (the built-in `shapes` data needs no network):
  python perceptual_diffusion.py                                   # = reproduce --preset cpu (<= 20 min, 2 CPU cores)
  python perceptual_diffusion.py train --loss mse --out runs/mse   # stage 1
  python perceptual_diffusion.py train --loss self-perceptual --init runs/mse/ckpt.pt --out runs/sp   # stage 2
  python perceptual_diffusion.py sample --ckpt runs/sp/ckpt.pt --n 64 --out grid.png
  python perceptual_diffusion.py evaluate --ckpt runs/sp/ckpt.pt --n 1000
  python perceptual_diffusion.py bench
On several GPUs (data parallel; --batch-size is the global batch):
  torchrun --standalone --nproc_per_node=8 perceptual_diffusion.py train --data cifar10 --loss mse ...
"""
import argparse
import copy
import functools
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UsageError(Exception):
    """A problem with what the user typed or pointed at: printed as one line, exit code 2."""


# =================================================================================================
#                    1. Noise schedule with zero terminal SNR (Common Diffusion, Alg. 1)
# =================================================================================================

def make_betas(T, kind):
    """The three standard beta schedules, in float64: DDPM `linear`, Stable Diffusion `scaled_linear`
    (linear in sqrt(beta)), and the `cosine` schedule of Nichol & Dhariwal (betas capped at 0.999)."""
    if kind == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}: use linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(betas):
    """Common Diffusion, Algorithm 1: shift sqrt(alpha_bar) so that its last value is 0 (SNR(T-1) = 0, the
    model is trained on pure noise at the last step), scale it so that its first value is unchanged, and
    recover betas from ratios of consecutive alpha_bar. The last beta becomes exactly 1."""
    alpha_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = alpha_bar_sqrt[0].clone(), alpha_bar_sqrt[-1].clone()
    alpha_bar_sqrt = (alpha_bar_sqrt - aT) * a0 / (a0 - aT)
    alpha_bar = alpha_bar_sqrt ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class Schedule:
    """The forward process x_t = alpha_t x0 + sigma_t eps, with alpha_t = sqrt(alpha_bar_t) and
    sigma_t = sqrt(1 - alpha_bar_t), for t in 0..T-1, and the v-prediction conversions."""

    def __init__(self, T=1000, betas="linear", zero_terminal_snr=True):
        self.T = T
        b = make_betas(T, betas)
        if zero_terminal_snr:
            b = rescale_zero_terminal_snr(b)
        self.betas = b.float()
        alpha_bar = torch.cumprod(1 - b, 0)
        self.alpha_bar = alpha_bar.float()                        # (T,)  alpha_bar[T-1] == 0 with ZTSNR
        self.alpha = alpha_bar.sqrt().float()                     # (T,)
        self.sigma = (1 - alpha_bar).sqrt().float()               # (T,)

    @staticmethod
    def _at(a, t, x):
        """a[t] shaped (N, 1, 1, 1) to broadcast against x, on x's device."""
        return a.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, eps):
        """Forward process: x_t = alpha_t x0 + sigma_t eps."""
        return self._at(self.alpha, t, x0) * x0 + self._at(self.sigma, t, x0) * eps

    # -------------------------- 2. v-prediction (Common Diffusion, sec. 3.2) --------------------------
    def v_target(self, x0, eps, t):
        """v = alpha_t eps - sigma_t x0: the training target of v-prediction."""
        return self._at(self.alpha, t, x0) * eps - self._at(self.sigma, t, x0) * x0

    def pred_to_x0_eps(self, x_t, v, t):
        """x0_hat = alpha_t x_t - sigma_t v and eps_hat = sigma_t x_t + alpha_t v. Neither divides by
        alpha_t, which is 0 at t = T-1 under zero terminal SNR (eps-prediction is undefined there)."""
        alpha, sigma = self._at(self.alpha, t, x_t), self._at(self.sigma, t, x_t)
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v

    def timesteps(self, steps, spacing="trailing"):
        """Descending sampling timesteps (Common Diffusion, Table 2; diffusers' `timestep_spacing`).
        trailing: round(T, T - T/S, ..., T/S) - 1, starts at T-1 where the model sees pure noise (recommended);
        leading:  0, T//S, 2T//S, ... reversed, never reaches T-1;  linspace: round(linspace(0, T-1, S)) reversed."""
        T = self.T
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        elif spacing == "leading":
            t = (np.arange(0, steps) * (T // steps))[::-1]
        elif spacing == "linspace":
            t = np.linspace(0, T - 1, steps).round()[::-1]
        else:
            raise ValueError(f"unknown spacing {spacing!r}: use trailing, leading or linspace")
        return torch.from_numpy(t.copy()).long()


# =================================================================================================
#                         3. The model: a small class-conditional UNet (DDPM style)
# =================================================================================================

def norm(c):
    """GroupNorm with up to 32 groups of at least 4 channels (DDPM uses 32 groups; small models have fewer channels)."""
    return nn.GroupNorm(min(32, c // 4), c)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the integer timestep t, as in the Transformer and DDPM.  # (N,) -> (N, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, c, head_dim=32):
        super().__init__()
        self.heads = max(1, c // head_dim)
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        N, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(N, 3, self.heads, C // self.heads, H * W).permute(1, 0, 2, 4, 3)
        h = F.scaled_dot_product_attention(q, k, v)               # (N, heads, H*W, C/heads)
        return x + self.proj(h.transpose(2, 3).reshape(N, C, H, W))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the (time + label) embedding added in between; optional attention after."""

    def __init__(self, c_in, c_out, emb_dim, dropout, attn=False):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.dropout, self.conv2 = norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)                          # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attn else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv (takes the embedding only to share the blocks' signature)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """Class-conditional UNet predicting v. Labels are 0..num_classes-1; label `num_classes` is the null
    label ("no condition") that classifier-free guidance uses; num_classes=0 makes it unconditional.
    The defaults are the command line's model defaults, so UNet() is the default model."""

    def __init__(self, image_size=32, in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 attn_resolutions=(8,), dropout=0.0, num_classes=10):
        super().__init__()
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise UsageError(f"image size {image_size} cannot be halved {levels - 1} times down to the UNet's "
                             f"deepest level (channel_mult has {levels} levels): use a multiple of {2 ** (levels - 1)}")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # One extra row in the label table: index num_classes is the learned null condition.
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down, skip_ch, c, res = nn.ModuleList(), [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, channels * mult, emb_dim, dropout, attn=res in attn_resolutions))
                c = channels * mult
                skip_ch.append(c)
            if level < levels - 1:
                self.down.append(Downsample(c))
                skip_ch.append(c)
                res //= 2
        # The mid block: its output is what the perceptual network compares (f*_mid in Alg. 1).
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout, attn=True), ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skip_ch.pop(), channels * mult, emb_dim, dropout,
                                        attn=res in attn_resolutions))
                c = channels * mult
            if level > 0:
                self.up.append(Upsample(c))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _down_mid(self, x, t, y):
        emb = self.time_mlp(timestep_embedding(t, self.channels))  # (N, 4C)
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)                                        # (N, C, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)                                      # (N, C_mid, H/2^(L-1), W/2^(L-1))
        return h, skips, emb

    def features(self, x, t, y):
        """f*_mid: the mid-block output. Runs only the down path and the mid block (the up path would be
        wasted work for the perceptual network)."""
        return self._down_mid(x, t, y)[0]

    def forward(self, x, t, y=None):
        """v_hat(x_t, t, y).  # (N, 3, H, W), (N,), (N,) -> (N, 3, H, W)"""
        h, skips, emb = self._down_mid(x, t, y)
        for block in self.up:
            h = block(h, emb) if isinstance(block, Upsample) else block(torch.cat([h, skips.pop()], 1), emb)
        return self.out(h)


def frozen_copy(model):
    """A copy whose parameters never train: the perceptual network f* (and the EMA's storage)."""
    f = copy.deepcopy(model).eval()
    f.requires_grad_(False)
    return f


# =================================================================================================
#                  4. The objectives: v-MSE and self-perceptual (Perceptual Loss paper, Alg. 1)
# =================================================================================================

def draw_t_eps(schedule, x0, t=None, eps=None):
    """t ~ U{0..T-1} and eps ~ N(0, I), unless given."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device) if t is None else t
    eps = torch.randn_like(x0) if eps is None else eps
    return t, eps


def mse_loss(model, schedule, x0, y, t=None, eps=None):
    """L_mse = || v_hat(x_t, t, y) - v ||^2 with weight 1 at every t (plain v-MSE, as in Common Diffusion)."""
    t, eps = draw_t_eps(schedule, x0, t, eps)
    v_hat = model(schedule.q_sample(x0, t, eps), t, y)
    return F.mse_loss(v_hat.float(), schedule.v_target(x0, eps, t))


def self_perceptual_loss(model, perceptual_net, schedule, x0, y, t=None, t_prime=None, eps=None):
    """L_sp, Algorithm 1 of the paper:
      x_t = alpha_t x0 + sigma_t eps;  v_hat = f_theta(x_t, t, y);  x0_hat, eps_hat from v_hat
      t' ~ U{0..T-1}, independent of t (t' = t is degenerate: both branches coincide for an exact prediction)
      real:      x_t'     = alpha_t' x0     + sigma_t' eps
      predicted: x_hat_t' = alpha_t' x0_hat + sigma_t' eps_hat      (the *predicted* noise, not the true one)
      L_sp = || f*_mid(x_hat_t', t', y) - f*_mid(x_t', t', y) ||^2      (no v-MSE term is added)
    perceptual_net is a frozen copy of the stage-1 model (see frozen_copy). Its parameters get no gradient,
    but the gradient must flow *through* it into x_hat_t' and so into f_theta: only the real branch may run
    under no_grad. (Wrapping both branches in no_grad trains nothing.)"""
    t, eps = draw_t_eps(schedule, x0, t, eps)
    x_t = schedule.q_sample(x0, t, eps)
    x0_hat, eps_hat = schedule.pred_to_x0_eps(x_t, model(x_t, t, y).float(), t)
    t_prime = torch.randint(0, schedule.T, t.shape, device=x0.device) if t_prime is None else t_prime
    with torch.no_grad():
        feat_real = perceptual_net.features(schedule.q_sample(x0, t_prime, eps), t_prime, y)
    feat_pred = perceptual_net.features(schedule.q_sample(x0_hat, t_prime, eps_hat), t_prime, y)
    return F.mse_loss(feat_pred.float(), feat_real.float())


LOSSES = {"mse": mse_loss, "self-perceptual": self_perceptual_loss}


def objective(loss, model, perceptual_net, schedule):
    """(x0, y) -> the named objective's loss; only self-perceptual takes the perceptual network."""
    loss_fn = LOSSES[loss]
    if loss == "self-perceptual":
        return lambda x0, y: loss_fn(model, perceptual_net, schedule, x0, y)
    return lambda x0, y: loss_fn(model, schedule, x0, y)


# =================================================================================================
#             5. DDIM sampling with classifier-free guidance and its rescale (Common Diffusion)
# =================================================================================================

def guided_v(model_fn, x, t, y, cfg_scale, cfg_rescale):
    """v for one sampling step. Classifier-free guidance: v_cfg = v_uncond + w (v_cond - v_uncond), both
    halves in ONE batched forward of 2N. Rescale (Common Diffusion, sec. 3.4): v_resc = v_cfg * std(v_cond) /
    std(v_cfg) per sample, then phi v_resc + (1 - phi) v_cfg. w = 1 costs a single forward of N."""
    if cfg_scale == 1.0:
        return model_fn(x, t, y).float()
    null = torch.full_like(y, model_fn.num_classes)
    v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    v_cfg = v_uncond + cfg_scale * (v_cond - v_uncond)
    if cfg_rescale > 0:
        dims = list(range(1, x.dim()))
        v_resc = v_cfg * v_cond.std(dims, keepdim=True) / v_cfg.std(dims, keepdim=True)
        v_cfg = cfg_rescale * v_resc + (1 - cfg_rescale) * v_cfg
    return v_cfg


@torch.no_grad()
def sample(model_fn, schedule, shape, y=None, steps=50, cfg_scale=1.0, cfg_rescale=0.0, eta=0.0,
           spacing="trailing", generator=None, noise=None):
    """DDIM (Song et al. 2021) with v-prediction. model_fn(x, t, y) -> v is any callable with a `num_classes`
    attribute. x_T = `noise` (drawn from `generator` on the CPU when None, so results do not depend on the
    device). eta = 0 is deterministic DDIM, eta = 1 the DDPM-like ancestral sampler. The step after the last
    timestep goes to "t = -1" where alpha_bar = 1, so the sampler lands on x0_hat."""
    if y is None and cfg_scale != 1.0:
        raise ValueError("classifier-free guidance needs labels y")
    params = getattr(model_fn, "parameters", None)
    device = y.device if y is not None else next(params()).device if params else torch.device("cpu")
    x = (torch.randn(shape, generator=generator) if noise is None else noise).to(device)  # x_T: (N, C, H, W)
    ts = schedule.timesteps(steps, spacing).tolist()
    alpha_bar = schedule.alpha_bar.tolist()
    for i, t in enumerate(ts):
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        v = guided_v(model_fn, x, t_batch, y, cfg_scale, cfg_rescale)
        x0_hat, eps_hat = schedule.pred_to_x0_eps(x, v, t_batch)
        # DDIM eq. 12: sigma_eta^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev).
        var = eta ** 2 * (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev) if eta > 0 else 0.0
        x = ab_prev ** 0.5 * x0_hat + max(1 - ab_prev - var, 0.0) ** 0.5 * eps_hat
        if var > 0:
            x = x + var ** 0.5 * torch.randn(shape, generator=generator).to(device)
    return x


# =================================================================================================
#                                 6a. Data: shapes, CIFAR-10, a folder
# =================================================================================================

SHAPE_NAMES = ["circle", "square", "triangle", "diamond", "plus", "ring", "cross", "star", "bar", "crescent"]


def shape_mask(c, X, Y):
    """Class c of SHAPE_NAMES as a mask on shape-local coordinates (unit radius).  # (m, S, S) -> (m, S, S)"""
    r = (X ** 2 + Y ** 2).sqrt()
    U, V = (X + Y) / 2 ** 0.5, (X - Y) / 2 ** 0.5                   # axes rotated by 45 degrees, for the cross
    theta = torch.atan2(X, -Y)                                     # 0 points up, symmetric in X -> -X
    plus = lambda A, B, arm: ((A.abs() < arm) & (B.abs() < 0.95)) | ((B.abs() < arm) & (A.abs() < 0.95))
    masks = [
        lambda: r < 1,                                                             # circle
        lambda: torch.maximum(X.abs(), Y.abs()) < 0.8,                             # square
        lambda: (Y < 0.7) & (X.abs() < 0.95 * (Y + 0.9) / 1.6),                    # triangle
        lambda: X.abs() + Y.abs() < 1,                                             # diamond
        lambda: plus(X, Y, 0.3),                                                   # plus
        lambda: (r > 0.55) & (r < 1),                                              # ring
        lambda: plus(U, V, 0.28),                                                  # cross
        lambda: r < 0.55 + 0.45 * torch.cos(5 * theta),                            # star
        lambda: (X.abs() < 0.95) & (Y.abs() < 0.4),                                # bar
        lambda: (r < 1) & ((X - 0.5) ** 2 + (Y + 0.1) ** 2 > 0.7 ** 2),            # crescent
    ]
    return masks[c]().float()


def hsv(h, s, v):
    """HSV -> RGB for (N,) tensors in [0, 1].  # -> (N, 3)"""
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


@functools.lru_cache(maxsize=4)
def make_shapes(n, image_size=32, seed=0, chunk=1000):
    """The built-in data set: 10 classes of simple coloured shapes (SHAPE_NAMES) at a random position and size
    on a random two-colour gradient, bright on dark or dark on light, deterministic from `seed`. The masks are
    rendered at 2x and averaged down, so edges are anti-aliased. Continuous random parameters: no small model memorises it.
    Returns uint8 images (n, 3, H, W) and int64 labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    S = 2 * image_size
    grid = (torch.arange(S) + 0.5) / S * 2 - 1
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")            # (S, S) in [-1, 1]
    labels = torch.randint(0, 10, (n,), generator=g)
    images = []
    for lab in labels.split(chunk):
        m = lab.shape[0]
        u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(m, *s, generator=g)
        cx, cy, radius = u(-0.35, 0.35, 1, 1), u(-0.35, 0.35, 1, 1), u(0.45, 0.75, 1, 1)
        X, Y = (xx - cx) / radius, (yy - cy) / radius                          # (m, S, S) shape-local coordinates
        mask = torch.zeros(m, 1, S, S)
        for c in lab.unique().tolist():
            mask[lab == c, 0] = shape_mask(c, X[lab == c], Y[lab == c])
        mask = F.avg_pool2d(mask, 2)                                           # (m, 1, H, W) anti-aliased coverage
        dark = torch.rand(m, generator=g) < 0.5                                # bright shape on a dark background?
        fg = hsv(u(0, 1), u(0.5, 1), torch.where(dark, u(0.75, 1), u(0.15, 0.4)))
        bg1, bg2 = [hsv(u(0, 1), u(0, 0.6), torch.where(dark, u(0, 0.35), u(0.65, 1))) for _ in range(2)]
        a = u(0, 2 * math.pi, 1, 1)
        w = ((torch.cos(a) * xx[::2, ::2] + torch.sin(a) * yy[::2, ::2]) / 2 + 0.5)[:, None]  # (m, 1, H, W)
        bg = bg1[:, :, None, None] * (1 - w) + bg2[:, :, None, None] * w
        img = bg * (1 - mask) + fg[:, :, None, None] * mask + 0.02 * torch.randn(m, 3, image_size, image_size, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images), labels


SHAPES_TRAIN, SHAPES_TEST = 20000, 5000


def load_dataset(name, data_dir="data", image_size=32, train=True, seed=0):
    """Returns (images uint8 (N, 3, H, W), labels int64 (N,), class names, whether h-flips are allowed).
    `shapes`: built in; the test split is drawn from another seed. `cifar10`: torchvision, downloaded to
    data_dir. Anything else: a folder of images in class subfolders (torchvision's ImageFolder), resized and
    centre-cropped; it has no held-out split, so train=False returns the same images."""
    if name == "shapes":
        x, y = make_shapes(SHAPES_TRAIN if train else SHAPES_TEST, image_size, seed if train else seed + 1)
        return x, y, SHAPE_NAMES, True
    import torchvision
    if name == "cifar10":
        try:
            ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as e:  # no network: URLError, OSError, RuntimeError, ... all mean the same here
            raise UsageError(f"CIFAR-10 is not in {data_dir!r} and could not be downloaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no network?'})")
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()        # (50000, 3, 32, 32) uint8
        if image_size != 32:
            x = F.interpolate(x.float(), size=image_size, mode="bilinear", antialias=True).round().clamp(0, 255).byte()
        return x, torch.tensor(ds.targets), list(ds.classes), True
    if not os.path.isdir(name):
        raise UsageError(f"--data {name!r} is neither 'shapes', 'cifar10' nor an existing folder")
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    try:
        ds = torchvision.datasets.ImageFolder(name, transform=tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(f"cannot read images from {name!r}: {str(e).splitlines()[0]}")
    return x, torch.tensor(ds.targets), list(ds.classes), True


def to_model_range(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# =================================================================================================
#                              6b. Checkpoints: atomic writes, safe loads
# =================================================================================================

CKPT_KIND = "perceptual-diffusion"


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, flush it to disk, then os.replace: a kill at any moment
    leaves either the old checkpoint or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"kind": CKPT_KIND, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load with weights_only=True (a checkpoint never runs code); any failure is one clear line."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path!r} (truncated, corrupt or not a safe torch file): "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CKPT_KIND or not {"config", "ema", "model"} <= ckpt.keys():
        raise UsageError(f"{path!r} is not a checkpoint written by perceptual_diffusion.py")
    return ckpt


def load_weights(module, state, what):
    """load_state_dict, with a mismatch as one clear line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{what} does not match the model: {str(e).splitlines()[0][:200]}")


def model_from_checkpoint(ckpt, weights="ema"):
    """The UNet described by the checkpoint's config, with its EMA (default) or raw weights."""
    try:
        model = UNet(**model_kwargs(ckpt["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"the checkpoint's config is incomplete or malformed ({type(e).__name__}: {e})")
    load_weights(model, ckpt[weights], f"the checkpoint's {weights} weights")
    return model


# =================================================================================================
#                     6c. Training: one plain function; DDP when launched by torchrun
# =================================================================================================

# Every hyperparameter of `train`, with its default and one line of help. The command line is built from
# this table, and a checkpoint stores the whole config. Model defaults come from UNet's signature.
_unet = inspect.signature(UNet).parameters
TRAIN_ARGS = [
    # data
    ("data", "shapes", "data set: shapes (built in, no network), cifar10 (downloads), or a folder of class subfolders"),
    ("data_dir", "data", "where cifar10 is downloaded to / read from"),
    ("image_size", _unet["image_size"].default, "image side in pixels"),
    ("no_flip", False, "no random horizontal flips (for data that must not be mirrored, such as digits)"),
    ("unconditional", False, "ignore the labels: an unconditional model (guidance is then impossible)"),
    # model
    ("channels", _unet["channels"].default, "UNet base channels"),
    ("channel_mult", ",".join(map(str, _unet["channel_mult"].default)), "channel multiplier per resolution level, comma-separated"),
    ("num_res_blocks", _unet["num_res_blocks"].default, "residual blocks per level"),
    ("attn_res", ",".join(map(str, _unet["attn_resolutions"].default)), "resolutions (pixels) with self-attention, comma-separated"),
    ("dropout", _unet["dropout"].default, "dropout in the residual blocks"),
    # diffusion
    ("T", 1000, "training timesteps"),
    ("betas", "scaled_linear", "beta schedule: scaled_linear (the paper's), linear or cosine; always rescaled to zero terminal SNR"),
    # objective and optimisation
    ("loss", "mse", "objective: mse (stage 1) or self-perceptual (stage 2, needs --init)"),
    ("init", "", "stage-1 checkpoint: the online model starts from its EMA weights, f* is a frozen copy of them"),
    ("resume", "", "a run folder to continue from its ckpt.pt (model, EMA, optimizer, step, data order)"),
    ("steps", 1000, "total training steps"),
    ("batch_size", 64, "global batch size (split over DDP ranks)"),
    ("lr", 1e-3, "AdamW learning rate after warm-up (constant after it, as in DiT)"),
    ("warmup", 100, "linear learning-rate warm-up steps"),
    ("weight_decay", 0.0, "AdamW weight decay"),
    ("grad_clip", 1.0, "clip the global gradient norm to this"),
    ("ema_decay", 0.999, "EMA decay of the weights (short runs need lower; warmed up as min(decay, (1+s)/(10+s)))"),
    ("label_dropout", 0.1, "probability of replacing the label by the null label (enables classifier-free guidance)"),
    # bookkeeping
    ("out", "runs/run", "run folder: ckpt.pt, sample grids, config.json"),
    ("seed", 0, "random seed (data order, noise, timesteps); the data set itself uses --data-seed"),
    ("data_seed", 0, "seed of the built-in shapes data set"),
    ("device", "cuda" if torch.cuda.is_available() else "cpu", "device (default: cuda when available, else cpu)"),
    ("precision", "auto", "bf16 or fp32 autocast; auto = bf16 on CUDA with bf16 support, fp32 elsewhere"),
    ("compile", False, "wrap the model in torch.compile"),
    ("log_every", 50, "print a log line every N steps"),
    ("sample_every", 500, "write a sample grid every N steps (0: never)"),
    ("ckpt_every", 500, "write the checkpoint every N steps (and always at the end)"),
]
TRAIN_DEFAULTS = {name: default for name, default, _ in TRAIN_ARGS}
ARCH_KEYS = ["image_size", "channels", "channel_mult", "num_res_blocks", "attn_res", "num_classes"]
RESUMABLE_KEYS = {"steps", "log_every", "sample_every", "ckpt_every", "device", "precision", "compile", "resume"}


def int_list(s):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    return tuple(int(v) for v in str(s).split(",") if v.strip())


def model_kwargs(cfg):
    """UNet keyword arguments from a (flat) training config."""
    return dict(image_size=cfg["image_size"], channels=cfg["channels"], channel_mult=int_list(cfg["channel_mult"]),
                num_res_blocks=cfg["num_res_blocks"], attn_resolutions=int_list(cfg["attn_res"]),
                dropout=cfg["dropout"], num_classes=cfg["num_classes"])


def schedule_from(cfg):
    """The training config's schedule, always with zero terminal SNR."""
    return Schedule(cfg["T"], cfg["betas"], zero_terminal_snr=True)


def autocast(device, precision):
    """bf16 autocast where asked (auto: CUDA with bf16 support), else a no-op."""
    dev = torch.device(device).type
    if precision == "auto":
        precision = "bf16" if dev == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return torch.autocast(dev, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def distributed():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def check_config(cfg):
    """Every bad value a person can type: one line, exit code 2 (via UsageError)."""
    if cfg["loss"] not in LOSSES:
        raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    if cfg["loss"] == "self-perceptual" and not cfg["init"] and not cfg["resume"]:
        raise UsageError("--loss self-perceptual needs --init STAGE1_RUN/ckpt.pt (a model trained with --loss mse)")
    if cfg["betas"] not in ("linear", "scaled_linear", "cosine"):
        raise UsageError(f"--betas must be linear, scaled_linear or cosine, got {cfg['betas']!r}")
    if cfg["precision"] not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {cfg['precision']!r}")
    for key in ("steps", "batch_size", "image_size", "channels", "num_res_blocks", "T", "log_every", "ckpt_every"):
        if cfg[key] <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    if not 0 <= cfg["ema_decay"] < 1 or not 0 <= cfg["label_dropout"] < 1:
        raise UsageError("--ema-decay and --label-dropout must be in [0, 1)")
    try:
        int_list(cfg["channel_mult"]), int_list(cfg["attn_res"])
    except ValueError:
        raise UsageError("--channel-mult and --attn-res take comma-separated integers, such as 1,2,2")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg['device']}: CUDA is not available on this machine")


def check_same_arch(cfg, ckpt, path):
    """A checkpoint used with --init must describe the model this run builds."""
    for key in ARCH_KEYS:
        if str(ckpt["config"].get(key)) != str(cfg[key]):
            raise UsageError(f"checkpoint {path!r} has {key}={ckpt['config'].get(key)} but this run asks for "
                             f"{key}={cfg[key]}: pass the same model flags as stage 1")


class Batches:
    """Deterministic batches: the DistributedSampler's shuffled order (seed, epoch) split over ranks, so
    batch `step` is a function of (seed, step, rank) alone and a resumed run reads the same data."""

    def __init__(self, n, batch_per_rank, rank, world, seed):
        from torch.utils.data import DistributedSampler
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.b = batch_per_rank
        self.per_epoch = len(self.sampler) // batch_per_rank
        if self.per_epoch == 0:
            raise UsageError(f"the data set ({n} images) is smaller than one batch per rank ({batch_per_rank})")
        self.epoch, self.order = None, None

    def indices(self, step):
        """This rank's image indices for training step `step`."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.order = epoch, torch.tensor(list(self.sampler))
        return self.order[i * self.b:(i + 1) * self.b]


def save_grid(x, path, nrow):
    """Save images in [-1, 1] as one PNG grid."""
    from torchvision.utils import save_image
    save_image((x.float().cpu() + 1) / 2, path, nrow=nrow, padding=1)


def train(cfg, log=print):
    """Train with cfg["loss"] (see TRAIN_ARGS) and return (ema_model, stats). Launched by torchrun, it runs
    data-parallel: every rank computes its share of the global batch, DDP averages the gradients, so every
    rank holds the same weights after each step; rank 0 alone logs, samples and writes checkpoints."""
    cfg = {**TRAIN_DEFAULTS, **cfg}
    check_config(cfg)
    rank, world, local_rank = distributed()
    device = torch.device(cfg["device"])
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg["batch_size"] % world:
        raise UsageError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} ranks")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    out = cfg["resume"] or cfg["out"]

    # ---- state: fresh, from a stage-1 checkpoint (--init), or resumed (--resume) ----
    ckpt, step = None, 0
    if cfg["resume"]:
        ckpt = load_checkpoint(os.path.join(cfg["resume"], "ckpt.pt"))
        if not {"optimizer", "step"} <= ckpt.keys():
            raise UsageError(f"{cfg['resume']}/ckpt.pt has no optimizer state or step: it cannot be resumed")
        changed = {k for k, v in cfg.items() if k not in RESUMABLE_KEYS and k != "out" and v != TRAIN_DEFAULTS[k]
                   and v != ckpt["config"].get(k)}
        if changed:
            raise UsageError(f"--resume continues the run as it was configured; cannot change {', '.join(sorted(changed))}")
        cfg = {**ckpt["config"], **{k: cfg[k] for k in RESUMABLE_KEYS}, "out": out}
        step = ckpt["step"]
    images, labels, class_names, flip_ok = load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], True, cfg["data_seed"])
    cfg["num_classes"] = 0 if cfg["unconditional"] else len(class_names)
    torch.manual_seed(cfg["seed"])                                 # the same initial weights on every rank
    model = UNet(**model_kwargs(cfg)).to(device)
    perceptual_net = None
    if ckpt is not None:
        load_weights(model, ckpt["model"], "the resumed checkpoint")
    elif cfg["init"]:
        init = load_checkpoint(cfg["init"])
        check_same_arch(cfg, init, cfg["init"])
        load_weights(model, init["ema"], f"--init {cfg['init']}")
    if cfg["loss"] == "self-perceptual":
        perceptual_net = frozen_copy(model)                       # f*: frozen copy of the stage-1 EMA weights
        if ckpt is not None:
            load_weights(perceptual_net, ckpt.get("perceptual"), "the resumed perceptual network")
    ema = frozen_copy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if ckpt is not None:
        load_weights(ema, ckpt["ema"], "the resumed EMA")
        load_weights(opt, ckpt["optimizer"], "the resumed optimizer state")
    schedule = schedule_from(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    net = model
    if cfg["compile"]:
        net = torch.compile(net)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_of = objective(cfg["loss"], net, perceptual_net, schedule)
    batches = Batches(len(images), cfg["batch_size"] // world, rank, world, cfg["seed"])
    amp = autocast(device, cfg["precision"])
    if master:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        log(f"{cfg['loss']} on {cfg['data']} ({len(images)} images, {cfg['num_classes']} classes), "
            f"{n_params / 1e6:.2f}M parameters, {world} rank(s) on {device}, steps {step}->{cfg['steps']}")

    def checkpoint():
        """Rank 0 writes everything a resume needs, atomically."""
        if master:
            state = {"config": cfg, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict()}
            if perceptual_net is not None:
                state["perceptual"] = perceptual_net.state_dict()
            save_checkpoint(os.path.join(out, "ckpt.pt"), state)

    # SIGINT / SIGTERM: finish the current step, write the checkpoint, exit cleanly.
    stop = {"signal": None}
    handler = lambda signum, frame: stop.update(signal=signum)
    old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    fixed_noise = torch.randn(64, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(1))
    fixed_y = torch.arange(64) % max(cfg["num_classes"], 1)
    model.train()
    t0, t_log, start_step, loss_sum = time.time(), time.time(), step, 0.0
    try:
        while step < cfg["steps"]:
            # The randomness of a step is a function of (seed, step, rank): a resumed run draws the same numbers.
            torch.manual_seed((cfg["seed"] * 1_000_003 + step) * 4096 + rank)
            idx = batches.indices(step)
            x0 = to_model_range(images[idx]).to(device)              # (B, 3, H, W) in [-1, 1]
            y = labels[idx].to(device)                               # (B,)
            if flip_ok and not cfg["no_flip"]:
                flip = torch.rand(len(idx), device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            if cfg["num_classes"]:
                # Label dropout: the same network learns v_uncond through the null label. This is what makes
                # classifier-free guidance possible at sampling time.
                y = torch.where(torch.rand(len(idx), device=device) < cfg["label_dropout"], cfg["num_classes"], y)
            lr = cfg["lr"] * min(1.0, (step + 1) / max(cfg["warmup"], 1))
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                loss = loss_of(x0, y)
            loss.backward()
            flags = torch.tensor([loss.item(), float(stop["signal"] is not None)], device=device)
            if world > 1:
                dist.all_reduce(flags)                               # every rank sees the same loss and stop flag
                flags[0] /= world
            if not math.isfinite(flags[0].item()):
                last = os.path.join(out, "ckpt.pt")
                raise FloatingPointError(f"loss is {flags[0].item()} at step {step}; stopped without writing a checkpoint"
                                         + (f"; the last good one is {last}" if os.path.exists(last) else ""))
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            # EMA of the weights; the warm-up keeps short runs from averaging in the random initialisation.
            decay = min(cfg["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            step += 1
            loss_sum += flags[0].item()
            if master and (step % cfg["log_every"] == 0 or step == cfg["steps"]):
                now = time.time()
                n_log = (step - start_step) % cfg["log_every"] or cfg["log_every"]
                ips = n_log * cfg["batch_size"] / (now - t_log)
                left = (cfg["steps"] - step) * (now - t0) / (step - start_step)
                log(f"step {step}/{cfg['steps']} | loss {loss_sum / n_log:.4f} | {ips:.1f} img/s | lr {lr:.2e} | "
                    f"{left / 60:.1f} min left")
                t_log, loss_sum = now, 0.0
            if master and cfg["sample_every"] and step % cfg["sample_every"] == 0:
                with amp:
                    x = sample(ema, schedule, fixed_noise.shape, fixed_y.to(device) if cfg["num_classes"] else None,
                               steps=50, noise=fixed_noise)
                save_grid(x, os.path.join(out, f"samples_{step:07d}.png"), nrow=8)
            if step % cfg["ckpt_every"] == 0 and step < cfg["steps"]:
                checkpoint()
            if flags[1] > 0:
                break
        checkpoint()
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if stop["signal"] is not None and master:
        log(f"stopped by signal {stop['signal']} at step {step}; checkpoint written, continue with --resume {out}")
    return ema, {"steps": step, "train_seconds": time.time() - t0, "params": n_params, "config": cfg, "model": model}


# =================================================================================================
#           7. Evaluation: Frechet distance, conditional accuracy, Inception Score
# =================================================================================================

def frechet_distance(mu1, cov1, mu2, cov2):
    """d^2 = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2), in float64. The matrix square
    roots come from eigendecompositions of symmetric matrices (C1^1/2 C2 C1^1/2 is symmetric, and has the same
    eigenvalues as C1 C2), so no scipy and no complex parts."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, cov1, mu2, cov2))
    w, V = torch.linalg.eigh(cov1)
    cov1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    m = cov1_half @ cov2 @ cov1_half
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean)


def feature_stats(f):
    """Mean and covariance of features (N, D), in float64."""
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))), the mean over `splits` parts (Salimans et al. 2016)."""
    scores = []
    for p in F.softmax(logits.double(), 1).chunk(splits):
        kl = (p * (torch.log(p + 1e-12) - torch.log(p.mean(0, keepdim=True) + 1e-12))).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


class Classifier(nn.Module):
    """The offline ruler: a small CNN trained on the data set's training images. Its penultimate features give
    the Frechet distance, its logits the conditional accuracy of class-conditional samples."""

    def __init__(self, num_classes, width=16):
        super().__init__()
        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), norm(c_out), nn.SiLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), norm(c_out), nn.SiLU()]
        self.body = nn.Sequential(*stage(3, width), nn.MaxPool2d(2), *stage(width, 2 * width), nn.MaxPool2d(2),
                                  *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        f = self.body(x)                                           # (N, 4w) penultimate features
        return f, self.head(f)


def train_classifier(images, labels, num_classes, steps, device, seed=0, log=print):
    """A few hundred AdamW steps with flips and 2-pixel shifts; enough for `shapes`, a ruler for CIFAR-10."""
    torch.manual_seed(seed)
    net = Classifier(num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    for step in range(steps):
        idx = torch.randint(0, len(images), (128,))
        x = to_model_range(images[idx]).to(device)
        x = torch.where(torch.rand(len(idx), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        dy, dx = torch.randint(-2, 3, (2,)).tolist()
        x = torch.roll(x, (dy, dx), (2, 3))
        loss = F.cross_entropy(net(x)[1], labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"classifier step {step + 1}/{steps} | loss {loss.item():.4f}")
    return net.eval()


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 (ImageNet weights): 2048-d pool features and the 1008->1000 logits, on images
    resized to 299. NOT the TF-ported network of standard FID: compare these numbers only with each other."""

    def __init__(self):
        super().__init__()
        from torchvision.models import Inception_V3_Weights, inception_v3
        try:
            self.net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
        except Exception as e:
            raise UsageError(f"Inception-v3 weights are not in the torch hub cache ({torch.hub.get_dir()}) and could "
                             f"not be downloaded ({type(e).__name__}); use --features classifier offline")
        self.fc, self.net.fc = self.net.fc, nn.Identity()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        x = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
        f = self.net((x - self.mean) / self.std)                   # (N, 2048)
        return f, self.fc(f)


@torch.no_grad()
def extract(net, images, device, batch=250):
    """Features (float64) and logits of images given as uint8 or in [-1, 1]."""
    feats, logits = [], []
    for x in images.split(batch):
        x = to_model_range(x) if x.dtype == torch.uint8 else x
        f, lg = net(x.to(device).float())
        feats.append(f.double().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(feats), torch.cat(logits)


class Ruler:
    """What every number is measured with: a feature network and the statistics of `real_n` real images, with
    the protocol written down beside them. features="classifier" trains (or reuses, from `cache`) the small CNN;
    features="inception" needs torchvision's downloaded weights."""

    def __init__(self, features, data, data_dir, image_size, data_seed, real_n, device, cache=None,
                 classifier_steps=600, log=print):
        self.features, self.device = features, device
        real, real_y, names, _ = load_dataset(data, data_dir, image_size, train=False, seed=data_seed)
        split = "test" if data in ("shapes", "cifar10") else "train (a folder has no held-out split)"
        real_n = min(real_n, len(real))                            # a small folder has fewer images
        real, real_y = real[:real_n], real_y[:real_n]
        self.protocol = {"features": features, "real_images": real_n, "real_split": split, "data": data}
        if features == "classifier":
            self.net = self._classifier(data, data_dir, image_size, data_seed, len(names), classifier_steps, cache, log)
        elif features == "inception":
            self.net = InceptionFeatures().to(device).eval()
        else:
            raise UsageError(f"--features must be classifier or inception, got {features!r}")
        f, logits = extract(self.net, real, device)
        self.real_mu, self.real_cov = feature_stats(f)
        if features == "classifier":
            self.protocol["classifier_accuracy_on_real"] = round((logits.argmax(1) == real_y).float().mean().item(), 4)

    def _classifier(self, data, data_dir, image_size, data_seed, num_classes, steps, cache, log):
        """The cached classifier when its key matches, else a newly trained one (then cached)."""
        key = {"data": data, "image_size": image_size, "data_seed": data_seed, "steps": steps}
        if cache and os.path.isfile(cache):
            try:
                saved = torch.load(cache, map_location="cpu", weights_only=True)
                if saved.get("key") == key:
                    net = Classifier(num_classes)
                    net.load_state_dict(saved["model"])
                    return net.to(self.device).eval()
            except Exception:
                pass                                               # unreadable cache: train a new one
        images, labels, _, _ = load_dataset(data, data_dir, image_size, train=True, seed=data_seed)
        net = train_classifier(images, labels, num_classes, steps, self.device, log=log)
        if cache:
            torch.save({"key": key, "model": net.state_dict()}, cache)
        return net

    def measure(self, x, y):
        """Frechet distance of samples x (in [-1, 1]) to the real images, and the share of conditional samples
        the classifier assigns to the class they were asked for (classifier) or the Inception Score."""
        f, logits = extract(self.net, x, self.device)
        out = {"fd": frechet_distance(*feature_stats(f), self.real_mu, self.real_cov)}
        if self.features == "inception":
            out["is"] = inception_score(logits)
        elif y is not None:
            out["cond_acc"] = (logits.argmax(1) == y.cpu()).float().mean().item()
        return out


def generate(model, schedule, n, steps, cfg_scale=1.0, cfg_rescale=0.0, eta=0.0, spacing="trailing", seed=0,
             batch=None, precision="auto", label=None):
    """n samples from fixed starting noise (seed); labels cycle through the classes (or are all `label`).
    The noise of sample i does not depend on `batch`, so models are compared from the same x_T. The default
    batch is 64 on a CPU, where larger batches run slower per image (measured), and 256 on a GPU."""
    device = next(model.parameters()).device
    batch = batch or (256 if device.type == "cuda" else 64)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    y = None
    if model.num_classes:
        y = torch.arange(n) % model.num_classes if label is None else torch.full((n,), label)
    out = []
    with autocast(device, precision):
        for i in range(0, n, batch):
            yi = None if y is None else y[i:i + batch].to(device)
            out.append(sample(model, schedule, noise[i:i + batch].shape, yi, steps, cfg_scale, cfg_rescale, eta,
                              spacing, generator=g, noise=noise[i:i + batch]).float().cpu())
    return torch.cat(out), y


def evaluate_model(model, schedule, ruler, n, steps, cfg_scale=1.0, cfg_rescale=0.0, eta=0.0, spacing="trailing",
                   seed=0, batch=None, precision="auto"):
    """Sample n images and measure them; the result carries its protocol."""
    t0 = time.time()
    x, y = generate(model, schedule, n, steps, cfg_scale, cfg_rescale, eta, spacing, seed, batch, precision)
    seconds = time.time() - t0
    res = ruler.measure(x, y)
    res.update(samples=n, sampler="DDIM", steps=steps, eta=eta, spacing=spacing, cfg_scale=cfg_scale,
               cfg_rescale=cfg_rescale, seed=seed, sample_seconds=round(seconds, 1), **ruler.protocol)
    return res


# =================================================================================================
#                           8. The paper's comparison in one command
# =================================================================================================

PRESETS = {
    # <= 20 minutes on 2 CPU cores (torch's default threads): shapes at 16 pixels, where a 1.1M-parameter UNet
    # learns the classes in a few thousand steps (at 32 pixels, 1200 steps still gave blobs); bf16 autocast,
    # 1.36x faster than fp32 here with no measured loss of quality (README, Speed); the paper's beta schedule.
    "cpu": dict(train=dict(data="shapes", image_size=16, attn_res="4", betas="scaled_linear", precision="bf16",
                           batch_size=64, lr=2e-3, warmup=50, ema_decay=0.995, log_every=250, sample_every=0,
                           ckpt_every=500),
                stage1_steps=4000, stage2_steps=1500, stage2_lr=5e-4, features="classifier", classifier_steps=400,
                real_n=2000, eval_n=1000, sweep_n=300, sweep_scales=[1.25, 1.5, 2.0, 3.0, 5.0], cfg_rescale=0.7,
                eval_steps=25, picture_per_class=3),
    # The recipe for a real run on one GPU. Its cost has not been measured in this repository (see README).
    "cifar10": dict(train=dict(data="cifar10", channels=128, channel_mult="1,2,2,2", num_res_blocks=2, attn_res="16",
                               dropout=0.1, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, log_every=500,
                               sample_every=10000, ckpt_every=5000),
                    stage1_steps=400_000, stage2_steps=50_000, stage2_lr=2e-5, features="inception",
                    classifier_steps=4000, real_n=10000, eval_n=10000, sweep_n=2000, sweep_scales=[1.5, 2.0, 3.0],
                    cfg_rescale=0.7, eval_steps=50, picture_per_class=2),
    # A seconds-long pass through every stage: checks the pipeline, measures nothing.
    "smoke": dict(train=dict(data="shapes", channels=8, channel_mult="1,2", attn_res="", precision="bf16", batch_size=8,
                             lr=1e-3, warmup=1, ema_decay=0.9, log_every=1, sample_every=0, ckpt_every=100),
                  stage1_steps=2, stage2_steps=1, stage2_lr=1e-3, features="classifier", classifier_steps=1,
                  real_n=40, eval_n=20, sweep_n=10, sweep_scales=[2.0, 3.0], cfg_rescale=0.7, eval_steps=2,
                  picture_per_class=1),
}

ROWS = [  # (row, name, which trained model, guided?)
    (1, "MSE", "mse", False),
    (2, "MSE, continued", "mse-continued", False),
    (3, "MSE + guidance", "mse", True),
    (4, "self-perceptual", "self-perceptual", False),
    (5, "self-perceptual + guidance", "self-perceptual", True),
]


def comparison_picture(models, schedule, rows, guidance, path, per_class, steps, precision):
    """One labelled column per row, the same classes and the same initial noise in every column."""
    from PIL import Image, ImageDraw
    scale, pad, head = max(2, 64 // models["mse"].image_size), 8, 30
    columns = []
    for row, name, key, guided in rows:
        m = models[key]
        k, s = max(m.num_classes, 1), m.image_size
        w, phi = guidance if guided else (1.0, 0.0)
        x, _ = generate(m, schedule, per_class * k, steps, w, phi, seed=12345, precision=precision)
        # sample i has class i % k: lay out one class per line, per_class samples side by side
        grid = to_uint8(x).view(per_class, k, 3, s, s).permute(1, 3, 0, 4, 2).reshape(k * s, per_class * s, 3)
        title = f"{row}. {name}\n" + (f"w={w:g}, phi={phi:g}" if guided else "no guidance")
        columns.append((title, Image.fromarray(grid.numpy()).resize((per_class * s * scale, k * s * scale), Image.NEAREST)))
    width = max(160, columns[0][1].width)
    canvas = Image.new("RGB", (len(columns) * (width + pad) + pad, columns[0][1].height + head + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, col) in enumerate(columns):
        x0 = pad + i * (width + pad)
        draw.multiline_text((x0, 3), title, fill="black")
        canvas.paste(col, (x0 + (width - col.width) // 2, head))
    canvas.save(path)


def reproduce(preset="cpu", out="runs/reproduce", device=None, seed=0, log=print, **overrides):
    """Stage 1 (MSE), stage 2 (self-perceptual from stage 1), and the fair control (MSE continued for as many
    steps as stage 2) from the same stage-1 weights; then the five rows of ROWS, each sampled with the same
    sampler, seeds and number of samples, and measured with the same ruler. Writes results.md, results.json
    and comparison.png under `out`."""
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if distributed()[1] > 1:
        raise UsageError("reproduce runs in one process; under torchrun, run the `train` stages instead")
    p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    base = {**p["train"], "seed": seed, "device": device or TRAIN_DEFAULTS["device"]}
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    stages = [("mse", dict(loss="mse", steps=p["stage1_steps"])),
              ("self-perceptual", dict(loss="self-perceptual", steps=p["stage2_steps"], lr=p["stage2_lr"])),
              ("mse-continued", dict(loss="mse", steps=p["stage2_steps"], lr=p["stage2_lr"]))]
    models, stats = {}, {}
    for i, (key, stage) in enumerate(stages):
        log(f"== stage {i + 1}/3: {key} ({stage['steps']} steps) ==")
        cfg = {**base, **stage, "out": os.path.join(out, key)}
        if key != "mse":                                           # both start from the stage-1 EMA weights
            cfg["init"] = os.path.join(out, "mse", "ckpt.pt")
        models[key], stats[key] = train(cfg, log=lambda s, k=key: log(f"[{k}] {s}"))
        models[key].eval()
    stats["mse-continued"]["steps"] += stats["mse"]["steps"]
    stats["self-perceptual"]["steps"] += stats["mse"]["steps"]
    cfg = stats["mse"]["config"]
    schedule = schedule_from(cfg)
    dev = torch.device(base["device"])
    log("== evaluation: building the ruler ==")
    ruler = Ruler(p["features"], cfg["data"], cfg["data_dir"], cfg["image_size"], cfg["data_seed"], p["real_n"], dev,
                  cache=os.path.join(out, "classifier.pt"), classifier_steps=p["classifier_steps"], log=log)
    ev = dict(steps=p["eval_steps"], precision=cfg["precision"])

    # A small guidance sweep for row 3, on other seeds and fewer samples than the table uses.
    sweep = []
    for w in p["sweep_scales"]:
        r = evaluate_model(models["mse"], schedule, ruler, p["sweep_n"], cfg_scale=w, cfg_rescale=p["cfg_rescale"],
                           seed=seed + 1, **ev)
        sweep.append({"cfg_scale": w, "cfg_rescale": p["cfg_rescale"], "fd": r["fd"], "cond_acc": r.get("cond_acc"),
                      "is": r.get("is")})
        log(f"guidance sweep: w={w:g} phi={p['cfg_rescale']:g} -> Frechet distance {r['fd']:.3f}")
    best = min(sweep, key=lambda r: r["fd"])
    guidance = (best["cfg_scale"], best["cfg_rescale"])

    rows = []
    for row, name, key, guided in ROWS:
        w, phi = guidance if guided else (1.0, 0.0)
        r = evaluate_model(models[key], schedule, ruler, p["eval_n"], cfg_scale=w, cfg_rescale=phi, seed=seed, **ev)
        r.update(row=row, name=name, loss=stats[key]["config"]["loss"], train_steps=stats[key]["steps"],
                 train_seconds=round(stats[key]["train_seconds"], 1))
        rows.append(r)
        log(f"row {row} {name}: Frechet distance {r['fd']:.3f}" +
            (f", conditional accuracy {r['cond_acc']:.3f}" if "cond_acc" in r else f", IS {r.get('is', 0):.2f}"))
    comparison_picture(models, schedule, ROWS, guidance, os.path.join(out, "comparison.png"), p["picture_per_class"],
                       p["eval_steps"], cfg["precision"])
    result = {"preset": preset, "settings": {k: v for k, v in p.items() if k != "train"}, "train": base,
              "guidance_sweep": sweep, "guidance": list(guidance), "rows": rows, "protocol": ruler.protocol,
              "wall_seconds": round(time.time() - t_start, 1), "device": str(dev), "torch_threads": torch.get_num_threads()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_markdown(result))
    log(f"wrote {out}/results.md, results.json, comparison.png in {result['wall_seconds'] / 60:.1f} min")
    return result


def results_markdown(res):
    """The results table with its protocol, and what it says about the paper's ordering."""
    rows, proto = res["rows"], res["protocol"]
    second = "IS" if proto["features"] == "inception" else "cond. accuracy"
    lines = [f"| row | model | loss | train steps | guidance w / phi | Frechet distance ({proto['features']}) | "
             f"{second} | sampling s | training s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        guide = "none" if r["cfg_scale"] == 1 else f"{r['cfg_scale']:g} / {r['cfg_rescale']:g}"
        snd = r.get("is", r.get("cond_acc"))
        lines.append(f"| {r['row']} | {r['name']} | {r['loss']} | {r['train_steps']} | {guide} | {r['fd']:.3f} | "
                     f"{'-' if snd is None else f'{snd:.3f}'} | {r['sample_seconds']} | {r['train_seconds']} |")
    r0 = rows[0]
    fd = {r["row"]: r["fd"] for r in rows}
    lines += ["", f"Protocol: {r0['samples']} samples per row, {r0['sampler']} eta={r0['eta']}, {r0['steps']} steps, "
              f"{r0['spacing']} spacing, seed {r0['seed']}, labels cycling through the classes, the same initial noise "
              f"in every row; real statistics from {proto['real_images']} {proto['data']} images of the "
              f"{proto['real_split']} split; features: {proto['features']}"
              + (f" (its accuracy on those real images: {proto['classifier_accuracy_on_real']:.3f})"
                 if "classifier_accuracy_on_real" in proto else "") + ".",
              "", "Guidance sweep for row 3 (other seed, " + f"{res['settings']['sweep_n']} samples): " +
              ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in res["guidance_sweep"]) +
              f"; chosen w={res['guidance'][0]:g}, phi={res['guidance'][1]:g}.", "",
              f"Paper's ordering (lower Frechet distance is better): row 4 < row 1: {fd[4] < fd[1]} "
              f"({fd[4]:.3f} vs {fd[1]:.3f}); row 4 < row 2: {fd[4] < fd[2]} ({fd[4]:.3f} vs {fd[2]:.3f}); "
              f"row 3 best of rows 1-4: {fd[3] <= min(fd[1], fd[2], fd[4])}.", "",
              f"Wall time {res['wall_seconds'] / 60:.1f} min on {res['device']} ({res['torch_threads']} torch threads)."]
    return "\n".join(lines) + "\n"


# =================================================================================================
#                                   Benchmark: where the time goes
# =================================================================================================

def bench(cfg, iters=5, log=print):
    """Parameter count, training images/s with each objective (and their ratio), and sampling images/s at
    50 DDIM steps without and with guidance, for the model flags, batch size and device in cfg."""
    cfg = {**TRAIN_DEFAULTS, **cfg, "num_classes": 10}
    check_config(cfg)
    device, B, S = torch.device(cfg["device"]), cfg["batch_size"], cfg["image_size"]
    torch.manual_seed(0)
    model = UNet(**model_kwargs(cfg)).to(device)
    perceptual_net = frozen_copy(model)
    net = torch.compile(model) if cfg["compile"] else model
    schedule, amp = schedule_from(cfg), autocast(device, cfg["precision"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0, y = torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device)

    def timed(fn, n):
        fn()                                                       # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.time() - t0) / n

    def train_step(loss):
        loss_of = objective(loss, net, perceptual_net, schedule)

        def step():
            with amp:
                l = loss_of(x0, y)
            l.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    t_mse, t_sp = timed(train_step("mse"), iters), timed(train_step("self-perceptual"), iters)
    model.eval()

    def sampler(w):
        def run():
            with amp:
                sample(net, schedule, (B, 3, S, S), y, steps=50, cfg_scale=w)
        return run
    t_u, t_g = timed(sampler(1.0), 1), timed(sampler(3.0), 1)
    res = {"params": sum(p.numel() for p in model.parameters()), "device": str(device), "batch": B,
           "precision": cfg["precision"], "threads": torch.get_num_threads(),
           "train_img_s_mse": B / t_mse, "train_img_s_self_perceptual": B / t_sp, "self_perceptual_step_ratio": t_sp / t_mse,
           "sample_img_s_50_steps": B / t_u, "sample_img_s_50_steps_guided": B / t_g, "guided_step_ratio": t_g / t_u}
    log(f"model {res['params'] / 1e6:.2f}M parameters | {device}, batch {B}, precision {cfg['precision']}, "
        f"{res['threads']} threads")
    log(f"train  mse              {res['train_img_s_mse']:8.1f} img/s")
    log(f"train  self-perceptual  {res['train_img_s_self_perceptual']:8.1f} img/s   "
        f"(step cost {res['self_perceptual_step_ratio']:.2f}x mse)")
    log(f"sample 50 steps         {res['sample_img_s_50_steps']:8.1f} img/s")
    log(f"sample 50 steps, cfg    {res['sample_img_s_50_steps_guided']:8.1f} img/s   "
        f"(step cost {res['guided_step_ratio']:.2f}x unguided)")
    return res


# =================================================================================================
#                                       9. Command line
# =================================================================================================

class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit code 2 (not a usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_args(p, names=None):
    """One flag per row of TRAIN_ARGS (or the rows in `names`): --data-dir for data_dir, a switch for booleans."""
    for name, default, help in TRAIN_ARGS:
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=type(default), default=default, metavar=type(default).__name__.upper(),
                           help=help if "default" in help else f"{help} (default: {default})")


def add_sampling_args(p):
    """The flags `sample` and `evaluate` share."""
    p.add_argument("--ckpt", required=True, help="checkpoint (RUN/ckpt.pt); its EMA weights are used")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale w; 1 = no guidance (default: 1)")
    p.add_argument("--cfg-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] (default: 0)")
    p.add_argument("--eta", type=float, default=0.0, help="0 = deterministic DDIM, 1 = ancestral (default: 0)")
    p.add_argument("--spacing", default="trailing", choices=["trailing", "leading", "linspace"], help="timestep spacing (default: trailing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--batch", type=int, default=None, help="images per sampling batch (default: 64 on CPU, 256 on GPU)")
    p.add_argument("--device", default=TRAIN_DEFAULTS["device"], help="device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast precision (default: auto)")


def build_parser():
    """The command line: train, sample, evaluate, reproduce, bench."""
    parser = Parser(prog="perceptual_diffusion.py", description=__doc__.split("\n\n")[0].strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    add_train_args(sub.add_parser("train", help="train a model (stage 1: --loss mse; stage 2: --loss self-perceptual --init)"))
    p = sub.add_parser("sample", help="sample a grid (PNG) and/or an .npz from a checkpoint")
    add_sampling_args(p)
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--label", type=int, default=None, help="class of every sample (default: cycle through the classes)")
    p.add_argument("--out", default="grid.png", help="PNG grid to write (default: grid.png; '' for none)")
    p.add_argument("--npz", default="", help="also write uint8 NHWC images (arr_0) and labels, as FID tools read")
    p = sub.add_parser("evaluate", help="Frechet distance (and conditional accuracy or IS) of a checkpoint's samples")
    add_sampling_args(p)
    p.add_argument("--n", type=int, default=1000, help="number of samples (default: 1000)")
    p.add_argument("--features", default="classifier", choices=["classifier", "inception"],
                   help="feature network: classifier (trained here, offline) or inception (downloads weights)")
    p.add_argument("--real-n", type=int, default=2000, help="real images for the reference statistics (default: 2000)")
    p.add_argument("--classifier-steps", type=int, default=600, help="training steps of the classifier ruler (default: 600)")
    p.add_argument("--json", default="", help="also write the result, with its protocol, to this JSON file")
    p = sub.add_parser("reproduce", help="the paper's comparison: train both stages, evaluate five rows, write a table and a picture")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="cpu (<= 20 min on 2 cores), cifar10 (one GPU), smoke (seconds)")
    p.add_argument("--out", default="runs/reproduce", help="run folder (default: runs/reproduce)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and evaluation (default: 0)")
    p.add_argument("--stage1-steps", type=int, default=None, help="override the preset's stage-1 (MSE) steps")
    p.add_argument("--stage2-steps", type=int, default=None, help="override the preset's stage-2 steps (and the control's)")
    p.add_argument("--eval-n", type=int, default=None, help="override the preset's samples per row")
    p = sub.add_parser("bench", help="parameters, training and sampling images/s for the model flags")
    add_train_args(p, {"image_size", "channels", "channel_mult", "num_res_blocks", "attn_res", "dropout",
                       "batch_size", "device", "precision", "compile"})
    p.add_argument("--iters", type=int, default=5, help="timed training steps per objective (default: 5)")
    return parser


def load_for_sampling(args):
    """The EMA model of a checkpoint, on args.device, with the label and guidance flags checked."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt).to(args.device).eval()
    if getattr(args, "label", None) is not None and not 0 <= args.label < model.num_classes:
        raise UsageError(f"--label {args.label} is outside 0..{model.num_classes - 1}" if model.num_classes else
                         "--label: this model is unconditional")
    if args.cfg != 1.0 and not model.num_classes:
        raise UsageError("--cfg: guidance needs a class-conditional model, this one is unconditional")
    if not 0 <= args.cfg_rescale <= 1 or args.steps < 1 or args.steps > ckpt["config"]["T"]:
        raise UsageError(f"--cfg-rescale must be in [0, 1] and --steps in 1..{ckpt['config']['T']}")
    return ckpt, model


def main(argv=None):
    """Run one command; a UsageError is one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout.reconfigure(line_buffering=True)                    # progress lines appear as they happen
    parser = build_parser()
    args = parser.parse_args(argv or ["reproduce"])
    if args.command is None:
        parser.error("a command is needed: train, sample, evaluate, reproduce or bench")
    try:
        if args.command == "train":
            cfg = vars(args).copy()
            cfg.pop("command")
            train(cfg)
            if dist.is_initialized():
                dist.barrier()                                     # no rank tears down while another still talks
                dist.destroy_process_group()
        elif args.command == "sample":
            ckpt, model = load_for_sampling(args)
            x, y = generate(model, schedule_from(ckpt["config"]), args.n, args.steps, args.cfg, args.cfg_rescale,
                            args.eta, args.spacing, args.seed, args.batch, args.precision, args.label)
            if args.out:
                save_grid(x, args.out, nrow=max(model.num_classes, 8) if args.label is None else 8)
            if args.npz:
                labels = y.numpy() if y is not None else np.zeros(args.n, np.int64)
                np.savez(args.npz, arr_0=to_uint8(x).permute(0, 2, 3, 1).numpy(), labels=labels)
            print(f"wrote {args.n} samples to {' and '.join(p for p in (args.out, args.npz) if p)}")
        elif args.command == "evaluate":
            ckpt, model = load_for_sampling(args)
            c = ckpt["config"]
            ruler = Ruler(args.features, c["data"], c["data_dir"], c["image_size"], c["data_seed"], args.real_n,
                          torch.device(args.device), cache=os.path.join(os.path.dirname(args.ckpt) or ".", "classifier.pt"),
                          classifier_steps=args.classifier_steps)
            res = evaluate_model(model, schedule_from(c), ruler, args.n, args.steps, args.cfg, args.cfg_rescale,
                                 args.eta, args.spacing, args.seed, args.batch, args.precision)
            res["checkpoint"], res["train_steps"] = args.ckpt, ckpt["step"]
            print(json.dumps(res))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
        elif args.command == "reproduce":
            reproduce(args.preset, args.out, args.device, args.seed, stage1_steps=args.stage1_steps,
                      stage2_steps=args.stage2_steps, eval_n=args.eval_n)
        elif args.command == "bench":
            cfg = vars(args).copy()
            bench(cfg, cfg.pop("iters"))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
