"""Tests of perceptual_diffusion.py: each name states the property it checks. All on CPU, tiny models.
Run: python -m pytest -q"""
import argparse
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import perceptual_diffusion as pd

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=3)
# The same tiny model as training flags, on 16-pixel shapes.
TINY_FLAGS = ["--image-size", "16", "--channels", "8", "--channel-mult", "1,2", "--attn-res", "8", "--batch-size", "8"]
TINY_CFG = dict(image_size=16, channels=8, channel_mult="1,2", attn_res="8", batch_size=8, warmup=1, lr=1e-3,
                log_every=1, sample_every=0, device="cpu")

def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    model = pd.UNet(**{**TINY, **kw})
    # UNet zero-initialises its output layers (each block starts as the identity); perturb them so that
    # tests see a network whose every path matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "perceptual_diffusion.py"), *args],
                          capture_output=True, text=True, timeout=300, **kw)


# ------------------------------------------ schedule ------------------------------------------

@pytest.mark.parametrize("betas", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_makes_last_alpha_bar_zero_and_keeps_first(betas):
    plain, ztsnr = pd.Schedule(1000, betas, zero_terminal_snr=False), pd.Schedule(1000, betas)
    assert ztsnr.alpha_bar[-1].item() == 0.0
    assert plain.alpha_bar[-1].item() > 0                          # the flaw the rescale fixes
    assert ztsnr.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-6)
    assert ztsnr.betas[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("betas", ["linear", "scaled_linear", "cosine"])
def test_snr_strictly_decreasing_and_alpha_sigma_on_unit_circle(betas):
    s = pd.Schedule(1000, betas)
    snr = s.alpha_bar.double() / (1 - s.alpha_bar.double())
    assert (snr[1:] < snr[:-1]).all()
    assert torch.allclose(s.alpha ** 2 + s.sigma ** 2, torch.ones(1000), atol=1e-6)


def test_ztsnr_matches_common_diffusion_algorithm_1_on_sd_betas():
    # Algorithm 1 of Lin et al. 2023, written out in numpy on Stable Diffusion's betas.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    a = np.sqrt(np.cumprod(1 - betas))
    a0, aT = a[0], a[-1]
    a = (a - aT) * a0 / (a0 - aT)
    ab = a ** 2
    ref = 1 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    assert np.allclose(pd.Schedule(1000, "scaled_linear").betas.numpy(), ref, atol=1e-6)


def test_q_sample_and_v_target_follow_their_definitions():
    s = pd.Schedule(1000)
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    a, sg = s.alpha[t].view(-1, 1, 1, 1), s.sigma[t].view(-1, 1, 1, 1)
    assert torch.allclose(s.q_sample(x0, t, eps), a * x0 + sg * eps)
    assert torch.allclose(s.v_target(x0, eps, t), a * eps - sg * x0)
    assert torch.equal(s.q_sample(x0, t[3:].expand(4), eps), eps)  # t = T-1 is pure noise


def test_v_x0_eps_conversions_invert_each_other_at_every_t_including_last():
    s = pd.Schedule(1000)
    x0, eps = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t, v = s.q_sample(x0, t, eps), s.v_target(x0, eps, t)
    x0_hat, eps_hat = s.pred_to_x0_eps(x_t, v, t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
    assert torch.isfinite(x0_hat).all()


def test_timesteps_match_published_definitions_on_known_cases():
    s = pd.Schedule(1000)
    # Common Diffusion, Table 2 (T = 1000, S = 10), and diffusers' DDIMScheduler for S = 3.
    assert s.timesteps(10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps(10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert s.timesteps(10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert s.timesteps(3, "trailing").tolist() == [999, 666, 332]
    assert s.timesteps(3, "leading").tolist() == [666, 333, 0]
    assert s.timesteps(3, "linspace").tolist() == [999, 500, 0]
    assert s.timesteps(1000, "trailing").tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        s.timesteps(10, "sideways")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_every_step_count_gives_exactly_that_many_strictly_decreasing_timesteps_in_range(spacing):
    s = pd.Schedule(1000)
    for steps in range(1, 1001):
        t = s.timesteps(steps, spacing)
        assert len(t) == steps, (spacing, steps)
        assert t.min() >= 0 and t.max() <= 999 and (t[1:] < t[:-1]).all(), (spacing, steps)
        if spacing == "trailing":
            assert t[0] == 999                                    # starts where the model saw pure noise


def test_sampler_at_61_steps_ends_like_60_steps_not_on_a_pure_noise_step():
    # 61 was one of the 62 step counts whose trailing list ended at t = -1 (alpha_bar[-1] = 0): the last step
    # then read a nearly clean image as pure noise and returned std 0.000 with an exact denoiser.
    s, mu, std = pd.Schedule(1000, "linear"), 0.0, 0.3
    noise = torch.randn(500, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (60, 61, 103):
        x = pd.sample(GaussianDenoiser(s, mu, std), s, noise.shape, steps=steps, noise=noise)
        assert x.std().item() == pytest.approx(0.275, abs=0.02), steps


# ------------------------------------------- model --------------------------------------------

def test_unet_returns_v_of_input_shape_and_null_label_changes_it():
    model = tiny_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    v = model(x, t, torch.tensor([0, 1]))
    assert v.shape == x.shape
    assert not torch.allclose(v, model(x, t, torch.tensor([3, 3])))   # label 3 = num_classes = null
    assert torch.allclose(model(x, t, None), model(x, t, torch.tensor([3, 3])))


def test_unet_default_is_the_command_line_default_model():
    args = vars(pd.build_parser().parse_args(["train"]))
    cfg = {**args, "num_classes": 10}                              # shapes has 10 classes
    unet_defaults = {k: p.default for k, p in inspect.signature(pd.UNet).parameters.items() if k != "in_channels"}
    assert pd.model_kwargs(cfg) == unet_defaults
    a, b = pd.UNet(), pd.UNet(**pd.model_kwargs(cfg))
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_features_equal_mid_block_activation_of_full_forward():
    model = tiny_unet().eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 700]), torch.tensor([2, 0])
    seen = {}
    hook = model.mid[-1].register_forward_hook(lambda m, i, o: seen.update(mid=o))
    model(x, t, y)
    hook.remove()
    assert len(model.features(x, t, y)) == 1 and torch.equal(model.features(x, t, y)[0], seen["mid"])


def test_features_skip_the_up_path():
    model = tiny_unet()
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in model.up]
    model.features(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([0]))
    assert calls == []
    [h.remove() for h in hooks]


def test_image_size_the_unet_cannot_halve_is_refused_at_the_door_and_asserted_by_the_model():
    with pytest.raises(pd.UsageError, match="cannot be halved"):
        pd.check_flags({**pd.TRAIN_DEFAULTS, "image_size": 30, "channel_mult": "1,2,2"})
    with pytest.raises(AssertionError, match="cannot be halved"):
        pd.UNet(image_size=30, channel_mult=(1, 2, 2))


# ------------------------------------------ objectives -----------------------------------------

def test_mse_loss_is_plain_v_mse():
    model, s = tiny_unet(), pd.Schedule(1000)
    x0, y, t, eps = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 9, 500, 999]), torch.randn(4, 3, 8, 8)
    expected = ((model(s.q_sample(x0, t, eps), t, y) - s.v_target(x0, eps, t)) ** 2).mean()
    assert pd.mse_loss(model, s, x0, y, t, eps).item() == pytest.approx(expected.item(), rel=1e-5)


def test_losses_are_finite_scalars_at_the_last_timestep():
    model, s = tiny_unet(), pd.Schedule(1000)
    perceptual = pd.frozen_copy(model)
    x0, y, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3]), torch.full((3,), 999)
    for loss in (pd.mse_loss(model, s, x0, y, t), pd.self_perceptual_loss(model, perceptual, s, x0, y, t, t_prime=t)):
        assert loss.dim() == 0 and torch.isfinite(loss)


def test_self_perceptual_gives_online_model_gradients_and_perceptual_net_none():
    model, s = tiny_unet(), pd.Schedule(1000)
    perceptual = pd.frozen_copy(tiny_unet(seed=1))
    loss = pd.self_perceptual_loss(model, perceptual, s, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())
    assert not perceptual.training


def test_self_perceptual_is_zero_when_online_model_predicts_true_v():
    s = pd.Schedule(1000)
    perceptual = pd.frozen_copy(tiny_unet())
    x0, eps, y = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    t, t_prime = torch.tensor([0, 300, 700, 999]), torch.tensor([999, 10, 500, 0])
    oracle = lambda x_t, t_, y_: s.v_target(x0, eps, t_)
    assert pd.self_perceptual_loss(oracle, perceptual, s, x0, y, t, t_prime, eps).item() < 1e-10
    wrong = lambda x_t, t_, y_: s.v_target(x0, eps, t_) + 0.1
    assert pd.self_perceptual_loss(wrong, perceptual, s, x0, y, t, t_prime, eps).item() > 1e-6


def test_self_perceptual_compares_real_and_predicted_branches_at_t_prime():
    # Written out from Algorithm 1 with the same draws: the function must equal this.
    model, s = tiny_unet(), pd.Schedule(1000)
    f = pd.frozen_copy(tiny_unet(seed=2))
    x0, eps, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    t, tp = torch.tensor([100, 800]), torch.tensor([600, 50])
    x_t = s.alpha[t].view(-1, 1, 1, 1) * x0 + s.sigma[t].view(-1, 1, 1, 1) * eps
    v = model(x_t, t, y)
    a, sg = s.alpha[t].view(-1, 1, 1, 1), s.sigma[t].view(-1, 1, 1, 1)
    x0_hat, eps_hat = a * x_t - sg * v, sg * x_t + a * v
    ap, sp = s.alpha[tp].view(-1, 1, 1, 1), s.sigma[tp].view(-1, 1, 1, 1)
    expected = F.mse_loss(f.features(ap * x0_hat + sp * eps_hat, tp, y)[0], f.features(ap * x0 + sp * eps, tp, y)[0])
    assert pd.self_perceptual_loss(model, f, s, x0, y, t, tp, eps).item() == pytest.approx(expected.item(), rel=1e-5)


def test_t_prime_is_drawn_independently_of_t():
    s, seen = pd.Schedule(1000), []
    f = pd.frozen_copy(tiny_unet())
    f.features = lambda x, t, y, layers: (seen.append(t.clone()), [x])[1]
    t = torch.full((256,), 5)
    pd.self_perceptual_loss(tiny_unet(), f, s, torch.randn(256, 3, 8, 8), torch.zeros(256, dtype=torch.long), t)
    assert (seen[0] != 5).float().mean() > 0.9 and seen[0].unique().numel() > 100


def test_ablation_same_t_prime_sets_t_prime_to_t_and_the_loss_vanishes_for_any_prediction():
    s, seen = pd.Schedule(1000), []
    f = pd.frozen_copy(tiny_unet())
    features = f.features
    f.features = lambda x, t, y, layers: (seen.append(t.clone()), features(x, t, y, layers))[1]
    model = tiny_unet(seed=3)                                      # any prediction, far from the true v
    t = torch.tensor([3, 250, 600, 998])
    loss = pd.self_perceptual_loss(model, f, s, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), t,
                                   t_prime_mode="same")
    assert torch.equal(seen[0], t) and torch.equal(seen[1], t)
    assert loss.item() < 1e-9                                      # x_hat_t = x_t exactly: the degenerate case


def test_ablation_mae_is_the_mean_absolute_difference_of_the_mid_features():
    model, s = tiny_unet(), pd.Schedule(1000)
    f = pd.frozen_copy(tiny_unet(seed=2))
    x0, eps, y, t, tp = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([100, 800]), torch.tensor([600, 50])
    x0_hat, eps_hat = s.pred_to_x0_eps(s.q_sample(x0, t, eps), model(s.q_sample(x0, t, eps), t, y), t)
    real = f.features(s.q_sample(x0, tp, eps), tp, y)[0]
    pred = f.features(s.q_sample(x0_hat, tp, eps_hat), tp, y)[0]
    got = pd.self_perceptual_loss(model, f, s, x0, y, t, tp, eps, distance="mae")
    assert got.item() == pytest.approx((pred - real).abs().mean().item(), rel=1e-5)


def test_ablation_all_layers_averages_every_down_and_mid_block_each_normalised_by_its_own_scale():
    model, s = tiny_unet(), pd.Schedule(1000)
    f = pd.frozen_copy(tiny_unet(seed=2))
    x = torch.randn(2, 3, 8, 8)
    layers = f.features(x, torch.tensor([5, 9]), torch.tensor([0, 1]), "all")
    assert len(layers) == len(f.down) + len(f.mid)                # every block the perceptual network runs
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in f.up]
    x0, eps, y, t, tp = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([100, 800]), torch.tensor([600, 50])
    got = pd.self_perceptual_loss(model, f, s, x0, y, t, tp, eps, features="all")
    assert calls == []                                             # no up path
    [h.remove() for h in hooks]
    assert got.item() > 0


class ScaledLayers:
    """A perceptual network whose "all" features are the input itself at the given scales, one layer each."""

    def __init__(self, scales):
        self.scales = scales

    def features(self, x, t, y, layers="mid"):
        return [k * x for k in self.scales]


def test_all_layers_loss_weighs_every_layer_equally_whatever_its_scale():
    # Each term is divided by its real features' mean square: a layer 10^4 times larger does not dominate, and
    # the loss equals one layer's relative error. Unnormalised, the 10^4 layer would be ~10^8 times the others.
    model, s = tiny_unet(), pd.Schedule(1000)
    x0, eps, y, t, tp = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([100, 800]), torch.tensor([600, 50])
    loss = lambda scales: pd.self_perceptual_loss(model, ScaledLayers(scales), s, x0, y, t, tp, eps, features="all").item()
    one = loss((1.0,))
    assert one > 0.01
    assert loss((1.0, 100.0, 1e4)) == pytest.approx(one, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_stage1(tmp_path_factory):
    """A 3-step stage-1 run of the tiny model: the --init of the ablation tests."""
    path = tmp_path_factory.mktemp("stage1")
    tiny_train(path, "stage1")
    return str(path / "stage1" / "ckpt.pt")


@pytest.mark.parametrize("variant", [dict(sp_features="all"), dict(sp_distance="mae"), dict(perceptual_net="ema"),
                                     dict(sp_t_max=0.2), dict(sp_t_prime_max=0.2), dict(sp_with_mse="auto"),
                                     dict(sp_with_mse="0.5", sp_t_max=0.2)])
def test_every_ablation_trains_the_online_model_through_a_perceptual_net_that_gets_no_gradient(variant, tmp_path, tiny_stage1):
    init = tiny_stage1
    _, stats = pd.train({**TINY_CFG, "out": str(tmp_path / "sp"), "steps": 2, "loss": "self-perceptual", "init": init,
                         **variant}, log=lambda s: None)
    before = pd.model_from_checkpoint(pd.load_checkpoint(init)).state_dict()
    after = stats["model"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)       # the online model learnt
    model = tiny_unet()
    perceptual = pd.frozen_copy(tiny_unet(seed=1))
    opts = pd.sp_options({**pd.TRAIN_DEFAULTS, **stats["config"]})
    pd.self_perceptual_loss(model, perceptual, pd.Schedule(1000), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]),
                            **opts).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())


def sp_case(seed=0):
    """A tiny online model, a frozen perceptual net and a batch with its t, t' and eps drawn."""
    g = torch.Generator().manual_seed(seed)
    x0, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    return (tiny_unet(), pd.frozen_copy(tiny_unet(seed=1)), pd.Schedule(1000), x0, y,
            dict(t=torch.tensor([10, 150, 199, 200, 500, 999]), t_prime=torch.randint(0, 1000, (6,), generator=g),
                 eps=torch.randn(6, 3, 8, 8, generator=g)))


def test_the_gated_term_is_the_batch_mean_of_the_terms_of_samples_whose_t_is_below_its_bound():
    model, f_star, s, x0, y, draw = sp_case()
    gated = pd.self_perceptual_loss(model, f_star, s, x0, y, t_max=200, **draw)
    alone = [pd.self_perceptual_loss(model, f_star, s, x0[i:i + 1], y[i:i + 1], t=draw["t"][i:i + 1],
                                     t_prime=draw["t_prime"][i:i + 1], eps=draw["eps"][i:i + 1]) for i in range(6)]
    assert gated.item() == pytest.approx(sum(alone[:3]).item() / 6, rel=1e-5) and gated > 0   # t = 10, 150, 199
    high = dict(draw, t=torch.full((6,), 200))
    assert pd.self_perceptual_loss(model, f_star, s, x0, y, t_max=200, **high).item() == 0    # none below: 0
    x = x0.clone().requires_grad_()
    pd.self_perceptual_loss(model, f_star, s, x, y, t_max=200, **draw).backward()
    assert x.grad[3:].abs().max() == 0 and x.grad[:3].abs().max() > 0       # samples at t >= 200 teach nothing


def test_t_prime_is_never_at_or_above_its_bound_and_fills_the_range_below_it(monkeypatch):
    model, f_star, s, x0, y, _ = sp_case()
    seen, real = [], f_star.features
    monkeypatch.setattr(f_star, "features", lambda x, t, y, layers: seen.append(t) or real(x, t, y, layers))
    for _ in range(40):
        pd.self_perceptual_loss(model, f_star, s, x0, y, t_prime_max=200)
    t_prime = torch.cat(seen)                                               # 480 draws of U{0..199}
    assert t_prime.max() < 200 and t_prime.min() < 20 and t_prime.max() >= 180


def test_the_kept_mse_term_and_lambda_are_in_the_loss_and_its_gradient():
    model, f_star, s, x0, y, draw = sp_case()
    grads = lambda l: torch.autograd.grad(l, list(model.parameters()))
    both = pd.self_perceptual_loss(model, f_star, s, x0, y, mse_lambda=0.3, **draw)
    mse = pd.mse_loss(model, s, x0, y, t=draw["t"], eps=draw["eps"])
    sp = pd.self_perceptual_loss(model, f_star, s, x0, y, **draw)
    assert both.item() == pytest.approx(mse.item() + 0.3 * sp.item(), rel=1e-6) and mse > 0 and sp > 0
    for g, gm, gs in zip(grads(both), grads(mse), grads(sp)):
        assert torch.allclose(g, gm + 0.3 * gs, atol=1e-6)


def test_auto_lambda_gives_both_terms_equal_gradient_norms_on_one_batch_and_a_run_records_it(tmp_path, tiny_stage1):
    model, f_star, s, x0, y, _ = sp_case()
    batches = [(x0[:3], y[:3]), (x0[3:], y[3:])]
    torch.manual_seed(5)
    lam, ratios = pd.balanced_lambda(model, f_star, s, batches, **pd.sp_options(pd.TRAIN_DEFAULTS))
    torch.manual_seed(5)                                                    # the same t and eps again, batch by batch
    norm = lambda l: torch.cat([g.flatten() for g in torch.autograd.grad(l, list(model.parameters()))]).norm().item()
    g_mse, g_sp = [], []
    for xb, yb in batches:
        t, eps = pd.draw_t_eps(s, xb)
        sp = pd.self_perceptual_loss(model, f_star, s, xb, yb, t=t, eps=eps)
        g_sp.append(norm(sp))
        g_mse.append(norm(pd.mse_loss(model, s, xb, yb, t, eps)))
    assert lam == pytest.approx(sum(g_mse) / sum(g_sp), rel=1e-5) and lam > 0     # equal mean gradient norms
    assert ratios == pytest.approx([a / b for a, b in zip(g_mse, g_sp)], rel=1e-5) and ratios[0] != ratios[1]
    cfg = {**TINY_CFG, "out": str(tmp_path / "sp"), "steps": 2, "loss": "self-perceptual", "init": tiny_stage1,
           "sp_with_mse": "auto", "ckpt_every": 1}
    pd.train({**cfg, "steps": 1}, log=lambda s: None)
    first = pd.load_checkpoint(str(tmp_path / "sp" / "ckpt.pt"))["config"]["sp_lambda_value"]
    pd.train(cfg, log=lambda s: None)                                       # continued: computed once, kept
    assert 0 < first < math.inf and pd.load_checkpoint(str(tmp_path / "sp" / "ckpt.pt"))["config"]["sp_lambda_value"] == first
    ratios = pd.load_checkpoint(str(tmp_path / "sp" / "ckpt.pt"))["config"]["sp_lambda_ratios"]
    finite = [r for r in ratios if r is not None]                           # None: a batch without an L_sp gradient
    assert len(ratios) == pd.LAMBDA_BATCHES and finite and min(finite) <= first <= max(finite)


def test_ema_perceptual_net_changes_after_a_step_and_the_frozen_one_does_not(tmp_path, tiny_stage1):
    init = tiny_stage1
    start = pd.model_from_checkpoint(pd.load_checkpoint(init)).state_dict()
    for kind in ("frozen", "ema"):
        pd.train({**TINY_CFG, "out": str(tmp_path / kind), "steps": 1, "loss": "self-perceptual", "init": init,
                  "perceptual_net": kind}, log=lambda s: None)
        ckpt = pd.load_checkpoint(str(tmp_path / kind / "ckpt.pt"))
        f_star = ckpt["perceptual"] if kind == "frozen" else ckpt["ema"]   # the EMA is f* in that ablation
        changed = any(not torch.equal(start[k], f_star[k]) for k in start)
        assert changed == (kind == "ema")


# ------------------------------------------- sampling -----------------------------------------

class CountingModel:
    """Wraps a model, counting forward calls and the batch size of each."""

    def __init__(self, model):
        self.model, self.num_classes, self.batches = model, model.num_classes, []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


def test_guidance_scale_one_is_conditional_and_costs_one_forward_of_n():
    model = CountingModel(tiny_unet().eval())
    x, t, y = torch.randn(4, 3, 8, 8), torch.full((4,), 500), torch.tensor([0, 1, 2, 0])
    v = pd.guided_v(model, x, t, y, 1.0, 0.7)
    assert torch.allclose(v, model.model(x, t, y)) and model.batches == [4]


def test_guidance_scale_zero_is_unconditional_and_one_batched_forward_of_2n():
    model = CountingModel(tiny_unet().eval())
    x, t, y = torch.randn(4, 3, 8, 8), torch.full((4,), 500), torch.tensor([0, 1, 2, 0])
    v = pd.guided_v(model, x, t, y, 0.0, 0.0)
    assert model.batches == [8]
    assert torch.allclose(v, model.model(x, t, torch.full((4,), 3)), atol=1e-5)


def test_guidance_formula_and_rescale_phi_zero_equals_plain_guidance():
    model = tiny_unet().eval()
    x, t, y = torch.randn(4, 3, 8, 8), torch.full((4,), 300), torch.tensor([0, 1, 2, 0])
    v_c, v_u = model(x, t, y), model(x, t, torch.full((4,), 3))
    v_cfg = v_u + 4.0 * (v_c - v_u)
    assert torch.allclose(pd.guided_v(model, x, t, y, 4.0, 0.0), v_cfg, atol=1e-5)
    # phi = 1: every sample's std is that of its conditional prediction
    v1 = pd.guided_v(model, x, t, y, 4.0, 1.0)
    assert torch.allclose(v1.std(dim=(1, 2, 3)), v_c.std(dim=(1, 2, 3)), rtol=1e-4)
    v_half = pd.guided_v(model, x, t, y, 4.0, 0.5)
    assert torch.allclose(v_half, 0.5 * v1 + 0.5 * v_cfg, atol=1e-5)


def test_generate_chunks_each_forward_to_the_limit_and_neither_results_nor_eta_noise_depend_on_it(monkeypatch):
    assert pd.max_forward_batch("cpu") == 64 and pd.max_forward_batch("cuda") is None
    s, model, seen = pd.Schedule(1000), tiny_unet().eval(), []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    guided = dict(cfg_scale=2.5, cfg_rescale=0.7, seed=1)
    whole, y = pd.generate(model, s, 12, 3, **guided)
    ancestral, _ = pd.generate(model, s, 12, 3, eta=1.0, seed=1)
    auto, _ = pd.generate(model, s, 12, 3, cfg_scale=2.0, guide=tiny_unet(seed=1).eval(), seed=1)
    assert seen[:3] == [24] * 3                                    # one call of 12 images, a forward of 2N per step
    seen.clear()
    monkeypatch.setattr(pd, "max_forward_batch", lambda device: 10)
    chunked, y2 = pd.generate(model, s, 12, 3, **guided)
    assert seen == [10, 10, 4] * 3                                 # the guided forward of 24, in pieces of 10
    assert torch.allclose(whole, chunked, atol=1e-5) and torch.equal(y, y2)
    assert torch.allclose(ancestral, pd.generate(model, s, 12, 3, eta=1.0, seed=1)[0], atol=1e-5)   # same noise
    assert torch.allclose(auto, pd.generate(model, s, 12, 3, cfg_scale=2.0, guide=tiny_unet(seed=1).eval(),
                                            seed=1)[0], atol=1e-5)
    seen.clear()
    pd.generate(model, s, 12, 3, seed=1)                           # unguided: a forward of 12, in 10 and 2
    pd.generate(model, s, 12, 3, seed=1, batch=4)                  # `batch` bounds a call too
    assert seen == [10, 2] * 3 + [4] * 9


def test_guidance_interval_covering_every_step_is_plain_guidance_and_an_empty_one_is_unguided():
    s = pd.Schedule(1000)
    model = tiny_unet().eval()
    noise, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    run = lambda **kw: pd.sample(model, s, noise.shape, y, steps=5, noise=noise, **kw)
    assert torch.equal(run(cfg_scale=3.0, cfg_interval=(0.0, math.inf)), run(cfg_scale=3.0))
    assert torch.equal(run(cfg_scale=3.0, cfg_interval=(1e9, 2e9)), run(cfg_scale=1.0))


def test_guidance_interval_spends_two_forwards_only_at_steps_whose_noise_level_is_inside():
    s = pd.Schedule(1000, "scaled_linear")
    model = CountingModel(tiny_unet().eval())
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    lo, hi = 0.5, 3.0
    pd.sample(model, s, noise.shape, y, steps=20, cfg_scale=2.0, noise=noise, cfg_interval=(lo, hi))
    sigmas = [pd.edm_sigma(s.alpha_bar[t].item()) for t in s.timesteps(20).tolist()]
    assert pd.edm_sigma(0.5) == 1 and pd.edm_sigma(0.2) == pytest.approx(2) and pd.edm_sigma(1.0) == 0
    assert sigmas[0] == math.inf                                  # zero terminal SNR: the first step is pure noise
    inside = [lo < sg <= hi for sg in sigmas]
    assert 0 < sum(inside) < 20
    assert model.batches == [4 if i else 2 for i in inside]


class GaussianDenoiser:
    """The exact E[v | x_t] for data x0 ~ N(mu, s^2 I): with D = alpha^2 s^2 + sigma^2,
    E[x0 | x_t] = mu + alpha s^2 / D (x_t - alpha mu),  E[eps | x_t] = sigma / D (x_t - alpha mu)."""
    num_classes = 0

    def __init__(self, schedule, mu, s):
        self.sch, self.mu, self.s = schedule, mu, s

    def __call__(self, x, t, y):
        a, sg = self.sch.alpha[t].view(-1, 1, 1, 1).double(), self.sch.sigma[t].view(-1, 1, 1, 1).double()
        D = a ** 2 * self.s ** 2 + sg ** 2
        r = x.double() - a * self.mu
        return (a * sg / D * r - sg * (self.mu + a * self.s ** 2 / D * r)).float()


def test_ddim_with_optimal_gaussian_denoiser_recovers_mean_and_std_as_steps_grow():
    s, mu, std = pd.Schedule(1000, "linear"), 0.5, 0.3
    model = GaussianDenoiser(s, mu, std)
    noise = torch.randn(2000, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (5, 50, 1000):
        x = pd.sample(model, s, noise.shape, steps=steps, noise=noise)
        assert x.mean().item() == pytest.approx(mu, abs=0.005)     # the mean is exact at any step count
        errors[steps] = abs(x.std().item() - std)
    # Few-step DDIM shrinks the std even with a perfect denoiser; the deterministic sampler converges to the
    # probability-flow ODE, whose marginals are exact, as steps grow. Measured std: 5 steps 0.111, 50 steps
    # 0.274, 1000 steps 0.299 (s = 0.3); the standard error of the std estimate here is about 0.0005.
    assert errors[5] > 0.02
    assert errors[1000] < 0.006
    assert errors[5] > errors[50] > errors[1000]


def test_ancestral_sampler_eta_one_recovers_the_gaussian_at_full_step_count():
    # With eta = 1 the variance is under-estimated at few steps (measured std: 50 steps 0.444, 200 steps 0.482,
    # 1000 steps 0.4965 for s = 0.5); at all T steps it is the DDPM sampler and within 1%.
    s, mu, std = pd.Schedule(1000, "linear"), -0.2, 0.5
    x = pd.sample(GaussianDenoiser(s, mu, std), s, (2000, 3, 4, 4), steps=1000, eta=1.0,
                  generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(std, abs=0.006)


def test_sampler_is_deterministic_given_noise_and_lands_on_x0_hat():
    s = pd.Schedule(1000)
    model = tiny_unet().eval()
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    a = pd.sample(model, s, noise.shape, y, steps=1, noise=noise)
    # One trailing step from t = 999: x0_hat = alpha x_T - sigma v = -v (alpha = 0, sigma = 1).
    with torch.no_grad():
        assert torch.allclose(a, -model(noise, torch.full((2,), 999), y), atol=1e-6)
    assert torch.equal(pd.sample(model, s, noise.shape, y, steps=4, cfg_scale=3.0, noise=noise),
                       pd.sample(model, s, noise.shape, y, steps=4, cfg_scale=3.0, noise=noise))


# ------------------------------------------ checkpoints ----------------------------------------

def tiny_train(tmp_path, name="run", **kw):
    cfg = {**TINY_CFG, "out": str(tmp_path / name), "steps": 3, "ckpt_every": 100, **kw}
    return pd.train(cfg, log=lambda s: None)


def test_checkpoint_saved_and_loaded_gives_identical_outputs(tmp_path):
    ema, stats = tiny_train(tmp_path)
    ckpt = pd.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    loaded = pd.model_from_checkpoint(ckpt).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 999]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(ema(x, t, y), loaded(x, t, y))
    assert ckpt["step"] == 3 and ckpt["config"]["num_classes"] == 10


def test_resume_gives_the_same_weights_as_one_uninterrupted_run(tmp_path):
    tiny_train(tmp_path, "ab", steps=3)
    _, resumed = pd.train({**TINY_CFG, "resume": str(tmp_path / "ab"), "steps": 6}, log=lambda s: None)
    _, straight = tiny_train(tmp_path, "straight", steps=6)
    a, b = pd.load_checkpoint(str(tmp_path / "ab" / "ckpt.pt")), pd.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_a_resumed_run_says_from_which_file_and_step_in_its_first_line(tmp_path):
    tiny_train(tmp_path, "r", steps=2)
    logs = []
    pd.train({**TINY_CFG, "resume": str(tmp_path / "r"), "steps": 3}, log=logs.append)
    assert logs[0] == f"resumed from {tmp_path / 'r' / 'ckpt.pt'} at step 2"


def test_resume_of_self_perceptual_keeps_the_frozen_perceptual_net(tmp_path):
    tiny_train(tmp_path, "mse", steps=2)
    init = str(tmp_path / "mse" / "ckpt.pt")
    tiny_train(tmp_path, "sp", steps=2, loss="self-perceptual", init=init)
    pd.train({**TINY_CFG, "resume": str(tmp_path / "sp"), "steps": 3}, log=lambda s: None)
    stage1, sp = pd.load_checkpoint(init), pd.load_checkpoint(str(tmp_path / "sp" / "ckpt.pt"))
    assert sp["step"] == 3 and all(torch.equal(stage1["ema"][k], sp["perceptual"][k]) for k in stage1["ema"])
    assert not all(torch.equal(stage1["ema"][k], sp["model"][k]) for k in stage1["ema"])


def test_killed_checkpoint_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    tiny_train(tmp_path)
    path = str(tmp_path / "run" / "ckpt.pt")
    before = open(path, "rb").read()

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt                                    # the process is killed mid-write
    monkeypatch.setattr(pd.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        pd.save_checkpoint(path, {"config": {}, "model": {}, "ema": {}})
    assert open(path, "rb").read() == before
    assert pd.load_checkpoint(path)["step"] == 3


def test_a_non_finite_gradient_with_a_finite_loss_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    calls, real = {"n": 0}, torch.nn.utils.clip_grad_norm_

    def nan_norm_at_third_step(params, max_norm):
        calls["n"] += 1
        norm = real(params, max_norm)
        return norm * float("nan") if calls["n"] == 3 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm_at_third_step)
    with pytest.raises(FloatingPointError, match="at step 2"):
        tiny_train(tmp_path, steps=5, ckpt_every=1)
    assert pd.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 2


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pd.mse_loss

    def explodes_at_third_step(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setitem(pd.LOSSES, "mse", explodes_at_third_step)
    with pytest.raises(FloatingPointError, match="at step 2"):
        tiny_train(tmp_path, steps=5, ckpt_every=1)
    ckpt = pd.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "tampered", "wrong-kind", "missing"])
def test_bad_checkpoints_give_one_line_and_exit_code_2(tmp_path, kind, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_train(tmp_path)
    good = open(tmp_path / "run" / "ckpt.pt", "rb").read()
    bad = tmp_path / "bad.pt"
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "corrupt":
        bad.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    elif kind == "tampered":
        torch.save({"kind": pd.CKPT_KIND, "config": Boom(), "model": {}, "ema": {}}, bad)
    elif kind == "wrong-kind":
        torch.save({"state_dict": {}}, bad)
    assert pd.main(["sample", "--ckpt", str(bad), "--n", "2", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------ bad inputs -----------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "imagenet-please"], "neither 'shapes', 'cifar10' nor an existing folder"),
    (["train", "--data", "/no/such/folder/"], "neither 'shapes', 'cifar10' nor an existing folder"),
    (["train", "--image-size", "30"], "cannot be halved"),
    (["train", "--loss", "self-perceptual"], "needs --init"),
    (["train", "--loss", "l1"], "argument --loss: invalid choice"),
    (["train", "--channel-mult", "1,x"], "argument --channel-mult: must be positive integers"),
    (["train", "--channel-mult", ""], "--channel-mult needs at least one level"),
    (["train", "--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["train", "--lr", "-1"], "argument --lr: must be a positive number, got '-1'"),
    (["train", "--lr", "nan"], "argument --lr: must be a positive number"),
    (["train", "--batch-size", "30000"], "smaller than one batch"),
])
def test_bad_training_inputs_give_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert pd.main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def out_of_range_values(action):
    """Values outside the range a flag declares: below its lower bound, not a number, and for [0, 1) / [0, 1]
    flags, above the upper bound."""
    what = getattr(action.type, "what", "")
    bad = ["not-a-number"]
    if "positive" in what:
        bad += ["0", "-5"]
    elif "non-negative" in what or "in [0, 1" in what:
        bad += ["-1"]
    elif ">= " in what:
        bad += [str(int(what.split(">= ")[1]) - 1)]
    if "[0, 1)" in what:
        bad += ["1"]
    if "[0, 1]" in what:
        bad += ["1.5"]
    if action.type is pd.interval_arg:
        bad += ["5,1", "-1,2", "1"]
    return bad


def numeric_flags(module=pd):
    """(subcommand, flag, bad value) for every flag of every subcommand whose type declares a range: walked from
    the module's parser itself, so a flag added later is covered without editing this test."""
    parser = module.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and callable(action.type) and action.type not in (str,):
                cases += [(name, action.option_strings[0], v) for v in out_of_range_values(action)]
    return cases


def refused_before_any_work(main, argv, tmp_path, capsys, message=""):
    """main(argv) exits 2 with one line (naming `message`), no traceback, and creates nothing in the working folder."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []                              # nothing was created or computed


@pytest.mark.parametrize("command, flag, value", numeric_flags())
def test_every_out_of_range_numeric_flag_is_one_line_and_exit_code_2_before_any_work(command, flag, value, capsys,
                                                                                       tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    needs = {"sample": ["--ckpt", "none.pt"], "evaluate": ["--ckpt", "none.pt"]}.get(command, [])
    refused_before_any_work(pd.main, [command, *needs, f"{flag}={value}"], tmp_path, capsys, flag)


def test_the_parser_walk_covers_every_numeric_flag_of_every_subcommand():
    covered = {(c, f) for c, f, _ in numeric_flags()}
    assert {("train", "--lr"), ("train", "--warmup"), ("train", "--grad-clip"), ("sample", "--n"), ("sample", "--eta"),
            ("sample", "--batch"), ("sample", "--cfg-interval")} <= covered


def unwritable_output_refused(module, argv, message, tmp_path, monkeypatch, capsys, loaders=()):
    """argv names an output that cannot be written: one line, exit 2, before any checkpoint or data is loaded (by
    this file or by the modules `loaders` that load them for `module`)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("a file, not a folder")
    called = []
    patched = [(m, name) for m in (pd, *loaders) for name in ("load_checkpoint", "load_dataset") if hasattr(m, name)]
    assert {name for _, name in patched} == {"load_checkpoint", "load_dataset"}
    for m, name in patched:
        monkeypatch.setattr(m, name, lambda *a, **k: called.append(1))
    needs = ["--ckpt", "x.pt"] if argv[0] in ("sample", "evaluate") else []
    assert module.main(argv + needs) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and called == []


@pytest.mark.parametrize("argv, message", [
    (["sample", "--out", "no_such_folder/grid.png"], "'no_such_folder' does not exist"),
    (["sample", "--out", "grid.txt"], "must end in"),
    (["sample", "--out", "."], "must end in"),
    (["sample", "--out", "a_file/grid.png"], "'a_file' is a file, not a folder"),
    (["sample", "--npz", "samples.png"], "must end in .npz"),
    (["train", "--out", "a_file/run"], "cannot create this folder"),
])
def test_unwritable_outputs_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    unwritable_output_refused(pd, argv, message, tmp_path, monkeypatch, capsys)


def test_a_write_that_fails_after_sampling_keeps_the_samples_and_says_where(tmp_path, capsys, monkeypatch):
    tiny_train(tmp_path)
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pd, "save_grid", disk_full)
    assert pd.main(["sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--n", "3", "--steps", "2",
                    "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left" in err and "kept in" in err
    kept = err.strip().split("kept in ")[1]
    assert np.load(kept)["arr_0"].shape == (3, 16, 16, 3)
    os.remove(kept)


def test_empty_image_folder_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    assert pd.main(["train", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "r")]) == 2
    assert "cannot read images" in capsys.readouterr().err


def test_image_folder_with_class_subfolders_gives_labels_and_size(tmp_path):
    from PIL import Image
    for c, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / c / f"{i}.png")
    x, y, names, _ = pd.load_dataset(str(tmp_path), image_size=16)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 and names == ["cats", "dogs"]
    assert y.tolist() == [0, 0, 1, 1] and x[0, 0].float().mean() > 250 and x[3, 2].float().mean() > 250
    held, held_y, _, _ = pd.load_dataset(str(tmp_path), image_size=16, train=False)
    assert held_y.tolist() == [0, 1]                               # one image of each class held out for the rulers


def test_folder_heldout_split_is_stratified_seeded_and_disjoint_from_training():
    y = torch.arange(200) % 4
    a, b = pd.heldout_split(y, seed=0), pd.heldout_split(y, seed=1)
    assert torch.equal(a, pd.heldout_split(y, seed=0)) and not torch.equal(a, b)
    assert [int(a[y == c].sum()) for c in range(4)] == [5, 5, 5, 5]        # 10% of each class


def test_unknown_flag_is_one_line_and_exit_code_2(capsys):
    assert pd.main(["train", "--no-such-flag"]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_cifar10_without_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as cifar

    def no_network(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    assert pd.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 is not in" in err and "could not be downloaded" in err and err.count("\n") == 1


def test_label_outside_classes_and_guidance_on_unconditional_are_usage_errors(tmp_path, capsys):
    tiny_train(tmp_path)
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    assert pd.main(["sample", "--ckpt", ckpt, "--label", "11", "--out", str(tmp_path / "g.png")]) == 2
    assert "--label 11 is outside 0..10 (10: unconditional)" in capsys.readouterr().err
    assert pd.main(["sample", "--ckpt", ckpt, "--label", "10", "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    tiny_train(tmp_path, "uncond", unconditional=True)
    assert pd.main(["sample", "--ckpt", str(tmp_path / "uncond" / "ckpt.pt"), "--cfg", "3", "--out", str(tmp_path / "g.png")]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_init_checkpoint_with_other_model_config_is_a_usage_error(tmp_path, capsys):
    tiny_train(tmp_path)
    argv = ["train", "--loss", "self-perceptual", "--init", str(tmp_path / "run" / "ckpt.pt"), "--out",
            str(tmp_path / "sp"), *TINY_FLAGS]
    argv[argv.index("--channels") + 1] = "16"
    assert pd.main(argv) == 2
    assert "has channels=8 but this run asks for channels=16" in capsys.readouterr().err


def test_init_checkpoint_on_another_noise_schedule_is_a_usage_error(tmp_path, capsys):
    tiny_train(tmp_path)
    argv = ["train", "--loss", "self-perceptual", "--init", str(tmp_path / "run" / "ckpt.pt"), "--out",
            str(tmp_path / "sp"), *TINY_FLAGS, "--betas", "cosine"]
    assert pd.main(argv) == 2
    assert "has betas=scaled_linear but this run asks for betas=cosine" in capsys.readouterr().err


def recording_objective(monkeypatch, seen, constant=None):
    """pd.objective, recording every label batch it is given (and returning `constant` as the loss, if set)."""
    real = pd.objective

    def wrapped(*a, **kw):
        loss_of = real(*a, **kw)

        def f(x0, y):
            seen.append(y.clone())
            loss = loss_of(x0, y)
            return loss if constant is None else loss * 0 + constant
        return f
    monkeypatch.setattr(pd, "objective", wrapped)


def test_label_dropout_replaces_labels_by_the_null_label_at_its_rate(tmp_path, monkeypatch):
    seen = []
    recording_objective(monkeypatch, seen)
    tiny_train(tmp_path, steps=20, batch_size=64, label_dropout=0.3)
    y = torch.cat(seen)                                            # 1280 labels; sd of the share 0.013
    assert (y == 10).float().mean().item() == pytest.approx(0.3, abs=0.045)
    assert ((y >= 0) & (y <= 10)).all()
    seen.clear()
    tiny_train(tmp_path, "none", steps=3, label_dropout=0.0)
    assert not (torch.cat(seen) == 10).any()


def test_ema_warm_up_averages_the_first_step_with_decay_one_tenth(tmp_path):
    # decay = min(ema_decay, (1 + step) / (10 + step)): 0.1 at step 0, so EMA = 0.1 init + 0.9 weights after it.
    ema, stats = tiny_train(tmp_path, steps=1, ema_decay=0.999)
    cfg = stats["config"]
    torch.manual_seed(cfg["seed"])
    init = pd.UNet(**pd.model_kwargs(cfg))
    for p_ema, p0, p1 in zip(ema.parameters(), init.parameters(), stats["model"].parameters()):
        assert torch.allclose(p_ema, 0.1 * p0 + 0.9 * p1, atol=1e-6)
    assert not all(torch.equal(p0, p1) for p0, p1 in zip(init.parameters(), stats["model"].parameters()))


def test_logged_loss_after_a_resume_is_the_mean_over_the_steps_since_the_last_line(tmp_path, monkeypatch):
    recording_objective(monkeypatch, [], constant=1.0)            # every step's loss is exactly 1
    tiny_train(tmp_path, steps=3, log_every=5)
    logs = []
    pd.train({**TINY_CFG, "resume": str(tmp_path / "run"), "steps": 15, "log_every": 5}, log=logs.append)
    losses = [line.split("loss ")[1].split(" ")[0] for line in logs if line.startswith("step")]
    assert losses == ["1.0000"] * 3                               # steps 5, 10, 15 (after the resume at 3)


def test_stage_2_checkpoint_records_its_origin_and_total_steps(tmp_path):
    tiny_train(tmp_path, "mse", steps=2)
    init = str(tmp_path / "mse" / "ckpt.pt")
    tiny_train(tmp_path, "sp", steps=3, loss="self-perceptual", init=init)
    sp, stage1 = pd.load_checkpoint(str(tmp_path / "sp" / "ckpt.pt")), pd.load_checkpoint(init)
    assert sp["origin"] == {"init_steps": 2, "init_hash": pd.weights_hash(stage1["ema"])}
    assert sp["total_steps"] == 5 and stage1["total_steps"] == 2 and stage1["origin"] is None


def test_resume_refuses_to_change_the_model(tmp_path, capsys):
    tiny_train(tmp_path)
    assert pd.main(["train", "--resume", str(tmp_path / "run"), "--steps", "5", "--lr", "0.5"]) == 2
    assert "cannot change lr" in capsys.readouterr().err


# ------------------------------------------ command line ---------------------------------------

def test_the_file_copied_alone_into_an_empty_folder_trains_and_samples_a_grid_and_npz(tmp_path):
    """The reference needs no other file of the project: copied alone, train and sample run from its folder."""
    import shutil
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "perceptual_diffusion.py"), alone)
    cli = lambda *args: subprocess.run([sys.executable, "perceptual_diffusion.py", *args], capture_output=True, text=True,
                                       timeout=300, cwd=alone, env={**os.environ, "PYTHONPATH": ""})
    r = cli("train", *TINY_FLAGS, "--steps", "2", "--log-every", "2", "--sample-every", "2", "--out", "run")
    assert r.returncode == 0, r.stderr
    assert "step 2/2 | loss" in r.stdout and "img/s" in r.stdout and "lr" in r.stdout
    assert (alone / "run" / "ckpt.pt").exists() and (alone / "run" / "samples_0000002.png").exists()
    r = cli("sample", "--ckpt", "run/ckpt.pt", "--n", "12", "--steps", "3", "--cfg", "2", "--cfg-rescale", "0.7",
            "--out", "grid.png", "--npz", "s.npz")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(alone / "grid.png").size[0] > 16
    npz = np.load(alone / "s.npz")
    assert npz["arr_0"].shape == (12, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [i % 10 for i in range(12)]
    assert sorted(os.listdir(alone)) == ["grid.png", "perceptual_diffusion.py", "run", "s.npz"]


@pytest.mark.parametrize("command", ["reproduce", "evaluate", "gpucheck", "bench"])
def test_the_comparisons_commands_are_an_invalid_choice_here_in_one_line_and_exit_2(command, capsys):
    assert pd.main([command, "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"invalid choice: '{command}'" in err


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "perceptual_diffusion.py"), "train", *TINY_FLAGS,
                          "--steps", "100000", "--log-every", "1", "--ckpt-every", "100000", "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:                                          # wait until training is under way
        if line.startswith("step 2/"):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stopped by signal" in out and "--resume" in out
    step = pd.load_checkpoint(str(run / "ckpt.pt"))["step"]
    assert 2 <= step < 100000


# -------------------------------------------- DDP ---------------------------------------------

def _ddp_worker(rank, world, port, out, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _, stats = pd.train(cfg, log=lambda s: None)
    flat = torch.cat([p.detach().flatten() for p in stats["model"].parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    torch.distributed.barrier()                                    # as main() does: nobody leaves early
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_ranks_end_with_identical_weights_and_one_checkpoint(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {**TINY_CFG, "out": str(tmp_path / "ddp"), "steps": 3, "ckpt_every": 100}
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "params.pt"), cfg), nprocs=2, join=True)
    params = torch.load(tmp_path / "params.pt")
    assert torch.equal(params[0], params[1])
    assert [f for f in os.listdir(tmp_path / "ddp") if ".pt" in f] == ["ckpt.pt"]
    ckpt = pd.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))
    model = pd.model_from_checkpoint(ckpt, "model")
    assert ckpt["step"] == 3 and torch.equal(params[0], torch.cat([p.flatten() for p in model.parameters()]))


def _ddp_main_worker(rank, world, port, argv, report, hidden_on_rank_1=""):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import contextlib
    import io
    if rank == 1 and hidden_on_rank_1:                      # as if rank 1 were a node without that file
        isfile = os.path.isfile
        pd.os.path.isfile = lambda p: isfile(p) and os.path.abspath(p) != hidden_on_rank_1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pd.main(argv)
    with open(f"{report}.{rank}", "w") as f:
        json.dump({"code": code, "stderr": err.getvalue()}, f)


@pytest.mark.parametrize("problem", ["unwritable --out", "missing --data", "--init missing on one rank",
                                     "--out checkpoint missing on one rank"])
def test_ddp_ranks_all_exit_with_one_line_when_the_output_or_the_data_is_bad(problem, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a_file").write_text("x")
    small = ["--batch-size", "2", "--image-size", "8", "--channels", "8", "--device", "cpu"]
    bad, hidden = {"unwritable --out": (["--out", str(tmp_path / "a_file" / "run")], ""),
                   "missing --data": (["--out", str(tmp_path / "run"), "--data", str(tmp_path / "no_such_folder")], ""),
                   "--init missing on one rank": (["--out", str(tmp_path / "sp"), "--loss", "self-perceptual",
                                                   "--init", str(tmp_path / "run" / "ckpt.pt")], str(tmp_path / "run" / "ckpt.pt")),
                   "--out checkpoint missing on one rank": (["--out", str(tmp_path / "run"), "--steps", "2"],
                                                            str(tmp_path / "run" / "ckpt.pt"))}[problem]
    if hidden:                                               # a finished 1-step run that rank 1 cannot see
        assert pd.main(["train", "--steps", "1", *small, "--out", str(tmp_path / "run"), "--log-every", "1"]) == 0
    argv = ["train", "--steps", "1", *small, *bad]
    ctx = mp.start_processes(_ddp_main_worker, args=(2, port, argv, str(tmp_path / "report"), hidden), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:                                 # a rank waiting forever is the bug
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank did not exit")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"report.{rank}").read_text())
        assert r["code"] == 2 and r["stderr"].count("\n") == 1 and r["stderr"].startswith("error:"), (rank, r)
        if problem.endswith("on one rank"):                  # both ranks name what one of them could not see
            assert ("does not exist" if "--init" in problem else "ranks see different files") in r["stderr"], (rank, r)


def test_batches_give_each_rank_disjoint_indices_that_together_cover_the_epoch():
    n, world, b = 40, 2, 4
    ranks = [pd.Batches(n, b, rank, world, seed=3) for rank in range(world)]
    per_epoch = ranks[0].per_epoch
    seen = [torch.cat([r.indices(step) for step in range(per_epoch)]) for r in ranks]
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(n))     # 40 images = 2 ranks x 5 steps x 4
    assert not torch.equal(ranks[0].indices(per_epoch), ranks[0].indices(0))   # a new epoch, a new order


# ------------------------------------- replication over seeds -------------------------------------

def test_cooldown_holds_the_rate_then_decays_as_one_minus_sqrt_to_its_end_value_at_the_last_step():
    cfg = dict(lr=2e-3, warmup=10, steps=100, cooldown=0.2, final_lr=5e-4)
    lrs = [pd.learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == lrs[79] == pytest.approx(2e-3)      # warm-up, constant
    assert lrs[99] == pytest.approx(5e-4) and all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[84] == pytest.approx(5e-4 + 1.5e-3 * (1 - (5 / 20) ** 0.5))                # 1 - sqrt
    assert [pd.learning_rate({**cfg, "cooldown": 0.0}, s) for s in (50, 99)] == [2e-3, 2e-3]


def test_a_cooled_down_run_stopped_and_resumed_gives_the_weights_of_an_uninterrupted_one(tmp_path):
    cfg = dict(steps=6, cooldown=0.5, final_lr=1e-4)

    def stop_at_3(line):                                           # a SIGTERM during step 4: stops after it
        if line.startswith("step 3/"):
            os.kill(os.getpid(), signal.SIGTERM)
    tiny_train(tmp_path, "ab", log_every=1, **cfg) if False else pd.train(
        {**TINY_CFG, "out": str(tmp_path / "ab"), "ckpt_every": 100, **cfg}, log=stop_at_3)
    assert pd.load_checkpoint(str(tmp_path / "ab" / "ckpt.pt"))["step"] == 4
    pd.train({**TINY_CFG, "resume": str(tmp_path / "ab"), "steps": 6}, log=lambda s: None)
    tiny_train(tmp_path, "straight", **cfg)
    a, b = pd.load_checkpoint(str(tmp_path / "ab" / "ckpt.pt")), pd.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_the_guide_snapshot_is_the_ema_at_its_stated_step(tmp_path):
    tiny_train(tmp_path, "long", steps=5, guide_at=2)
    tiny_train(tmp_path, "short", steps=2)
    guide, short = pd.load_checkpoint(str(tmp_path / "long" / "guide.pt")), pd.load_checkpoint(str(tmp_path / "short" / "ckpt.pt"))
    assert guide["step"] == 2 and all(torch.equal(guide["ema"][k], short["ema"][k]) for k in short["ema"])


def test_autoguidance_is_guide_plus_w_times_main_minus_guide_on_v_and_costs_n_forwards_of_each():
    main, guide = CountingModel(tiny_unet(seed=0).eval()), CountingModel(tiny_unet(seed=1).eval())
    x, t, y = torch.randn(4, 3, 8, 8), torch.full((4,), 300), torch.tensor([0, 1, 2, 3])
    v = pd.guided_v(main, x, t, y, 2.5, 0.0, guide=guide)
    with torch.no_grad():
        v_main, v_guide = main.model(x, t, y), guide.model(x, t, y)
    assert torch.allclose(v, v_guide + 2.5 * (v_main - v_guide), atol=1e-5)
    assert main.batches == [4] and guide.batches == [4]


def test_autoguidance_with_w_one_or_with_the_model_itself_is_unguided_sampling():
    s, model = pd.Schedule(1000), tiny_unet().eval()
    noise, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])           # 3: the null label, unconditional
    plain = pd.sample(model, s, noise.shape, y, steps=4, noise=noise)
    assert torch.equal(pd.sample(model, s, noise.shape, y, steps=4, noise=noise, cfg_scale=1.0, guide=tiny_unet(seed=1)), plain)
    assert torch.allclose(pd.sample(model, s, noise.shape, y, steps=4, noise=noise, cfg_scale=3.0, guide=model), plain, atol=1e-5)
    other = pd.sample(model, s, noise.shape, y, steps=4, noise=noise, cfg_scale=3.0, guide=tiny_unet(seed=1).eval())
    assert not torch.allclose(other, plain, atol=1e-3)


# ---------------------------- precision, recall, density, coverage ----------------------------

def test_sample_with_a_guide_checkpoint_is_autoguidance_and_refuses_another_model(tmp_path, capsys):
    tiny_train(tmp_path, steps=3, guide_at=1)
    run = str(tmp_path / "run")
    argv = ["sample", "--ckpt", f"{run}/ckpt.pt", "--guide", f"{run}/guide.pt", "--cfg", "2", "--steps", "2", "--n", "4",
            "--label", "10", "--out", str(tmp_path / "g.png")]
    assert pd.main(argv) == 0 and (tmp_path / "g.png").is_file()
    tiny_train(tmp_path, "wide", steps=1, channels=16)
    argv[argv.index("--guide") + 1] = str(tmp_path / "wide" / "ckpt.pt")
    assert pd.main(argv) == 2 and "channels" in capsys.readouterr().err


def make_folder(path, classes=2, per_class=40, size=20):
    """A small data set of class subfolders: each class a colour, each image a noisy square of it."""
    from PIL import Image
    g = np.random.default_rng(0)
    for c in range(classes):
        (path / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.full((size, size, 3), 40, np.uint8)
            img[4:16, 4:16] = [(200, 30, 30), (30, 30, 200), (30, 200, 30)][c]
            img = np.clip(img + g.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(path / f"class{c}" / f"{i}.png")
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--cooldown", "0.5", "--final-lr", "0.01", "--lr", "0.001"], "--final-lr 0.01 is above --lr 0.001"),
    (["--guide-at", "11", "--steps", "10"], "--guide-at 11 is past the last step (10)"),
])
def test_a_rising_cool_down_or_a_guide_past_the_last_step_is_refused_before_any_work(flags, message, tmp_path, capsys):
    assert pd.main(["train", *TINY_FLAGS, *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_a_cooled_down_run_resumes_only_to_its_configured_steps(tmp_path, capsys):
    tiny_train(tmp_path, steps=4, cooldown=0.5)
    assert pd.main(["train", "--resume", str(tmp_path / "run"), "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "continues only to the 4 steps it was configured with (--steps 4)" in err and err.count("\n") == 1
    assert pd.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 4


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_picks_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pd.DEVICE("auto") == expected and pd.best_device() == expected


def test_mps_is_accepted_where_torch_has_it_and_refused_in_one_line_where_not(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pd.DEVICE("mps") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pd.main(["train", "--device", "mps", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "MPS is not available on this machine" in err and err.count("\n") == 1 and not (tmp_path / "r").exists()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(pd.UsageError, match="bf16 is not supported on mps"):
        pd.check_flags({**pd.TRAIN_DEFAULTS, "device": "mps", "precision": "bf16"})
    assert pd.resolve_precision("mps", "auto") == "fp32"


# ------------------------------- devices: right by construction without a GPU -------------------------------
# FakeTensorMode puts modules and tensors on a fake cuda device and raises on a cross-device op as CUDA would (forward
# only); the meta device runs a backward; a dispatch mode counts host reads. See shared GPU_NOTES.

from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts host reads (aten._local_scalar_dense: .item(), .tolist(), float(t), `if t`) and copies from the CPU
    to another device (aten._to_copy)."""

    def __init__(self):
        super().__init__()
        self.host_reads, self.copies_from_cpu = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        if (func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu"
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu"):
            self.copies_from_cpu += 1
        return func(*args, **kwargs)


def fake_gpu():
    """A fake cuda device on a CPU-only machine: everything created inside lives on fake cuda:0."""
    return FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda")


def test_attention_hands_sdpa_a_contiguous_head_dimension_and_gives_the_textbook_result(monkeypatch):
    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(pd.F, "scaled_dot_product_attention", lambda q, k, v: seen.append((q, k, v)) or real(q, k, v))
    torch.manual_seed(0)
    att, x = pd.Attention(64), torch.randn(2, 64, 4, 4)
    out = att(x)
    (q, k, v), = seen
    assert q.shape == (2, 2, 16, 32) and all(t.stride()[-2:] == (32, 1) for t in (q, k, v))   # (N, heads, HW, d)
    qkv = att.qkv(att.norm(x)).reshape(2, 3, 2, 32, 16)                  # by hand: softmax(q k^T / sqrt d) v
    q0, k0, v0 = qkv[:, 0].transpose(2, 3), qkv[:, 1].transpose(2, 3), qkv[:, 2].transpose(2, 3)
    h = torch.softmax(q0 @ k0.transpose(2, 3) / 32 ** 0.5, -1) @ v0
    assert torch.allclose(out, x + att.proj(h.transpose(2, 3).reshape(2, 64, 4, 4)), atol=1e-5)


def test_model_objectives_ablations_and_sampler_run_on_a_fake_gpu_with_no_cross_device_op():
    schedule = pd.Schedule(1000)                                         # made on the CPU, as train makes it
    mode, cuda = fake_gpu()
    with mode, cuda:
        model, f_star, guide = tiny_unet(), tiny_unet(1), tiny_unet(2)   # f*: a second module (no deepcopy in the mode)
        x0, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
        assert model(x0, torch.randint(0, 1000, (4,)), y).device.type == "cuda"
        assert pd.mse_loss(model, schedule, x0, y).device.type == "cuda"
        for ablation in ({}, dict(features="all"), dict(t_prime_mode="same"), dict(distance="mae"), dict(t_max=200),
                         dict(t_prime_max=200), dict(mse_lambda=0.5), dict(t_max=200, mse_lambda=0.5)):
            assert pd.self_perceptual_loss(model, f_star, schedule, x0, y, **ablation).device.type == "cuda"
        for kw in (dict(cfg_scale=2.0, cfg_rescale=0.7), dict(cfg_scale=2.0, guide=guide), dict(eta=1.0)):
            assert pd.sample(model, schedule, (4, 3, 8, 8), y, steps=3, **kw).device.type == "cuda"


def test_a_table_kept_on_the_cpu_fails_on_the_fake_gpu_so_the_test_above_can_fail():
    mode, cuda = fake_gpu()
    table = torch.arange(10.0)
    with mode, cuda, pytest.raises(Exception, match="device"):
        torch.zeros(4).index_add_(0, torch.arange(4), table[:4].to("cpu"))
    with mode, cuda, pytest.raises(Exception, match="device"):
        torch.randn(4) + table[:4]


def test_schedule_tables_reach_the_device_once_not_at_every_call():
    schedule, counter = pd.Schedule(1000), CountOps()
    mode, cuda = fake_gpu()
    with mode, cuda:
        model, f_star = tiny_unet(), tiny_unet(1)
        x0, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
        pd.self_perceptual_loss(model, f_star, schedule, x0, y)          # the first call copies each table once
        with counter:
            pd.self_perceptual_loss(model, f_star, schedule, x0, y)
            pd.mse_loss(model, schedule, x0, y)
    assert counter.copies_from_cpu == 0


def test_a_training_step_runs_forward_and_backward_on_the_meta_device():
    schedule = pd.Schedule(1000)
    with torch.device("meta"):
        model, f_star = pd.UNet(**TINY), pd.UNet(**TINY).requires_grad_(False)
        x0, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    for loss in (pd.mse_loss(model, schedule, x0, y), pd.self_perceptual_loss(model, f_star, schedule, x0, y)):
        loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch._foreach_lerp_(list(f_star.parameters()), list(model.parameters()), 0.1)
    pd.self_perceptual_loss(model, f_star, schedule, x0, y, t_max=200, mse_lambda=0.5).backward()
    with pytest.raises(Exception, match="Cannot copy out of meta"):   # its one host read: the lambda, once per run
        pd.balanced_lambda(model, f_star, schedule, [(x0, y)], **pd.sp_options(pd.TRAIN_DEFAULTS))


def test_training_steps_between_log_steps_read_nothing_on_the_host(tmp_path, monkeypatch):
    """A CUDA step runs ahead of the GPU only if nothing waits for it: count host reads step by step."""
    counter, reads, real = CountOps(), {}, pd.Batches.indices

    def indices(self, step):                       # each step starts here: close the last step's count, open one
        if step:
            counter.__exit__(None, None, None)
            reads[step - 1] = counter.host_reads
        counter.host_reads = 0
        out = real(self, step)
        counter.__enter__()
        return out
    monkeypatch.setattr(pd.Batches, "indices", indices)
    # AdamW (capturable=False, torch's default) keeps its step counters as host tensors on every device and reads
    # them with .item(): no wait for the GPU, so its step is not counted here (the next test checks where they live).
    adam_step = torch.optim.AdamW.step

    def uncounted_step(self, *a, **k):
        counter.__exit__(None, None, None)
        try:
            return adam_step(self, *a, **k)
        finally:
            counter.__enter__()
    monkeypatch.setattr(torch.optim.AdamW, "step", uncounted_step)
    # .tolist() of a CPU tensor reads its memory without dispatching (on a GPU it copies to the host): count it here.
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.host_reads += counter in torch.utils._python_dispatch._get_current_dispatch_mode_stack()
        return tolist(self)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    for loss, extra in (("mse", {}), ("self-perceptual", {"init": str(tmp_path / "mse" / "ckpt.pt")})):
        reads.clear()
        try:
            tiny_train(tmp_path, "mse" if loss == "mse" else "sp", steps=9, log_every=4, loss=loss, **extra)
        finally:
            counter.__exit__(None, None, None)
        assert [reads[s] for s in (0, 1, 2, 4, 5, 6)] == [0] * 6, (loss, reads)   # steps 1-3, 5-7: no read at all
        assert reads[3] == reads[7] == 1                          # log steps 4 and 8: one read of the sums


def test_adamw_keeps_its_step_counters_on_the_host_when_the_weights_are_on_a_gpu():
    mode, cuda = fake_gpu()
    with mode, cuda:
        model = tiny_unet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(s["step"].device.type == "cpu" and s["exp_avg"].device.type == "cuda" for s in opt.state.values())


def test_lambda_text_is_canonical_so_a_python_config_and_its_printed_command_compare_equal(tmp_path, tiny_stage1):
    assert [pd.SP_LAMBDA(v) for v in ("", "auto", "0.50", 0.5, "1", "2e-1")] == ["", "auto", "0.5", "0.5", "1.0", "0.2"]
    cfg = {**TINY_CFG, "out": str(tmp_path / "sp"), "steps": 2, "loss": "self-perceptual", "init": tiny_stage1,
           "ckpt_every": 1}
    pd.train({**cfg, "steps": 1, "sp_with_mse": 0.5}, log=lambda s: None)             # given in Python, a float
    logs = []
    pd.train({**cfg, "sp_with_mse": "0.50"}, log=logs.append)                        # as a command types it
    assert logs[0].startswith("resumed from") and pd.load_checkpoint(str(tmp_path / "sp" / "ckpt.pt"))["step"] == 2


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_the_runs_own_gpu_has_native_bf16(capability, expected, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # emulation counts here: not used
    assert pd.resolve_precision("cuda:1", "auto") == expected and asked == [torch.device("cuda:1")]
    assert pd.resolve_precision("cpu", "auto") == "fp32" and pd.resolve_precision("cuda:1", "fp32") == "fp32"


# ----------------------------------- a stage is never lost, a run is watchable -----------------------------------

def test_train_into_a_finished_run_leaves_it_untouched(tmp_path):
    tiny_train(tmp_path, steps=3)
    files = {f: os.path.getmtime(tmp_path / "run" / f) for f in os.listdir(tmp_path / "run")}
    logs = []
    ema, stats = pd.train({**TINY_CFG, "out": str(tmp_path / "run"), "steps": 3, "ckpt_every": 100}, log=logs.append)
    assert stats["reused"] and logs == [f"reusing the finished run in {tmp_path / 'run'} (3 steps): left as it is"]
    assert {f: os.path.getmtime(tmp_path / "run" / f) for f in os.listdir(tmp_path / "run")} == files


def test_train_into_an_interrupted_run_of_the_same_configuration_continues_it(tmp_path):
    tiny_train(tmp_path, "ab", steps=2)
    logs = []
    pd.train({**TINY_CFG, "out": str(tmp_path / "ab"), "steps": 5, "ckpt_every": 100}, log=logs.append)
    tiny_train(tmp_path, "straight", steps=5)
    a, b = (pd.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("ab", "straight"))
    assert logs[0] == f"resumed from {tmp_path / 'ab' / 'ckpt.pt'} at step 2" and a["step"] == 5
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


@pytest.mark.parametrize("change, named", [(["--lr", "0.01"], "lr"), (["--seed", "3"], "seed"),
                                           (["--loss", "self-perceptual", "--init", "OTHER"], "loss")])
def test_train_into_a_folder_holding_another_run_is_refused_in_one_line_and_leaves_it(change, named, tmp_path, capsys):
    tiny_train(tmp_path, steps=2)
    tiny_train(tmp_path, "other", steps=1)
    before = open(tmp_path / "run" / "ckpt.pt", "rb").read()
    change = [str(tmp_path / "other" / "ckpt.pt") if c == "OTHER" else c for c in change]
    argv = ["train", *TINY_FLAGS, "--warmup", "1", "--lr", "1e-3", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--steps", "4", "--out", str(tmp_path / "run"), *change]
    assert pd.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "--resume" in err and "new --out" in err
    assert open(tmp_path / "run" / "ckpt.pt", "rb").read() == before


def test_a_stage_2_into_a_folder_of_a_stage_2_from_other_stage_1_weights_is_refused(tmp_path):
    tiny_train(tmp_path, "mse", steps=2)
    init = str(tmp_path / "mse" / "ckpt.pt")
    tiny_train(tmp_path, "sp", steps=2, loss="self-perceptual", init=init)
    tiny_train(tmp_path, "mse", steps=3)                              # stage 1 continued in place: other weights
    with pytest.raises(pd.UsageError, match="the --init weights"):
        tiny_train(tmp_path, "sp", steps=4, loss="self-perceptual", init=init)


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, pd.METRICS))]


def test_every_run_folder_has_a_metrics_log_of_each_log_step_continued_across_a_resume(tmp_path):
    tiny_train(tmp_path, steps=4, log_every=2)
    pd.train({**TINY_CFG, "resume": str(tmp_path / "run"), "steps": 6, "log_every": 2}, log=lambda s: None)
    lines = metrics(tmp_path / "run")
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(set(r) == {"step", "loss", "lr", "img_s", "grad_norm", "seconds"} for r in lines)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["img_s"] > 0 for r in lines)
    assert lines[0]["seconds"] < lines[1]["seconds"] < lines[2]["seconds"]


def test_a_run_killed_with_sigkill_continues_from_its_last_checkpoint_when_its_command_is_run_again(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, os.path.join(HERE, "perceptual_diffusion.py"), "train", *TINY_FLAGS, "--steps", "200",
            "--log-every", "1", "--ckpt-every", "5", "--sample-every", "0", "--device", "cpu", "--out", str(run)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:                                          # past a checkpoint, not at one
        if line.startswith("step 7/"):
            break
    p.kill()                                                       # SIGKILL: no handler, no last checkpoint
    p.communicate(timeout=60)
    step = pd.load_checkpoint(str(run / "ckpt.pt"))["step"]
    assert 5 <= step < 200 and step % 5 == 0
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {run / 'ckpt.pt'} at step {step}" in r.stdout
    assert [m["step"] for m in metrics(run)] == list(range(1, 201))     # the lines past the checkpoint were dropped
    before = open(run / "ckpt.pt", "rb").read()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)   # finished: launched again, untouched
    assert r.returncode == 0 and "left as it is" in r.stdout and open(run / "ckpt.pt", "rb").read() == before


def test_each_epochs_order_is_made_on_the_images_device_and_a_step_copies_nothing_from_the_host():
    counter, sampler = CountOps(), pd.Batches(40, 4, 0, 1, seed=0).sampler
    order = list(sampler)                     # DistributedSampler draws it on the host (outside the fake mode here)
    mode, cuda = fake_gpu()
    with mode, cuda:
        images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)                 # the data set on the (fake) GPU
        batches = pd.Batches(40, 4, 0, 1, seed=0, device=images.device)
        batches.sampler = type("Drawn", (), {"set_epoch": lambda self, e: None, "__iter__": lambda self: iter(order)})()
        batches.indices(0)                                                   # the epoch's order: one copy
        with counter:
            for step in range(1, 9):                                         # the rest of the epoch
                x0 = pd.to_model_range(images[batches.indices(step)])
    assert counter.copies_from_cpu == 0 and x0.device.type == "cuda" and batches.order.device.type == "cuda"
