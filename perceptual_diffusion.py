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
  7. command line: train, sample
It needs no other file of this project. The measurement (rulers, intervals, the paper's comparison in one
command, evaluate, bench, gpucheck) is reproduce.py, which imports this file.

Run (the built-in `shapes` data needs no network):
  python perceptual_diffusion.py train --loss mse --out runs/mse   # stage 1
  python perceptual_diffusion.py train --loss self-perceptual --init runs/mse/ckpt.pt --out runs/sp   # stage 2
  python perceptual_diffusion.py sample --ckpt runs/sp/ckpt.pt --n 64 --out grid.png
  python reproduce.py bench                                        # parameters, training and sampling speed
  python reproduce.py                                              # the paper's comparison (3-15 min, 2 CPU cores)
On several GPUs (data parallel; --batch-size is the global batch):
  torchrun --standalone --nproc_per_node=8 perceptual_diffusion.py train --data cifar10 --loss mse ...
"""
import argparse
import copy
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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
        self._tables = {}                                         # (name, device) -> that table on that device

    def _at(self, name, t, x):
        """Table `name` at t, shaped (N, 1, 1, 1) to broadcast against x. Each table is copied to x's device once
        and kept there: a copy per call would be a host-to-device transfer (and a sync) at every use."""
        key = (name, x.device)
        if key not in self._tables:
            self._tables[key] = getattr(self, name).to(x.device)
        return self._tables[key][t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, eps):
        """Forward process: x_t = alpha_t x0 + sigma_t eps."""
        return self._at("alpha", t, x0) * x0 + self._at("sigma", t, x0) * eps

    # -------------------------- 2. v-prediction (Common Diffusion, sec. 3.2) --------------------------
    def v_target(self, x0, eps, t):
        """v = alpha_t eps - sigma_t x0: the training target of v-prediction."""
        return self._at("alpha", t, x0) * eps - self._at("sigma", t, x0) * x0

    def pred_to_x0_eps(self, x_t, v, t):
        """x0_hat = alpha_t x_t - sigma_t v and eps_hat = sigma_t x_t + alpha_t v. Neither divides by
        alpha_t, which is 0 at t = T-1 under zero terminal SNR (eps-prediction is undefined there)."""
        alpha, sigma = self._at("alpha", t, x_t), self._at("sigma", t, x_t)
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v

    def timesteps(self, steps, spacing="trailing"):
        """Descending sampling timesteps (Common Diffusion, Table 2; diffusers' `timestep_spacing`).
        trailing: round(T, T - T/S, ..., T/S) - 1, starts at T-1 where the model sees pure noise (recommended);
        leading:  0, T//S, 2T//S, ... reversed, never reaches T-1;  linspace: round(linspace(0, T-1, S)) reversed.
        A numpy array: the sampler's loop runs on the host, so its timesteps are never device tensors."""
        T = self.T
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if spacing == "trailing":
            # PITFALL: np.arange(T, 0, -T/S) alone (diffusers' formula) keeps an extra value near 0 for 62 step
            # counts (61, 103, ...): S + 1 steps ending at t = -1. Keep its first S values (the others agree with it).
            t = np.round(np.arange(T, 0, -T / steps)[:steps]).astype(np.int64) - 1
        elif spacing == "leading":
            t = (np.arange(0, steps) * (T // steps))[::-1]
        elif spacing == "linspace":
            t = np.linspace(0, T - 1, steps).round()[::-1]
        else:
            raise ValueError(f"unknown spacing {spacing!r}: use trailing, leading or linspace")
        return t.astype(np.int64)                                # host values: the sampler's loop runs on the host


# =================================================================================================
#                         3. The model: a small class-conditional UNet (DDPM style)
# =================================================================================================

def norm(c):
    """GroupNorm with up to 32 groups (DDPM's) of at least 4 channels, the group count a divisor of c."""
    g = max(1, min(32, c // 4))
    while c % g:
        g -= 1
    return nn.GroupNorm(g, c)


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
        qkv = self.qkv(self.norm(x)).reshape(N, 3, self.heads, C // self.heads, H * W)
        # PITFALL: permuting alone leaves the head dimension d with stride H*W; SDPA then silently takes its slow
        # math kernel. Contiguous (N, heads, H*W, d) lets it pick a fused (flash / memory-efficient) one.
        q, k, v = qkv.transpose(3, 4).contiguous().unbind(1)     # each (N, heads, H*W, C/heads), stride 1 last
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
        assert image_size % 2 ** (levels - 1) == 0, f"image size {image_size} cannot be halved {levels - 1} times"
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
        """The down path and the mid block: (skips, mid-block outputs, embedding)."""
        emb = self.time_mlp(timestep_embedding(t, self.channels))  # (N, 4C)
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)                                        # (N, C, H, W)
        skips, mids = [h], []
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)                                      # (N, C_mid, H/2^(L-1), W/2^(L-1))
            mids.append(h)
        return skips, mids, emb

    def features(self, x, t, y, layers="mid"):
        """f*'s features, a list of tensors. "mid" (the paper's): the mid-block output alone. "all" (an ablation):
        the output of every block of the down path and the mid block. Only those run: the up path would be
        wasted work for the perceptual network, and its last layer is v itself (see self_perceptual_loss)."""
        skips, mids, _ = self._down_mid(x, t, y)
        return mids[-1:] if layers == "mid" else skips[1:] + mids

    def forward(self, x, t, y=None):
        """v_hat(x_t, t, y).  # (N, 3, H, W), (N,), (N,) -> (N, 3, H, W)"""
        skips, mids, emb = self._down_mid(x, t, y)
        h = mids[-1]
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


def self_perceptual_loss(model, perceptual_net, schedule, x0, y, t=None, t_prime=None, eps=None,
                         features="mid", t_prime_mode="independent", distance="mse", t_max=None, t_prime_max=None,
                         mse_lambda=None):
    """L_sp, Algorithm 1 of the paper:
      x_t = alpha_t x0 + sigma_t eps;  v_hat = f_theta(x_t, t, y);  x0_hat, eps_hat from v_hat
      t' ~ U{0..T-1}, independent of t
      real:      x_t'     = alpha_t' x0     + sigma_t' eps
      predicted: x_hat_t' = alpha_t' x0_hat + sigma_t' eps_hat      (the *predicted* noise, not the true one)
      L_sp = || f*_mid(x_hat_t', t', y) - f*_mid(x_t', t', y) ||^2      (no v-MSE term is added)
    perceptual_net is a frozen copy of the stage-1 model (see frozen_copy). Its parameters get no gradient,
    but the gradient must flow *through* it into x_hat_t' and so into f_theta: only the real branch may run
    under no_grad. (Wrapping both branches in no_grad trains nothing.)
    Ablations (defaults = the paper's): features="all" averages every block's term, each divided by the real
    features' own size; t_prime_mode="same" (t' = t) is degenerate: x0_hat, eps_hat decompose x_t exactly, so
    x_hat_t = x_t for ANY prediction and the loss is 0; distance="mae". (An EMA f* is train()'s choice.)
    Variants beyond the paper, as others use perceptual losses (None = the paper's): t_max, the term only for the
    samples whose t < t_max (the latent perceptual loss gates it to low noise), the batch mean taken over every
    sample; t_prime_max, t' ~ U{0..t_prime_max-1} (f* sees nearly clean images); mse_lambda, the v-MSE term kept:
    L = L_mse + lambda L_sp, both from the same v_hat."""
    t, eps = draw_t_eps(schedule, x0, t, eps)
    x_t = schedule.q_sample(x0, t, eps)
    v_hat = model(x_t, t, y).float()
    x0_hat, eps_hat = schedule.pred_to_x0_eps(x_t, v_hat, t)
    if t_prime is None:
        t_prime = t if t_prime_mode == "same" else torch.randint(0, t_prime_max or schedule.T, t.shape,
                                                                 device=x0.device)
    with torch.no_grad():
        real = perceptual_net.features(schedule.q_sample(x0, t_prime, eps), t_prime, y, features)
    pred = perceptual_net.features(schedule.q_sample(x0_hat, t_prime, eps_hat), t_prime, y, features)
    dist = {"mse": F.mse_loss, "mae": F.l1_loss}[distance]
    if t_max is None:
        terms = [dist(p.float(), r.float()) for p, r in zip(pred, real)]
    else:                                    # per-sample means, the samples with t >= t_max counted as 0
        terms = [(dist(p.float(), r.float(), reduction="none").flatten(1).mean(1) * (t < t_max)).mean()
                 for p, r in zip(pred, real)]
    if features == "all":
        terms = [d / dist(r.float(), torch.zeros_like(r, dtype=torch.float)).clamp(min=1e-12)
                 for d, r in zip(terms, real)]
    loss = sum(terms) / len(terms)
    return loss if mse_lambda is None else F.mse_loss(v_hat, schedule.v_target(x0, eps, t)) + mse_lambda * loss


LOSSES = {"mse": mse_loss, "self-perceptual": self_perceptual_loss}


def objective(loss, model, perceptual_net, schedule, **options):
    """(x0, y) -> the named objective's loss; only self-perceptual takes the perceptual network (and the
    keyword arguments of its ablations and variants)."""
    loss_fn = LOSSES[loss]
    if loss == "self-perceptual":
        return lambda x0, y: loss_fn(model, perceptual_net, schedule, x0, y, **options)
    return lambda x0, y: loss_fn(model, schedule, x0, y)


# =================================================================================================
#             5. DDIM sampling with classifier-free guidance and its rescale (Common Diffusion)
# =================================================================================================

def guided_v(model_fn, x, t, y, cfg_scale, cfg_rescale, guide=None):
    """v for one sampling step. Classifier-free guidance: v_cfg = v_uncond + w (v_cond - v_uncond), both
    halves in one batched forward of 2N. Rescale (Common Diffusion, sec. 3.4):
    v_resc = v_cfg * std(v_cond) / std(v_cfg) per sample, then phi v_resc + (1 - phi) v_cfg. w = 1 costs a
    single forward of N. With a `guide` (autoguidance, Karras et al. 2024): the same formula with the guide's
    v in place of v_uncond, D_w = D_guide + w (D_main - D_guide), taken on v (linear in D at fixed x_t), with
    the same label y (None or the null label: unconditional); N forwards of each network."""
    if cfg_scale == 1.0:
        return model_fn(x, t, y).float()
    if guide is not None:
        v_cond, v_uncond = model_fn(x, t, y).float(), guide(x, t, y).float()
    else:
        null = torch.full_like(y, model_fn.num_classes)
        v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    v_cfg = v_uncond + cfg_scale * (v_cond - v_uncond)
    if cfg_rescale > 0:
        dims = list(range(1, x.dim()))
        v_resc = v_cfg * v_cond.std(dims, keepdim=True) / v_cfg.std(dims, keepdim=True)
        v_cfg = cfg_rescale * v_resc + (1 - cfg_rescale) * v_cfg
    return v_cfg


def edm_sigma(alpha_bar_t):
    """The noise level of Karras et al. (EDM), sigma_t / alpha_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the
    variable in which guidance intervals are defined. Under zero terminal SNR it is infinite at t = T-1."""
    return math.inf if alpha_bar_t == 0 else ((1 - alpha_bar_t) / alpha_bar_t) ** 0.5


@torch.no_grad()
def sample(model_fn, schedule, shape, y=None, steps=50, cfg_scale=1.0, cfg_rescale=0.0, eta=0.0,
           spacing="trailing", generator=None, noise=None, cfg_interval=(0.0, math.inf), guide=None):
    """DDIM (Song et al. 2021) with v-prediction. model_fn(x, t, y) -> v is any callable with a `num_classes`
    attribute. x_T = `noise` (drawn from `generator` on the CPU when None, so results do not depend on the
    device). eta = 0 is deterministic DDIM, eta = 1 the DDPM-like ancestral sampler. The step after the last
    timestep goes to "t = -1" where alpha_bar = 1, so the sampler lands on x0_hat. Guidance applies only where
    edm_sigma(t) is in cfg_interval = (lo, hi] (Kynkaenniemi et al. 2024); elsewhere a step is one forward of N.
    The default (0, inf] guides every step, the first (t = T-1, sigma = inf) included. `guide`: autoguidance."""
    if y is None and cfg_scale != 1.0 and guide is None:
        raise ValueError("classifier-free guidance needs labels y")
    params = getattr(model_fn, "parameters", None)
    device = y.device if y is not None else next(params()).device if params else torch.device("cpu")
    x = (torch.randn(shape, generator=generator) if noise is None else noise).to(device)  # x_T: (N, C, H, W)
    ts = schedule.timesteps(steps, spacing).tolist()
    alpha_bar = schedule.alpha_bar.tolist()
    lo, hi = cfg_interval
    for i, t in enumerate(ts):
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        w = cfg_scale if lo < edm_sigma(ab_t) <= hi else 1.0
        v = guided_v(model_fn, x, t_batch, y, w, cfg_rescale, guide=guide)
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

class UsageError(Exception):
    """A problem with what the user typed or pointed at: printed as one line, exit code 2."""


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
    """The built-in data set: 10 classes of coloured shapes (SHAPE_NAMES), random position and size, on a random
    two-colour gradient, bright on dark or dark on light, from `seed`; masks rendered at 2x and averaged down
    (anti-aliased); continuous parameters, so no small model memorises it. -> uint8 (n, 3, H, W), int64 (n,)"""
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
        noise = 0.02 * torch.randn(m, 3, image_size, image_size, generator=g)
        img = bg * (1 - mask) + fg[:, :, None, None] * mask + noise
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images), labels


SHAPES_TRAIN, SHAPES_TEST = 20000, 5000


def load_dataset(name, data_dir="data", image_size=32, train=True, seed=0):
    """Returns (images uint8 (N, 3, H, W), labels int64 (N,), class names, whether h-flips are allowed).
    `shapes`: built in; the test split is drawn from another seed. `cifar10`: torchvision, downloaded to
    data_dir. Anything else: a folder of images in class subfolders (torchvision's ImageFolder), resized and
    centre-cropped, split by heldout_split: train=False returns the held-out share, train=True the rest."""
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
    check_data(name)
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    try:
        ds = torchvision.datasets.ImageFolder(name, transform=tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(f"cannot read images from {name!r}: {str(e).splitlines()[0]}")
    y = torch.tensor(ds.targets)
    if len(ds.classes) < 2:
        raise UsageError(f"--data {name!r} has {len(ds.classes)} class folder(s); the comparison needs at least 2")
    keep = heldout_split(y, seed) != train                     # the held-out share, or (train) all the rest
    return x[keep], y[keep], list(ds.classes), True


def check_data(name):
    """--data names the built-in shapes, CIFAR-10, or an existing folder: UsageError otherwise."""
    if name not in ("shapes", "cifar10") and not os.path.isdir(name):
        raise UsageError(f"--data {name!r} is neither 'shapes', 'cifar10' nor an existing folder")


FOLDER_HELDOUT = 0.1    # the share of each class of a folder data set held out for the rulers' real statistics


def heldout_split(y, seed):
    """A fixed, seeded, class-stratified held-out split of a folder data set: FOLDER_HELDOUT of each class (at least
    one image of a class with two or more), so that the rulers never measure against training images. (N,) bool."""
    g, held = torch.Generator().manual_seed(seed), torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        k = max(1, round(FOLDER_HELDOUT * len(idx))) if len(idx) > 1 else 0
        held[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return held


def to_model_range(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# =================================================================================================
#            6b. Checkpoints and outputs: atomic writes, safe loads, paths checked before work
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


def matches_sha256(path):
    """Whether the file's sha256 is the one written in PATH.sha256 beside it (as `sha256sum -c` reads it)."""
    with open(path, "rb") as f, open(path + ".sha256") as h:
        return hashlib.sha256(f.read()).hexdigest() == h.read().split()[0]


def load_checkpoint(path):
    """Load with weights_only=True (a checkpoint never runs code); any failure is one clear line. A checkpoint
    with a PATH.sha256 beside it (the shipped models: `sha256sum -c` reads it too) must match that hash. Weights
    stored in fp16 load into fp32 models as they are (load_state_dict casts)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(path + ".sha256") and not matches_sha256(path):
        raise UsageError(f"{path!r} does not match its sha256 in {path}.sha256: the file was changed or damaged; "
                         "restore it (git checkout) or regenerate it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path!r} (truncated, corrupt or not a safe torch file): "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CKPT_KIND or not {"config", "ema"} <= ckpt.keys():
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
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise UsageError(f"the checkpoint's config is incomplete or malformed ({type(e).__name__}: {e})")
    load_weights(model, ckpt[weights], f"the checkpoint's {weights} weights")
    return model


def writable_dir(path, flag):
    """Create folder `path` if needed and check that it can be written, before any work: UsageError otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:                                           # a file in the way, no permission, ...
        raise UsageError(f"{flag} {path!r}: cannot create this folder ({e.strerror or e})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: this folder is not writable")
    return path


def writable_file(path, flag, extensions=None):
    """Check, before any work, that `path` can be written: a known extension (None: the image formats PIL can
    write, such as .png and .jpg), an existing writable folder, not itself a folder. UsageError otherwise."""
    if extensions is None:
        from PIL import Image
        Image.init()
        extensions = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    folder = os.path.dirname(path) or "."
    if os.path.splitext(path)[1].lower() not in extensions:
        shown = ", ".join(extensions) if len(extensions) < 6 else ".bmp, .jpg, .png, ..."
        raise UsageError(f"{flag} {path!r}: the file name must end in {shown}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path!r}: {folder!r} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: the folder {folder!r} is not writable")
    return path


# =================================================================================================
#                     6c. Training: one plain function; DDP when launched by torchrun
# =================================================================================================

# Valid ranges, declared once beside each flag as its argparse `type` (a bad value is one line naming the flag, the
# value and the range; exit code 2). The rules that tie flags together are check_flags, at the command line's door.
def ranged(kind, ok, what):
    """A parser of `kind` (int or float) whose values must satisfy ok(v); `what` names the range in messages."""
    def parse(text):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if isinstance(v, float) and not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    parse.what, parse.kind = what, kind
    return parse


POS_INT = ranged(int, lambda v: v > 0, "a positive integer")
NONNEG_INT = ranged(int, lambda v: v >= 0, "a non-negative integer")
ANY_INT = ranged(int, lambda v: True, "an integer")
POS_FLOAT = ranged(float, lambda v: v > 0, "a positive number")
NONNEG_FLOAT = ranged(float, lambda v: v >= 0, "a non-negative number")
PROB = ranged(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
UNIT = ranged(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
FRACTION = ranged(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def SP_LAMBDA(text):
    """'' (no MSE term), 'auto', or a positive number; returned as canonical text ('0.50' and 0.5 give '0.5'), so
    that a config given in Python and the printed command that reruns it compare equal."""
    try:
        return text if text in ("", "auto") else str(POS_FLOAT(str(text)))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be '', auto or a positive number, got {text!r}")


def best_device():
    """cuda if this machine has it, then mps (Apple silicon's GPU), then cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def DEVICE(text):
    """A torch device this machine has: auto (best_device), cpu, cuda, cuda:1, mps."""
    text = best_device() if text == "auto" else text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be auto or a torch device such as cpu, cuda or mps, got {text!r}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or mps, got {text!r}")
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[dev.type]:
        raise argparse.ArgumentTypeError(f"{dev.type.upper()} is not available on this machine (torch "
                                         f"{torch.__version__}), got {text!r}")
    return text


def INT_LIST(text):
    """'1,2,2' (or '' for none): positive integers, comma-separated; returned as the text."""
    try:
        ok = all(v > 0 for v in int_list(text))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, such as 1,2,2, got {text!r}")
    return text

# Every hyperparameter of `train`: name, default, valid values (a parser above, a tuple of choices, or None for
# free text and switches), one line of help. The command line is built from this table, and a checkpoint stores
# the whole config. The model defaults are UNet's (a test holds them equal), so UNet() is the default model.
TRAIN_ARGS = [
    # data
    ("data", "shapes", None, "data set: shapes (built in, no network), cifar10 (downloads), or a folder of class "
     "subfolders"),
    ("data_dir", "data", None, "where cifar10 is downloaded to / read from"),
    ("image_size", 32, POS_INT, "image side in pixels"),
    ("no_flip", False, None, "no random horizontal flips (for data that must not be mirrored, such as digits)"),
    ("unconditional", False, None, "ignore the labels: an unconditional model (guidance is then impossible)"),
    # model
    ("channels", 32, POS_INT, "UNet base channels"),
    ("channel_mult", "1,2,2", INT_LIST, "channel multiplier per resolution level, comma-separated"),
    ("num_res_blocks", 1, POS_INT, "residual blocks per level"),
    ("attn_res", "8", INT_LIST, "resolutions (pixels) with self-attention, comma-separated"),
    ("dropout", 0.0, PROB, "dropout in the residual blocks"),
    # diffusion
    ("T", 1000, POS_INT, "training timesteps"),
    ("betas", "scaled_linear", ("scaled_linear", "linear", "cosine"), "beta schedule (scaled_linear is the paper's); "
     "always rescaled to zero terminal SNR"),
    # objective and optimisation
    ("loss", "mse", tuple(LOSSES), "objective: mse (stage 1) or self-perceptual (stage 2, needs --init)"),
    ("init", "", None, "stage-1 checkpoint: the online model starts from its EMA weights, f* is a frozen copy of them"),
    ("resume", "", None, "a run folder to continue from its ckpt.pt (model, EMA, optimizer, step, data order)"),
    # the paper's ablations of the self-perceptual objective; each default is the paper's choice
    ("sp_features", "mid", ("mid", "all"), "f* features compared: mid (the mid block) or all (every down and mid "
     "block, each normalised)"),
    ("sp_t_prime", "independent", ("independent", "same"), "t' drawn independently of t, or t' = t (degenerate)"),
    ("sp_distance", "mse", ("mse", "mae"), "distance between the feature maps"),
    ("perceptual_net", "frozen", ("frozen", "ema"), "f*: a frozen copy of stage 1, or the online model's EMA"),
    # variants beyond the paper, as others use perceptual losses; each default is the paper's choice
    ("sp_t_max", 1.0, FRACTION, "the self-perceptual term only at training steps t < FRAC T (1: every t)"),
    ("sp_t_prime_max", 1.0, FRACTION, "t' drawn from 0..FRAC T - 1 (1: uniform over every t)"),
    ("sp_with_mse", "", SP_LAMBDA, "keep the v-MSE term: L = L_mse + LAMBDA L_sp, LAMBDA a number or auto (equal "
     "mean gradient norms of the two terms over the first 8 batches, computed once; stored as sp_lambda_value); '': "
     "no MSE term"),
    ("steps", 1000, POS_INT, "total training steps"),
    ("batch_size", 64, POS_INT, "global batch size (split over DDP ranks)"),
    ("lr", 1e-3, POS_FLOAT, "AdamW learning rate after warm-up"),
    ("warmup", 100, NONNEG_INT, "linear learning-rate warm-up steps"),
    ("cooldown", 0.0, UNIT, "fraction of the steps at the end over which the rate decays to --final-lr as 1 - sqrt "
     "(Hagele et al. 2024); 0 = constant after warm-up, as in DDPM and DiT"),
    ("final_lr", 0.0, NONNEG_FLOAT, "the learning rate at the last step of a cool-down"),
    ("guide_at", 0, NONNEG_INT, "also save the EMA weights at this step as guide.pt, a weaker model for autoguidance "
     "(0: none)"),
    ("weight_decay", 0.0, NONNEG_FLOAT, "AdamW weight decay"),
    ("grad_clip", 1.0, POS_FLOAT, "clip the global gradient norm to this"),
    ("ema_decay", 0.999, PROB, "EMA decay of the weights (short runs need lower; warmed up as min(decay, "
     "(1+s)/(10+s)))"),
    ("label_dropout", 0.1, PROB, "probability of replacing the label by the null label (enables classifier-free "
     "guidance)"),
    # bookkeeping
    ("out", "runs/run", None, "run folder: ckpt.pt, sample grids, config.json"),
    ("seed", 0, ANY_INT, "random seed (data order, noise, timesteps); the data set itself uses --data-seed"),
    ("data_seed", 0, ANY_INT, "seed of the built-in shapes data set"),
    ("device", best_device(), DEVICE, "device: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps "
     "(default: auto)"),
    ("precision", "auto", ("auto", "bf16", "fp32"), "bf16 or fp32 autocast; auto = bf16 on CUDA with bf16 support, "
     "fp32 elsewhere"),
    ("compile", False, None, "wrap the model in torch.compile"),
    ("log_every", 50, POS_INT, "print a log line every N steps"),
    ("sample_every", 500, NONNEG_INT, "write a sample grid every N steps (0: never)"),
    ("ckpt_every", 500, POS_INT, "write the checkpoint every N steps (and always at the end)"),
]
TRAIN_DEFAULTS = {name: default for name, default, _, _ in TRAIN_ARGS}
ARCH_KEYS = ["image_size", "channels", "channel_mult", "num_res_blocks", "attn_res", "num_classes"]
RESUMABLE_KEYS = {"steps", "log_every", "sample_every", "ckpt_every", "device", "precision", "compile", "resume"}  # a
# longer --steps moves a cool-down's start: resume a cooled-down run only to the steps it was configured with


def sp_options(cfg):
    """The keyword arguments of self_perceptual_loss that a config's ablation and variant flags give."""
    bound = lambda frac: max(1, round(frac * cfg["T"])) if frac < 1 else None
    return dict(features=cfg["sp_features"], t_prime_mode=cfg["sp_t_prime"], distance=cfg["sp_distance"],
                t_max=bound(cfg["sp_t_max"]), t_prime_max=bound(cfg["sp_t_prime_max"]),
                mse_lambda=cfg.get("sp_lambda_value"))


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


def native_bf16(device):
    """Whether `device` computes bf16 natively: CUDA of compute capability 8.0 or more (A100, H100, RTX 30xx on),
    read from the run's own device. (PITFALL: torch.cuda.is_bf16_supported() counts emulated bf16, as on V100 and
    T4, in newer torch, and looks at the current device, not necessarily the run's.) TF32 exists on the same GPUs."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(device, precision):
    """auto -> bf16 where the device has native bf16 (native_bf16), fp32 elsewhere (on a CPU without native bf16,
    bf16 is ~15x slower; on Apple's mps, fp32)."""
    return ("bf16" if native_bf16(device) else "fp32") if precision == "auto" else precision


def autocast(device, precision):
    """bf16 autocast where asked (see resolve_precision), else a no-op."""
    bf16 = resolve_precision(device, precision) == "bf16"
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()


def distributed():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    env = os.environ
    return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))) if "RANK" in env else (0, 1, 0)


def check_flags(cfg):
    """The rules that tie flags together (each flag's own range is its argparse type): a config that breaks one is
    refused in one line, exit code 2 (UsageError), before any work. train's command line checks here, and so do the
    experiment's presets; train() itself asserts only what it relies on."""
    levels = len(int_list(cfg["channel_mult"]))
    if cfg["loss"] == "self-perceptual" and not cfg["init"] and not cfg["resume"]:
        raise UsageError("--loss self-perceptual needs --init STAGE1_RUN/ckpt.pt (a model trained with --loss mse)")
    if not levels:
        raise UsageError("--channel-mult needs at least one level, such as 1,2,2")
    if cfg["image_size"] % 2 ** (levels - 1):
        raise UsageError(f"--image-size {cfg['image_size']} cannot be halved {levels - 1} times down to the UNet's "
                         f"deepest level (--channel-mult has {levels} levels): use a multiple of {2 ** (levels - 1)}")
    if cfg["cooldown"] and cfg["final_lr"] > cfg["lr"]:
        raise UsageError(f"--final-lr {cfg['final_lr']:g} is above --lr {cfg['lr']:g}: a cool-down lowers the rate")
    if cfg["precision"] == "bf16" and torch.device(cfg["device"]).type == "mps":
        raise UsageError("--precision bf16 is not supported on mps here: use fp32 (or auto)")
    if cfg["guide_at"] > cfg["steps"]:
        raise UsageError(f"--guide-at {cfg['guide_at']} is past the last step ({cfg['steps']}): no guide would be "
                         "saved")
    check_data(cfg["data"])


def check_same_arch(cfg, ckpt, path):
    """A checkpoint used with --init must describe the model this run builds, on the same noise schedule (f* was
    trained on stage 1's schedule: its features at t' mean nothing on another)."""
    for key in ARCH_KEYS + ["T", "betas"]:
        if str(ckpt["config"].get(key)) != str(cfg[key]):
            raise UsageError(f"checkpoint {path!r} has {key}={ckpt['config'].get(key)} but this run asks for "
                             f"{key}={cfg[key]}: pass the same model and schedule flags as stage 1")


def weights_hash(state):
    """The identity of a set of weights: sha256 over the names and bytes of a state dict, 16 hex digits. Weights
    are hashed as the fp32 model holds them, so fp16 weights on disk and the model loaded from them agree."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu()
        h.update(k.encode() + (v.float() if v.is_floating_point() else v).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def origin_of(init):
    """What a stage 2 starts from: its (loaded) --init checkpoint's total training steps and the hash of its EMA."""
    return {"init_steps": init.get("total_steps", init["step"]), "init_hash": weights_hash(init["ema"])}


class Batches:
    """Deterministic batches: the DistributedSampler's shuffled order (seed, epoch) split over ranks, so
    batch `step` is a function of (seed, step, rank) alone and a resumed run reads the same data. The order of an
    epoch is made once, on `device` (where the images are), so that a step copies nothing from the host."""

    def __init__(self, n, batch_per_rank, rank, world, seed, device="cpu"):
        from torch.utils.data import DistributedSampler
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.b, self.device = batch_per_rank, device
        self.per_epoch = len(self.sampler) // batch_per_rank
        if self.per_epoch == 0:
            raise UsageError(f"the data set ({n} images) is smaller than one batch per rank ({batch_per_rank})")
        self.epoch, self.order = None, None

    def indices(self, step):
        """This rank's image indices for training step `step`."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            self.epoch, self.order = epoch, torch.tensor(list(self.sampler), device=self.device)
        return self.order[i * self.b:(i + 1) * self.b]


def save_grid(x, path, nrow):
    """Save images in [-1, 1] as one PNG grid."""
    from torchvision.utils import save_image
    save_image((x.float().cpu() + 1) / 2, path, nrow=nrow, padding=1)


def save_samples(x, y, out, npz, nrow):
    """The grid `out` and/or the .npz `npz` (uint8 NHWC arr_0 and labels, as FID tools read). A write that fails
    after sampling (disk full, folder removed) keeps the samples as an .npz in the temporary folder and says where."""
    arrays = dict(arr_0=to_uint8(x).permute(0, 2, 3, 1).numpy(), labels=np.zeros(len(x), np.int64) if y is None
                  else y.numpy())
    try:
        if out:
            save_grid(x, out, nrow)
        if npz:
            np.savez(npz, **arrays)
    except OSError as e:
        import tempfile
        keep = os.path.join(tempfile.gettempdir(), f"perceptual_diffusion_samples_{os.getpid()}.npz")
        np.savez(keep, **arrays)
        raise OSError(f"could not write {e.filename or out or npz} ({e.strerror or e}); the samples are kept in {keep}")


def learning_rate(cfg, step):
    """The rate of step `step` (0-based), a function of the step alone so a resume continues it: linear warm-up,
    constant, then over the last `cooldown` fraction a 1 - sqrt decay to final_lr at the last step. (Without a
    cool-down any later run at a lower rate gains from the drop alone, credited to whatever that run changed.)"""
    lr = cfg["lr"] * min(1.0, (step + 1) / max(cfg["warmup"], 1))
    n_cool = round(cfg["cooldown"] * cfg["steps"])
    start = cfg["steps"] - n_cool
    if n_cool and step >= start:
        lr = cfg["final_lr"] + (lr - cfg["final_lr"]) * (1 - ((step + 1 - start) / n_cool) ** 0.5)
    return lr


LAMBDA_BATCHES = 8           # --sp-with-mse auto: gradient norms averaged over the run's first 8 batches
METRICS = "metrics.jsonl"    # every run folder: one JSON line per log step (step, loss, lr, img_s, grad_norm, seconds)
STOP_EVERY = 10              # under DDP the ranks agree on a stop signal every this many steps (one host sync)
DATA_TIMEOUT = datetime.timedelta(minutes=60)   # the process group's timeout: it covers rank 0's download of the data


def continued_run(cfg, ckpt, out, init):
    """Whether train into `out`, which holds checkpoint `ckpt`, may continue it: with --resume, when no flag given
    changes the run; without, when it IS this run (every setting but those RESUMABLE_KEYS lists, and for a stage 2
    its origin: the --init weights' step and hash). Anything else is refused in one line: train never starts over
    on top of a checkpoint. (Every rank reads `out`: under torchrun on several nodes it is on a shared filesystem.)"""
    if not {"model", "optimizer", "step"} <= ckpt.keys():
        raise UsageError(f"{out}/ckpt.pt has no optimizer state or step: it cannot be continued; give a new --out")
    saved = {**TRAIN_DEFAULTS, **ckpt["config"]}                   # older runs lack newer keys
    saved["sp_with_mse"] = SP_LAMBDA(saved["sp_with_mse"])         # as train stores it now ('1' -> '1.0')
    if cfg["resume"]:
        changed = sorted(k for k, v in cfg.items() if k not in RESUMABLE_KEYS | {"out"} and v != TRAIN_DEFAULTS[k]
                         and v != saved.get(k))
        if changed:
            raise UsageError(f"--resume continues the run as it was configured; cannot change {', '.join(changed)}")
    else:
        changed = sorted(k for k in TRAIN_DEFAULTS if k not in RESUMABLE_KEYS | {"out", "init"} and cfg[k] != saved[k])
        if (origin_of(init) if init is not None else None) != ckpt.get("origin"):
            changed.append("the --init weights")
        if changed:
            raise UsageError(f"--out {out} holds a run of another configuration ({', '.join(changed)} differ): "
                             f"continue that one with --resume {out}, or give a new --out")
    if saved["cooldown"] and cfg["steps"] != saved["steps"]:
        raise UsageError(f"{out} cools its rate down; it continues only to the {saved['steps']} steps it was "
                         f"configured with (--steps {saved['steps']})")
    if ckpt["step"] > cfg["steps"]:
        raise UsageError(f"{out} holds {ckpt['step']} steps, more than --steps {cfg['steps']}: give a new --out")
    return {**saved, **{k: cfg[k] for k in RESUMABLE_KEYS}, "out": out}


def metrics_log(out, step):
    """The run's metrics log, open for appending, with every line past `step` (the checkpoint the run continues
    from) dropped, so that after a kill the log and the checkpoint agree again; a new run starts it empty."""
    path, kept = os.path.join(out, METRICS), []
    if step and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] > step:
                        break
                except (ValueError, KeyError):                       # a line cut short by the kill
                    break
                kept.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def agreed(world, fn, view=None, differ=""):
    """fn() on this rank, and under DDP a UsageError on any rank raised on every rank alike (none waits forever for
    another). view(result): what each rank read, by content; the ranks must agree on it (they read one --init and
    --out, on a filesystem that every node shares), else UsageError(differ)."""
    try:
        result, error = fn(), None
    except UsageError as e:
        result, error = None, str(e)
    if world > 1:
        views = [None] * world
        dist.all_gather_object(views, error or (view(result) if view else None))
        error = error or next((v for v in views if isinstance(v, str)), None)
        if not error and len(set(views)) > 1:
            error = differ
    if error:
        raise UsageError(error)
    return result


def start_state(cfg, out, world):
    """Where the run starts: fresh, from a stage-1 checkpoint (--init), or continued (--resume, or the same run's
    --out: see continued_run). A bad path fails here, before any work, on every rank alike. -> (cfg, init, ckpt)"""
    def read():
        try:
            init = load_checkpoint(cfg["init"]) if cfg["init"] and not cfg["resume"] else None
            path = os.path.join(out, "ckpt.pt")
            ckpt = load_checkpoint(path) if cfg["resume"] or os.path.isfile(path) else None
            seen = world > 1 and (init and origin_of(init)["init_hash"], ckpt and (ckpt["step"],
                                                                                   weights_hash(ckpt["ema"])))
            return (cfg if ckpt is None else continued_run(cfg, ckpt, out, init)), init, ckpt, seen
        except (OSError, KeyError, IndexError, ValueError) as e:     # what each rank read, by content, inside
            raise UsageError(f"cannot read --init or --out {out}: {type(e).__name__}: {e}")
    return agreed(world, read, lambda r: r[3], f"the ranks see different files in --init or --out {out}: put them "
                  "on a filesystem that every node shares")[:3]


def balanced_lambda(model, perceptual_net, schedule, batches, world=1, **options):
    """The stated rule of --sp-with-mse auto: lambda = mean |grad L_mse| / mean |grad L_sp| over the weights, each
    term's gradient taken on the same batch and (t, eps), over the given (x0, y) batches (one draw of t is noisy:
    the two terms start with gradients of equal norm on average). Under DDP each gradient is first averaged over
    the ranks, so that its norm is the whole batch's. Returns (lambda, [the ratio on each batch])."""
    params = [p for p in model.parameters() if p.requires_grad]

    def norm(loss):
        g = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in
                       zip(torch.autograd.grad(loss, params, allow_unused=True), params)])
        if world > 1:
            dist.all_reduce(g)
            g /= world
        return g.norm()
    norms = []
    for x0, y in batches:
        t, eps = draw_t_eps(schedule, x0)
        sp = self_perceptual_loss(model, perceptual_net, schedule, x0, y, t=t, eps=eps,
                                  **{**options, "mse_lambda": None})
        norms.append(torch.stack([norm(mse_loss(model, schedule, x0, y, t, eps)), norm(sp)]))
    norms = torch.stack(norms).double()                           # (batches, 2); one host read, once per run
    ratios = [r if math.isfinite(r) else None for r in (norms[:, 0] / norms[:, 1]).tolist()]   # None: no L_sp grad
    return (norms[:, 0].mean() / norms[:, 1].mean()).item(), ratios


def set_mse_lambda(cfg, model, perceptual_net, schedule, images, labels, batches, world, rank):
    """--sp-with-mse's lambda, computed once per run and stored in the config (sp_lambda_value): the number given, or
    auto: balanced_lambda over the run's first LAMBDA_BATCHES batches (no flips or label dropout), its spread over
    those batches recorded beside it (sp_lambda_ratios)."""
    lam = cfg["sp_with_mse"]
    if lam == "auto":
        torch.manual_seed(cfg["seed"] * 4096 + rank)
        device = next(model.parameters()).device
        first = [(to_model_range(images[i]).to(device), labels[i].to(device))
                 for i in map(batches.indices, range(LAMBDA_BATCHES))]
        lam, ratios = balanced_lambda(model, perceptual_net, schedule, first, world, **sp_options(cfg))
        if not 0 < lam < math.inf:
            raise UsageError(f"--sp-with-mse auto: the self-perceptual term has no gradient on the first batches "
                             f"(lambda {lam}): give LAMBDA as a number")
        cfg["sp_lambda_ratios"] = ratios                           # its spread over the batches, recorded beside it
    cfg["sp_lambda_value"] = float(lam)


NEVER = 2 ** 62              # the first non-finite step's value while there is none


def read_sums(loss_sum, gnorm_sum, first_bad, stop_asked, world, out):
    """The training loop's one host sync, at log, checkpoint and stop-poll steps alone (the other steps never wait for
    the GPU): the loss and gradient-norm sums kept on the device since the last log line, the first step whose loss
    or gradient was not finite, and every rank's stop flag, reduced over the ranks so that every rank sees the same.
    A step that was not finite stops the run, before any checkpoint has its weights. -> (loss sum, norm sum, stop)"""
    sums = torch.stack([loss_sum, gnorm_sum, torch.full((), float(stop_asked), device=loss_sum.device)])
    bad = first_bad.clone()
    if world > 1:
        dist.all_reduce(sums)                                      # every rank sees the same loss and stop flag
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        sums[:2] /= world
    loss_total, gnorm_total, stopping, bad = torch.cat([sums.double(), bad.double()[None]]).tolist()
    if bad != NEVER:
        last = os.path.join(out, "ckpt.pt")
        good = f"; the last good one is {last}" if os.path.exists(last) else ""
        raise FloatingPointError(f"loss or gradient not finite at step {bad:.0f} (counting from 0); stopped without "
                                 f"writing a checkpoint{good}")
    return loss_total, gnorm_total, stopping > 0


def join_ranks(cfg):
    """(rank, world size, device) of this process. Under torchrun each rank takes its own GPU (LOCAL_RANK) and joins
    the process group, whose timeout covers rank 0's download of the data (DATA_TIMEOUT)."""
    rank, world, local_rank = distributed()
    device = torch.device(cfg["device"])
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if cfg["batch_size"] % world:
        raise UsageError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} ranks")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DATA_TIMEOUT)
    return rank, world, device


def finished_run(ckpt, out, device, log):
    """A run whose checkpoint is at its last step, reused as it is: nothing is trained or written."""
    log(f"reusing the finished run in {out} ({ckpt['step']} steps): left as it is")
    ema = model_from_checkpoint(ckpt).to(device).eval()
    return ema, {"steps": ckpt["step"], "total_steps": ckpt.get("total_steps", ckpt["step"]), "reused": True,
                 "train_seconds": ckpt.get("train_seconds", 0.0), "params": sum(p.numel() for p in ema.parameters()),
                 "config": ckpt["config"], "model": None, "origin": ckpt.get("origin"), "stopped": False}


def build_models(cfg, init, ckpt, device):
    """The online model (random, from --init's EMA weights, or resumed), its EMA, f* and the optimizer."""
    torch.manual_seed(cfg["seed"])                                 # the same initial weights on every rank
    model = UNet(**model_kwargs(cfg)).to(device)
    if ckpt is not None:
        load_weights(model, ckpt["model"], "the resumed checkpoint")
    elif init is not None:
        check_same_arch(cfg, init, cfg["init"])
        load_weights(model, init["ema"], f"--init {cfg['init']}")
    ema, perceptual_net = frozen_copy(model), None
    if cfg["loss"] == "self-perceptual":  # f*: a frozen copy of the stage-1 EMA weights, or (the ablation) the EMA
        perceptual_net = frozen_copy(model) if cfg["perceptual_net"] == "frozen" else ema
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if ckpt is not None:
        load_weights(ema, ckpt["ema"], "the resumed EMA")
        load_weights(opt, ckpt["optimizer"], "the resumed optimizer state")
        if perceptual_net not in (None, ema):
            load_weights(perceptual_net, ckpt.get("perceptual"), "the resumed perceptual network")
    return model, ema, perceptual_net, opt


def log_line(metrics, rec, steps, left, log):
    """A log step: its record appended to the metrics log (flushed: a kill loses none of it) and its line printed."""
    metrics.write(json.dumps(rec) + "\n")
    metrics.flush()
    log(f"step {rec['step']}/{steps} | loss {rec['loss']:.4f} | {rec['img_s']:.1f} img/s | lr {rec['lr']:.2e} | "
        f"grad norm {rec['grad_norm']:.3f} | {left / 60:.1f} min left")


def start_log(out, cfg, step, resumed, n_images, setup, log):
    """Rank 0's start of a run: its config.json, its metrics log (metrics_log, returned) and its first lines."""
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    metrics = metrics_log(out, step)
    if resumed:
        log(f"resumed from {os.path.join(out, 'ckpt.pt')} at step {step}")
    held = f"; {FOLDER_HELDOUT:.0%} of each class held out for the rulers"
    held = "" if cfg["data"] in ("shapes", "cifar10") else held
    log(f"{cfg['loss']} on {cfg['data']} ({n_images} images{held}, {cfg['num_classes']} classes), {setup}, "
        f"steps {step}->{cfg['steps']}")
    return metrics


@contextmanager
def training_context(device, stop, metrics):
    """While training: SIGINT / SIGTERM set stop["signal"] (the loop finishes the current step, writes the checkpoint
    and exits cleanly), and TF32 is on where the device has native bf16; both are restored when training ends
    (evaluation is fp32), and the metrics log is closed."""
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if native_bf16(device):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if metrics is not None:
            metrics.close()


def training_batch(cfg, images, labels, idx, flip, device):
    """The images idx in [-1, 1] (B, 3, H, W), h-flipped at random where `flip`, and their labels (B,) with label
    dropout: the same network learns v_uncond through the null label. This is what makes classifier-free guidance
    possible at sampling time."""
    x0, y = to_model_range(images[idx]).to(device), labels[idx].to(device)
    if flip:
        x0 = torch.where((torch.rand(len(idx), device=device) < 0.5)[:, None, None, None], x0.flip(3), x0)
    if cfg["num_classes"]:
        y = torch.where(torch.rand(len(idx), device=device) < cfg["label_dropout"], cfg["num_classes"], y)
    return x0, y


def train(cfg, log=print):
    """Train with cfg["loss"] (see TRAIN_ARGS) and return (ema_model, stats). Launched by torchrun, it runs
    data-parallel: every rank computes its share of the global batch, DDP averages the gradients, so every
    rank holds the same weights after each step; rank 0 alone logs, samples and writes checkpoints. An --out that
    holds a checkpoint is continued (or, finished, left as it is) when it is the same run, else refused."""
    cfg = {**TRAIN_DEFAULTS, **cfg}
    assert cfg["loss"] == "mse" or cfg["init"] or cfg["resume"], "self-perceptual needs --init (see check_flags)"
    cfg["sp_with_mse"] = SP_LAMBDA(cfg["sp_with_mse"])
    rank, world, device = join_ranks(cfg)
    master, out = rank == 0, cfg["resume"] or cfg["out"]
    cfg, init, ckpt = start_state(cfg, out, world)
    step = 0 if ckpt is None else ckpt["step"]
    if ckpt is not None and step == cfg["steps"]:                  # finished: nothing is trained or written
        return finished_run(ckpt, out, device, log if master else lambda line: None)
    agreed(world, lambda: writable_dir(out, "--resume" if cfg["resume"] else "--out"))   # before any data or step
    # Rank 0 alone downloads or prepares the data, then the others read it: no race on one download folder.
    load = lambda: load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], True, cfg["data_seed"])
    data = agreed(world, load if master else lambda: None)
    images, labels, class_names, flip_ok = agreed(world, (lambda: data) if master else load)
    if device.type == "cuda" and images.nbytes < 0.25 * torch.cuda.mem_get_info(device)[0]:
        images, labels = images.to(device), labels.to(device)     # CIFAR-10 is 153 MB: no host copy per step
    cfg["num_classes"] = 0 if cfg["unconditional"] else len(class_names)
    model, ema, perceptual_net, opt = build_models(cfg, init, ckpt, device)
    seconds_before = 0.0 if ckpt is None else ckpt.get("train_seconds", 0.0)
    # Provenance: a stage 2 records which stage-1 weights it started from, so a stale one is never reused.
    origin = ckpt.get("origin") if ckpt is not None else origin_of(init) if init is not None else None
    steps_before = origin["init_steps"] if origin else 0           # total steps count from initialisation
    schedule, n_params = schedule_from(cfg), sum(p.numel() for p in model.parameters())
    net = torch.compile(model) if cfg["compile"] else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    batches = Batches(len(images), cfg["batch_size"] // world, rank, world, cfg["seed"], images.device)
    if cfg["loss"] == "self-perceptual" and cfg["sp_with_mse"] and "sp_lambda_value" not in cfg:
        set_mse_lambda(cfg, model, perceptual_net, schedule, images, labels, batches, world, rank)
    loss_of = objective(cfg["loss"], net, perceptual_net, schedule, **sp_options(cfg))
    cfg["precision"] = resolve_precision(device, cfg["precision"])  # as run: "auto" means another thing elsewhere
    amp = autocast(device, cfg["precision"])
    setup = f"{n_params / 1e6:.2f}M parameters, {world} rank(s) on {device}"
    metrics = start_log(out, cfg, step, ckpt is not None, len(images), setup, log) if master else None

    def checkpoint(name="ckpt.pt", **state):
        """Rank 0 writes everything a resume needs, atomically, after the metrics log up to this step (or `state`)."""
        if master:
            metrics.flush()
            state = state or {"model": model.state_dict(), "optimizer": opt.state_dict(), "origin": origin,
                              "train_seconds": seconds_before + time.time() - t0, "total_steps": steps_before + step,
                              **({"perceptual": perceptual_net.state_dict()} if perceptual_net is not None else {})}
            save_checkpoint(os.path.join(out, name), {"config": cfg, "step": step, "ema": ema.state_dict(), **state})

    fixed_noise = torch.randn(64, 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(1))
    fixed_y = torch.arange(64) % max(cfg["num_classes"], 1)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    # Sums since the last log line and the first step whose loss was not finite, kept on the device: read_sums.
    loss_sum, gnorm_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    first_bad = torch.full((), NEVER, dtype=torch.long, device=device)
    model.train()
    t0, t_log, start_step, log_step, stopped, stop = time.time(), time.time(), step, step, False, {"signal": None}
    with training_context(device, stop, metrics):
        while step < cfg["steps"]:
            # The randomness of a step is a function of (seed, step, rank): a resumed run draws the same numbers.
            torch.manual_seed((cfg["seed"] * 1_000_003 + step) * 4096 + rank)
            x0, y = training_batch(cfg, images, labels, batches.indices(step), flip_ok and not cfg["no_flip"], device)
            lr = learning_rate(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                loss = loss_of(x0, y)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            # EMA of the weights, every tensor in a few kernels; the warm-up keeps short runs from averaging in the
            # random initialisation.
            decay = min(cfg["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
                loss_sum += loss.detach().float()
                gnorm_sum += gnorm
                finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm)   # a NaN gradient poisons the weights
                first_bad = torch.where(finite, first_bad, first_bad.clamp(max=step))
            step += 1
            log_now = step % cfg["log_every"] == 0 or step == cfg["steps"]
            write_now = step % cfg["ckpt_every"] == 0 and step < cfg["steps"] or step == cfg["guide_at"]
            if log_now or write_now or (stop["signal"] is not None if world == 1 else step % STOP_EVERY == 0):
                loss_total, gnorm_total, stopped = read_sums(loss_sum, gnorm_sum, first_bad,
                                                             stop["signal"] is not None, world, out)
            if log_now:
                now, n_log = time.time(), step - log_step  # steps since the last line (a resume starts mid-way)
                if master:
                    rec = {"step": step, "loss": loss_total / n_log, "lr": lr, "img_s": n_log * cfg["batch_size"] /
                           (now - t_log), "grad_norm": gnorm_total / n_log, "seconds": seconds_before + now - t0}
                    log_line(metrics, rec, cfg["steps"], (cfg["steps"] - step) * (now - t0) / (step - start_step), log)
                t_log, log_step = now, step
                loss_sum.zero_()
                gnorm_sum.zero_()
            if master and cfg["sample_every"] and step % cfg["sample_every"] == 0:
                with amp:
                    x = sample(ema, schedule, fixed_noise.shape, fixed_y.to(device) if cfg["num_classes"] else None,
                               steps=50, noise=fixed_noise)
                save_grid(x, os.path.join(out, f"samples_{step:07d}.png"), nrow=8)
            if step % cfg["ckpt_every"] == 0 and step < cfg["steps"]:
                checkpoint()
            if step == cfg["guide_at"]:                            # the weaker model that autoguidance guides with
                checkpoint("guide.pt", model=ema.state_dict(), total_steps=step)
            if stopped:                                            # every rank agreed on the signal
                break
        checkpoint()
    if stopped and master:
        log(f"stopped by signal {stop['signal']} at step {step}; checkpoint written: run the same command again "
            f"to continue (or --resume {out})")
    return ema, {"steps": step, "total_steps": steps_before + step, "train_seconds": seconds_before + time.time() - t0,
                 "params": n_params, "config": cfg, "model": model, "origin": origin, "stopped": stopped}


def max_forward_batch(device):
    """The largest batch one forward pass should take: a CPU runs a batch of 128 slower per image than two of 64
    (README: Speed), a GPU takes any batch. Every sampling path of `generate` goes through this one number."""
    return 64 if torch.device(device).type == "cpu" else None


class Chunked:
    """model(x, t, y) in pieces of at most `limit` images (None: at once), concatenated in float32: the one place
    sampling is chunked, wrapped around the model by `generate`, so that neither the sampler's signature nor its
    noise draws depend on the device (a guided step's forward of 2N is chunked here too)."""

    def __init__(self, model, limit):
        self.model, self.limit, self.num_classes, self.parameters = model, limit, model.num_classes, model.parameters

    def __call__(self, x, t, y):
        if self.limit is None or len(x) <= self.limit:
            return self.model(x, t, y).float()
        ys = [None] * len(x) if y is None else y.split(self.limit)
        return torch.cat([self.model(xc, tc, yc).float() for xc, tc, yc in
                          zip(x.split(self.limit), t.split(self.limit), ys)])


def generate(model, schedule, n, steps, cfg_scale=1.0, cfg_rescale=0.0, eta=0.0, spacing="trailing", seed=0,
             batch=256, precision="auto", label=None, cfg_interval=(0.0, math.inf), guide=None):
    """n samples from fixed starting noise (seed); labels cycle through the classes (or are all `label`; the null
    label num_classes: the unconditional model). Sample i's noise does not depend on `batch` (models are compared
    from the same x_T); each call of `sample` takes `batch` images (with eta > 0 its noise draws follow `batch`, on
    any device), and each forward at most max_forward_batch of them (Chunked), so `batch` only bounds memory."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    y = None
    if model.num_classes:
        y = torch.arange(n) % model.num_classes if label is None else torch.full((n,), label)
    limit = max_forward_batch(device)
    net, guide = Chunked(model, limit), guide and Chunked(guide, limit)
    out = []
    with autocast(device, precision):
        for i in range(0, n, batch):
            yi = None if y is None else y[i:i + batch].to(device)
            out.append(sample(net, schedule, noise[i:i + batch].shape, yi, steps=steps, cfg_scale=cfg_scale,
                              cfg_rescale=cfg_rescale, eta=eta, spacing=spacing, generator=g, noise=noise[i:i + batch],
                              cfg_interval=cfg_interval, guide=guide).float().cpu())
    return torch.cat(out), y


# =================================================================================================
#                               7. Command line: train and sample
# =================================================================================================

class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit code 2 (not a usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_args(p, names=None, override=False):
    """One flag per row of TRAIN_ARGS (or the rows in `names`): --data-dir for data_dir, a switch for booleans,
    the row's range as the flag's type or choices. override: the default is None (the preset's value stands)."""
    for name, default, check, help in TRAIN_ARGS:
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        help = help if "default" in help else f"{help} (default: {'the preset' if override else default})"
        metavar = type(default).__name__.upper()                   # INT, FLOAT, STR, also when the default is None
        default = None if override and not isinstance(default, bool) else default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help)
        elif isinstance(check, tuple):
            p.add_argument(flag, default=default, choices=check, help=help)
        else:
            p.add_argument(flag, type=check or str, default=default, metavar=metavar, help=help)


def interval_arg(text):
    """'LO,HI' with 0 <= LO < HI (HI may be inf): the noise levels between which guidance applies."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"must be LO,HI with 0 <= LO < HI (HI may be inf), got {text!r}")
    return lo, hi


def add_sampling_args(p):
    """The flags `sample` and `evaluate` share."""
    p.add_argument("--ckpt", required=True, help="checkpoint (RUN/ckpt.pt); its EMA weights are used")
    p.add_argument("--steps", type=POS_INT, default=50, help="DDIM steps, at most the model's T (default: 50)")
    p.add_argument("--cfg", type=NONNEG_FLOAT, default=1.0, help="classifier-free guidance scale w; 1 = no guidance "
                   "(default: 1)")
    p.add_argument("--cfg-rescale", type=UNIT, default=0.0, help="guidance rescale phi in [0, 1] (default: 0)")
    p.add_argument("--cfg-interval", type=interval_arg, default=(0.0, math.inf), metavar="LO,HI",
                   help="guide only at noise levels sigma_t/alpha_t in (LO, HI] (Kynkaanniemi et al. 2024; "
                        "default: 0,inf = every step)")
    p.add_argument("--guide", default="", help="autoguidance (Karras et al. 2024): a weaker checkpoint of the same "
                   "model, such as RUN/guide.pt that stage 1 saved on its way; --cfg is then its weight w")
    p.add_argument("--eta", type=UNIT, default=0.0, help="0 = deterministic DDIM, 1 = ancestral (default: 0)")
    p.add_argument("--spacing", default="trailing", choices=["trailing", "leading", "linspace"],
                   help="timestep spacing (default: trailing)")
    p.add_argument("--seed", type=ANY_INT, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--batch", type=POS_INT, default=256, help="images per sampling call; each forward is chunked to "
                   "the device's efficient size (default: 256)")
    p.add_argument("--device", type=DEVICE, default="auto", help="device: auto (cuda, else mps, else cpu), cpu, cuda "
                   "or mps (default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast precision (default: auto)")


def build_parser():
    """The command line: train and sample. Every numeric flag's range is its type."""
    parser = Parser(prog="perceptual_diffusion.py", description=__doc__.split("\n\n")[0].strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    p = sub.add_parser("train", help="train a model (stage 1: --loss mse; stage 2: --loss self-perceptual --init)")
    add_train_args(p)
    p = sub.add_parser("sample", help="sample a grid (PNG) and/or an .npz from a checkpoint")
    add_sampling_args(p)
    p.add_argument("--n", type=POS_INT, default=64, help="number of samples (default: 64)")
    p.add_argument("--label", type=NONNEG_INT, default=None, help="class of every sample; num_classes = the null "
                   "label, i.e. unconditional (default: cycle through the classes)")
    p.add_argument("--out", default="grid.png", help="image grid to write (default: grid.png; '' for none)")
    p.add_argument("--npz", default="", help="also write uint8 NHWC images (arr_0) and labels, as FID tools read")
    return parser


def load_for_sampling(args):
    """The EMA model of a checkpoint (and of the --guide checkpoint), on args.device, with the label and guidance
    flags checked."""
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt).to(args.device).eval()
    if args.label is not None and not 0 <= args.label <= model.num_classes:
        raise UsageError(f"--label {args.label} is outside 0..{model.num_classes} ({model.num_classes}: unconditional)"
                         if model.num_classes else "--label: this model is unconditional")
    guide = None
    if args.guide:
        g = load_checkpoint(args.guide)
        check_same_arch(ckpt["config"], g, args.guide)
        guide = model_from_checkpoint(g).to(args.device).eval()
    elif args.cfg != 1.0 and not model.num_classes:
        raise UsageError("--cfg: this model is unconditional, and classifier-free guidance needs labels (--guide CKPT "
                         "gives autoguidance)")
    if args.steps > ckpt["config"]["T"]:
        raise UsageError(f"argument --steps: must be at most the model's T = {ckpt['config']['T']}, got {args.steps}")
    return ckpt, model, guide


def run_command(parser, argv, dispatch, needed):
    """Parse argv, run dispatch(args) -> exit code (None: 0); each problem is one line: a bad flag or UsageError 2
    (before work; every torchrun rank alike), work whose end failed 1, a stop (Ctrl-C, a signal) 130."""
    sys.stdout.reconfigure(line_buffering=True)                    # progress lines appear as they happen
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error(f"a command is needed: {needed}")
    except SystemExit as e:                                        # a bad flag (one line already printed), or --help
        return e.code
    try:
        return dispatch(args) or 0
    except (UsageError, FloatingPointError, OSError) as e:         # refused before work, or the work's end failed
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, UsageError) and dist.is_initialized():
            dist.destroy_process_group()
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:                                      # Ctrl-C, or a signal that stopped a stage
        print("stopped: the last checkpoint is kept; rerun the same command to continue", file=sys.stderr)
        return 130


def run_train(args):
    """`train`: one run (under torchrun, this rank's share), its flags' rules checked first (check_flags)."""
    cfg = vars(args).copy()
    cfg.pop("command")
    check_flags({**TRAIN_DEFAULTS, **cfg})
    train(cfg)
    if dist.is_initialized():
        dist.barrier()                                             # no rank tears down while another still talks
        dist.destroy_process_group()


def run_sample(args):
    """`sample`: a grid and/or an .npz from a checkpoint's EMA weights, the outputs checked before any work."""
    for flag, path, extensions in (("--out", args.out, None), ("--npz", args.npz, [".npz"])):
        if path:
            writable_file(path, flag, extensions)
    ckpt, model, guide = load_for_sampling(args)
    x, y = generate(model, schedule_from(ckpt["config"]), args.n, args.steps, cfg_scale=args.cfg,
                    cfg_rescale=args.cfg_rescale, eta=args.eta, spacing=args.spacing, seed=args.seed, batch=args.batch,
                    precision=args.precision, label=args.label, cfg_interval=args.cfg_interval, guide=guide)
    save_samples(x, y, args.out, args.npz, nrow=max(model.num_classes, 8) if args.label is None else 8)
    print(f"wrote {args.n} samples to {' and '.join(p for p in (args.out, args.npz) if p)}")


def main(argv=None):
    """Run one command of this file (the comparison's commands are reproduce.py's)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": run_train, "sample": run_sample}
    return run_command(build_parser(), argv, lambda args: commands[args.command](args),
                       "train or sample (the paper's comparison: python reproduce.py)")


if __name__ == "__main__":
    sys.exit(main())
