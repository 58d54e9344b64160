"""What every number is measured with: the feature networks (a classifier trained here, standard FID's
Inception, fixed random features), pixel statistics, the Ruler that holds the real images' statistics, the
evaluation of a model's samples, standard FID, and the x0_hat study.
"""
import hashlib
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from perceptual_diffusion import (FOLDER_HELDOUT, UsageError, autocast, generate, load_dataset, norm, to_model_range,
                                  matches_sha256, to_uint8, weights_hash)
from .metrics import (bootstrap_weights, feature_stats, frechet_distances, kid_real_term, prdc_indicators, resampled_fd,
                      resampled_kid, resampled_prdc, sqrtm_psd)
from .report import tile
from .stats import interval


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


CLASSIFIER_STEPS = 400      # training steps of the classifier ruler, wherever one is built
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")   # its rulers


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


def stratified_order(y, seed):
    """A seeded order of labels y in which every prefix holds each class in proportion (within about 1.5 images):
    position k takes the class furthest behind k n_c / N, each class's images in a seeded random order."""
    g, classes = torch.Generator().manual_seed(seed), y.unique().tolist()
    pools = {c: (y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)].tolist() for c in classes}
    n, order = {c: len(pools[c]) for c in classes}, []
    for k in range(1, len(y) + 1):
        c = max((c for c in classes if pools[c]), key=lambda c: k * n[c] / len(y) - (n[c] - len(pools[c])))
        order.append(pools[c].pop())
    return torch.tensor(order)


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
        if data not in ("shapes", "cifar10"):     # ImageFolder lists class by class: the rulers take prefixes of the
            order = stratified_order(heldout_y, data_seed)        # held-out images, and each must hold every class
            heldout, heldout_y = heldout[order], heldout_y[order]
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
        """The shipped classifier for (data, image size, data seed, steps) where pretrained/ has one (the default
        data: every machine then measures with the same weights; one trained on each machine differs, as fp32
        kernels do), else the one cached under data_dir, else a newly trained one (then cached): `evaluate` and
        every `reproduce` on one data set measure with the same ruler. Its weights' hash goes into the protocol."""
        path = cache_path(data_dir, f"classifier{steps}", data, image_size, data_seed)
        shipped = os.path.join(SHIPPED_DIR, os.path.basename(path))
        net = Classifier(num_classes)
        if os.path.isfile(shipped):
            if not os.path.isfile(shipped + ".sha256") or not matches_sha256(shipped):
                raise UsageError(f"{shipped!r} does not match its sha256 in {shipped}.sha256: the shipped ruler was "
                                 "changed or damaged; restore it (git checkout)")
            net.load_state_dict(torch.load(shipped, map_location="cpu", weights_only=True)["model"])
            self.protocol["ruler"] = f"pretrained/{os.path.basename(path)} (shipped)"
        else:
            self.protocol["ruler"] = os.path.basename(path)
            try:
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
            except Exception:                                      # no cache, or an unreadable one: train one
                images, labels, _, _ = load_dataset(data, data_dir, image_size, train=True, seed=data_seed)
                net = train_classifier(images, labels, num_classes, steps, self.device, log=log)
                try:
                    os.makedirs(data_dir, exist_ok=True)
                    torch.save({"model": net.state_dict()}, path)
                except OSError as e:
                    log(f"the classifier ruler could not be cached in {path} ({e.strerror or e}); it was used all "
                        "the same")
        self.protocol["ruler_hash"] = weights_hash(net.state_dict())
        return net.to(self.device).eval()

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
