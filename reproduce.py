"""
The experiment beside perceptual_diffusion.py (the method): the measuring apparatus and the paper's comparison.

  7. evaluation: two rulers that share nothing, pixel statistics, 95% bootstrap intervals
  8. the paper's comparison in one command: paired verdicts, unconditional rows, x0_hat, ablations, seeds; the
     shipped stage 1 (pretrained/) that the default run fine-tunes; the cost of a run, counted and timed
  9. command line: reproduce (the default), evaluate, pretrain, gpucheck

Run (the built-in `shapes` data needs no network):
  python reproduce.py                                    # = reproduce --preset cpu: fine-tunes the shipped stage 1
  python reproduce.py reproduce --seeds 5                # verdicts about fine-tuning it, pooled over 5 seeds
  python reproduce.py reproduce --preset cpu-long --seeds 5   # about the method: each seed trains its own stage 1
  python reproduce.py reproduce --ablations              # + the paper's ablations (reuses finished stages)
  python reproduce.py reproduce --data FOLDER --stage1 train --estimate   # your data (class subfolders); cost first
  python reproduce.py reproduce --preset cifar10-quick --estimate        # FLOPs counted, GPU hours projected
  python reproduce.py reproduce --preset cifar10-quick --print-commands 8   # the torchrun command of each stage
  python reproduce.py evaluate --ckpt runs/sp/ckpt.pt --n 1000
  python reproduce.py pretrain                           # regenerate pretrained/ (72 min of training on one core)
  python reproduce.py gpucheck                           # every GPU path, timed; each GPU preset's hours
"""
import argparse
import functools
import hashlib
import importlib.util
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import perceptual_diffusion
from perceptual_diffusion import (
    ANY_INT, DEVICE, FOLDER_HELDOUT, NONNEG_INT, POS_INT, Parser, TRAIN_DEFAULTS, UNIT, UNet, UsageError,
    add_sampling_args, add_train_args, autocast, bench, check_config, distributed, generate, load_checkpoint,
    frozen_copy, load_dataset, load_for_sampling, max_forward_batch, model_from_checkpoint, model_kwargs, norm,
    objective, origin_of, ranged,
    native_bf16, resolve_precision, schedule_from, step_times, to_model_range, to_uint8, run_command, save_checkpoint, train,
    weights_hash, writable_dir, writable_file)

# =================================================================================================
#     7. Evaluation: two rulers, pixel statistics, bootstrap intervals (Frechet distance, accuracy, FID)
# =================================================================================================

def sqrtm_psd(c):
    """The square root of a symmetric positive semi-definite matrix, from its eigendecomposition."""
    w, V = torch.linalg.eigh(c)
    return V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T


def frechet_distances(mu, cov, mu_r, cov_r, cov_r_half=None):
    """d^2 = ||mu - mu_r||^2 + tr(C) + tr(C_r) - 2 tr((C_r^1/2 C C_r^1/2)^1/2) for a batch of (mu (B, D), cov
    (B, D, D)) against one reference, in float64. C_r^1/2 C C_r^1/2 is symmetric with the eigenvalues of C C_r,
    so its trace square root comes from eigvalsh: no scipy and no complex parts."""
    half = sqrtm_psd(cov_r) if cov_r_half is None else cov_r_half
    m = half @ cov @ half
    tr_covmean = torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).clamp(min=0).sqrt().sum(-1)
    return ((mu - mu_r) ** 2).sum(-1) + cov.diagonal(dim1=-2, dim2=-1).sum(-1) + cov_r.trace() - 2 * tr_covmean


def feature_stats(f, w=None):
    """Mean and covariance of features f (N, D) in float64; with resampling weights w (B, N), whose rows are
    counts summing to N, one (mean, covariance) per row: (B, D), (B, D, D)."""
    f = f.double()
    if w is None:
        return f.mean(0), torch.cov(f.T)
    n = f.shape[0]
    mu = w @ f / n
    second = torch.einsum("bn,nd,ne->bde", w, f, f) / n                       # via a (B, n, D) temporary
    return mu, (second - mu[:, :, None] * mu[:, None, :]) * n / (n - 1)


def resampled_fd(f, w, ref, budget=2 ** 28):
    """The Frechet distance of features f (n, D) under each row of resampling weights w (B, n) against the
    reference ref = (mu_r, cov_r, cov_r^1/2): (B,). The resampled statistics are built a chunk of c rows at a time
    and only the distances kept. Peak memory per chunk: about 8 c (2 n D + 5 D^2) bytes in float64 (the einsum's
    two weighted-feature temporaries; the second moment, the covariance, its product with cov_r^1/2 on each side
    and the eigenvectors alive together: 5 D x D per row, measured), c chosen to fit `budget` (256 MiB; at least
    1 row). Built all at once, (B, D, D) alone is 34 GB at B = 1,001 and D = 2048 (FID)."""
    n, D = f.shape
    c = max(1, budget // (8 * (2 * n * D + 5 * D * D)))
    return torch.cat([frechet_distances(*feature_stats(f, wc), *ref) for wc in w.split(c)])


def cubic_kernel(a, b):
    """KID's polynomial kernel k(a, b) = (a.b / D + 1)^3.  # (n, D), (m, D) -> (n, m)"""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_real_term(f_real, block=2048):
    """The real set's term of the unbiased MMD^2: the mean of k over its distinct pairs (held fixed, computed once)."""
    m, total = len(f_real), 0.0
    for i in range(0, m, block):
        K = cubic_kernel(f_real[i:i + block], f_real)
        total += float(K.sum() - K.diagonal(offset=i).sum())
    return total / (m * (m - 1))


def resampled_kid(f, w, f_real, real_term, block=2048):
    """Kernel inception distance (Binkowski et al. 2018), the unbiased MMD^2 between features f (n, D) and the
    real features (m, D) with KID's cubic kernel, under each row of resampling weights w (B, n): (B,). The
    within-set term of a resample sums over pairs of *distinct* originals (w_i w_j K_ij, i != j), so the copies
    that resampling with replacement makes add no zero-distance pairs and the estimate stays unbiased. Unlike
    the Frechet distance, two samples of one distribution score about 0 at any n. Memory: blocks of n x `block`."""
    n = len(f)
    wKw, diag, cross = torch.zeros(len(w), dtype=f.dtype, device=f.device), torch.zeros_like(f[:, 0]), torch.zeros_like(f[:, 0])
    for i in range(0, n, block):
        K = cubic_kernel(f[i:i + block], f)                                    # (b, n)
        wKw += ((w[:, i:i + block] @ K) * w).sum(1)
        diag[i:i + block], cross[i:i + block] = K.diagonal(offset=i), cubic_kernel(f[i:i + block], f_real).mean(1)
    within = (wKw - w ** 2 @ diag) / (n * n - (w ** 2).sum(1))              # every row of w sums to n
    return within + real_term - 2 * w @ cross / n


def pairwise(a, b, fn, block=2048):
    """fn applied to blocks of rows of the exact float64 distance matrix ||a_i - b_j||, concatenated: the full
    matrix never exists at once. (PITFALL: torch.cdist's default switches to a matrix-multiply formula above 25
    rows, whose self-distances are not exactly 0; the exact mode is asked for here.)"""
    return torch.cat([fn(torch.cdist(a[i:i + block].double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist"), i)
                      for i in range(0, len(a), block)])


def knn_radius(x, k):
    """The distance from each point to its k-th nearest *other* point of its own set.  # (n, D) -> (n,)"""
    def kth(d, i):
        rows = torch.arange(len(d), device=d.device)
        d[rows, rows + i] = math.inf                                           # exclude the point itself
        return d.kthvalue(k, 1).values
    return pairwise(x, x, kth)


def prdc_indicators(real, fake, k_pr=3, k_dc=5):
    """Per-point indicators of improved precision and recall (Kynkaanniemi et al. 2019; k = 3) and density and
    coverage (Naeem et al. 2020; k = 5), on features standardised with the real set's mean and std. A point is in
    a ball when its distance is <= the radius (ties inside). Returns per generated point: precision (in some real
    point's k_pr ball), density (how many real k_dc balls hold it, / k_dc); per real point: recall (in some
    generated point's k_pr ball), coverage (its k_dc ball holds a generated point). The metrics are their means."""
    real, fake = standardised(real, fake)
    r_pr, r_dc, f_pr = knn_radius(real, k_pr), knn_radius(real, k_dc), knn_radius(fake, k_pr)
    fake_side = pairwise(fake, real, lambda d, i: torch.stack([(d <= r_pr).any(1).double(),
                                                                (d <= r_dc).sum(1).double() / k_dc], 1))
    real_side = pairwise(real, fake, lambda d, i: torch.stack([(d <= f_pr).any(1).double(),
                                                                (d.min(1).values <= r_dc[i:i + len(d)]).double()], 1))
    return {"precision": fake_side[:, 0], "density": fake_side[:, 1], "recall": real_side[:, 0],
            "coverage": real_side[:, 1]}


def standardised(real, fake):
    """Both sets in the units of the real set's per-feature mean and std."""
    mu, sd = real.mean(0), real.std(0).clamp(min=1e-12)
    return (real - mu) / sd, (fake - mu) / sd


def resampled_prdc(real, fake, w, k_pr=3, k_dc=5, chunk=64, near=32):
    """Precision, recall, density and coverage of the generated set under each row of resampling weights w
    (B, n) over its points: {name: (B,)}, row 0 (all ones) the estimate itself. Precision and density are means
    of per-generated-point indicators, so they are resampled by weighting. Recall and coverage are means over the
    *real* points of indicators that depend on the whole generated set, so each resample recomputes them from its
    distinct generated points, their k_pr-NN radii measured among those points (a point drawn twice is not its
    own neighbour). (PITFALL: weighting the real-side indicators by generated-point weights leaves out the
    variance of drawing the samples: per-run recall and coverage verdicts were then called in 25% and 18% of
    null experiments instead of 5%.) Cost: a resample's radius is the k_pr-th of a point's `near` nearest
    neighbours that it drew (exactly: the rare point with fewer drawn falls back to all of them), and only the
    (real, generated) pairs close enough to ever count are kept. Memory: the full (n, n) and (m, n) distance
    matrices, 1.6 GB at n = m = 10,000."""
    ind = prdc_indicators(real, fake, k_pr, k_dc)
    out = {k: w @ ind[k] / w.sum(1) for k in ("precision", "density")}
    real, fake = standardised(real, fake)
    near = min(near, len(fake) - 1)
    r_dc = knn_radius(real, k_dc)
    d_ff = pairwise(fake, fake, lambda d, i: d)
    d_ff.fill_diagonal_(math.inf)
    nn_d, nn_i = d_ff.topk(near, 1, largest=False)                             # (n, near), nearest first
    d_rf = pairwise(real, fake, lambda d, i: d)                                 # (m, n)
    rec_r, rec_j = (d_rf <= nn_d[:, -1]).nonzero(as_tuple=True)                 # pairs that can count for recall
    cov_r, cov_j = (d_rf <= r_dc[:, None]).nonzero(as_tuple=True)              # pairs that count for coverage
    m, recall, coverage = len(real), [], []
    for b in range(0, len(w), chunk):
        drawn = w[b:b + chunk] > 0                                              # (c, n)
        seen = drawn[:, nn_i].cumsum(2)                                         # (c, n, near) drawn neighbours
        kth = (seen < k_pr).sum(2)                                              # position of the k_pr-th drawn one
        radius = nn_d.gather(1, kth.clamp(max=near - 1).T).T                    # (c, n)
        far = (kth >= near).nonzero().tolist()                                  # fewer than k_pr drawn among `near`
        for c, j in far:
            others = d_ff[j][drawn[c]]
            radius[c, j] = others.kthvalue(k_pr).values if (others < math.inf).sum() >= k_pr else math.nan
        ok = drawn[:, rec_j] & (d_rf[rec_r, rec_j] <= radius[:, rec_j])        # (c, pairs)
        hit = torch.zeros(len(drawn), m, dtype=torch.float64, device=real.device).index_add_(1, rec_r, ok.double())
        for c, j in far:                                                        # their balls reach past the kept pairs
            if drawn[c, j]:
                hit[c] += (d_rf[:, j] <= radius[c, j]).double()
        rec = hit.gt(0).double().mean(1)
        recall.append(rec.masked_fill(drawn.sum(1) <= k_pr, math.nan))      # no k_pr-th neighbour: no recall
        hit = torch.zeros(len(drawn), m, dtype=torch.float64, device=real.device).index_add_(1, cov_r,
                                                                                   drawn[:, cov_j].double())
        coverage.append(hit.gt(0).double().mean(1))
    return {**out, "recall": torch.cat(recall), "coverage": torch.cat(coverage)}


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


class FIDInception(nn.Module):
    """Standard FID's network: the port of the TF Inception that FID is defined with, from the optional package
    pytorch-fid (`pip install pytorch-fid`; its weights download on first use). 2048-d pool features. The package
    resizes to 299x299 and maps [0, 1] to [-1, 1] itself (resize_input, normalize_input), so images go in once,
    at their own size, in [0, 1]."""

    def __init__(self):
        super().__init__()
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            raise UsageError("--features fid needs the optional package pytorch-fid: pip install pytorch-fid")
        try:
            self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
        except Exception as e:                                     # offline: URLError, OSError, ...
            raise UsageError(f"the FID Inception weights are not in the torch hub cache ({torch.hub.get_dir()}) and "
                             f"could not be downloaded ({type(e).__name__}); use --features classifier offline")

    def forward(self, x):
        f = self.net((x + 1) / 2)[0].flatten(1)                     # (N, 2048)
        return f, x.new_zeros(len(x), 0)


def as_saved(x):
    """Images as they are saved and read back (uint8 PNGs, as the published FID protocol measures them): samples in
    [-1, 1] clamped and rounded to uint8; uint8 images as they are (contiguous: a permuted array read from a file
    takes other kernels, whose float sums differ in the 8th digit). Every ruler measures what this returns."""
    return (x if x.dtype == torch.uint8 else to_uint8(x)).contiguous()


@torch.no_grad()
def extract(net, images, device, batch=250):
    """Features (float64) and logits of images given as uint8 or in [-1, 1] (quantised first: as_saved)."""
    feats, logits = [], []
    for x in as_saved(images).split(batch):
        x = to_model_range(x)
        f, lg = net(x.to(device).float())
        feats.append(f.double().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(feats), torch.cat(logits)


class RandomFeatures(nn.Module):
    """The second ruler: a convolutional network with fixed random weights (He-normal, drawn from its own seed)
    that is never trained. It shares nothing with the classifier ruler -- no data, no labels, no training, another
    architecture -- so a verdict that both rulers give does not come from what one network learnt to look at.
    Its 64 features are the per-channel means of three ReLU layers (16 channels at full resolution, 16 at 1/2,
    32 at 1/4): colour, contrast and texture statistics, which a shape classifier is trained to be blind to."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                                    nn.Conv2d(16, 32, 3, stride=2, padding=1)])
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / conv.weight[0].numel()) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x.mean((2, 3)))
        return torch.cat(feats, 1), x.new_zeros(len(x), 0)        # (N, 64) features, no logits


def pixel_summary(x):
    """Per-image pixel statistics of images in [-1, 1], taken in [0, 1]: mean, mean square, saturation (the mean
    over pixels of (max - min) / max over the RGB channels), contrast (the std of the image's pixels); and the
    radially averaged power spectrum (image mean removed, mean over channels) at integer radii from 1 to the
    corner, where the blur the paper attributes to MSE shows.  # (N, 3, H, W) -> (N, 4), (N, R)"""
    p = ((x.float() + 1) / 2).clamp(0, 1)
    mx, mn = p.max(1).values, p.min(1).values
    stats = torch.stack([p.mean((1, 2, 3)), (p ** 2).mean((1, 2, 3)), ((mx - mn) / mx.clamp(min=1e-6)).mean((1, 2)),
                         p.std((1, 2, 3), unbiased=False)], 1)
    H, W = p.shape[-2:]
    power = torch.fft.fft2(p - p.mean((2, 3), keepdim=True)).abs().pow(2).mean(1)     # (N, H, W)
    fy, fx = torch.fft.fftfreq(H, device=p.device) * H, torch.fft.fftfreq(W, device=p.device) * W
    r = (fy[:, None] ** 2 + fx[None] ** 2).sqrt().round()
    spectrum = torch.stack([power[:, r == k].mean(1) for k in range(1, int(r.max()) + 1)], 1)   # corners included
    return stats.double(), spectrum.double()


def high_freq_ratio(spectrum, real_spectrum):
    """Energy in the upper half of the radii, relative to the real images' (1 = as sharp as real; < 1 blurrier)."""
    k = spectrum.shape[-1] // 2
    return spectrum[..., k:].sum(-1) / real_spectrum[k:].sum()


def bootstrap_weights(n, resamples, seed):
    """(1 + resamples, n) weights: row 0 all ones (the estimate itself), each other row the counts of one
    resample of the n samples with replacement (Efron's bootstrap), deterministic from seed. Two sample sets
    of the same size measured with the same seed are resampled at the same indices: a paired bootstrap."""
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(resamples, n, dtype=torch.float64))
    return torch.cat([torch.ones(1, n, dtype=torch.float64), counts])


def interval(estimate, replicates, level=0.95, centred=True):
    """The bootstrap percentile interval, shifted so the replicates' median sits on the estimate (resampling with
    replacement biases a Frechet distance upwards; the shift removes that bias, not the spread); centred=False:
    the plain percentile interval."""
    q = torch.quantile(replicates.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2, 0.5], dtype=torch.float64))
    shift = q[2] - float(estimate) if centred else 0.0
    return [float(q[0] - shift), float(q[1] - shift)]


CLASSIFIER_STEPS = 400      # training steps of the classifier ruler, wherever one is built


def cache_path(data_dir, what, data, image_size, data_seed):
    """Where a ruler's part for one data set is cached: the key (data, image size, data seed) in its name. A
    folder is named by its files (a hash of their paths, sizes and modification times, symlinked folders
    followed as ImageFolder follows them), not its name: two folders of one name, or a folder whose images
    changed (and with them its held-out split), do not share a cached classifier."""
    name = data
    if data not in ("shapes", "cifar10"):
        h = hashlib.sha256()
        for root, dirs, files in os.walk(data, followlinks=True):
            dirs.sort()                                            # walk the subfolders in a fixed order
            for fn in sorted(files):
                st = os.stat(os.path.join(root, fn))
                h.update(f"{os.path.relpath(os.path.join(root, fn), data)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        name = f"{os.path.basename(os.path.normpath(data))}-{h.hexdigest()[:12]}"
    return os.path.join(data_dir, f"{what}_{name}_{image_size}px_seed{data_seed}.pt")


class Ruler:
    """What every number is measured with: two feature networks that share nothing (the first: the classifier,
    or standard FID's Inception; the second: RandomFeatures), pixel statistics, and the statistics of `real_n`
    held-out real images, with the protocol written down beside them. features="classifier" trains (or reuses,
    from its cache) the small CNN; "fid" needs the package pytorch-fid (against the whole training split). Every number comes with a 95%
    bootstrap interval over the samples (the real statistics are held fixed: every row shares them)."""

    def __init__(self, features, data, data_dir, image_size, data_seed, real_n, device,
                 classifier_steps=CLASSIFIER_STEPS, log=print):
        self.features, self.device = features, device
        heldout, heldout_y, names, _ = load_dataset(data, data_dir, image_size, train=False, seed=data_seed)
        split = "test" if data in ("shapes", "cifar10") else f"held-out {FOLDER_HELDOUT:.0%} of the folder's"
        real_n = min(real_n, len(heldout))                         # a small folder has fewer images
        self.heldout, self.heldout_y, self.real_n, self.class_names = heldout, heldout_y, real_n, names
        self.protocol = {"features": features, "second_features": "random", "real_images": real_n,
                         "real_split": split, "data": data, "samples_measured_as": "saved uint8 images (clamped, "
                         "rounded), as the published FID protocol measures them"}
        missing = [names[c] for c in range(len(names)) if not (heldout_y[:real_n] == c).any()]
        if missing:                                                # a class of one image is never held out
            self.protocol["classes_not_in_real_images"] = missing
            log(f"note: no held-out image of class(es) {', '.join(missing)}: the real statistics leave them out")
        if features == "classifier":
            net = self._classifier(data, data_dir, image_size, data_seed, len(names), classifier_steps, log)
        elif features == "fid":
            net = FIDInception().to(device).eval()
        else:
            raise UsageError(f"--features must be classifier or fid, got {features!r}")
        self.nets = {features: net, "random": RandomFeatures().to(device)}
        self.num_classes = len(names) if features == "classifier" else 0
        real = self.summarize(heldout[:real_n], heldout_y[:real_n])
        self.real_feat, self.real_stats = {}, {}
        for name, f in real["feat"].items():
            f = f.to(device)
            self.real_feat[name] = (f, kid_real_term(f))           # KID's reference: the held-out images
            if name != "fid":                                      # FID's is the whole training split (below)
                mu, cov = feature_stats(f)
                self.real_stats[name] = (mu, cov, sqrtm_psd(cov))
        if features == "fid":                                      # the common protocol: all training images
            mu, cov = self._fid_reference(data, data_dir, image_size, data_seed, log)
            self.real_stats["fid"] = (mu.to(device), cov.to(device), sqrtm_psd(cov.to(device)))
            self.protocol.update(real_images_fid=f"the whole training split ({data})", fid="pytorch-fid")
        self.real_spectrum = real["spectrum"].mean(0)
        self.feat_names = list(real["feat"])
        ones = torch.ones(1, real_n, dtype=torch.float64)
        self.real_values = {k: float(v[0]) for k, v in self.metrics(real, ones, distances=False).items()}
        if features == "classifier":
            self.protocol["classifier_accuracy_on_real"] = round(self.real_values.pop("cond_acc"), 4)
            log(f"ruler: {self.protocol['ruler']}, accuracy {self.protocol['classifier_accuracy_on_real']:.3f} on "
                f"{real_n} held-out images")

    def fd_protocol(self, n):
        """The protocol of a Frechet distance of n samples here: network, n, reference set."""
        net = {"classifier": "the classifier ruler's features", "fid": "pytorch-fid Inception pool3"}[self.features]
        ref = ("the whole training split" if self.features == "fid" else
               f"{self.real_n} {self.protocol['real_split']} images")
        return f"{net}, {n} samples against {ref}" + (" (not the literature's 50,000-sample protocol)"
                                                       if self.features == "fid" and n != 50_000 else "")

    def _classifier(self, data, data_dir, image_size, data_seed, num_classes, steps, log):
        """The classifier cached under data_dir for (data, image size, data seed, steps), else a newly trained one
        (then cached): `evaluate` and every `reproduce` on one data set measure with the same ruler."""
        path = cache_path(data_dir, f"classifier{steps}", data, image_size, data_seed)
        self.protocol["ruler"] = os.path.basename(path)
        if os.path.isfile(path):
            try:
                net = Classifier(num_classes)
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
                return net.to(self.device).eval()
            except Exception:
                pass                                               # unreadable cache: train a new one
        images, labels, _, _ = load_dataset(data, data_dir, image_size, train=True, seed=data_seed)
        net = train_classifier(images, labels, num_classes, steps, self.device, log=log)
        try:
            os.makedirs(data_dir, exist_ok=True)
            torch.save({"model": net.state_dict()}, path)
        except OSError as e:
            log(f"the classifier ruler could not be cached in {path} ({e.strerror or e}); it was used all the same")
        return net

    def _fid_reference(self, data, data_dir, image_size, data_seed, log):
        """FID's reference statistics: the pytorch-fid features of every training image (CIFAR-10: the 50,000
        training images, the common protocol), cached beside the data."""
        path = cache_path(data_dir, "fid_stats", data, image_size, data_seed)
        if os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return saved["mu"], saved["cov"]
        images, _, _, _ = load_dataset(data, data_dir, image_size, train=True, seed=data_seed)
        log(f"FID reference statistics: {len(images)} training images (cached in {path})")
        mu, cov = feature_stats(extract(self.nets["fid"], images, self.device)[0])
        os.makedirs(data_dir, exist_ok=True)
        torch.save({"mu": mu, "cov": cov, "images": len(images)}, path)
        return mu, cov

    def prdc_ceiling(self, n):
        """Precision, recall, density and coverage of one real subset of n images against another, disjoint one,
        in each feature space: what a perfect model scores at this n and k, n capped as the rows' are at the
        real images (None without 2n of them)."""
        n = min(n, self.real_n)
        if 2 * n > self.real_n:
            return None
        out = {}
        for name in self.feat_names:
            f, suffix = self.real_feat[name][0], "" if name == self.features else f"_{name}"
            out.update({k + suffix: float(v.mean()) for k, v in prdc_indicators(f[:n], f[n:2 * n]).items()})
        return out

    def summarize(self, x, y):
        """Per-image quantities of images x (uint8, or in [-1, 1]: measured as saved, as_saved) with requested labels
        y (None: unconditional)."""
        feat, logits, x = {}, None, as_saved(x)
        for name, net in self.nets.items():
            feat[name], lg = extract(net, x, self.device)
            logits = lg if logits is None else logits
        stats, spectrum = pixel_summary(to_model_range(x))
        return {"feat": feat, "logits": logits, "y": y, "stats": stats, "spectrum": spectrum}

    def metrics(self, s, w, distances=True):
        """Every metric of a summarized set under resampling weights w (B, n): {name: (B,)}. Frechet distances
        and KIDs to the real images (fd, kid: the first feature network; fd_random, kid_random: the second; left
        out when not `distances`), the conditional accuracy, the entropy (nats) of the classifier's
        predicted-class histogram and the share of its rarest class (a sampler that wins on Frechet distance by
        dropping modes shows there), and the pixel statistics."""
        n, m = w.shape[1], {}
        for name, f in s["feat"].items() if distances else ():
            f, wd, suffix = f.to(self.device), w.to(self.device), "" if name == self.features else f"_{name}"
            m["fd" + suffix] = resampled_fd(f, wd, self.real_stats[name]).cpu()
            m["kid" + suffix] = resampled_kid(f, wd, *self.real_feat[name]).cpu()
            # As many real points as generated ones (k = min(n, real_n)): the first k held-out images in every row.
            k = min(n, self.real_n)
            for key, v in resampled_prdc(self.real_feat[name][0][:k], f[:k], wd[:, :k]).items():
                m[key + suffix] = v.cpu()
        if self.num_classes:
            pred = s["logits"].argmax(1)
            hist = w @ F.one_hot(pred, self.num_classes).double() / n                 # (B, K)
            m["class_entropy"] = -(hist * hist.clamp(min=1e-12).log()).sum(1)
            m["rarest_class"] = hist.min(1).values
            if s["y"] is not None:
                m["cond_acc"] = w @ (pred == s["y"].cpu()).double() / n
        st = w @ s["stats"] / n                                                      # (B, 4)
        m.update(mean=st[:, 0], std=(st[:, 1] - st[:, 0] ** 2).clamp(min=0).sqrt(), saturation=st[:, 2],
                 contrast=st[:, 3])
        m["spectrum_dist"] = (w @ s["spectrum"] / n / self.real_spectrum).log10().pow(2).mean(1).sqrt()
        return m

    def measure(self, x, y, resamples=1000, seed=0):
        """Every metric of samples x (in [-1, 1]) as {name: value, name_ci: [lo, hi]} (95%), and the bootstrap
        replicates {name: (resamples,)}: sets of the same size measured with the same seed share their
        resamples, so the difference of two rows' replicates is a paired bootstrap of their difference."""
        s = self.summarize(x, y)
        out, boot = {}, {}
        for k, v in self.metrics(s, bootstrap_weights(len(x), resamples, seed)).items():
            out[k], out[k + "_ci"], boot[k] = float(v[0]), interval(v[0], v[1:]), v[1:]
        return out, boot


STANDARD_FID = ("pytorch-fid Inception pool3, {n:,} samples against the whole training split: the protocol of "
                "published CIFAR-10 FIDs, such as DDPM's 3.17")


def standard_fid(model, schedule, ruler, n, steps, cfg_scale=1.0, cfg_rescale=0.0, seed=0, precision="auto",
                 label=None, chunk=1000, log=lambda s: None):
    """FID by the protocol of published CIFAR-10 numbers: n samples (50,000) in the Inception features of
    pytorch-fid against the statistics of the whole training split (ruler.real_stats["fid"]); the samples are
    drawn and measured a chunk at a time, their mean and covariance accumulated in float64. No interval: the
    literature's protocol has none, and the paired verdicts use the held-out comparison. Logs its progress."""
    total, outer, count, t0 = 0, 0, 0, time.time()
    for i in range(0, n, chunk):
        x, _ = generate(model, schedule, min(chunk, n - i), steps, cfg_scale, cfg_rescale, seed=seed + i,
                        precision=precision, label=label)
        f, _ = extract(ruler.nets["fid"], x, ruler.device)
        total, outer, count = total + f.sum(0), outer + f.T @ f, count + len(f)
        log(f"standard FID: {count:,} of {n:,} samples, {(time.time() - t0) / count * (n - count) / 60:.1f} min left")
    mu = total / count
    cov = (outer - count * torch.outer(mu, mu)) / (count - 1)
    mu_r, cov_r, cov_r_half = ruler.real_stats["fid"]
    return float(frechet_distances(mu[None].to(ruler.device), cov[None].to(ruler.device), mu_r, cov_r, cov_r_half)[0])


def evaluate_model(model, schedule, ruler, n, steps, cfg_scale=1.0, cfg_rescale=0.0, eta=0.0, spacing="trailing",
                   seed=0, batch=256, precision="auto", label=None, resamples=1000, cfg_interval=(0.0, math.inf),
                   guide=None):
    """Sample n images and measure them: (result with its protocol and 95% intervals, bootstrap replicates).
    label = model.num_classes samples the unconditional model (no conditional accuracy then)."""
    t0 = time.time()
    x, y = generate(model, schedule, n, steps, cfg_scale, cfg_rescale, eta, spacing, seed, batch, precision, label,
                    cfg_interval, guide)
    seconds = time.time() - t0
    res, boot = ruler.measure(x, y if label is None else None, resamples, seed)
    res["non_finite_samples"] = int((~torch.isfinite(x.flatten(1))).any(1).sum())   # as saved they would read 0
    res.update(samples=n, sampler="DDIM", steps=steps, eta=eta, spacing=spacing, cfg_scale=cfg_scale,
               cfg_rescale=cfg_rescale, seed=seed, sample_seconds=round(seconds, 1), bootstrap_resamples=resamples,
               guidance="auto" if guide is not None and cfg_scale != 1 else "cfg" if cfg_scale != 1 else "none",
               fd_protocol=ruler.fd_protocol(n), **ruler.protocol)
    if label is not None:
        res["label"] = label
    return res, boot


# =================================================================================================
#                           8. The paper's comparison in one command
# =================================================================================================

STAGE2_STEPS_CPU = 600    # the default run's stage 2 and control (1.5x the earlier 400), sized to its budget (README, Cost)
PRESETS = {
    # The default run, sized for the slowest 2-core CPU measured (AVX2, no native bf16: README, Cost): shapes at
    # 16 pixels, a 0.69M-parameter UNet (16 base channels, most of its width at low resolution, where it is
    # cheap), batch 32, fp32 (bf16 autocast ran convolutions 15x SLOWER there), the paper's beta schedule. Stage 1
    # is the shipped model (pretrained/: this preset's stage 1 trained 50,000 steps), fine-tuned as the paper
    # fine-tunes a pretrained model; --stage1 train trains a 2,000-step one instead (it draws blobs).
    "cpu": dict(train=dict(data="shapes", image_size=16, channels=16, channel_mult="1,2,4", attn_res="4",
                           betas="scaled_linear", precision="fp32", batch_size=32, lr=2e-3, warmup=50, ema_decay=0.995,
                           log_every=250, sample_every=0, ckpt_every=250),
                stage1="shipped", stage1_steps=2000, stage2_steps=STAGE2_STEPS_CPU, stage2_lr=5e-4, cooldown=0.2,
                features="classifier",
                classifier_steps=CLASSIFIER_STEPS,
                real_n=2000, eval_n=600, sweep_n=150, sweep_scales=[1.5, 2.0, 3.0], cfg_rescale=0.7,
                eval_steps=16, picture_per_class=3, resamples=1000, x0_n=500, x0_show=4),
    # DDPM's CIFAR-10 network and optimisation (Ho et al. 2020: 35.7M parameters, batch 128, lr 2e-4, warm-up 5,000,
    # EMA 0.9999, dropout 0.1, 400k steps) as stage 1, with this project's schedule, v-prediction and cool-down; stage 2
    # and the control 50k steps each: 2.7e18 FLOPs counted with the evaluation, about 6.1 h on one GPU at ASSUMPTION.
    # Standard FID (50,000 samples against the training set) for rows 1-4 beside the held-out comparison.
    "cifar10": dict(target="gpu", fid_protocol="standard", fid_n=50_000, train=dict(data="cifar10", channels=128, channel_mult="1,2,2,2", num_res_blocks=2, attn_res="16",
                               dropout=0.1, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, log_every=500,
                               sample_every=10000, ckpt_every=5000),
                    stage1="train", stage1_steps=400_000, stage2_steps=50_000, stage2_lr=2e-5, cooldown=0.2, features="fid",
                    classifier_steps=CLASSIFIER_STEPS, real_n=10000, eval_n=10000, sweep_n=2000, sweep_scales=[1.5, 2.0, 3.0],
                    cfg_rescale=0.7, eval_steps=50, picture_per_class=2, resamples=200, x0_n=1000, x0_show=4),
    # A seconds-long pass through every stage: checks the pipeline, measures nothing.
    "smoke": dict(train=dict(data="shapes", image_size=16, channels=8, channel_mult="1,2", attn_res="", precision="fp32",
                             batch_size=8, lr=1e-3, warmup=1, ema_decay=0.9, log_every=1, sample_every=0, ckpt_every=100),
                  stage1="train", stage1_steps=2, stage2_steps=1, stage2_lr=1e-3, cooldown=0.5, features="classifier", classifier_steps=1,
                  real_n=40, eval_n=20, sweep_n=10, sweep_scales=[2.0, 3.0], cfg_rescale=0.7, eval_steps=2,
                  picture_per_class=1, resamples=50, x0_n=20, x0_show=2),
}

# The method over stage-1 seeds: the cpu preset training its own stage 1, five times longer (10,000 steps, <= 60
# minutes on the same 2 cores), and the stage 2 of the earlier default (400 steps). Its EMA half-life is 7% of
# stage 1 (0.999: 693 steps of 10,000).
PRESETS["cpu-long"] = {**PRESETS["cpu"], "stage1": "train", "stage1_steps": 10000, "stage2_steps": 400,
                       "train": {**PRESETS["cpu"]["train"], "ema_decay": 0.999, "log_every": 500, "ckpt_every": 500}}

# The cifar10 recipe at half the channel width (64: 8.95M parameters, a quarter of the FLOPs), everything else as
# DDPM's: 6.3e17 training FLOPs, about 1.6 h on one A100-class GPU at ASSUMPTION with its evaluation.
PRESETS["cifar10-quick"] = {**PRESETS["cifar10"], "train": {**PRESETS["cifar10"]["train"], "channels": 64}}

# The shipped stage 1 (`python reproduce.py pretrain` regenerates it): the cpu preset's stage 1 trained 50,000
# steps with EMA 0.9995 (half-life 1,386 steps), its weights and guide stored in fp16 with a sha256 each.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
PRETRAINED = {"mse": os.path.join(PRETRAINED_DIR, "shapes16-mse.pt"), "guide": os.path.join(PRETRAINED_DIR, "shapes16-guide.pt"),
              "card": os.path.join(PRETRAINED_DIR, "shapes16.json")}
PRETRAIN_STEPS, PRETRAIN_EMA = 50_000, 0.9995
SHIPPED_KEYS = ["data", "data_seed", "image_size", "channels", "channel_mult", "num_res_blocks", "attn_res", "dropout",
                "T", "betas", "unconditional"]   # what a run must share with the shipped model to start from it

ROWS = [  # (row, name, which trained model, how it is sampled: "cond" unguided, "cfg" classifier-free guidance,
    #        "null" null label, "auto" / "auto-null" autoguidance with the label / with the null label)
    (1, "MSE", "mse", "cond"),
    (2, "MSE, continued", "mse-continued", "cond"),
    (3, "MSE + guidance", "mse", "cfg"),
    (4, "self-perceptual", "self-perceptual", "cond"),
    (5, "self-perceptual + guidance", "self-perceptual", "cfg"),
    (6, "MSE, unconditional", "mse", "null"),
    (7, "MSE continued, unconditional", "mse-continued", "null"),
    (8, "self-perceptual, unconditional", "self-perceptual", "null"),
    (9, "MSE + autoguidance", "mse", "auto"),                      # guided by stage 1's EMA at 1/8 of its steps
    (10, "MSE + autoguidance, unconditional", "mse", "auto-null"),
]
PAIRS = [  # (row a, row b, what the paired difference a - b asks)
    (4, 1, "self-perceptual vs the MSE model it started from (the paper's claim)"),
    (4, 2, "self-perceptual vs MSE trained as long (the fair comparison)"),
    (2, 1, "the control's gain from the extra MSE steps (is stage 1 converged?)"),
    (3, 4, "MSE + guidance vs self-perceptual (the paper: guidance stays ahead)"),
    (5, 3, "self-perceptual + guidance vs MSE + guidance"),
    (8, 6, "unconditional: self-perceptual vs MSE"),
    (8, 7, "unconditional: self-perceptual vs MSE trained as long"),
    (9, 3, "autoguidance vs classifier-free guidance (conditional)"),
    (8, 10, "unconditional: self-perceptual vs MSE + autoguidance (the label-free rival)"),
]
# The training flags that reproduce passes on (they override the preset's; the stages set loss, steps, lr, init).
REPRODUCE_TRAIN_ARGS = {"data", "data_dir", "data_seed", "image_size", "no_flip", "channels", "channel_mult",
                        "num_res_blocks", "attn_res", "dropout", "T", "betas", "batch_size", "lr", "warmup",
                        "weight_decay", "grad_clip", "ema_decay", "label_dropout", "precision", "compile"}
# The paper's ablations of the self-perceptual objective: one stage-2 run each, evaluated exactly like row 4.
# Then the variants beyond the paper, as others use perceptual losses (shared EVAL_NOTES): the latent perceptual
# loss's combination (MSE at every step, the perceptual term only at low noise, t < T/5), the term added to MSE at
# every t, and t' from low noise only. Each takes row 20 + its place here; with --ablations NAMES only those run.
ABLATIONS = [("all-layers", "all layers (down + mid), each normalised", dict(sp_features="all")),
             ("t-prime-same", "t' = t", dict(sp_t_prime="same")),
             ("mae", "MAE distance", dict(sp_distance="mae")),
             ("ema-perceptual", "EMA of the online model as f*", dict(perceptual_net="ema")),
             ("lpl-gated", "MSE + lambda L_sp at t < T/5 only (LPL-style), lambda auto",
              dict(sp_with_mse="auto", sp_t_max=0.2)),
             ("plus-mse", "MSE + lambda L_sp at every t, lambda auto", dict(sp_with_mse="auto")),
             ("t-prime-low", "t' < T/5 only", dict(sp_t_prime_max=0.2))]
VARIANTS = ["lpl-gated", "plus-mse", "t-prime-low", "all-layers"]   # judged against the fair control by HELPS_RULE


def selected_ablations(ablations):
    """[(row, key, label, flags)] of the asked ablations: True (all), a list of keys, or False/None (none)."""
    if not ablations:
        return []
    return [(20 + i, k, label, v) for i, (k, label, v) in enumerate(ABLATIONS) if ablations is True or k in ablations]
PRDC = ["precision", "recall", "density", "coverage"]
SWEEP_KEYS = ["fd", "fd_random"] + PRDC + [k + "_random" for k in PRDC]
METRIC_KEYS = ["fd", "fd_random", "kid", "kid_random", "cond_acc", "saturation"] + SWEEP_KEYS[2:]  # pooled over seeds
VERDICT_METRICS = [("fd", "Frechet distance, 1st ruler", -1), ("fd_random", "Frechet distance, random features", -1),
                   ("kid", "KID, 1st ruler", -1), ("kid_random", "KID, random features", -1),
                   ("cond_acc", "conditional accuracy", 1)] + [
    (k + sfx, f"{k}, {ruler}", 1) for sfx, ruler in (("", "1st ruler"), ("_random", "random features")) for k in PRDC]
BOOKKEEPING_KEYS = {"log_every", "sample_every", "ckpt_every", "resume", "out", "device", "compile"}  # not the result


def run_stage(cfg, log, origin=None):
    """train(cfg), which continues a run of this configuration in cfg["out"] (an interrupted one resumes, a finished
    one is reused: rerunning reproduce, or adding --ablations, never retrains a finished stage) and refuses a folder
    that holds another run. A stage whose origin (the --init weights' step and hash, as train records it) is not
    `origin`, the weights its --init holds now, is stale (a stage 1 continued in place makes every stage 2 on it
    so): its folder is moved aside, never overwritten, the log says where, and the stage is trained anew.
    origin: that of the --init weights (origin_of), from the stage-1 model the caller holds."""
    cfg = {**TRAIN_DEFAULTS, **cfg}
    path = os.path.join(cfg["out"], "ckpt.pt")
    if os.path.isfile(path):
        was = load_checkpoint(path).get("origin")
        if was != origin:
            aside = next(f"{cfg['out']}.stale{i}" for i in range(1, 10 ** 6) if not os.path.exists(f"{cfg['out']}.stale{i}"))
            os.replace(cfg["out"], aside)
            was = was or {"init_steps": "?", "init_hash": "not recorded"}
            log(f"moved {cfg['out']} aside to {aside}: it started from stage-1 weights at step {was['init_steps']} "
                f"(hash {was['init_hash']}), but {cfg['init']} is now at step {origin['init_steps']} (hash "
                f"{origin['init_hash']}); training it anew")
    model, stats = train(cfg, log=log)
    if stats["stopped"]:                                           # a stopped stage is not a finished one: go no further
        raise KeyboardInterrupt
    return model, stats


GREY = (128, 128, 128)   # the gaps between pictured samples: neither a dark nor a light background


def tile(x, scale, gap=2, group=0, group_gap=8):
    """Images x (r, c, 3, S, S) uint8 as one PIL image: each scaled `scale` times, `gap` grey pixels around
    every cell and `group_gap` more after every `group` columns, so that neighbouring samples never run into
    each other whatever the data's background. Returns (image, cell pitch, group pitch)."""
    from PIL import Image
    r, c, _, S, _ = x.shape
    pitch = S * scale + gap
    groups = c // group if group else 1
    canvas = Image.new("RGB", (gap + c * pitch + (groups - 1) * group_gap, gap + r * pitch), GREY)
    for i in range(r):
        for j in range(c):
            cell = Image.fromarray(x[i, j].permute(1, 2, 0).numpy()).resize((S * scale, S * scale), Image.NEAREST)
            canvas.paste(cell, (gap + j * pitch + (j // group if group else 0) * group_gap, gap + i * pitch))
    return canvas, pitch, (group * pitch + group_gap if group else 0)


def comparison_picture(models, schedule, rows, guidance, path, per_class, steps, precision, class_names=()):
    """One labelled column per conditional row, one line per class (named on the left), the same classes and the
    same initial noise in every column: read across a line to compare the rows on one class and one x_T.
    guidance: {row: (w, phi)} of the guided rows."""
    from PIL import Image, ImageDraw
    scale, pad, head, left = max(2, 64 // models["mse"].image_size), 8, 30, 70
    columns = []
    for row, name, key, mode in rows:
        m = models[key]
        k, s = max(m.num_classes, 1), m.image_size
        w, phi = guidance.get(row, (1.0, 0.0))
        x, _ = generate(m, schedule, per_class * k, steps, w, phi, seed=12345, precision=precision)
        # sample i has class i % k: one class per line, per_class samples side by side
        col, pitch, _ = tile(to_uint8(x).view(per_class, k, 3, s, s).transpose(0, 1), scale)
        columns.append((f"{row}. {name}\n" + (f"w={w:g}, phi={phi:g}" if row in guidance else "no guidance"), col))
    width = max(160, columns[0][1].width)
    canvas = Image.new("RGB", (left + len(columns) * (width + pad) + pad, columns[0][1].height + head + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(class_names):
        draw.text((4, head + j * pitch + pitch // 2 - 5), c, fill="black")
    for i, (title, col) in enumerate(columns):
        x0 = left + pad + i * (width + pad)
        draw.multiline_text((x0, 3), title, fill="black")
        canvas.paste(col, (x0 + (width - col.width) // 2, head))
    canvas.save(path)


def tradeoff_picture(res, path):
    """The guidance trade-off (guidance_tradeoff.png): Frechet distance, precision and recall (1st ruler) against
    the guidance scale w for the MSE model and the self-perceptual model, from the sweeps (w = 1: unguided), with
    the unguided self-perceptual point ringed and the real-vs-real ceiling of precision and recall dashed."""
    from PIL import Image, ImageDraw
    curves = {"MSE": ((200, 60, 40), res["guidance_sweep"]), "self-perceptual": ((40, 90, 200), res["sp_guidance_sweep"])}
    ceiling = res.get("sweep_prdc_ceiling") or {}
    W, H, m = 260, 220, 40
    canvas = Image.new("RGB", (3 * W + 20, H + 50), "white")
    draw = ImageDraw.Draw(canvas)
    ws = [p["cfg_scale"] for p in res["guidance_sweep"]]
    for i, key in enumerate(["fd", "precision", "recall"]):
        x0 = 10 + i * W
        vals = [p[key] for _, pts in curves.values() for p in pts] + ([ceiling[key]] if key in ceiling else [])
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
        X = lambda w: x0 + m + (w - min(ws)) / (max(ws) - min(ws) or 1) * (W - m - 20)
        Y = lambda v: 30 + (hi - v) / (hi - lo) * (H - 50)
        draw.rectangle([x0 + m, 30, x0 + W - 20, H - 20], outline="black")
        draw.text((x0 + m, 10), f"{key} ({res['protocol']['features']})" if key == "fd" else key, fill="black")
        for v in (lo, hi):
            draw.text((x0, Y(v) - 6), f"{v:.2f}", fill="black")
        for w in ws:
            draw.text((X(w) - 8, H - 15), f"w={w:g}", fill="black")
        if key in ceiling:
            for xa in range(int(X(min(ws))), int(X(max(ws))), 8):
                draw.line([xa, Y(ceiling[key]), xa + 4, Y(ceiling[key])], fill="gray")
        for name, (colour, pts) in curves.items():
            draw.line([(X(p["cfg_scale"]), Y(p[key])) for p in pts], fill=colour, width=2)
            for p in pts:
                r = 6 if name == "self-perceptual" and p["cfg_scale"] == 1 else 3
                draw.ellipse([X(p["cfg_scale"]) - r, Y(p[key]) - r, X(p["cfg_scale"]) + r, Y(p[key]) + r],
                             outline=colour, fill=None if r == 6 else colour)
    draw.text((10 + m, H + 25), "red: MSE + guidance;  blue: self-perceptual + guidance (ringed: unguided, w=1);  "
              "gray dashes: real vs real", fill="black")
    canvas.save(path)


def loss_curves_picture(folders, path):
    """The training curves of a run's stages (loss_curves.png), read from each stage folder's metrics log: loss and
    gradient norm against the stage's own steps, MSE objectives and self-perceptual ones in panels of their own
    (their losses differ by orders of magnitude). folders: {stage name: its folder}; a stage without a log (the
    shipped stage 1) is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {}
    for name, folder in folders.items():
        try:
            with open(os.path.join(folder, perceptual_diffusion.METRICS)) as f:
                logs[name] = [json.loads(line) for line in f]
        except (OSError, ValueError):
            continue
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    for col, kind in enumerate(("mse", "self-perceptual")):
        for name, recs in logs.items():
            if recs and (name.startswith("sp") or name == "self-perceptual") == (kind == "self-perceptual"):
                steps = [r["step"] for r in recs]
                axes[0, col].plot(steps, [r["loss"] for r in recs], label=name)
                axes[1, col].plot(steps, [r["grad_norm"] for r in recs], label=name)
        axes[0, col].set_title(f"{kind} stages: loss (mean between log lines)", fontsize=9)
        axes[1, col].set_title("gradient norm before clipping", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xlabel("step of the stage")
            if ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):   # t' = t's loss is exactly 0
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return sorted(logs)


@torch.no_grad()
def x0_hat_study(models, schedule, ruler, n, n_show, path, precision, seed=0, resamples=1000):
    """The paper's argument made visible: from the same x_t = alpha_t x0 + sigma_t eps of held-out images, each
    model's one-step prediction x0_hat, at t = 99, 299, 499, 699, 899, 999 (T = 1000). Writes a picture (one line
    per t; columns x_t, each model's x0_hat, x0) and returns, per t and model, the high-frequency energy of x0_hat
    relative to the real images' (1 = as sharp as real) and its Frechet distance (1st ruler) to the real images,
    each with a 95% bootstrap interval (paired across models: the same resamples), measured on n held-out images
    that the ruler's reference statistics do not contain (where there are enough), and which images those were."""
    from PIL import Image, ImageDraw
    T, first = schedule.T, ruler.real_n if len(ruler.heldout) >= ruler.real_n + n else 0
    source = ("held-out images that the ruler's reference statistics do not contain" if first else
              "the ruler's own reference images (the held-out set is too small for both)") + (
              "; each x0_hat clamped to [-1, 1] and rounded to uint8, as a saved image")
    x0_u8, y = ruler.heldout[first:first + n], ruler.heldout_y[first:first + n]
    x0 = to_model_range(x0_u8)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    ts = sorted({max(0, round(f * T) - 1) for f in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)})
    n = len(x0)
    w = bootstrap_weights(n, resamples, seed)
    numbers, lines = [], []
    for t in ts:
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = schedule.q_sample(x0, tt, eps)
        row, shown = {"t": t}, [x_t[:n_show]]
        for name, m in models.items():
            dev = next(m.parameters()).device
            with autocast(dev, precision):
                v = torch.cat([m(xc.to(dev), tc.to(dev), yc.to(dev) if m.num_classes else None).float().cpu()
                               for xc, tc, yc in zip(x_t.split(256), tt.split(256), y.split(256))])
            x0_hat = schedule.pred_to_x0_eps(x_t, v, tt)[0].clamp(-1, 1)
            s = ruler.summarize(x0_hat, None)
            values = {"high_freq": high_freq_ratio(w @ s["spectrum"] / n, ruler.real_spectrum),
                      "fd": resampled_fd(s["feat"][ruler.features].to(ruler.device), w.to(ruler.device),
                                         ruler.real_stats[ruler.features]).cpu()}
            row[name] = {k: float(v[0]) for k, v in values.items()}
            row[name].update({k + "_ci": interval(v[0], v[1:]) for k, v in values.items()})
            shown.append(x0_hat[:n_show])
        numbers.append(row)
        lines.append(torch.cat(shown + [x0[:n_show]]))                           # (columns * n_show, 3, H, W)
    scale, left, head = max(2, 64 // x0.shape[-1]), 60, 20
    img, pitch, block = tile(to_uint8(torch.stack(lines)), scale, group=n_show)
    canvas = Image.new("RGB", (img.width + left, img.height + head), "white")
    canvas.paste(img, (left, head))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(["x_t"] + [f"{k}: x0_hat" for k in models] + ["x0"]):
        draw.text((left + i * block + 2, 4), title, fill="black")
    for i, t in enumerate(ts):
        draw.text((4, head + i * pitch + pitch // 2 - 5), f"t={t}", fill="black")
    canvas.save(path)
    return numbers, f"{n} {source}"


def preset_settings(preset, overrides, **run):
    """The preset's settings with the given (non-None) overrides, `train` ones and the run's own (seed, device)
    merged into the preset's training flags: checked here, once, before any work."""
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None and k != "train"}}
    if p.get("fid_protocol", "heldout") not in ("heldout", "standard"):
        raise UsageError(f"--fid-protocol must be heldout or standard, got {p['fid_protocol']!r}")
    if p.get("fid_protocol") == "standard" and p["features"] != "fid":
        raise UsageError("--fid-protocol standard measures FID in pytorch-fid's Inception features: it needs a preset "
                         "whose first ruler is fid (cifar10, cifar10-quick)")
    p.setdefault("fid_n", 50_000)
    for flag in ("stage1_steps", "cooldown"):
        if p["stage1"] == "shipped" and overrides.get(flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} shapes a trained stage 1; the shipped one is used: add "
                             "--stage1 train")
    p["train"] = {**p["train"], **{k: v for k, v in (overrides.get("train") or {}).items() if v is not None and v is not False},
                  **run}
    check_config({**TRAIN_DEFAULTS, **p["train"]})
    return p


def stage1_settings(p):
    """Stage 1's own flags: MSE for the preset's stage-1 steps, cooled down to stage 2's rate, with the EMA at 1/8
    of its steps saved as the autoguidance guide."""
    return dict(loss="mse", steps=p["stage1_steps"], cooldown=p["cooldown"], final_lr=p["stage2_lr"],
                guide_at=max(1, p["stage1_steps"] // 8))


def shipped_stage1(base):
    """The shipped stage-1 checkpoint (its sha256 checked), if the run asks for its data and model: else one line."""
    ckpt = load_checkpoint(PRETRAINED["mse"])
    want = {**TRAIN_DEFAULTS, **base}
    other = [f"--{k.replace('_', '-')} {want[k]} (shipped: {ckpt['config'][k]})" for k in SHIPPED_KEYS
             if ckpt["config"].get(k) != want[k]]
    if other:
        raise UsageError(f"the shipped stage 1 has another data set or model than this run asks for: {'; '.join(other)}."
                         " Add --stage1 train to train a stage 1 for it")
    return ckpt


def plan(p, out, stage1_dir, stage1_seed=None, ablations=False):
    """What a run of preset settings p trains: (stage-1 checkpoint, its guide, [(key, stage flags with their
    folder)]): stage 1 (unless shipped), stage 2 and the control from it, the ablations if asked."""
    shipped = p["stage1"] == "shipped"
    stage1, guide = ((PRETRAINED["mse"], PRETRAINED["guide"]) if shipped else
                     (os.path.join(stage1_dir, "ckpt.pt"), os.path.join(stage1_dir, "guide.pt")))
    s2 = dict(steps=p["stage2_steps"], lr=p["stage2_lr"], init=stage1)
    stages = ([] if shipped else [("mse", {**stage1_settings(p), "out": stage1_dir,
                                           **({} if stage1_seed is None else {"seed": stage1_seed})})])
    stages += [(key, {"loss": loss, **s2, **variant, "out": os.path.join(out, key)}) for key, loss, variant in
               [("self-perceptual", "self-perceptual", {}), ("mse-continued", "mse", {})] +
               [(f"sp-{k}", "self-perceptual", v) for _, k, _, v in selected_ablations(ablations)]]
    return stage1, guide, stages


def flag_text(k, v):
    """One command-line flag for key k set to v: a switch alone when v is True, a list comma-separated, the value
    shell-quoted."""
    v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")


def train_flags(cfg, skip=()):
    """The `train` flags that give cfg, except the keys in `skip`: every value that differs from TRAIN_DEFAULTS."""
    return " ".join(flag_text(k, v) for k, v in cfg.items()
                    if k in TRAIN_DEFAULTS and k not in skip and v != TRAIN_DEFAULTS[k] and v is not False)


def print_commands(preset, nproc, out, seed=0, device=None, ablations=False, log=print, nnodes=1, rdzv_endpoint="",
                   **overrides):
    """The multi-GPU route, from the preset itself: the exact torchrun command of each training stage (data
    parallel on nproc ranks per node, on nnodes nodes that meet at rdzv_endpoint; rank 0 prepares the data and
    writes the checkpoints), then the reproduce command that finds them finished, reuses them and evaluates every
    row in one process. Each stage command is safe to run again: it continues its run, or leaves it finished.
    Several nodes need --out (and the data folder) on a filesystem they share: every rank reads the checkpoint."""
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address where the nodes meet")
    p = preset_settings(preset, overrides, seed=seed, device=device or TRAIN_DEFAULTS["device"])
    if p["stage1"] == "shipped":
        shipped_stage1(p["train"])
    if p["features"] == "fid" and not importlib.util.find_spec("pytorch_fid"):
        log("# note: the evaluation (the last command) needs pytorch-fid and its weights: pip install pytorch-fid")
    _, _, stages = plan(p, out, os.path.join(out, "mse"), ablations=ablations)
    launch = (f"torchrun --standalone --nproc_per_node={nproc}" if nnodes == 1 else
              f"torchrun --nnodes={nnodes} --nproc_per_node={nproc} --rdzv_backend=c10d "
              f"--rdzv_endpoint={rdzv_endpoint} --rdzv_id=perceptual-diffusion")
    lines = [f"{launch} perceptual_diffusion.py train " + train_flags({**TRAIN_DEFAULTS, **p["train"], **stage})
             for _, stage in stages]
    again = {"preset": preset, "out": out, "seed": seed, **{k: v for k, v in overrides.items() if k != "train"},
             **(overrides.get("train") or {}), "device": device, "ablations": ablations}
    lines.append("python reproduce.py reproduce " + " ".join(flag_text(k, v) for k, v in again.items()
                                                          if v is not None and v is not False))
    for line in lines:
        log(line)
    return lines


def reproduce(preset="cpu", out="runs/reproduce", device=None, seed=0, log=print, ablations=False, stage1_out=None,
              stage1_seed=None, **overrides):
    """Stage 1 (MSE, cooled down to stage 2's rate, saving an early EMA snapshot as the autoguidance guide; or,
    where the preset says stage1="shipped", the shipped pretrained model and its guide, as the paper fine-tunes a
    pretrained model), stage 2 (self-perceptual from stage 1), and the fair control (MSE continued for as many
    steps as stage 2) from the same stage-1 weights; then the rows of ROWS, each sampled with the same sampler,
    seeds, initial noise and number of samples, and measured with the same two rulers; the paired verdicts of
    PAIRS; the x0_hat study; with fid_protocol="standard", the literature's FID of rows 1-4. With ablations, one
    more stage-2 run per entry of ABLATIONS. stage1_out, stage1_seed: the folder and seed of a shared stage 1
    (default: out, seed). Writes results.md, results.json, comparison.png, x0_hat.png, guidance_tradeoff.png
    (and ablations.md, .json) under `out`. Every verdict here rests on one training run of each stage: see
    reproduce_seeds for verdicts over seeds."""
    if distributed()[1] > 1:
        raise UsageError("reproduce runs in one process; under torchrun, run the `train` stages instead")
    p = preset_settings(preset, overrides, seed=seed, device=device or TRAIN_DEFAULTS["device"])
    base = p["train"]
    writable_dir(out, "--out")
    shipped = shipped_stage1(base) if p["stage1"] == "shipped" else None   # checked before any work
    t_start = time.time()
    stage1_dir = os.path.join(stage1_out or out, "mse")
    stage1, guide_path, stages = plan(p, out, stage1_dir, stage1_seed, ablations)
    # Everything the evaluation needs (the classifier ruler, or pytorch-fid, its weights and the reference statistics)
    # is built before any training: a missing package or an offline GPU node is one line now, not after hours.
    d, dev = shipped["config"] if shipped else {**TRAIN_DEFAULTS, **base}, torch.device(base["device"])
    log("== the rulers, before any training ==")
    ruler = Ruler(p["features"], d["data"], d["data_dir"], d["image_size"], d["data_seed"], p["real_n"], dev,
                  classifier_steps=p["classifier_steps"], log=log)
    models, stats, origin = {}, {}, None
    if shipped:
        log(f"== stage 1: the shipped model {stage1} ({shipped['total_steps']} steps; no training) ==")
        models["mse"] = model_from_checkpoint(shipped).to(base["device"]).eval()
        stats["mse"] = {"config": shipped["config"], "total_steps": shipped["total_steps"], "reused": True,
                        "train_seconds": shipped.get("train_seconds", 0.0)}
        origin = origin_of(shipped)                                # what train records for --init
    for i, (key, stage) in enumerate(stages):
        log(f"== stage {i + 1}/{len(stages)}: {key} ({stage['steps']} steps) ==")
        models[key], stats[key] = run_stage({**base, **stage}, log=lambda s, k=key: log(f"[{k}] {s}"), origin=origin)
        models[key].eval()
        if key == "mse":                                           # what every stage 2 starts from
            origin = {"init_steps": stats[key]["total_steps"], "init_hash": weights_hash(models[key].state_dict())}
    cfg = stats["mse"]["config"]
    if not os.path.isfile(guide_path):
        raise UsageError(f"{stage1_dir} holds a stage 1 without guide.pt (trained before autoguidance): remove that "
                         "folder or use another --out")
    guide = model_from_checkpoint(load_checkpoint(guide_path)).to(base["device"]).eval()
    schedule = schedule_from(cfg)
    ev = dict(steps=p["eval_steps"], precision=cfg["precision"], resamples=p["resamples"])
    notes = []
    if ruler.real_n < p["eval_n"]:
        notes.append(f"The held-out set has {ruler.real_n} images, fewer than the {p['eval_n']} samples per row: "
                     f"precision, recall, density and coverage use {ruler.real_n} of each, and each Frechet distance "
                     f"compares {p['eval_n']} samples with {ruler.real_n} real images. At this n a Frechet distance "
                     "is dominated by its bias: its paired differences can still order rows, but its values are not "
                     "comparable with distances measured at another n (KID is unbiased).")
        log("note: " + notes[-1])

    # Small sweeps, on another seed and fewer samples than the table uses: classifier-free guidance of the MSE model
    # (row 3's w) and of the self-perceptual model, w = 1 included (the trade-off curve); autoguidance with the null
    # label (the label-free rival; its w serves rows 9 and 10). w is chosen by the first ruler's Frechet distance.
    sweeps, guidance = {}, {}
    for kind, key, phi, label, scales in (("cfg", "mse", p["cfg_rescale"], None, [1.0] + p["sweep_scales"]),
                                          ("cfg-sp", "self-perceptual", p["cfg_rescale"], None, [1.0] + p["sweep_scales"]),
                                          ("auto", "mse", 0.0, models["mse"].num_classes, p["sweep_scales"])):
        sweeps[kind] = []
        for w in scales:
            r, _ = evaluate_model(models[key], schedule, ruler, p["sweep_n"], cfg_scale=w, cfg_rescale=phi,
                                  seed=seed + 1, label=label, guide=guide if kind == "auto" else None, resamples=20,
                                  **{k: v for k, v in ev.items() if k != "resamples"})
            sweeps[kind].append({"cfg_scale": w, "cfg_rescale": phi, **{k: r[k] for k in SWEEP_KEYS if k in r}})
            log(f"{kind} guidance sweep: w={w:g} phi={phi:g} -> Frechet distance {r['fd']:.3f}, precision "
                f"{r['precision']:.3f}, recall {r['recall']:.3f}")
        guidance[kind] = (min((r for r in sweeps[kind] if r["cfg_scale"] != 1), key=lambda r: r["fd"])["cfg_scale"], phi)

    # Each guided row takes the w of its own model's sweep: row 3 (and the picture's MSE column) the MSE sweep's,
    # row 5 the self-perceptual sweep's, rows 9 and 10 the autoguidance sweep's.
    guided = {row: guidance["cfg-sp" if (key, mode) == ("self-perceptual", "cfg") else mode.split("-")[0]]
              for row, _, key, mode in ROWS if mode.startswith(("cfg", "auto"))}

    todo, t_rows = len(ROWS) + len(selected_ablations(ablations)), time.time()

    def evaluate_row(row, name, key, mode):
        """One row: the model sampled as `mode` from the table's seed, with its provenance; logs the progress."""
        w, phi = guided[row] if row in guided else (1.0, 0.0)
        label = models[key].num_classes if mode.endswith("null") else None
        r, boot = evaluate_model(models[key], schedule, ruler, p["eval_n"], cfg_scale=w, cfg_rescale=phi, seed=seed,
                                 label=label, guide=guide if mode.startswith("auto") else None, **ev)
        r.update(row=row, name=name, model=key, mode=mode, loss=stats[key]["config"]["loss"],
                 train_steps=stats[key]["total_steps"], train_seconds=round(stats[key]["train_seconds"], 1))
        done = len(rows) + 1
        log(f"row {row} {name}: Frechet distance {r['fd']:.3f} {fmt_ci(r['fd_ci'])} ({r['fd_protocol']}), random "
            f"features {r['fd_random']:.3f} {fmt_ci(r['fd_random_ci'])} | {done} of {todo} rows, "
            f"{done * p['eval_n']:,} of {todo * p['eval_n']:,} samples, "
            f"{(time.time() - t_rows) / done * (todo - done) / 60:.1f} min left")
        return r, boot

    rows, boots = {}, {}
    for spec in ROWS:
        rows[spec[0]], boots[spec[0]] = evaluate_row(*spec)
    verdicts = [verdict(a, b, what, rows, boots) for a, b, what in PAIRS]
    fid = {}
    if p.get("fid_protocol") == "standard":                        # the literature's FID for rows 1-4
        for row, name, key, mode in ROWS[:4]:
            w, phi = guided.get(row, (1.0, 0.0))
            fid[row] = standard_fid(models[key], schedule, ruler, p["fid_n"], p["eval_steps"], w, phi, seed + 2,
                                    cfg["precision"], log=lambda s, r=row: log(f"row {r} {s}"))
            log(f"row {row} {name}: FID {fid[row]:.2f} ({STANDARD_FID.format(n=p['fid_n'])})")
    comparison_picture(models, schedule, [r for r in ROWS if r[3] in ("cond", "cfg")], guided,
                       os.path.join(out, "comparison.png"), p["picture_per_class"], p["eval_steps"], cfg["precision"],
                       ruler.class_names)
    x0_numbers, x0_images = x0_hat_study({"MSE": models["mse"], "self-perceptual": models["self-perceptual"]}, schedule, ruler,
                              p["x0_n"], p["x0_show"], os.path.join(out, "x0_hat.png"), cfg["precision"], seed,
                              p["resamples"])
    result = {"preset": preset, "settings": {k: v for k, v in p.items() if k != "train"}, "train": base,
              "stage1": stage1, "guide": guide_path, "stage1_source": "shipped" if shipped else "trained",
              "guidance_sweep": sweeps["cfg"], "guidance": list(guidance["cfg"]), "autoguidance_sweep": sweeps["auto"],
              "autoguidance": list(guidance["auto"]), "sp_guidance_sweep": sweeps["cfg-sp"],
              "sp_guidance": list(guidance["cfg-sp"]),
              "prdc_ceiling": ruler.prdc_ceiling(p["eval_n"]), "sweep_prdc_ceiling": ruler.prdc_ceiling(p["sweep_n"]),
              "rows": list(rows.values()), "verdicts": verdicts,
              "x0_hat": x0_numbers, "x0_hat_images": x0_images, "real": ruler.real_values, "protocol": ruler.protocol,
              "notes": notes, "standard_fid": fid, "standard_fid_protocol": STANDARD_FID.format(n=p.get("fid_n", 0)) if fid else None,
              "stage_hashes": {k: weights_hash(models[k].state_dict()) for k in models},
              "reused_stages": [k for k in stats if stats[k].get("reused")],
              "device": str(dev), "torch_threads": torch.get_num_threads()}
    if ablations:
        abl = []
        for row, key, label, variant in selected_ablations(ablations):
            r, boots[row] = evaluate_row(row, label, f"sp-{key}", "cond")
            r["variant"], rows[row] = variant, r
            r["sp_lambda_value"] = stats[f"sp-{key}"]["config"].get("sp_lambda_value")
            abl.append({"key": key, "ablation": r, "verdicts": [verdict(row, b, what, rows, boots) for b, what in
                                                                ((4, "against the paper's choice (row 4)"),
                                                                 (2, "against MSE trained as long (row 2)"))]})
        result["ablations"] = abl
    tradeoff_picture(result, os.path.join(out, "guidance_tradeoff.png"))
    result["loss_curves"] = loss_curves_picture({key: stage["out"] for key, stage in stages},
                                                os.path.join(out, "loss_curves.png"))
    result["wall_seconds"] = round(time.time() - t_start, 1)
    write_outputs(out, {"results.json": json.dumps(result, indent=1), "results.md": results_markdown(result)}, log)
    if ablations:
        write_outputs(out, {"ablations.json": json.dumps(result["ablations"], indent=1),
                            "ablations.md": ablations_markdown(result)}, log)
    log(f"wrote {out}/results.md, results.json, comparison.png, x0_hat.png, guidance_tradeoff.png, loss_curves.png "
        f"in {result['wall_seconds'] / 60:.1f} min")
    return result


def machine():
    """This machine in words: CPU model and vector extensions (they change fp32 results and speed), cores, the
    torch threads, and the GPU if one is used."""
    import platform
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in info)
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name} ({flags or 'flags unknown'}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}"


def pretrain(out="runs/pretrain", dest=PRETRAINED_DIR, device="cpu", log=print):
    """Regenerate the shipped stage 1: the cpu preset's stage 1 trained PRETRAIN_STEPS steps with EMA PRETRAIN_EMA
    (a finished run in out/mse is reused, an interrupted one resumed); its EMA weights and its guide (the EMA at
    1/8 of the steps) written to `dest` in fp16, each with a sha256 that load_checkpoint checks; and its card
    (shapes16.json): provenance, and the default run's measurement of it (row 1: unguided samples, the classifier
    ruler) for the fp16 weights as shipped and for the fp32 ones they were rounded from."""
    import importlib.metadata as md
    p = preset_settings("cpu", {"stage1": "train", "stage1_steps": PRETRAIN_STEPS, "train": {"ema_decay": PRETRAIN_EMA}},
                        seed=0, device=device)
    cfg = {**TRAIN_DEFAULTS, **p["train"], **stage1_settings(p), "out": os.path.join(out, "mse")}
    writable_dir(dest, "--dest")
    run_stage(cfg, log)
    run = {k: load_checkpoint(os.path.join(out, "mse", f"{k}.pt")) for k in ("ckpt", "guide")}
    flags = train_flags(cfg, BOOKKEEPING_KEYS | {"data_dir"})
    provenance = {"command": "python reproduce.py pretrain", "same as": f"python perceptual_diffusion.py train {flags}",
                  "steps": run["ckpt"]["step"], "guide_step": run["guide"]["step"], "data_seed": cfg["data_seed"],
                  "train_seconds": round(run["ckpt"].get("train_seconds", 0.0)), "machine": machine(),
                  "packages": {m: md.version(m) for m in ("torch", "torchvision", "numpy", "pillow")},
                  "python": sys.version.split()[0], "stored": "EMA weights in fp16 (loaded as fp32)"}
    paths, digests = {k: os.path.join(dest, os.path.basename(PRETRAINED[k])) for k in PRETRAINED}, {}
    for key, c in (("mse", run["ckpt"]), ("guide", run["guide"])):
        save_checkpoint(paths[key], {"config": c["config"], "ema": {k: v.half() for k, v in c["ema"].items()},
                                     "step": c["step"], "total_steps": c.get("total_steps", c["step"]),
                                     "train_seconds": c.get("train_seconds", 0.0), "provenance": provenance})
        name = os.path.basename(paths[key])
        with open(paths[key], "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()
        with open(paths[key] + ".sha256", "w") as f:
            f.write(f"{digests[name]}  {name}\n")
    # The shipped model measured exactly as the default run measures its row 1.
    c = run["ckpt"]["config"]
    ruler = Ruler(p["features"], c["data"], c["data_dir"], c["image_size"], c["data_seed"], p["real_n"],
                  torch.device(device), classifier_steps=p["classifier_steps"], log=log)
    measured = {}
    for name, ckpt in (("shipped_fp16", load_checkpoint(paths["mse"])), ("fp32", run["ckpt"])):
        r, _ = evaluate_model(model_from_checkpoint(ckpt).to(device).eval(), schedule_from(c), ruler, p["eval_n"],
                              p["eval_steps"], seed=0, precision=c["precision"], resamples=p["resamples"])
        measured[name] = {k: r[k] for k in ("cond_acc", "cond_acc_ci", "fd", "fd_ci", "fd_random", "fd_random_ci",
                                            "kid", "kid_ci", "precision", "recall", "samples", "steps", "features")}
        log(f"{name}: conditional accuracy {r['cond_acc']:.3f} {fmt_ci(r['cond_acc_ci'])}, Frechet distance "
            f"{r['fd']:.3f} {fmt_ci(r['fd_ci'])} ({p['eval_n']} unguided samples, {p['eval_steps']} steps, seed 0)")
    card = {"provenance": provenance, "files": digests, "measured": measured, "protocol": ruler.protocol}
    write_outputs(dest, {os.path.basename(paths["card"]): json.dumps(card, indent=1)}, log)
    log(f"wrote {paths['mse']}, {paths['guide']} (each with its .sha256) and {paths['card']}")
    return card


def reproduce_seeds(preset, out, seeds, stage2_seeds=0, device=None, log=print, ablations=False, stage1_root=None,
                    **overrides):
    """The comparison as a claim about the method: the whole pipeline once per training seed, each in out/seedS
    (a finished seed is reused, an interrupted one resumed), then verdicts pooled over the seeds (pooled_verdicts).
    stage2_seeds = J > 0 adds J runs that share seed 0's stage 1 (out/seed0) with their own stage-2, control and
    sampling seeds (1000 + j, or above the largest training seed), so that the spread between seeds splits into its sources (variance_sources).
    stage1_root: where each seed's stage 1 lives (stage1_root/seedS; default: in its own folder), so that runs that
    differ only after stage 1 (the length sweep) share it. Writes pooled.md and pooled.json under `out`."""
    shipped = preset_settings(preset, overrides)["stage1"] == "shipped"
    if shipped and stage2_seeds:
        raise UsageError("--stage2-seeds: with the shipped stage 1 every seed already shares one stage 1 (add "
                         "--stage1 train to split the spread between stage-1 and stage-2 seeds)")
    writable_dir(out, "--out")
    runs, results = seed_runs(out, seeds, stage2_seeds, stage1_root), {}
    for name, seed, stage1_out, stage1_seed in runs:
        sub = os.path.join(out, name)
        prior = finished_result(sub, preset, seed, overrides, ablations)
        if prior:
            log(f"== {name}: reusing its finished results ==")
            results[name] = prior
            continue
        log(f"== {name} ({len(results) + 1} of {len(runs)}) ==")
        results[name] = reproduce(preset, sub, device, seed, lambda s, n=name: log(f"[{n}] {s}"), ablations,
                                  stage1_out, stage1_seed, **overrides)
    full = [results[f"seed{s}"] for s in seeds]
    shared = [full[0]] + [r for n, r in results.items() if "-stage2-" in n]
    rows = pooled_rows(full)
    pooled = {"preset": preset, "seeds": list(seeds), "stage2_seeds": stage2_seeds, "stage1_source": full[0]["stage1_source"],
              "samples_per_row": full[0]["rows"][0]["samples"], "verdicts": pooled_verdicts(full), "rows": rows,
              "sources": variance_sources(rows, pooled_rows(shared)) if stage2_seeds else None,
              "stage2_steps": full[0]["settings"]["stage2_steps"]}
    pooled["variant_judgements"] = variant_judgements(pooled["verdicts"])
    write_outputs(out, {"pooled.json": json.dumps(pooled, indent=1), "pooled.md": pooled_markdown(pooled)}, log)
    log(f"wrote {out}/pooled.md and pooled.json ({len(seeds)} full-pipeline seeds)")
    return pooled


def reproduce_lengths(preset, out, lengths, seeds, device=None, log=print, ablations=False, **overrides):
    """The stage-2 length sweep: reproduce_seeds once per stage-2 length (the self-perceptual stage and its control
    alike), each in out/stepsL, every length fine-tuning the same stage 1 of each seed (out/stage1/seedS, trained
    once where the preset trains one); then lengths.md, lengths.json and stage2_length.png (length_summary)."""
    writable_dir(out, "--out")
    per = {}
    for steps in lengths:
        log(f"=== stage-2 length {steps} ({lengths.index(steps) + 1} of {len(lengths)}) ===")
        per[steps] = reproduce_seeds(preset, os.path.join(out, f"steps{steps}"), seeds, 0, device,
                                     lambda s, L=steps: log(f"[steps{L}] {s}"), ablations,
                                     stage1_root=os.path.join(out, "stage1"), **{**overrides, "stage2_steps": steps})
    summary = length_summary(per)
    length_picture(summary, os.path.join(out, "stage2_length.png"))
    write_outputs(out, {"lengths.json": json.dumps(summary, indent=1), "lengths.md": lengths_markdown(summary)}, log)
    log(f"wrote {out}/lengths.md, lengths.json and stage2_length.png ({len(lengths)} lengths, {len(seeds)} seeds each)")
    return summary


LENGTH_METRICS = ["fd", "precision", "recall", "coverage"]


def length_summary(per):
    """{stage-2 steps: pooled} -> per length, the pooled verdicts 4 - 2 and 4 - 1 and rows 2 and 4 (mean and interval
    over seeds) on LENGTH_METRICS; and per primary measure whether the 4 - 2 curve has settled, from the seeds that
    ran both of the two longest lengths, paired: the change of each seed's 4 - 2 difference from the shorter to the
    longer length, with its 95% t interval. Settled: the interval holds 0 (no change detected; changes as large as
    its ends are not excluded, and are stated); still moving: it excludes 0; not known: fewer than two lengths or
    two common seeds."""
    lengths = sorted(per)
    out = {"lengths": lengths, "seeds": {L: per[L]["seeds"] for L in lengths}, "per_length": {}, "settled": {}}
    for L in lengths:
        v = {(x["a"], x["b"]): x for x in per[L]["verdicts"]}
        rows = {r["row"]: r for r in per[L]["rows"]}
        out["per_length"][L] = {
            "verdicts": {f"{a}-{b}": {m: {k: v[a, b][m][k] for k in ("diff", "ci", "verdict", "held", "seeds")}
                                      for m in LENGTH_METRICS if m in v[a, b]} for a, b in ((4, 2), (4, 1))},
            "rows": {r: {m: {k: rows[r][m][k] for k in ("mean", "ci")} for m in LENGTH_METRICS} for r in (2, 4)}}
    for m in PRIMARY:
        out["settled"][m] = None
        if len(lengths) < 2:
            continue
        short, long_ = ({s: d for s, d in zip(per[L]["seeds"], per_seed(per[L], m))} for L in lengths[-2:])
        common = sorted(set(short) & set(long_))
        mean, ci = pooled_interval([long_[s] - short[s] for s in common])
        if ci is not None:
            out["settled"][m] = None if not informative(ci) else {  # a zero-width or NaN interval decides nothing
                                 "settled": not excludes_zero(ci), "change": mean, "ci": ci, "seeds": common,
                                 "from": lengths[-2], "to": lengths[-1]}
    return out


def per_seed(pooled, m):
    """The per-seed 4 - 2 differences of metric m in a pooled result."""
    return next(v for v in pooled["verdicts"] if (v["a"], v["b"]) == (4, 2))[m]["per_seed"]


def lengths_markdown(summary):
    """The length sweep as tables: the pooled 4 - 2 and 4 - 1 verdicts per length, rows 2 and 4, and the settling."""
    names = {k: n for k, n, _ in VERDICT_METRICS}
    lines = ["Self-perceptual fine-tuning (row 4) against the fair control (row 2: MSE for as many steps) and against "
             "the model both start from (row 1), per stage-2 length; mean over seeds of the paired differences, 95% t "
             "interval over seeds, 'held': seeds whose own verdict named the same row.", "",
             "| stage-2 steps | seeds | a - b | metric | mean difference | 95% interval | verdict | held |",
             "|---|---|---|---|---|---|---|---|"]
    for L in summary["lengths"]:
        for pair, vs in summary["per_length"][L]["verdicts"].items():
            for m, e in vs.items():
                lines.append(f"| {L} | {len(summary['seeds'][L])} | {pair.replace('-', ' - ')} | {names[m]} | "
                             f"{e['diff']:+.4f} | {fmt_ci(e['ci']) if e['ci'] else '-'} | {e['verdict']} | "
                             f"{e['held']} of {e['seeds']} |")
    lines += ["", "| stage-2 steps | row | " + " | ".join(LENGTH_METRICS) + " |", "|---|---|" + "---|" * len(LENGTH_METRICS)]
    for L in summary["lengths"]:
        for r, ms in summary["per_length"][L]["rows"].items():
            lines.append(f"| {L} | {r} | " + " | ".join(f"{ms[m]['mean']:.3f} {fmt_ci(ms[m]['ci']) if ms[m]['ci'] else ''}"
                                                       for m in LENGTH_METRICS) + " |")
    for m, s in summary["settled"].items():
        lines.append("" if m == PRIMARY[0] else None)
        if s is None:
            lines.append(f"{names[m]}: whether the 4 - 2 difference has settled is not known (fewer than two lengths, "
                         "fewer than two seeds common to the two longest, or a paired interval of zero width).")
            continue
        change = (f"its change from {s['from']} to {s['to']} steps, paired over seeds {s['seeds']}, is "
                  f"{s['change']:+.4f} {fmt_ci(s['ci'])}")
        lines.append(f"{names[m]}: " + (f"settled: {change}, which holds 0 (no change detected; changes up to "
                                        f"{max(abs(v) for v in s['ci']):.4f} are not excluded)." if s["settled"]
                                        else f"NOT settled: {change}, which excludes 0 (the 4 - 2 difference still moves)."))
    lines = [line for line in lines if line is not None]
    return "\n".join(lines) + "\n"


def length_picture(summary, path):
    """stage2_length.png: the first ruler's Frechet distance, precision and recall of rows 2 (MSE continued) and 4
    (self-perceptual) against stage-2 steps, each point the mean over seeds with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    L = summary["lengths"]
    for ax, m in zip(axes, ("fd", "precision", "recall")):
        for r, name, shift in ((2, "2: MSE continued (control)", 0.97), (4, "4: self-perceptual", 1.03)):
            e = [summary["per_length"][x]["rows"][r][m] for x in L]
            mean = [p["mean"] for p in e]
            err = [[p["mean"] - (p["ci"] or [p["mean"]] * 2)[0] for p in e], [(p["ci"] or [p["mean"]] * 2)[1] - p["mean"] for p in e]]
            ax.errorbar([x * shift for x in L], mean, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("stage-2 steps (and the control's)")
        ax.set_title({"fd": "Frechet distance (1st ruler)", "precision": "precision", "recall": "recall"}[m])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def seed_runs(out, seeds, stage2_seeds, stage1_root=None):
    """(folder name, seed, stage-1 folder, stage-1 seed) of each run of reproduce_seeds: one full pipeline per
    training seed (its stage 1 under stage1_root/seedS where given), then J runs on the first seed's stage 1 whose
    seeds never repeat a training seed."""
    first, home = max([999, *seeds]) + 1, lambda s: os.path.join(stage1_root or out, f"seed{s}")
    return [(f"seed{s}", s, home(s) if stage1_root else None, s if stage1_root else None) for s in seeds] + [
        (f"seed{seeds[0]}-stage2-{first + j}", first + j, home(seeds[0]), seeds[0]) for j in range(stage2_seeds)]


def finished_result(sub, preset, seed, overrides, ablations=False):
    """The results.json in `sub` if it was written by this preset, seed and settings, from the weights that are
    in its stage folders now, with the ablations if they are asked for; else None (the seed is then run, reusing
    whatever stages still match)."""
    try:
        with open(os.path.join(sub, "results.json")) as f:
            res = json.load(f)
        p = preset_settings(preset, overrides)
        same = (res["preset"] == preset and res["train"]["seed"] == seed and
                res["settings"] == json.loads(json.dumps({k: v for k, v in p.items() if k != "train"})) and
                all(res["train"][k] == v for k, v in p["train"].items()))
        hashes = {k: weights_hash(load_checkpoint(res["stage1"] if k == "mse" else os.path.join(sub, k, "ckpt.pt"))["ema"])
                  for k in res["stage_hashes"]}
        present = {a["ablation"]["model"][3:] for a in res.get("ablations", [])}
        asked = {k for _, k, _, _ in selected_ablations(ablations)}
        return res if same and hashes == res["stage_hashes"] and asked <= present else None
    except (OSError, ValueError, KeyError, UsageError):
        return None


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """The p-quantile (p > 0.5) of Student's t distribution with df degrees of freedom: bisection on its CDF,
    integrated numerically from its density (no scipy). t_quantile(0.975, 4) = 2.776."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    cdf = lambda x: 0.5 + np.trapezoid(c * (1 + np.linspace(0, x, 20001) ** 2 / df) ** (-(df + 1) / 2), dx=x / 20000)
    lo, hi = 0.0, 1e3
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def pooled_interval(values, level=0.95):
    """(mean, 95% interval) over K training seeds: the t interval mean +- t_{K-1} sd / sqrt(K). Each seed's value
    already carries its own sampling noise, so the spread of the values contains the variance between training
    runs *and* the sampling variance: the interval is about the method, not one run. None for K = 1."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), None
    half = t_quantile((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), [float(v.mean() - half), float(v.mean() + half)]


def all_verdicts(res):
    """A result's verdicts, the ablations' included."""
    return res["verdicts"] + [v for a in res.get("ablations", []) for v in a["verdicts"]]


def pooled_verdicts(results):
    """For every pair (matched by its rows, in every seed) and metric: the mean over seeds of the per-seed paired differences, its pooled interval,
    the verdict called only when that interval excludes 0, and in how many seeds the per-seed verdict agreed."""
    out, by_pair = [], [{(v["a"], v["b"]): v for v in all_verdicts(r)} for r in results]
    for v0 in all_verdicts(results[0]):
        if not all((v0["a"], v0["b"]) in seed for seed in by_pair):    # a pair some seed lacks is not pooled
            continue
        per_seed = [seed[v0["a"], v0["b"]] for seed in by_pair]
        entry = {"a": v0["a"], "b": v0["b"], "what": v0["what"]}
        for key, _, sign in VERDICT_METRICS:
            if key not in v0:
                continue
            diffs = [v[key]["diff"] for v in per_seed]
            mean, ci = pooled_interval(diffs)
            better = v0["a"] if (mean > 0) == (sign > 0) else v0["b"]
            held = sum(v[key]["verdict"] == f"row {better} better in this run" for v in per_seed)
            word = (f"row {better} better" if ci and excludes_zero(ci) else "not distinguishable over seeds"
                    if ci and informative(ci) else "no verdict: the interval is not finite or has zero width" if ci
                    else "one training run: no verdict about the method")
            entry[key] = {"diff": mean, "ci": ci, "verdict": word, "held": held, "seeds": len(results),
                          "per_seed": diffs}
        out.append(entry)
    return out


def pooled_rows(results):
    """Each row's metrics over seeds: mean, pooled interval, and the sampling standard error (the bootstrap
    interval's width / 3.92, as the root of the seeds' mean variance) beside the standard deviation between seeds."""
    rows = []
    for i, r0 in enumerate(results[0]["rows"]):
        row = {"row": r0["row"], "name": r0["name"], "model": r0.get("model")}
        for key in METRIC_KEYS:
            if key in r0:
                vals = [r["rows"][i][key] for r in results]
                mean, ci = pooled_interval(vals)
                row[key] = {"mean": mean, "ci": ci, "sd_seeds": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                            "se_sampling": float(np.mean([((r["rows"][i][key + "_ci"][1] - r["rows"][i][key + "_ci"][0])
                                                           / 3.92) ** 2 for r in results])) ** 0.5}
        rows.append(row)
    return rows


def variance_sources(a, b):
    """Where the spread between seeds comes from, per row and metric, as standard deviations, from pooled_rows of
    the full design (a: K stage-1 seeds) and of the shared-stage-1 design (b: J + 1 runs on one stage 1):
    sampling alone (the bootstrap's mean variance), stage-2 seeds (b's variance less sampling) and stage-1 seeds
    (a's less b's). A row drawn from stage 1 alone (rows 1, 3, 6, 9, 10) has no stage-2 source: its b-spread is
    sampling, and its stage-1 share is a's variance less sampling. A negative variance estimate is reported as 0
    and named in `clamped`; with K - 1 and J degrees of freedom, such estimates are common, not exact zeros."""
    out = []
    for ra, rb in zip(a, b):
        row = {"row": ra["row"], "name": ra["name"]}
        for key in METRIC_KEYS:
            if key in ra:
                se2, var_s2, var_full = rb[key]["se_sampling"] ** 2, rb[key]["sd_seeds"] ** 2, ra[key]["sd_seeds"] ** 2
                parts = ({"sampling": se2, "stage2": var_s2 - se2, "stage1": var_full - var_s2} if ra.get("model") != "mse"
                         else {"sampling": se2, "stage1": var_full - se2})
                row[key] = {**{k: max(v, 0.0) ** 0.5 for k, v in parts.items()},
                            "clamped": [k for k, v in parts.items() if v < 0], "sd_full": ra[key]["sd_seeds"],
                            "sd_shared": rb[key]["sd_seeds"]}
        out.append(row)
    return out


HELPS_RULE = ("a variant helps only if its pooled interval against the fair control (row 2) excludes 0 in its favour "
              "on a primary measure named in advance (the first ruler's Frechet distance or precision), that verdict "
              "held in at least 4 of every 5 seeds, and neither recall nor coverage is significantly worse than the "
              "control's (its pooled interval does not exclude 0 against the variant); every other result is "
              "reported as measured. Four variants and two primary measures are judged without a correction for "
              "multiplicity: a single 'helps' is a lead to test again, not a finding")
PRIMARY = ["fd", "precision"]


def variant_judgements(verdicts):
    """HELPS_RULE applied to the pooled verdicts of each variant (VARIANTS) against row 2: [{row, key, helps, wins,
    worse, verdict}], wins the primary measures it won by the rule, worse the diversity measures it lost."""
    out = []
    for v in verdicts:
        if v["b"] != 2 or v["a"] < 20 or ABLATIONS[v["a"] - 20][0] not in VARIANTS:
            continue
        won = lambda m: (m in v and v[m]["verdict"] == f"row {v['a']} better" and v[m]["held"] >= math.ceil(0.8 *
                                                                                                       v[m]["seeds"]))
        wins = [m for m in PRIMARY if won(m)]
        worse = [m for m in ("recall", "coverage") if m in v and v[m]["verdict"] == "row 2 better"]
        helps = bool(wins) and not worse
        out.append({"row": v["a"], "key": ABLATIONS[v["a"] - 20][0], "helps": helps, "wins": wins, "worse": worse,
                    "verdict": "helps" if helps else "does not help by the rule" + (
                        f" (won {', '.join(wins)} but lost {', '.join(worse)})" if wins else "")})
    return out


def pooled_markdown(pooled):
    """The pooled verdicts, each with its interval over seeds and k of K, the rows over seeds, and the sources."""
    K = len(pooled["seeds"])
    about = ("Verdicts about fine-tuning one model (the paper's situation), not about the method over stage-1 "
             f"seeds: every seed fine-tunes the shipped stage 1, so only the stage-2 and sampling seeds vary ({K}: "
             if pooled.get("stage1_source") == "shipped" else
             f"Verdicts about the method: {K} full-pipeline training seeds (")
    lines = [f"{about}{', '.join(map(str, pooled['seeds']))}), "
             f"{pooled['samples_per_row']} samples per row and seed. Estimate: the mean over seeds of the paired "
             f"difference row a - row b; interval: 95% t interval over the seeds (it includes the variance between "
             "training runs and the sampling variance); a verdict is called only when it excludes 0; 'k of K': the "
             "seeds whose own bootstrap verdict named the same row.", "",
             "| a - b | question | metric | mean difference | 95% interval over seeds | verdict | held in |",
             "|---|---|---|---|---|---|---|"]
    names = {k: n for k, n, _ in VERDICT_METRICS}
    for v in pooled["verdicts"]:
        for key in names:
            if key in v:
                e = v[key]
                lines.append(f"| {v['a']} - {v['b']} | {v['what']} | {names[key]} | {e['diff']:+.4f} | "
                             f"{fmt_ci(e['ci']) if e['ci'] else '-'} | {e['verdict']} | {e['held']} of {e['seeds']} |")
    lines += ["", "Rows over seeds (mean and 95% interval; sd between seeds beside the mean sampling standard error):",
              "", "| row | model | " + " | ".join(METRIC_KEYS) + " |", "|---|---|" + "---|" * len(METRIC_KEYS)]
    for r in pooled["rows"]:
        spread = lambda e: f"{e['mean']:.3f} {fmt_ci(e['ci']) if e['ci'] else ''} (sd {e['sd_seeds'] or 0:.3f} / se {e['se_sampling']:.3f})"
        lines.append(f"| {r['row']} | {r['name']} | " + " | ".join(spread(r[k]) if k in r else "-" for k in METRIC_KEYS) + " |")
    if pooled.get("variant_judgements"):
        lines += ["", f"Variants against the fair control, judged by the rule stated in advance: {HELPS_RULE}.", "",
                  "| row | variant | verdict |", "|---|---|---|"]
        lines += [f"| {j['row']} | {j['key']} | {j['verdict']} |" for j in pooled["variant_judgements"]]
    if pooled["sources"]:
        J = pooled["stage2_seeds"]
        lines += ["", f"Where the spread comes from (standard deviations): sampling alone / stage-2 seeds on one stage 1 "
                  f"({J + 1} runs sharing seed {pooled['seeds'][0]}'s stage 1: {J} degrees of freedom) / stage-1 seeds "
                  f"({K} seeds: {K - 1} degrees of freedom). '-': no such source (a row of stage 1 alone); '0*': the "
                  "variance estimate was negative, shown as 0. With this few degrees of freedom each share is rough.",
                  "", "| row | model | " + " | ".join(METRIC_KEYS) + " |", "|---|---|" + "---|" * len(METRIC_KEYS)]
        share = lambda e, part: ("-" if part not in e else "0*" if part in e["clamped"] else f"{e[part]:.3f}")
        for r in pooled["sources"]:
            lines.append(f"| {r['row']} | {r['name']} | " + " | ".join(
                " / ".join(share(r[k], part) for part in ("sampling", "stage2", "stage1")) if k in r else "-"
                for k in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"


def informative(ci):
    """An interval that can carry a verdict: finite, of positive width (K identical values, a NaN: none)."""
    return all(math.isfinite(v) for v in ci) and ci[1] > ci[0]


def excludes_zero(ci):
    """A verdict is called: the interval is informative and 0 lies outside it."""
    return informative(ci) and not ci[0] <= 0 <= ci[1]


def verdict(a, b, what, rows, boots):
    """The paired verdicts of row a against row b, one per metric both rows have: the difference a - b, its 95%
    paired bootstrap interval, and the verdict it supports (sign -1: lower is better)."""
    out = {"a": a, "b": b, "what": what}
    for key, _, sign in VERDICT_METRICS:
        if key in rows[a] and key in rows[b]:
            d = rows[a][key] - rows[b][key]
            # Recall's resampled replicates are too narrow and biased, coverage's too wide (a resample has about
            # 0.63 n distinct points): in null experiments the plain interval called recall in 3-9% and the
            # centred one coverage in 1-3% (n 100-600, D 8-64); centring recall called 10-15%, plain coverage up to 10%.
            ci = interval(d, boots[a][key] - boots[b][key], centred=not key.startswith("recall"))
            word = (f"row {a if (d > 0) == (sign > 0) else b} better in this run" if excludes_zero(ci) else
                    "not distinguishable in this run" if informative(ci) else "no verdict: the interval is not finite "
                    "or has zero width")
            out[key] = {"diff": d, "ci": ci, "verdict": word}
    return out


def fmt_ci(ci):
    """[lo, hi] as text."""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def write_outputs(out, files, log):
    """Write finished text files; if one cannot be written (disk full, folder removed), say so in one line and
    keep the others: the numbers are also in the log above."""
    for name, text in files.items():
        try:
            with open(os.path.join(out, name), "w") as f:
                f.write(text)
        except OSError as e:
            log(f"error: could not write {os.path.join(out, name)} ({e.strerror or e}); its content is not lost: "
                f"the rows are in the log above")


def results_markdown(res):
    """The results tables with their intervals and protocol, and what they say about the paper's ordering."""
    rows, proto, real = res["rows"], res["protocol"], res["real"]
    first = proto["features"]
    c = cell
    lines = [f"| row | model | sampled | train steps | Frechet distance ({first}) | Frechet distance (random features) | "
             f"KID ({first}) | KID (random features) | cond. accuracy | class entropy | rarest class | sampling s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"Frechet distance ({first}): {rows[0]['fd_protocol']}." if "fd_protocol" in rows[0] else "", ""] + lines
    if res.get("standard_fid"):
        lines = [f"FID by the standard protocol ({res['standard_fid_protocol']}): " + ", ".join(
            f"row {k} {v:.2f}" for k, v in res["standard_fid"].items()) + ".", ""] + lines
    for r in rows:
        how = {"cond": "no guidance", "null": "null label, no guidance"}.get(r["mode"], f"w={r['cfg_scale']:g}, phi={r['cfg_rescale']:g}")
        lines.append(f"| {r['row']} | {r['name']} | {how} | {r['train_steps']} | {c(r, 'fd')} | {c(r, 'fd_random')} | "
                     f"{c(r, 'kid')} | {c(r, 'kid_random')} | {c(r, 'cond_acc')} | {c(r, 'class_entropy')} | {c(r, 'rarest_class')} | "
                     f"{r['sample_seconds']} |")
    if "class_entropy" in real:
        lines.append(f"| - | real images | - | - | - | - | - | - | - | {real['class_entropy']:.3f} | {real['rarest_class']:.3f} | - |")
    lines += ["", "Pixel statistics (images in [0, 1]; spectrum distance: RMS over radii of log10 of the radially "
              "averaged power spectrum's ratio to the real images'):", "",
              "| row | mean | std | saturation | contrast | spectrum distance |", "|---|---|---|---|---|---|",
              f"| real | {real['mean']:.3f} | {real['std']:.3f} | {real['saturation']:.3f} | {real['contrast']:.3f} | 0 |"]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(c(r, k) for k in ("mean", "std", "saturation", "contrast",
                                                                        "spectrum_dist")) + " |")
    ceil, k_used = res["prdc_ceiling"], min(rows[0]["samples"], proto["real_images"])
    lines += ["", f"Realism and diversity: precision and recall (k = 3), density and coverage (k = 5), on features "
              f"standardised by the real set's, {k_used} real against {k_used} generated"
              + (f" (the first {k_used} of each row's {rows[0]['samples']} samples)" if k_used < rows[0]["samples"] else "")
              + "; the ceiling is one real subset against another, disjoint one (what a perfect model scores at this "
              "n):", "", "| row | " + " | ".join(f"{k} ({first})" for k in PRDC) + " | " +
              " | ".join(f"{k} (random)" for k in PRDC) + " |", "|---|" + "---|" * 8,
              "| real vs real | " + (" | ".join(f"{ceil[k]:.3f}" for k in SWEEP_KEYS[2:]) if ceil else
                                     f"no ceiling: it needs 2 x {k_used} real images, there are {proto['real_images']}"
                                     + " |" * 7) + " |"]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(c(r, k) for k in SWEEP_KEYS[2:]) + " |")
    lines += ["", f"Paired differences (row a - row b: the rows share their initial noise and labels; 95% paired "
              f"bootstrap interval, {rows[0]['bootstrap_resamples']} resamples). These verdicts rest on ONE training run "
              f"of each stage (seed {res['train']['seed']}) and {rows[0]['samples']} samples per row: they describe this "
              "run, not the method (reproduce --seeds K pools K training runs):", ""]
    lines += verdict_lines(res["verdicts"])
    lines += ["", rulers_line(res["verdicts"]), "", convergence_line(res)]
    lines += ["", "x0_hat from one step (`x0_hat.png`): high-frequency energy relative to real images (1 = as sharp)"
              f" and Frechet distance ({first}) to the real images, on {res['x0_hat_images']}:", "",
              "| t | " + " | ".join(f"{k}: high-freq / FD" for k in res["x0_hat"][0] if k != "t") + " |",
              "|---|" + "---|" * (len(res["x0_hat"][0]) - 1)]
    for row in res["x0_hat"]:
        lines.append(f"| {row['t']} | " + " | ".join(f"{v['high_freq']:.3f} {fmt_ci(v['high_freq_ci'])} / {v['fd']:.3f} "
                                                      f"{fmt_ci(v['fd_ci'])}" for k, v in row.items() if k != "t") + " |")
    r0 = rows[0]
    lines += ["", f"Protocol: {r0['samples']} samples per row, {r0['sampler']} eta={r0['eta']}, {r0['steps']} steps, "
              f"{r0['spacing']} spacing, seed {r0['seed']}, labels cycling through the classes (rows 6-8 and 10: the "
              f"null label), the same initial noise in every row; real statistics from {proto['real_images']} "
              f"{proto['data']} images of the {proto['real_split']} split; first ruler: {first}"
              + (f" (its accuracy on those real images: {proto['classifier_accuracy_on_real']:.3f})"
                 if "classifier_accuracy_on_real" in proto else "") + "; second ruler: fixed random features. "
              "Intervals: 95%, bootstrap over the samples (real statistics held fixed), percentile interval "
              "shifted to the estimate. A Frechet distance is biased upwards at finite n (two samples of one "
              "distribution score above 0, by an amount that depends on each row's covariance); KID (unbiased MMD^2, "
              "cubic kernel) is not, and scores about 0 there.", "",
              "Guidance sweep for row 3 (other seed, " + f"{res['settings']['sweep_n']} samples): " +
              ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in res["guidance_sweep"]) +
              f"; chosen w={res['guidance'][0]:g}, phi={res['guidance'][1]:g}. Autoguidance sweep (null label; guide: "
              f"stage 1's EMA at 1/8 of its steps): " + ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in
                                                                   res["autoguidance_sweep"]) +
              f"; chosen w={res['autoguidance'][0]:g} for rows 9 and 10. Guidance sweep of the self-perceptual model "
              "for row 5: " + ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in res["sp_guidance_sweep"]) +
              f"; chosen w={res['sp_guidance'][0]:g}.", ""] + [f"Note: {n}" for n in res["notes"]] + ["",
              f"Wall time {res['wall_seconds'] / 60:.1f} min on {res['device']} ({res['torch_threads']} torch threads)"
              + (f"; stages reused from an earlier run: {', '.join(res['reused_stages'])}" if res["reused_stages"] else "")
              + "."]
    return "\n".join(lines) + "\n"


def cell(r, k):
    """A row's metric k with its interval, as text ("-" when the row has none)."""
    return f"{r[k]:.3f} {fmt_ci(r[k + '_ci'])}" if k in r else "-"


def verdict_lines(verdicts):
    """The paired verdicts as a table, one line per pair and metric."""
    return ["| a - b | question | metric | difference [95% interval] | verdict |", "|---|---|---|---|---|"] + [
        f"| {v['a']} - {v['b']} | {v['what']} | {name} | {v[k]['diff']:+.4f} {fmt_ci(v[k]['ci'])} | {v[k]['verdict']} |"
        for v in verdicts for k, name, _ in VERDICT_METRICS if k in v]


def rulers_line(verdicts):
    """One line: the comparisons where both rulers give the same verdict, and those where they differ."""
    agree, differ = [], []
    for v in verdicts:
        if "fd" in v and "fd_random" in v:
            (agree if v["fd"]["verdict"] == v["fd_random"]["verdict"] else differ).append(f"{v['a']}-{v['b']}")
    return (f"Rulers: the two Frechet distances agree on {', '.join(agree) or 'no comparison'}; they disagree on "
            f"{', '.join(differ) or 'none'}.")


def convergence_line(res):
    """Is stage 1 converged? The control's gain over row 1, and what it means for the row-4-vs-row-1 verdict."""
    r1, r2 = (next(r for r in res["rows"] if r["row"] == k) for k in (1, 2))
    gain = (r1["fd"] - r2["fd"]) / r1["fd"] if r1["fd"] > 0 else 0.0
    v = next(v for v in res["verdicts"] if (v["a"], v["b"]) == (2, 1))["fd"]
    text = (f"Convergence of stage 1: the control (row 2, {r2['train_steps'] - r1['train_steps']} more MSE steps) "
            f"changed the Frechet distance by {-100 * gain:+.0f}% against row 1 ({v['diff']:+.3f} {fmt_ci(v['ci'])}).")
    if v["ci"][0] <= 0 <= v["ci"][1]:
        text += (" That change is not distinguishable from none at this sample size (which does not show that stage 1 "
                 "converged); row 4 against row 2 stays the fair comparison.")
    elif v["diff"] > 0:
        text += (" The control got measurably WORSE than stage 1, so the extra steps alone moved the model: row 4 "
                 "against row 1 mixes the objective with that change; row 4 against row 2 is the fair comparison.")
    elif gain > 0.1:
        text += (" That gain is large: stage 1 was not converged, so row 4 against row 1 mixes the objective with "
                 "training length; row 4 against row 2 is the fair comparison.")
    else:
        text += " The gain is under 10% but measurable: row 4 against row 2 remains the fair comparison."
    return text


def ablations_markdown(res):
    """The ablation table: each variant evaluated exactly like row 4, with paired verdicts against rows 4 and 2."""
    keys = ["fd", "fd_random", "kid", "precision", "recall", "cond_acc"]
    rows = [next(r for r in res["rows"] if r["row"] == 4)] + [a["ablation"] for a in res["ablations"]]
    lines = ["| row | variant | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines += [f"| {r['row']} | {r['name']} | " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    lines += ["", f"Each variant: {res['settings']['stage2_steps']} stage-2 steps at lr {res['settings']['stage2_lr']:g} "
              "from the same stage-1 checkpoint as row 4, sampled and measured exactly like row 4 (same noise, labels "
              "and rulers); 95% paired bootstrap intervals, one training run:", ""]
    return "\n".join(lines + verdict_lines([v for a in res["ablations"] for v in a["verdicts"]])) + "\n"


# Where nothing was measured, time is projected from counted FLOPs at this stated assumption (a GPU's measured
# throughput replaces it: gpucheck).
ASSUMED_FLOP_S, ASSUMPTION = 0.4 * 312e12, "40% of an A100's dense bf16 peak (312 TFLOP/s)"


@functools.lru_cache(maxsize=None)
def _flops(arch):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = {**TRAIN_DEFAULTS, **dict(arch), "num_classes": 10}
    torch.manual_seed(0)
    model = UNet(**model_kwargs(cfg))
    f_star, schedule, B, S = frozen_copy(model), schedule_from(cfg), 2, cfg["image_size"]
    x0, y, out = torch.randn(B, 3, S, S), torch.randint(0, 10, (B,)), {}
    # PITFALL: the counter has no formula for the CPU's fused attention kernel (it would count attention as 0
    # FLOPs); the math kernel computes the same product with matmuls it counts.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for loss in ("mse", "self-perceptual"):
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            objective(loss, model, f_star, schedule)(x0, y).backward()
        out[loss] = fc.get_total_flops() / B
    with torch.no_grad(), FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        model(x0, torch.zeros(B, dtype=torch.long), y)
    return {**out, "forward": fc.get_total_flops() / B, "params": sum(p.numel() for p in model.parameters())}


ARCH_FLAGS = ["image_size", "channels", "channel_mult", "num_res_blocks", "attn_res"]   # what FLOPs depend on


def count_flops(train_cfg):
    """FLOPs per image (2 per multiply-add; torch's FLOP counter, on the CPU at batch 2, seconds even for the
    cifar10 network) of one training step of each objective, forward and backward, and of one sampling forward."""
    return _flops(tuple(sorted((k, train_cfg[k]) for k in ARCH_FLAGS if k in train_cfg)))


def work(p):
    """What a run of preset settings p does, counted: (what, how many, kind) per part; kind mse and
    self-perceptual count training steps of the global batch, forward and guided count sampling image-steps
    (a guided one costs two forwards)."""
    k, S = 10, p["eval_steps"]                                    # classes of shapes and CIFAR-10
    n_unguided, n_guided = sum(m in ("cond", "null") for *_, m in ROWS), sum(m not in ("cond", "null") for *_, m in ROWS)
    unguided = S * ((n_unguided * p["eval_n"] + 2 * p["sweep_n"]) + 3 * p["picture_per_class"] * k) + 12 * p["x0_n"]
    guided = S * (n_guided * p["eval_n"] + 3 * len(p["sweep_scales"]) * p["sweep_n"] + 2 * p["picture_per_class"] * k)
    parts = [("stage 1: the shipped model, not trained", 0, "mse") if p["stage1"] == "shipped" else
             (f"stage 1: mse, {p['stage1_steps']:,} steps", p["stage1_steps"], "mse"),
             (f"stage 2: self-perceptual, {p['stage2_steps']:,} steps", p["stage2_steps"], "self-perceptual"),
             (f"control: mse, {p['stage2_steps']:,} steps", p["stage2_steps"], "mse"),
             (f"evaluation: {unguided:,} image-steps unguided", unguided, "forward"),
             (f"evaluation: {guided:,} image-steps guided", guided, "guided")]
    if p.get("fid_protocol") == "standard":                        # rows 1, 2, 4 unguided and 3 guided
        parts += [(f"standard FID: 3 x {p['fid_n']:,} samples unguided", 3 * p["fid_n"] * S, "forward"),
                  (f"standard FID: {p['fid_n']:,} samples guided", p["fid_n"] * S, "guided")]
    return parts


def unit_flops(p):
    """FLOPs of one unit of each kind of work(p): a training step of the global batch, a sampling image-step."""
    B, fl = p["train"]["batch_size"], count_flops(p["train"])
    return {"mse": B * fl["mse"], "self-perceptual": B * fl["self-perceptual"], "forward": fl["forward"],
            "guided": 2 * fl["forward"]}


def estimate(preset, device=None, log=print, runs=1, stage2_runs=0, shared_stage1=False, **overrides):
    """The cost of `reproduce --preset`, part by part: its FLOPs, counted (count_flops, work), and its time:
    measured from a few timed steps of each objective and of sampling on `device` (random data of the preset's
    shape: nothing is downloaded or trained), except for a GPU preset on a CPU, whose full-size steps would take
    minutes each: its hours are projected from the FLOPs at ASSUMPTION and labelled so. For `runs` full-pipeline
    seeds and `stage2_runs` runs on a shared stage 1. Not included: building the ruler and writing pictures."""
    device = device or TRAIN_DEFAULTS["device"]
    p = preset_settings(preset, overrides, device=device)
    B, fl, flop = p["train"]["batch_size"], count_flops(p["train"]), unit_flops(p)
    timed = not (p.get("target") == "gpu" and torch.device(device).type == "cpu")
    if timed:
        t = step_times(p["train"], iters=3, sample_steps=4)
        sec = {"mse": t["mse"], "self-perceptual": t["self-perceptual"], "forward": t["unguided"] / (4 * B),
               "guided": t["guided"] / (4 * B)}
    else:
        sec = {k: v / ASSUMED_FLOP_S for k, v in flop.items()}
    parts = [(name, n * flop[kind], n * sec[kind]) for name, n, kind in work(p)]
    if shared_stage1:                                              # a later length of the sweep: stage 1 is shared
        parts[0] = ("stage 1: shared with the first length, counted there", 0.0, 0.0)
    if runs > 1 or stage2_runs:
        scale = lambda i: runs + (stage2_runs if i > 0 else 0)
        parts = [(name, f * scale(i), s * scale(i)) for i, (name, f, s) in enumerate(parts)]
        log(f"(x {runs} seeds + {stage2_runs} runs on a shared stage 1, in every line)")
    total_flop, total = sum(f for _, f, _ in parts), sum(s for _, _, s in parts)
    how = (f"measured: 3 training steps per objective at batch {B}, 4 sampling steps, forwards chunked to "
           f"{max_forward_batch(device) or 256}" if timed else f"PROJECTED at {ASSUMPTION}: an assumption, not a "
           "measurement; `python reproduce.py gpucheck` on your GPU measures it")
    log(f"estimate for --preset {preset} on {device} ({fl['params'] / 1e6:.2f}M parameters; time {how})")
    log(f"  FLOPs counted (torch's counter): one training step at batch {B}: mse {flop['mse']:.3g}, self-perceptual "
        f"{flop['self-perceptual']:.3g}; one sampling step: {fl['forward']:.3g} per image (x2 guided)")
    unit, div = ("h", 3600) if total > 5 * 3600 else ("min", 60)
    for name, f, s in parts:
        log(f"  {name:55s} {f:10.3g} FLOP {s / div:9.2f} {unit}")
    log(f"  {'total (without building the ruler)':55s} {total_flop:10.3g} FLOP {total / div:9.2f} {unit}"
        + ("" if timed else " projected")
        + f"   (--ablations adds {len(ABLATIONS)} x {p['stage2_steps'] * sec['self-perceptual'] / div:.2f} {unit} of training)")
    return {"parts": {name: s for name, _, s in parts}, "flops": {name: f for name, f, _ in parts},
            "total_seconds": total, "total_flops": total_flop, "timed": timed, "per_image_flops": fl}


GPUCHECK_PATHS = ["bench_fp32", "bench_bf16", "compile", "train_loop", "stages_and_evaluation", "kill_and_rerun",
                  "ddp_2_ranks", "standard_fid"]   # every path gpucheck rehearses; its JSON names each


def descendants(pid):
    """The process ids below `pid` (Linux's /proc), children first: torchrun starts its ranks in groups of their own."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def launch(argv, nproc, log_prefix="", kill_after=None, timeout=600):
    """Run a `perceptual_diffusion.py train` argv under torchrun on nproc ranks (OMP_NUM_THREADS=1 each); with
    kill_after=k, SIGKILL it and its ranks once rank 0 has logged step k. Returns (exit code, stdout, stderr)."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           perceptual_diffusion.__file__, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if kill_after is None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return r.returncode, r.stdout, r.stderr
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith(f"step {kill_after}/"):
            for pid in descendants(p.pid) + [p.pid]:               # SIGKILL the ranks and torchrun, as a scheduler
                try:                                               # ends a job: no handler, no last checkpoint
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            break
    out, err = p.communicate(timeout=timeout)
    return p.returncode, "".join(seen) + out, err


def gpu_check(device="cuda", tiny=False, out="gpu_check.json", log=print):
    """Every path the cifar10 presets take, rehearsed at a tiny size and timed, in one command (at most a few minutes
    on one GPU; --tiny on a CPU is how the test suite runs it), on the built-in shapes at 32 px (no network):
    bench's figures in fp32, bf16 (where the GPU has native bf16) and compiled; the real training loop (EMA,
    clipping, logging) whose img/s projects each GPU preset's hours; a tiny reproduce (stage 1 MSE, stage 2
    self-perceptual with its frozen copy, the control, the evaluation with every ruler on the device); a stage
    killed with SIGKILL and launched again with its printed torchrun command (it continues from its checkpoint, then
    a third launch leaves the finished run untouched); a self-perceptual stage with --sp-with-mse auto on 2 ranks
    (NCCL with 2 GPUs, gloo on a CPU; one GPU: not exercised); standard FID and the paired rulers in the real
    pytorch-fid network's features where its weights are already on disk (nothing downloads them). Writes one JSON: the figures, and `paths` with each path "ok", "not exercised: why" or
    "FAILED: the error"; returns the failures."""
    import tempfile
    dev = torch.device(device)
    model_keys = ["channels", "channel_mult", "num_res_blocks", "attn_res", "dropout", "batch_size"]
    cfg = {**{k: PRESETS["cifar10"]["train"][k] for k in model_keys}, "image_size": 32, "device": device}
    if tiny:
        cfg.update(channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="", batch_size=4, image_size=8)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    figures, paths, failures = {"device": machine(), "torch": torch.__version__, "config": cfg}, {}, {}

    def part(name, fn, skip=None):
        """Run one path; record its figures, or why it was not exercised, or its failure (every path is tried)."""
        if skip:
            paths[name] = f"not exercised: {skip}"
            log(f"{name}: {paths[name]}")
            return
        t0 = time.time()
        try:
            figures[name] = fn()
            figures.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
            paths[name] = "ok"
            log(f"{name}: {json.dumps(figures[name])} ({time.time() - t0:.0f} s)")
        except Exception as e:
            failures[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            paths[name] = f"FAILED: {failures[name]}"
            log(f"{name}: FAILED {failures[name]}")

    speeds = lambda **kw: bench({**cfg, **kw}, iters=2 if tiny else 20, log=lambda s: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bf16 = dev.type == "cpu" or native_bf16(dev)                  # a CPU emulates it; an older GPU would only emulate
    part("bench_fp32", lambda: speeds(precision="fp32"))
    part("bench_bf16", lambda: speeds(precision="bf16"), None if bf16 else "this GPU has no native bf16")
    part("compile", lambda: speeds(precision="bf16" if bf16 else "fp32", compile=True))
    with tempfile.TemporaryDirectory() as tmp:

        def train_loop():
            steps = 12 if tiny else 200
            train({**cfg, "steps": steps, "log_every": steps // 4, "out": os.path.join(tmp, "loop"), "sample_every": 0,
                   "warmup": 1}, log=lambda s: None)
            with open(os.path.join(tmp, "loop", perceptual_diffusion.METRICS)) as f:
                last = [json.loads(line) for line in f][-1]               # after the warm-up of the first lines
            return {"train_img_s_mse": last["img_s"], "steps": steps, "with": "EMA, clipping, logging"}
        part("train_loop", train_loop)

        def stages():                              # in bf16 where the GPU has it, as the cifar10 presets train
            more = {} if tiny else dict(stage1_steps=48, stage2_steps=24)
            precision = "bf16" if dev.type == "cuda" and bf16 else "fp32"
            res = reproduce("smoke", os.path.join(tmp, "r"), device, log=lambda s: None, train={"precision": precision},
                            **more)
            return {"minutes": res["wall_seconds"] / 60, "rulers_on": res["device"], "rows": len(res["rows"]),
                    "precision": precision}
        part("stages_and_evaluation", stages)

        def kill_and_rerun():
            steps, every = (120, 5) if tiny else (600, 50)     # headroom: the kill must land before the end
            line = print_commands("smoke", min(max(gpus, 1), 2), os.path.join(tmp, "k"), device=device,
                                  log=lambda s: None, stage1_steps=steps, train={"ckpt_every": every, "log_every": 1})[0]
            argv = shlex.split(line)[3:]                               # after torchrun and its launch flags
            nproc = int(shlex.split(line)[2].split("=")[1])
            ckpt = os.path.join(tmp, "k", "mse", "ckpt.pt")
            code, _, err = launch(argv[1:], nproc, kill_after=every + 2)
            at = load_checkpoint(ckpt)["step"]
            if not every <= at < steps:
                raise RuntimeError(f"after the kill the checkpoint is at step {at}, not between {every} and {steps}")
            code, stdout, err = launch(argv[1:], nproc)
            if code or f"at step {at}" not in stdout:
                raise RuntimeError(f"the relaunch did not continue from step {at}: {(err.strip().splitlines() or [''])[-1]}")
            before = open(ckpt, "rb").read()
            code, stdout, err = launch(argv[1:], nproc)
            if code or open(ckpt, "rb").read() != before:
                raise RuntimeError("launching the finished stage again changed it")
            return {"killed_at_checkpoint": at, "ranks": nproc, "continued_and_finished": steps, "third_launch": "untouched"}
        part("kill_and_rerun", kill_and_rerun)

        def ddp():    # a stage 2 on 2 ranks: the frozen copy, the lambda's all-reduce, a stop poll (step 10)
            init = os.path.join(tmp, "r", "mse", "ckpt.pt")
            if not os.path.isfile(init):
                raise RuntimeError("it fine-tunes the stage 1 of stages_and_evaluation, which did not finish")
            c = {**TRAIN_DEFAULTS, **load_checkpoint(init)["config"]}
            stage = {**c, "loss": "self-perceptual", "init": init, "steps": 12, "sp_with_mse": "auto", "batch_size": 8,
                     "log_every": 4, "sample_every": 0, "out": os.path.join(tmp, "ddp"), "device": device}
            code, stdout, err = launch(["train", *shlex.split(train_flags(stage, {"resume"}))], 2)
            if code or "2 rank(s)" not in stdout or "step 12/12" not in stdout:
                raise RuntimeError((err.strip().splitlines() or ["no output"])[-1])
            lam = load_checkpoint(os.path.join(tmp, "ddp", "ckpt.pt"))["config"]["sp_lambda_value"]
            return {"backend": "nccl" if dev.type == "cuda" else "gloo", "ranks": 2, "stage": "self-perceptual, "
                    "--sp-with-mse auto", "sp_lambda_value": lam}
        part("ddp_2_ranks", ddp, None if dev.type == "cpu" or gpus >= 2 else
             f"multi-rank NCCL not exercised: {gpus} GPU here (the 1-rank launch above ran)")

        weights = os.path.join(torch.hub.get_dir(), "checkpoints", "pt_inception-2015-12-05-6726825d.pth")

        def fid():    # the real network: standard FID, and the paired rulers in its 2048-d features
            ruler = Ruler("fid", "shapes", os.path.join(tmp, "data"), cfg["image_size"], 0, 500, dev, log=lambda s: None)
            model = UNet(**model_kwargs({**TRAIN_DEFAULTS, **cfg, "num_classes": 10})).to(dev).eval()
            n, schedule = 200 if tiny else 2000, schedule_from(TRAIN_DEFAULTS)
            res, _ = evaluate_model(model, schedule, ruler, 200, 4, resamples=20)
            return {"fid_untrained_model": standard_fid(model, schedule, ruler, n, 4), "samples": n,
                    "paired_fd_2048d": res["fd"], "kid": res["kid"], "precision": res["precision"]}
        part("standard_fid", fid, None if importlib.util.find_spec("pytorch_fid") and os.path.isfile(weights) else
             f"pytorch-fid or its weights ({weights}) are not here, and nothing downloads them in this check")
    figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    if "train_loop" in figures:    # this device's achieved FLOP/s in the real loop, applied to each preset's count
        achieved = figures["train_loop"]["train_img_s_mse"] * count_flops(cfg)["mse"]
        figures["achieved_tflop_s"] = achieved / 1e12
        figures["projected_hours"] = {name: sum(n * unit_flops(p)[kind] for _, n, kind in work(p)) / achieved / 3600
                                      for name, p in PRESETS.items() if p.get("target") == "gpu"}
        log(f"this device: {achieved / 1e12:.2f} TFLOP/s achieved (training loop); hours per preset, at that rate: "
            + ", ".join(f"{k} {v:.1f} h" for k, v in figures["projected_hours"].items()))
    figures.update(paths=paths, failures=failures)
    with open(out, "w") as f:
        json.dump(figures, f, indent=1)
    log(f"wrote {out}: {len(failures)} failure(s)" + (f": {', '.join(failures)}" if failures else ""))
    return failures


# =================================================================================================
#                                       9. Command line
# =================================================================================================

def at_least(k):
    """An integer >= k (a covariance needs at least 2 samples)."""
    return ranged(int, lambda v: v >= k, f"an integer >= {k}")


def steps_list(text):
    """'N' or 'N1,N2,...': distinct positive step counts, ascending."""
    try:
        steps = [int(v) for v in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise argparse.ArgumentTypeError(f"must be a positive integer or distinct ones such as 600,2500, got {text!r}")
    return sorted(steps)


def ablation_list(text):
    """'all' (True) or ablation keys, comma-separated (a list)."""
    keys = [k for k, _, _ in ABLATIONS]
    asked = [k.strip() for k in text.split(",") if k.strip()]
    if text == "all":
        return True
    if not asked or any(k not in keys for k in asked):
        raise argparse.ArgumentTypeError(f"must be all or some of {', '.join(keys)} (comma-separated), got {text!r}")
    return asked


def seeds_arg(text):
    """'K' (seeds 0..K-1, K >= 1) or 'S1,S2,...' (distinct integers): the training seeds of reproduce --seeds."""
    try:
        seeds = list(range(int(text))) if "," not in text else [int(v) for v in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be a count K >= 1 or distinct seeds such as 0,3,7, got {text!r}")
    return seeds


def build_parser():
    """The command line: reproduce, evaluate, gpucheck. Every numeric flag's range is its type."""
    parser = Parser(prog="reproduce.py", description=__doc__.split("\n\n")[0].strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    p = sub.add_parser("evaluate", help="Frechet distances, conditional accuracy and pixel statistics of a checkpoint's samples, with 95%% intervals")
    add_sampling_args(p)
    p.add_argument("--n", type=at_least(2), default=1000, help="number of samples (default: 1000)")
    p.add_argument("--label", type=NONNEG_INT, default=None, help="as for sample (num_classes: unconditional)")
    p.add_argument("--features", default="classifier", choices=["classifier", "fid"], help="first feature network: "
                   "classifier (trained here, offline) or fid (standard FID's network: the optional package "
                   "pytorch-fid); the second is always fixed random features")
    p.add_argument("--real-n", type=at_least(2), default=2000, help="real images for the reference statistics (default: 2000)")
    p.add_argument("--classifier-steps", type=POS_INT, default=CLASSIFIER_STEPS, help="training steps of the "
                   f"classifier ruler, cached per data set under the data folder (default: {CLASSIFIER_STEPS}, as reproduce)")
    p.add_argument("--resamples", type=at_least(20), default=1000, help="bootstrap resamples for the 95%% intervals (default: 1000)")
    p.add_argument("--json", default="", help="also write the result, with its protocol, to this JSON file")
    p = sub.add_parser("reproduce", help="the paper's comparison: train both stages, evaluate every row, write tables and pictures")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="cpu (default: fine-tunes the shipped stage "
                   "1), cpu-long (trains its own, <= 60 min on 2 cores), cifar10 (DDPM's recipe, one GPU), cifar10-quick "
                   "(at half width: 1.6 h projected on one GPU), smoke (seconds)")
    p.add_argument("--out", default="runs/reproduce", help="run folder; finished stages in it are reused (default: runs/reproduce)")
    p.add_argument("--device", type=device_arg, default=None, help="device: auto (cuda, else mps, else cpu; a GPU "
                   "preset then refuses a CPU), cpu, cuda or mps (default: auto)")
    p.add_argument("--seed", type=ANY_INT, default=0, help="seed of training and evaluation (default: 0)")
    p.add_argument("--seeds", type=seeds_arg, default=None, metavar="K|S1,S2,..", help="run the whole pipeline once per "
                   "training seed (K: seeds 0..K-1), each in --out/seedS, and pool the verdicts over them (pooled.md)")
    p.add_argument("--stage2-seeds", type=NONNEG_INT, default=0, help="with --seeds: J more runs on the first seed's "
                   "stage 1 with their own stage-2 and sampling seeds, to split the spread into its sources (default: 0)")
    p.add_argument("--cooldown", type=UNIT, default=None, help="override the preset's stage-1 cool-down fraction (0: "
                   "constant learning rate)")
    p.add_argument("--fid-protocol", default=None, choices=["heldout", "standard"], help="heldout: the paired "
                   "comparison only (every preset); standard: also FID of rows 1-4 by the literature's protocol "
                   "(50,000 samples against the training set; the cifar10 presets' default)")
    p.add_argument("--stage1", default=None, choices=["shipped", "train"], help="stage 1: the shipped pretrained "
                   "model (the cpu preset's default: its data and model only) or trained by this run (the other "
                   "presets' default)")
    p.add_argument("--stage1-steps", type=POS_INT, default=None, help="override the preset's stage-1 (MSE) steps")
    p.add_argument("--stage2-steps", type=steps_list, default=None, metavar="N|N1,N2,..", help="override the preset's "
                   "stage-2 steps (and the control's); a list runs the length sweep, each length in --out/stepsN "
                   "with --seeds, and writes lengths.md and stage2_length.png")
    p.add_argument("--eval-n", type=at_least(2), default=None, help="override the preset's samples per row")
    p.add_argument("--ablations", type=ablation_list, nargs="?", const=True, default=False, metavar="NAMES",
                   help="also train and evaluate the ablations of the self-perceptual objective (the paper's and the "
                   f"variants beyond it): all, or some of {','.join(k for k, _, _ in ABLATIONS)}; writes "
                   "ablations.md and ablations.json")
    p.add_argument("--estimate", action="store_true", help="count the FLOPs of each stage and of sampling, time a few "
                   "steps (or project the time of a GPU preset on a CPU) and print the cost; train nothing")
    p.add_argument("--print-commands", type=POS_INT, default=None, metavar="NPROC", help="print the torchrun command "
                   "of each training stage on NPROC GPUs and the reproduce command that then evaluates them; run nothing")
    p.add_argument("--nnodes", type=POS_INT, default=1, help="with --print-commands: the number of nodes (default: 1)")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT", help="with --print-commands and --nnodes > 1: "
                   "where the nodes meet (torchrun's rendezvous)")
    add_train_args(p, REPRODUCE_TRAIN_ARGS, override=True)
    p = sub.add_parser("pretrain", help="regenerate the shipped stage 1 (pretrained/): train it, store it in fp16 "
                       "with its sha256, measure it")
    p.add_argument("--out", default="runs/pretrain", help="the training run's folder; a finished run is reused "
                   "(default: runs/pretrain)")
    p.add_argument("--dest", default=PRETRAINED_DIR, help="where the shipped files are written (default: pretrained/)")
    p.add_argument("--device", type=DEVICE, default=TRAIN_DEFAULTS["device"], help="device: auto (cuda, else mps, else cpu), cpu, cuda or mps (default: auto)")
    p = sub.add_parser("gpucheck", help="every accelerator path once, timed, in one command; writes a JSON of figures")
    p.add_argument("--device", type=DEVICE, default=TRAIN_DEFAULTS["device"], help="device: auto (cuda, else mps, else cpu), cpu, cuda or mps (default: auto)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: how the test suite runs the check on a CPU")
    p.add_argument("--out", default="gpu_check.json", help="the JSON of figures (default: gpu_check.json)")
    return parser


def run_evaluate(args):
    """`evaluate`: one checkpoint's samples measured with both rulers (outputs checked before any work)."""
    if args.json:
        writable_file(args.json, "--json", [".json"])
    ckpt, model, guide = load_for_sampling(args)
    c = ckpt["config"]
    ruler = Ruler(args.features, c["data"], c["data_dir"], c["image_size"], c["data_seed"], args.real_n,
                  torch.device(args.device), classifier_steps=args.classifier_steps)
    res, _ = evaluate_model(model, schedule_from(c), ruler, args.n, args.steps, args.cfg, args.cfg_rescale, args.eta,
                            args.spacing, args.seed, args.batch, args.precision, args.label, args.resamples,
                            args.cfg_interval, guide)
    res["checkpoint"], res["train_steps"] = args.ckpt, ckpt.get("total_steps", ckpt["step"])
    print(json.dumps(res))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        except OSError as e:
            raise OSError(f"could not write --json {args.json!r} ({e.strerror or e}); the result is the JSON line "
                          f"printed above")


def device_arg(text):
    """--device of reproduce: as DEVICE, but `auto` kept as it is, so that an explicit --device cpu can be told from
    a machine where auto found no GPU."""
    return text if text == "auto" else DEVICE(text)


def run_reproduce(args):
    """`reproduce`: the comparison once, over seeds, or its projected cost (--estimate). A GPU preset refuses to
    train where no GPU is visible unless --device cpu is given (--estimate and --print-commands train nothing)."""
    explicit_cpu = args.device is not None and args.device != "auto" and torch.device(args.device).type == "cpu"
    args.device = None if args.device == "auto" else args.device
    device = args.device or TRAIN_DEFAULTS["device"]
    if (PRESETS[args.preset].get("target") == "gpu" and torch.device(device).type == "cpu" and not explicit_cpu
            and not (args.estimate or args.print_commands)):
        raise UsageError(f"--preset {args.preset} is sized for a GPU and none is visible here (torch "
                         f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}): run it where CUDA is, "
                         "or give --device cpu to train it on this CPU anyway (--estimate projects the time)")
    lengths = args.stage2_steps or [None]
    overrides = dict(fid_protocol=args.fid_protocol, stage1=args.stage1, stage1_steps=args.stage1_steps,
                     stage2_steps=lengths[0], eval_n=args.eval_n, cooldown=args.cooldown,
                     train={k: getattr(args, k) for k in REPRODUCE_TRAIN_ARGS})
    if args.stage2_seeds and not args.seeds:
        raise UsageError("--stage2-seeds needs --seeds")
    if len(lengths) > 1:
        if args.print_commands or args.stage2_seeds:
            raise UsageError("a list of --stage2-steps runs the length sweep: give one length with "
                             f"{'--print-commands' if args.print_commands else '--stage2-seeds'}")
        for i, steps in enumerate(lengths):
            if args.estimate:
                estimate(args.preset, args.device, runs=len(args.seeds or [0]), shared_stage1=i > 0,
                         **{**overrides, "stage2_steps": steps})
        if not args.estimate:
            reproduce_lengths(args.preset, args.out, lengths, args.seeds or [0], args.device, ablations=args.ablations,
                              **overrides)
    elif args.print_commands:
        print_commands(args.preset, args.print_commands, args.out, args.seed, args.device, args.ablations,
                       nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, **overrides)
    elif args.estimate:
        estimate(args.preset, args.device, runs=len(args.seeds or [0]), stage2_runs=args.stage2_seeds, **overrides)
    elif args.seeds:
        reproduce_seeds(args.preset, args.out, args.seeds, args.stage2_seeds, args.device, ablations=args.ablations,
                        **overrides)
    else:
        reproduce(args.preset, args.out, args.device, args.seed, ablations=args.ablations, **overrides)


def run_gpucheck(args):
    """`gpucheck`: exit code 1 if any path failed."""
    writable_file(args.out, "--out", [".json"])
    return 1 if gpu_check(args.device, args.tiny, args.out) else 0


def main(argv=None):
    """Run one command (none, or flags alone: reproduce); each problem is one line (run_command)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["reproduce", *argv]                                # python reproduce.py --out runs/x
    commands = {"evaluate": run_evaluate, "reproduce": run_reproduce, "gpucheck": run_gpucheck,
                "pretrain": lambda args: pretrain(args.out, args.dest, args.device) and None}
    return run_command(build_parser(), argv, lambda args: commands[args.command](args),
                       "reproduce, evaluate, pretrain or gpucheck")


if __name__ == "__main__":
    sys.exit(main())
