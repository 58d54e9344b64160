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


def test_image_size_the_unet_cannot_halve_is_a_usage_error():
    with pytest.raises(pd.UsageError, match="cannot be halved"):
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


@pytest.mark.parametrize("variant", [dict(sp_features="all"), dict(sp_distance="mae"), dict(perceptual_net="ema")])
def test_every_ablation_trains_the_online_model_through_a_perceptual_net_that_gets_no_gradient(variant, tmp_path, tiny_stage1):
    init = tiny_stage1
    _, stats = pd.train({**TINY_CFG, "out": str(tmp_path / "sp"), "steps": 2, "loss": "self-perceptual", "init": init,
                         **variant}, log=lambda s: None)
    before = pd.model_from_checkpoint(pd.load_checkpoint(init)).state_dict()
    after = stats["model"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)       # the online model learnt
    model = tiny_unet()
    perceptual = pd.frozen_copy(tiny_unet(seed=1))
    opts = {pd.SP_ABLATION_KEYS[k]: v for k, v in variant.items() if k in pd.SP_ABLATION_KEYS}
    pd.self_perceptual_loss(model, perceptual, pd.Schedule(1000), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]),
                            **opts).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())


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


def test_chunked_guided_sampling_equals_one_batched_forward_and_chunks_to_the_limit():
    s = pd.Schedule(1000)
    model = CountingModel(tiny_unet().eval())
    noise, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    whole = pd.sample(model, s, noise.shape, y, steps=3, cfg_scale=2.5, cfg_rescale=0.7, noise=noise, max_batch=1000)
    assert model.batches == [12] * 3
    model.batches.clear()
    chunked = pd.sample(model, s, noise.shape, y, steps=3, cfg_scale=2.5, cfg_rescale=0.7, noise=noise, max_batch=5)
    assert model.batches == [5, 5, 2] * 3
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert pd.max_forward_batch("cpu") == 64 and pd.max_forward_batch("cuda") is None


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


def numeric_flags():
    """(subcommand, flag, bad value) for every flag of every subcommand whose type declares a range: walked from
    the parser itself, so a flag added later is covered without editing this test."""
    parser = pd.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and callable(action.type) and action.type not in (str,):
                cases += [(name, action.option_strings[0], v) for v in out_of_range_values(action)]
    return cases


@pytest.mark.parametrize("command, flag, value", numeric_flags())
def test_every_out_of_range_numeric_flag_is_one_line_and_exit_code_2_before_any_work(command, flag, value, capsys,
                                                                                       tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    needs = {"sample": ["--ckpt", "none.pt"], "evaluate": ["--ckpt", "none.pt"]}.get(command, [])
    assert pd.main([command, *needs, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []                              # nothing was created or computed


def test_the_parser_walk_covers_every_numeric_flag_of_every_subcommand():
    covered = {(c, f) for c, f, _ in numeric_flags()}
    assert {("train", "--lr"), ("train", "--warmup"), ("train", "--grad-clip"), ("sample", "--n"), ("sample", "--eta"),
            ("sample", "--batch"), ("sample", "--cfg-interval"), ("evaluate", "--n"), ("evaluate", "--real-n"),
            ("reproduce", "--eval-n"), ("bench", "--iters"), ("bench", "--batch-size")} <= covered


@pytest.mark.parametrize("argv, message", [
    (["sample", "--out", "no_such_folder/grid.png"], "'no_such_folder' does not exist"),
    (["sample", "--out", "grid.txt"], "must end in"),
    (["sample", "--out", "."], "must end in"),
    (["sample", "--out", "a_file/grid.png"], "'a_file' is a file, not a folder"),
    (["sample", "--npz", "samples.png"], "must end in .npz"),
    (["evaluate", "--json", "no_such_folder/r.json"], "does not exist"),
    (["evaluate", "--json", "r.txt"], "must end in .json"),
    (["train", "--out", "a_file/run"], "cannot create this folder"),
    (["reproduce", "--out", "a_file/rep"], "cannot create this folder"),
])
def test_unwritable_outputs_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("a file, not a folder")
    called = []
    monkeypatch.setattr(pd, "load_checkpoint", lambda *a: called.append(1))
    monkeypatch.setattr(pd, "load_dataset", lambda *a, **k: called.append(1))
    needs = ["--ckpt", "x.pt"] if argv[0] in ("sample", "evaluate") else []
    assert pd.main(argv + needs) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and called == []


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

def test_cli_train_then_sample_writes_checkpoint_grid_and_npz(tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", *TINY_FLAGS, "--steps", "4", "--log-every", "2", "--sample-every", "4", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "step 4/4 | loss" in r.stdout and "img/s" in r.stdout and "lr" in r.stdout
    assert (run / "ckpt.pt").exists() and (run / "samples_0000004.png").exists()
    r = run_cli("sample", "--ckpt", str(run / "ckpt.pt"), "--n", "12", "--steps", "3", "--cfg", "2",
                "--cfg-rescale", "0.7", "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size[0] > 16
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (12, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [i % 10 for i in range(12)]


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


# ------------------------------------------ evaluation -----------------------------------------

def frechet(mu1, cov1, mu2, cov2):
    """One Frechet distance through the batched frechet_distances."""
    return float(pd.frechet_distances(mu1.double()[None], cov1.double()[None], mu2.double(), cov2.double())[0])


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    assert abs(frechet(*pd.feature_stats(f), *pd.feature_stats(f))) < 1e-8


def test_frechet_distance_between_known_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    C1, mu1, mu2 = A @ A.T + 0.1 * torch.eye(8, dtype=torch.float64), torch.zeros(8), torch.ones(8)
    # Commuting covariances C2 = k C1: d^2 = ||mu1 - mu2||^2 + (1 - sqrt(k))^2 tr(C1).
    assert frechet(mu1, C1, mu2, 4 * C1) == pytest.approx(8 + tr(C1), rel=1e-9)
    # A non-commuting pair, against tr sqrt(C1 C2) = sum sqrt(eig(C1 C2)) from numpy.
    B = torch.randn(8, 8, generator=g, dtype=torch.float64)
    C2 = B @ B.T + 0.1 * torch.eye(8, dtype=torch.float64)
    ref = 8 + tr(C1) + tr(C2) - 2 * np.sqrt(np.linalg.eigvals((C1 @ C2).numpy()).real).sum()
    assert frechet(mu1, C1, mu2, C2) == pytest.approx(ref, rel=1e-9)


def tr(c):
    return c.trace().item()


def test_inception_score_is_one_for_constant_and_k_for_uniform_confident_predictions():
    assert pd.inception_score(torch.zeros(100, 10)) == pytest.approx(1.0)
    confident = 50 * F.one_hot(torch.arange(1000) % 10, 10).float()
    assert pd.inception_score(confident) == pytest.approx(10.0, rel=1e-3)


def test_classifier_ruler_runs_offline_and_is_cached(tmp_path):
    data_dir = str(tmp_path / "data")
    ruler = pd.Ruler("classifier", "shapes", data_dir, 16, 0, 200, torch.device("cpu"), classifier_steps=30,
                     log=lambda s: None)
    cache = pd.cache_path(data_dir, "classifier30", "shapes", 16, 0)             # keyed by data, size, seed, steps
    assert os.path.isfile(cache) and 0 <= ruler.protocol["classifier_accuracy_on_real"] <= 1
    assert ruler.protocol["ruler"] == os.path.basename(cache)
    real, y, _, _ = pd.load_dataset("shapes", image_size=16, train=False)
    res, _ = ruler.measure(pd.to_model_range(real[:200]), y[:200], resamples=50)
    assert abs(res["fd"]) < 1e-6 and abs(res["fd_random"]) < 1e-6
    assert res["cond_acc"] == pytest.approx(ruler.protocol["classifier_accuracy_on_real"])
    assert res["saturation"] == pytest.approx(ruler.real_values["saturation"])
    noise, _ = ruler.measure(torch.rand(200, 3, 16, 16) * 2 - 1, y[:200], resamples=50)
    assert noise["fd_ci"][0] > 1.0 and noise["kid_ci"][0] > 0 and noise["fd_random_ci"][0] > 0   # far from real
    again = pd.Ruler("classifier", "shapes", data_dir, 16, 0, 200, torch.device("cpu"), classifier_steps=30,
                     log=lambda s: "classifier step" in s and pytest.fail("retrained instead of reusing the cache"))
    assert torch.equal(again.real_stats["classifier"][0], ruler.real_stats["classifier"][0])


def test_bootstrap_weights_are_counts_of_n_draws_and_deterministic_from_the_seed():
    w = pd.bootstrap_weights(50, 200, seed=3)
    assert w.shape == (201, 50) and torch.equal(w[0], torch.ones(50)) and (w.sum(1) == 50).all()
    assert torch.equal(w, pd.bootstrap_weights(50, 200, seed=3)) and not torch.equal(w, pd.bootstrap_weights(50, 200, 4))
    f = torch.randn(50, 4, dtype=torch.float64)
    mu, cov = pd.feature_stats(f, w[:3])
    assert torch.allclose(mu[0], f.mean(0)) and torch.allclose(cov[0], torch.cov(f.T))
    idx = torch.repeat_interleave(torch.arange(50), w[1].long())   # resample 1 written out as indices
    assert torch.allclose(cov[1], torch.cov(f[idx].T))


def paired_fd_interval(a, b, ref, seed=0):
    """The paired bootstrap interval of FD(a) - FD(b) against reference features ref, as reproduce computes it."""
    mu_r, cov_r = pd.feature_stats(ref)
    w = pd.bootstrap_weights(len(a), 500, seed)
    fd_a, fd_b = (pd.frechet_distances(*pd.feature_stats(x, w), mu_r, cov_r) for x in (a, b))
    return pd.interval(fd_a[0] - fd_b[0], fd_a[1:] - fd_b[1:])


def test_paired_interval_contains_zero_for_one_distribution_and_excludes_it_for_two():
    g = torch.Generator().manual_seed(0)
    ref, a, b = (torch.randn(600, 8, generator=g, dtype=torch.float64) for _ in range(3))
    lo, hi = paired_fd_interval(a, b, ref)                         # a and b: the same distribution
    assert lo < 0 < hi
    lo, hi = paired_fd_interval(a, 1.2 * b + 0.1, ref)            # b: wider and shifted
    assert hi < 0


def test_kid_is_about_zero_for_one_distribution_and_its_interval_excludes_zero_for_two():
    g = torch.Generator().manual_seed(0)
    ref, a = torch.randn(2000, 16, generator=g, dtype=torch.float64), torch.randn(600, 16, generator=g, dtype=torch.float64)
    w = pd.bootstrap_weights(600, 500, seed=1)
    same = pd.resampled_kid(a, w, ref, pd.kid_real_term(ref))
    lo, hi = pd.interval(same[0], same[1:])
    assert lo < 0 < hi and abs(same[0]) < 0.01
    # The plug-in Frechet distance of the same two samples is clearly positive: the bias KID does not have.
    assert pd.resampled_fd(a, w[:1], (*pd.feature_stats(ref), pd.sqrtm_psd(pd.feature_stats(ref)[1])))[0] > 0.1
    other = pd.resampled_kid(1.2 * a + 0.1, w, ref, pd.kid_real_term(ref))
    assert pd.interval(other[0], other[1:])[0] > 0


def test_kid_of_a_resample_leaves_out_pairs_of_copies_and_matches_the_written_out_u_statistic():
    g = torch.Generator().manual_seed(2)
    a, ref = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    w = pd.bootstrap_weights(30, 3, seed=0)
    got = pd.resampled_kid(a, w, ref, pd.kid_real_term(ref), block=7)          # blocks that do not divide n
    for row in range(4):
        idx = torch.repeat_interleave(torch.arange(30), w[row].long())        # the resample written out
        K = pd.cubic_kernel(a[idx], a[idx])
        same = idx[:, None] == idx[None, :]                                     # pairs of copies of one original
        within = K[~same].sum() / (900 - (w[row] ** 2).sum())
        Kr = pd.cubic_kernel(ref, ref)
        expected = within + (Kr.sum() - Kr.trace()) / (40 * 39) - 2 * pd.cubic_kernel(a[idx], ref).mean()
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-9)


def test_resampled_frechet_distance_equals_the_direct_one_and_its_memory_stays_under_the_stated_bound():
    g = torch.Generator().manual_seed(0)
    f, ref = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(500, 8, generator=g, dtype=torch.float64)
    mu, cov = pd.feature_stats(ref)
    w = pd.bootstrap_weights(300, 20, seed=0)
    chunked = pd.resampled_fd(f, w, (mu, cov, pd.sqrtm_psd(cov)), budget=1)      # one resample per chunk
    assert torch.allclose(chunked, pd.frechet_distances(*pd.feature_stats(f, w), mu, cov), rtol=1e-9)
    # D = 512, n = 1000, 200 resamples: all at once it peaks at 2.0 GB (measured). With a 64 MiB budget the
    # docstring's bound is 8 c (n D + 3 D^2) <= 64 MiB (measured: 67 MB). Measured in a subprocess as the growth
    # of its peak resident memory (Linux: VmHWM, reset through clear_refs), large blocks given back when freed.
    code = """
import torch, perceptual_diffusion as pd
kb = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
g = torch.Generator().manual_seed(0)
f = torch.randn(1000, 512, generator=g, dtype=torch.float64)
ref = (f.mean(0), torch.eye(512, dtype=torch.float64), torch.eye(512, dtype=torch.float64))
w = pd.bootstrap_weights(1000, 200, 0)
pd.resampled_fd(f[:50], w[:2, :50], ref)                      # load the kernels before measuring
open('/proc/self/clear_refs', 'w').write('5')
before = kb('VmRSS')
pd.resampled_fd(f, w, ref, budget=64 * 2 ** 20)
print((kb('VmHWM') - before) / 1024)"""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak memory is measured through Linux's /proc")
    grown_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                                    cwd=os.path.dirname(os.path.abspath(pd.__file__))).stdout.split()[-1])
    assert grown_mb < 64 + 16                                      # the budget, plus small temporaries


def rows_and_boots(fd_a, fd_b, acc_a, acc_b):
    """Two rows whose paired replicates differ by a fixed amount plus small noise: a clear verdict."""
    g = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    rows = {1: {"fd": fd_a, "cond_acc": acc_a}, 2: {"fd": fd_b, "cond_acc": acc_b}}
    boots = {1: {"fd": fd_a + noise, "cond_acc": acc_a + noise}, 2: {"fd": torch.full((200,), fd_b, dtype=torch.float64),
                                                                    "cond_acc": torch.full((200,), acc_b, dtype=torch.float64)}}
    return rows, boots


def test_verdict_names_the_row_with_lower_distance_and_higher_accuracy_as_better():
    v = pd.verdict(1, 2, "q", *rows_and_boots(fd_a=1.0, fd_b=2.0, acc_a=0.3, acc_b=0.6))
    assert v["fd"]["verdict"] == "row 1 better in this run" and v["fd"]["diff"] == pytest.approx(-1.0)
    assert v["cond_acc"]["verdict"] == "row 2 better in this run" and v["cond_acc"]["ci"][1] < 0
    v = pd.verdict(1, 2, "q", *rows_and_boots(fd_a=2.0, fd_b=2.0, acc_a=0.6, acc_b=0.6))
    assert v["fd"]["verdict"].startswith("not distinguishable")


@pytest.mark.parametrize("diff, ci, expected", [
    (-3.0, [-4.0, -2.0], "not converged"), (-0.2, [-0.3, -0.1], "under 10% but measurable"),
    (-0.2, [-0.5, 0.1], "not distinguishable"), (4.0, [3.0, 5.0], "WORSE")])
def test_convergence_line_follows_the_sign_and_size_of_the_controls_change(diff, ci, expected):
    res = {"rows": [{"row": 1, "fd": 10.0, "train_steps": 100}, {"row": 2, "fd": 10.0 + diff, "train_steps": 120}],
           "verdicts": [{"a": 2, "b": 1, "fd": {"diff": diff, "ci": ci}}]}
    line = pd.convergence_line(res)
    assert expected in line and f"{100 * diff / 10:+.0f}%" in line


@pytest.fixture(scope="module")
def shapes_ruler(tmp_path_factory):
    return pd.Ruler("classifier", "shapes", str(tmp_path_factory.mktemp("ruler")), 16, 0, 500, torch.device("cpu"),
                    classifier_steps=150, log=lambda s: None)


def degrade(x, kind, strength):
    """A known degradation of images in [-1, 1]: blur (box filter of width 1 + 2 * strength), desaturation
    (mix towards grey), additive Gaussian noise."""
    if kind == "blur":
        k = 1 + 2 * strength
        return F.avg_pool2d(F.pad(x, [strength] * 4, mode="replicate"), k, stride=1)
    if kind == "desaturate":
        return x + strength / 3 * (x.mean(1, keepdim=True) - x)
    return x + strength / 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["blur", "desaturate", "noise"])
def test_each_ruler_is_a_ruler_real_against_real_is_near_its_floor_and_degradation_raises_it(shapes_ruler, kind):
    held = pd.to_model_range(shapes_ruler.heldout[500:1000])       # real images the reference does not contain
    y = shapes_ruler.heldout_y[500:1000]
    floor, _ = shapes_ruler.measure(held, y, resamples=200)
    seen = [floor] + [shapes_ruler.measure(degrade(held, kind, s), y, resamples=20)[0] for s in (1, 2, 3)]
    for key in ("fd", "fd_random"):
        values = [r[key] for r in seen]
        assert values == sorted(values) and len(set(values)) == 4, (key, values)   # strictly rising with strength
        # and the strongest beyond what real-against-real sampling noise gives -- except that the shape classifier
        # barely sees colour (measured: full desaturation moves it less than its own noise), the blind spot the
        # second ruler is there for
        if not (key == "fd" and kind == "desaturate"):
            assert values[3] > floor[key + "_ci"][1], (key, values)
    # the pixel statistics move the way each degradation says
    if kind == "blur":
        assert seen[3]["spectrum_dist"] > seen[1]["spectrum_dist"] > floor["spectrum_dist"]
    if kind == "desaturate":
        assert seen[3]["saturation"] < seen[1]["saturation"] < floor["saturation"]


def test_the_two_rulers_share_nothing_random_features_are_fixed_and_untrained(shapes_ruler):
    net = shapes_ruler.nets["random"]
    assert not any(p.requires_grad for p in net.parameters())
    again = pd.RandomFeatures()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert set(shapes_ruler.nets) == {"classifier", "random"}


def test_pixel_summary_measures_what_its_names_say():
    grey = torch.zeros(2, 3, 8, 8)                                 # 0 in [-1, 1] = 0.5 in [0, 1]
    stats, spectrum = pd.pixel_summary(grey)
    assert stats[0].tolist() == pytest.approx([0.5, 0.25, 0.0, 0.0]) and spectrum.abs().max() < 1e-12
    red = torch.full((1, 3, 8, 8), -1.0)
    red[:, 0] = 1
    assert pd.pixel_summary(red)[0][0, 2].item() == pytest.approx(1.0)   # fully saturated
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2 - 1.0
    _, spec = pd.pixel_summary(checker.expand(1, 3, 8, 8))
    assert spec[0, -1] > 0 and spec[0, :-1].abs().max() < 1e-9       # all energy at the highest radius


def test_inception_without_weights_is_one_clear_line_and_never_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))

    def no_download(url, *a, **k):
        raise OSError(f"download of {url} refused by the test")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(pd.UsageError, match="Inception-v3 weights are not in the torch hub cache"):
        pd.InceptionFeatures()
    tiny_train(tmp_path)
    assert pd.main(["evaluate", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--features", "inception",
                    "--n", "4", "--real-n", "4"]) == 2
    err = capsys.readouterr().err
    assert "Inception-v3 weights" in err and err.count("\n") == 1


def fake_pytorch_fid(monkeypatch, seen, fail=None):
    """A stand-in for the optional package pytorch-fid: its InceptionV3 class, with random weights, recording
    what it is given. It resizes to 299 and normalises to [-1, 1] itself, as the real one does when asked."""
    import types

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks, resize_input=False, normalize_input=False):
            super().__init__()
            if fail:
                raise fail
            seen["flags"] = (blocks, resize_input, normalize_input)
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 64, 3, stride=8)       # 64 features keep the test fast

        def forward(self, x):
            seen.setdefault("inputs", []).append((x.min().item(), x.max().item(), tuple(x.shape[-2:])))
            x = F.interpolate(x, size=(299, 299), mode="bilinear") * 2 - 1
            return [F.adaptive_avg_pool2d(self.conv(x), 1)]

    pkg, mod = types.ModuleType("pytorch_fid"), types.ModuleType("pytorch_fid.inception")
    mod.InceptionV3, pkg.inception = InceptionV3, mod
    monkeypatch.setitem(sys.modules, "pytorch_fid", pkg)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", mod)


def test_fid_plumbing_uses_the_package_network_once_on_images_in_0_1_and_a_set_with_itself_scores_zero(tmp_path, monkeypatch):
    seen = {}
    fake_pytorch_fid(monkeypatch, seen)
    monkeypatch.setattr(pd, "SHAPES_TRAIN", 300)                   # a small "training split" for the reference
    ruler = pd.Ruler("fid", "shapes", str(tmp_path / "data"), 16, 0, 100, torch.device("cpu"), log=lambda s: None)
    assert seen["flags"] == ([3], True, True)                  # the package resizes and normalises, once
    assert all(lo >= 0 and hi <= 1 and size == (16, 16) for lo, hi, size in seen["inputs"])
    assert any(f.startswith("fid_stats_shapes_16px") for f in os.listdir(tmp_path / "data"))   # cached beside the data
    train_images, _, _, _ = pd.load_dataset("shapes", image_size=16, train=True)
    res, _ = ruler.measure(pd.to_model_range(train_images), None, resamples=20)
    assert abs(res["fd"]) < 1e-6 * ruler.real_stats["fid"][1].trace().item()   # the reference set against itself
    assert ruler.protocol["fid"] == "pytorch-fid"


@pytest.mark.parametrize("problem", ["no package", "no weights"])
def test_fid_without_the_package_or_its_weights_is_one_clear_line_and_exit_code_2(problem, tmp_path, monkeypatch, capsys):
    if problem == "no package":
        monkeypatch.setitem(sys.modules, "pytorch_fid", None)      # import fails as if not installed
    else:
        fake_pytorch_fid(monkeypatch, {}, fail=OSError("download refused by the test"))
    tiny_train(tmp_path)
    assert pd.main(["evaluate", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--features", "fid", "--n", "4",
                    "--real-n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("pip install pytorch-fid" in err if problem == "no package" else "FID Inception weights" in err)


def test_estimate_projects_every_stage_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = pd.estimate("smoke", "cpu", log=lambda s: None)
    assert len(res["parts"]) == 4 and res["total_seconds"] == pytest.approx(sum(res["parts"].values()))
    assert all(sec > 0 for sec in res["parts"].values())
    assert pd.main(["reproduce", "--preset", "smoke", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "stage 1" in out and "total" in out and os.listdir(tmp_path) == []      # nothing trained or written
    assert pd.main(["train", "--estimate", "--steps", "1000", *TINY_FLAGS]) == 0
    assert "min of training" in capsys.readouterr().out and os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke reproduction with the ablations, shared by the tests below (each checks another property)."""
    out = tmp_path_factory.mktemp("reproduce") / "a"
    return out, pd.reproduce("smoke", str(out), device="cpu", ablations=True, log=lambda s: None)


def test_reproduce_smoke_preset_writes_tables_pictures_unconditional_rows_and_verdicts(smoke_run):
    out, res = smoke_run
    assert [r["row"] for r in res["rows"]] == list(range(1, 11))
    md = (out / "results.md").read_text()
    assert all(f"| {i} |" in md for i in range(1, 9)) and "Protocol:" in md and "Convergence of stage 1" in md
    assert "Rulers:" in md and "Pixel statistics" in md and "x0_hat" in md
    data = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert rows[2]["train_steps"] == rows[1]["train_steps"] + 1                      # the fair control
    assert rows[3]["cfg_scale"] == data["guidance"][0] != 1
    assert all(rows[k]["label"] == 10 and "cond_acc" not in rows[k] for k in (6, 7, 8))  # the null label
    assert all({"fd_ci", "fd_random_ci", "kid_ci", "kid_random_ci"} <= r.keys() for r in data["rows"])
    assert {(v["a"], v["b"]) for v in data["verdicts"]} >= {(4, 1), (4, 2), (2, 1), (8, 6), (8, 7)}
    assert [x["t"] for x in data["x0_hat"]][-1] == 999 and len(data["x0_hat"]) >= 4
    assert [s["cfg_scale"] for s in data["guidance_sweep"]] == [1.0, 2.0, 3.0] == [s["cfg_scale"] for s in data["sp_guidance_sweep"]]
    assert [s["cfg_scale"] for s in data["autoguidance_sweep"]] == [2.0, 3.0] and rows[9]["guidance"] == "auto"
    assert rows[10]["label"] == 10 and rows[9]["cfg_scale"] == rows[10]["cfg_scale"] == data["autoguidance"][0]
    assert os.path.isfile(data["guide"]) and pd.load_checkpoint(data["guide"])["step"] == 1   # 1/8 of 2 steps, at least 1
    assert set(data["prdc_ceiling"]) == set(pd.SWEEP_KEYS[2:]) and all("recall_random_ci" in r for r in data["rows"])
    from PIL import Image
    assert Image.open(out / "comparison.png").size[0] > 5 * 16 and Image.open(out / "x0_hat.png").size[1] > 4 * 16


def test_reproduce_ablations_trains_each_variant_and_writes_its_table(smoke_run):
    out, res = smoke_run
    assert [a["ablation"]["model"] for a in res["ablations"]] == [f"sp-{k}" for k, _, _ in pd.ABLATIONS]
    for key, _, variant in pd.ABLATIONS:
        cfg = pd.load_checkpoint(str(out / f"sp-{key}" / "ckpt.pt"))["config"]
        assert all(cfg[k] == v for k, v in variant.items())
    md = (out / "ablations.md").read_text()
    assert all(label in md for _, label, _ in pd.ABLATIONS) and "row 4" in md
    assert len(json.loads((out / "ablations.json").read_text())) == len(pd.ABLATIONS)


def test_reproduce_rerun_gives_the_same_table_and_reuses_finished_stages(smoke_run, tmp_path):
    out, a = smoke_run
    key = lambda res: [(r["fd"], r["fd_random"], r.get("cond_acc"), r["fd_ci"]) for r in res["rows"]]
    b = pd.reproduce("smoke", str(tmp_path / "b"), device="cpu", log=lambda s: None)        # from scratch
    assert key(a) == key(b) and a["guidance_sweep"] == b["guidance_sweep"]
    logs = []
    again = pd.reproduce("smoke", str(out), device="cpu", log=logs.append)                  # in the same folder
    assert key(again) == key(a) and sum("reusing the finished run" in line for line in logs) == 3
    with pytest.raises(pd.UsageError, match="another configuration"):
        pd.reproduce("smoke", str(out), device="cpu", seed=1, log=lambda s: None)


def test_reproduce_retrains_stage_2_when_stage_1_was_continued_in_place(smoke_run, tmp_path):
    out, _ = smoke_run
    import shutil
    shutil.copytree(out, tmp_path / "c")
    pd.train({"resume": str(tmp_path / "c" / "mse"), "steps": 3}, log=lambda s: None)   # the learning-curve workflow
    logs = []
    res = pd.reproduce("smoke", str(tmp_path / "c"), device="cpu", stage1_steps=3, log=logs.append)
    assert sum("reusing the finished run" in line for line in logs) == 1              # stage 1 alone
    assert sum("training" in line and "anew" in line for line in logs) == 2           # the stage 2 and the control
    rows = {r["row"]: r for r in res["rows"]}
    assert rows[1]["train_steps"] == 3 and rows[2]["train_steps"] == rows[4]["train_steps"] == 4


def test_reproduce_reuses_stages_trained_on_another_device(smoke_run, tmp_path, monkeypatch):
    out, _ = smoke_run
    import shutil
    shutil.copytree(out, tmp_path / "d")
    for key in ("mse", "self-perceptual", "mse-continued"):
        path = str(tmp_path / "d" / key / "ckpt.pt")
        ckpt = pd.load_checkpoint(path)
        ckpt["config"]["device"] = "cuda"                             # as if trained on a GPU
        pd.save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "kind"})
    logs = []
    pd.reproduce("smoke", str(tmp_path / "d"), device="cpu", log=logs.append)
    assert sum("reusing the finished run" in line for line in logs) == 3


def test_bench_reports_throughputs_and_ratios():
    res = pd.bench(dict(image_size=8, channels=8, channel_mult="1,2", attn_res="4", batch_size=4, device="cpu"),
                   iters=1, log=lambda s: None)
    assert res["params"] > 0 and res["train_img_s_mse"] > 0 and res["sample_img_s_50_steps_guided"] > 0
    assert res["self_perceptual_step_ratio"] > 0 and res["guided_step_ratio"] > 0
    assert 0 < res["cfg_interval_guided_steps"] < 50 and res["interval_step_ratio"] > 0


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


def _ddp_main_worker(rank, world, port, argv, report):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pd.main(argv)
    with open(f"{report}.{rank}", "w") as f:
        json.dump({"code": code, "stderr": err.getvalue()}, f)


@pytest.mark.parametrize("problem", ["unwritable --out", "missing --data"])
def test_ddp_ranks_all_exit_with_one_line_when_the_output_or_the_data_is_bad(problem, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a_file").write_text("x")
    bad = ["--out", str(tmp_path / "a_file" / "run")] if problem == "unwritable --out" else \
          ["--out", str(tmp_path / "run"), "--data", str(tmp_path / "no_such_folder")]
    argv = ["train", "--steps", "1", "--batch-size", "2", "--image-size", "8", "--channels", "8", *bad]
    ctx = mp.start_processes(_ddp_main_worker, args=(2, port, argv, str(tmp_path / "report")), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:                                 # a rank waiting forever is the bug
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank did not exit")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"report.{rank}").read_text())
        assert r["code"] == 2 and r["stderr"].count("\n") == 1 and r["stderr"].startswith("error:"), (rank, r)


def test_batches_give_each_rank_disjoint_indices_that_together_cover_the_epoch():
    n, world, b = 40, 2, 4
    ranks = [pd.Batches(n, b, rank, world, seed=3) for rank in range(world)]
    per_epoch = ranks[0].per_epoch
    seen = [torch.cat([r.indices(step) for step in range(per_epoch)]) for r in ranks]
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(n))     # 40 images = 2 ranks x 5 steps x 4
    assert not torch.equal(ranks[0].indices(per_epoch), ranks[0].indices(0))   # a new epoch, a new order


# ------------------------------------- replication over seeds -------------------------------------

def test_t_quantile_matches_published_tables():
    assert pd.t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert pd.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert pd.t_quantile(0.975, 30) == pytest.approx(2.042, abs=1e-3)


def test_pooled_interval_covers_the_true_difference_in_95_percent_of_simulated_experiments():
    # Each experiment: K = 5 training seeds; a seed's paired difference = true + between-run effect (sd 0.3) +
    # its own sampling noise (sd 0.1). A sampling-only interval would cover far less often.
    g = np.random.default_rng(0)
    true, covered, n = 0.2, 0, 400
    for _ in range(n):
        diffs = true + g.normal(0, 0.3, 5) + g.normal(0, 0.1, 5)
        _, (lo, hi) = pd.pooled_interval(diffs)
        covered += lo <= true <= hi
    assert 0.92 <= covered / n <= 0.98                            # binomial sd at n = 400: 0.011


def fake_result(diffs, verdicts):
    """A results.json-like dict whose one verdict (4 - 2, Frechet distance) has the given difference and word."""
    return {"verdicts": [{"a": 4, "b": 2, "what": "q", "fd": {"diff": diffs, "ci": [0, 0], "verdict": verdicts}}]}


def test_no_verdict_is_called_when_seeds_disagree_in_sign_and_the_pooled_interval_holds_zero():
    results = [fake_result(0.5, "row 2 better in this run"), fake_result(-0.6, "row 4 better in this run"),
               fake_result(0.2, "not distinguishable in this run")]
    v = pd.pooled_verdicts(results)[0]["fd"]
    assert v["ci"][0] < 0 < v["ci"][1] and v["verdict"] == "not distinguishable over seeds"
    assert v["diff"] == pytest.approx(0.1 / 3) and v["per_seed"] == [0.5, -0.6, 0.2]
    agree = [fake_result(-d, "row 4 better in this run") for d in (1.0, 1.1, 0.9)]
    v = pd.pooled_verdicts(agree)[0]["fd"]
    assert v["verdict"] == "row 4 better" and v["held"] == 3 and v["seeds"] == 3
    assert pd.pooled_verdicts(agree[:1])[0]["fd"]["verdict"].startswith("one training run")


def test_reproduce_seeds_writes_pooled_verdicts_and_an_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    real, calls = pd.reproduce, []

    def failing_second_seed(preset, out, device, seed, *a, **kw):
        calls.append(seed)
        if seed == 1:
            raise KeyboardInterrupt                                  # the run is stopped during seed 1
        return real(preset, out, device, seed, *a, **kw)
    monkeypatch.setattr(pd, "reproduce", failing_second_seed)
    assert pd.main(["reproduce", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path / "s")]) == 130
    monkeypatch.setattr(pd, "reproduce", real)
    assert pd.main(["reproduce", "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "seed0: reusing its finished results" in out and "== seed1 (" in out
    pooled = json.loads((tmp_path / "s" / "pooled.json").read_text())
    assert pooled["seeds"] == [0, 1] and all(v["fd"]["seeds"] == 2 for v in pooled["verdicts"])
    md = (tmp_path / "s" / "pooled.md").read_text()
    assert "of 2 |" in md and "95% interval over seeds" in md
    assert (tmp_path / "s" / "seed1" / "results.md").is_file() and (tmp_path / "s" / "seed0" / "results.json").is_file()


def test_stage2_seeds_share_the_first_seeds_stage_1_and_split_the_spread_by_source(tmp_path):
    pooled = pd.reproduce_seeds("smoke", str(tmp_path / "v"), [0, 1], stage2_seeds=1, device="cpu", log=lambda s: None)
    shared = json.loads((tmp_path / "v" / "seed0-stage2-1000" / "results.json").read_text())
    assert shared["stage1"] == str(tmp_path / "v" / "seed0" / "mse" / "ckpt.pt")
    assert not (tmp_path / "v" / "seed0-stage2-1000" / "mse").exists() and shared["train"]["seed"] == 1000
    src = {r["row"]: r for r in pooled["sources"]}
    assert {"sampling", "stage2", "stage1"} <= src[4]["fd"].keys() and src[1]["fd"]["sampling"] > 0


def test_bad_seed_lists_are_one_line_and_exit_code_2(capsys, tmp_path):
    for value in ("0", "1,1", "a", "-2"):
        assert pd.main(["reproduce", "--seeds", value, "--out", str(tmp_path)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert pd.main(["reproduce", "--stage2-seeds", "2", "--out", str(tmp_path)]) == 2
    assert "--stage2-seeds needs --seeds" in capsys.readouterr().err and os.listdir(tmp_path) == []


# ------------------------------- cool-down and autoguidance -------------------------------------

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

def gaussian(n, d=16, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_knn_radius_excludes_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64).repeat(1, 2)
    assert pd.knn_radius(x, 1).tolist() == pytest.approx([2 ** 0.5, 2 ** 0.5, 2 * 2 ** 0.5, 4 * 2 ** 0.5])
    big = gaussian(300)                                            # past cdist's 25-row switch to matrix multiply
    assert (pd.knn_radius(big, 1) > 0).all()


def test_two_samples_of_one_distribution_give_density_near_one_and_coverage_near_its_expectation():
    N, k = 600, 5
    ind = pd.prdc_indicators(gaussian(N, seed=1), gaussian(N, seed=2))
    expected = 1 - math.prod((N - i) / (2 * N - i) for i in range(1, k + 1))       # 0.969
    assert ind["density"].mean().item() == pytest.approx(1.0, abs=0.1)
    assert ind["coverage"].mean().item() == pytest.approx(expected, abs=0.025)
    assert 0.4 < ind["precision"].mean().item() < 0.85 and 0.4 < ind["recall"].mean().item() < 0.85


def test_dropping_half_the_modes_lowers_recall_and_coverage_and_keeps_precision():
    centres = 6 * torch.eye(16, dtype=torch.float64)[:8]                           # 8 well-separated modes
    real = centres[torch.arange(800) % 8] + gaussian(800, seed=1)
    full = centres[torch.arange(800) % 8] + gaussian(800, seed=2)
    half = centres[torch.arange(800) % 4] + gaussian(800, seed=2)                  # modes 4-7 missing
    a, b = (pd.prdc_indicators(real, f) for f in (full, half))
    m = lambda ind, k: ind[k].mean().item()
    assert m(b, "recall") < m(a, "recall") - 0.25 and m(b, "coverage") < m(a, "coverage") - 0.3
    assert m(b, "precision") == pytest.approx(m(a, "precision"), abs=0.08)


@pytest.mark.parametrize("degrade", ["blur", "noise"])
def test_blur_or_noise_lowers_precision_and_density(degrade, shapes_ruler):
    real, _, _, _ = pd.load_dataset("shapes", image_size=16, train=False)
    x = pd.to_model_range(real[600:1000])
    bad = F.avg_pool2d(x, 5, 1, 2) if degrade == "blur" else (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    good, _ = shapes_ruler.measure(x, None, resamples=20)
    worse, _ = shapes_ruler.measure(bad, None, resamples=20)
    for sfx in ("", "_random"):
        assert worse["precision" + sfx] < good["precision" + sfx] - 0.05
        assert worse["density" + sfx] < good["density" + sfx] - 0.05


def test_prdc_bootstrap_resamples_indicators_so_duplicated_points_do_not_collapse_it(shapes_ruler):
    # Resampling the *points* with replacement puts a duplicate at distance 0 from its copy (every radius
    # shrinks, recall and coverage move); resampling the per-point indicators leaves their mean where it was.
    real, _, _, _ = pd.load_dataset("shapes", image_size=16, train=False)
    res, boot = shapes_ruler.measure(pd.to_model_range(real[600:1000]), None, resamples=200)
    for key in ("precision", "recall", "density", "coverage"):
        assert boot[key].mean().item() == pytest.approx(res[key], abs=0.01)
        assert res[key + "_ci"][1] - res[key + "_ci"][0] > 0.01


# ------------------------------------- your data, your GPU -------------------------------------

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


def test_reproduce_runs_the_whole_comparison_on_a_folder_of_class_subfolders(tmp_path, capsys):
    folder = make_folder(tmp_path / "mydata")
    argv = ["reproduce", "--preset", "smoke", "--data", folder, "--image-size", "16", "--channels", "8",
            "--batch-size", "4", "--out", str(tmp_path / "r")]
    assert pd.main(argv) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["train"]["data"] == folder and res["train"]["batch_size"] == 4 and res["train"]["channels"] == 8
    assert res["protocol"]["real_split"].startswith("held-out 10%") and res["protocol"]["real_images"] == 8
    assert [r["row"] for r in res["rows"]] == list(range(1, 11)) and res["verdicts"]
    assert (tmp_path / "r" / "comparison.png").is_file() and (tmp_path / "r" / "guidance_tradeoff.png").is_file()
    assert pd.load_checkpoint(str(tmp_path / "r" / "mse" / "ckpt.pt"))["config"]["num_classes"] == 2
    assert "(72 images; 10% of each class held out for the rulers, 2 classes)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/folder"], "neither 'shapes', 'cifar10' nor an existing folder"),
    (["--channels", "0"], "argument --channels: must be a positive integer"),
    (["--lr", "-1"], "argument --lr: must be a positive number"),
    (["--channel-mult", "1,x"], "argument --channel-mult"),
    (["--betas", "square"], "argument --betas: invalid choice")])
def test_reproduce_data_and_model_flags_refuse_bad_values_with_one_line_before_any_work(argv, message, tmp_path, capsys):
    assert pd.main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r" / "mse").exists()


def test_reproduce_estimate_takes_the_model_flags(capsys):
    assert pd.main(["reproduce", "--preset", "smoke", "--estimate", "--channels", "16", "--image-size", "8"]) == 0
    small = capsys.readouterr().out
    assert pd.main(["reproduce", "--preset", "smoke", "--estimate", "--channels", "8", "--image-size", "8"]) == 0
    param = lambda out: float(out.split("(")[1].split("M parameters")[0])
    assert param(small) > param(capsys.readouterr().out)


def test_sample_with_a_guide_checkpoint_is_autoguidance_and_refuses_another_model(tmp_path, capsys):
    tiny_train(tmp_path, steps=3, guide_at=1)
    run = str(tmp_path / "run")
    argv = ["sample", "--ckpt", f"{run}/ckpt.pt", "--guide", f"{run}/guide.pt", "--cfg", "2", "--steps", "2", "--n", "4",
            "--label", "10", "--out", str(tmp_path / "g.png")]
    assert pd.main(argv) == 0 and (tmp_path / "g.png").is_file()
    tiny_train(tmp_path, "wide", steps=1, channels=16)
    argv[argv.index("--guide") + 1] = str(tmp_path / "wide" / "ckpt.pt")
    assert pd.main(argv) == 2 and "channels" in capsys.readouterr().err


def test_gpu_check_runs_every_path_on_the_cpu_in_tiny_mode_and_writes_every_field(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: model)   # compiling takes minutes on a CPU; the plumbing is tested
    out = tmp_path / "gpu.json"
    assert pd.gpu_check("cpu", tiny=True, out=str(out), log=lambda s: None) == {}
    figures = json.loads(out.read_text())
    assert {"device", "torch", "config", "fp32", "bf16", "compile_bf16", "peak_memory_gb", "ddp_torchrun_1_rank",
            "reproduce_smoke", "cifar10_preset_training_hours", "failures"} <= figures.keys()
    for part in ("fp32", "bf16", "compile_bf16"):
        assert figures[part]["train_img_s_mse"] > 0 and figures[part]["guided_step_ratio"] > 0
    assert figures["ddp_torchrun_1_rank"]["backend"] == "gloo" and figures["cifar10_preset_training_hours"] > 0


def test_gpu_check_reports_every_failing_path_and_exits_non_zero(tmp_path, monkeypatch):
    def fail(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access")
    for name in ("bench", "reproduce"):
        monkeypatch.setattr(pd, name, fail)
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 1, "", "NCCL error\n"))
    assert pd.main(["gpucheck", "--device", "cpu", "--tiny", "--out", str(tmp_path / "g.json")]) == 1
    failures = json.loads((tmp_path / "g.json").read_text())["failures"]
    assert set(failures) == {"fp32", "bf16", "compile_bf16", "ddp_torchrun_1_rank", "reproduce_smoke"}
    assert failures["ddp_torchrun_1_rank"] == "RuntimeError: NCCL error" and "illegal memory" in failures["fp32"]
