"""The optional recipe options for small-scale JEPAs (all off by default): VICReg's variance and covariance terms
(C-JEPA), LeJEPA's SIGReg, and the EMA-momentum warmup of `train.schedule`. Each term is checked against its
equation and its zero / collapse cases, for where its gradients go, and for leaving the paper's path untouched."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ijepa_viz.config import Config, ConfigError, ModelConfig, OptimConfig, PRESETS, get_preset, override
from ijepa_viz.masks import Masks
from ijepa_viz.model import (IJEPA, SIGREG_KNOTS, SIGREG_T_MAX, epps_pulley, sigreg, vicreg_covariance,
                             vicreg_variance)
from ijepa_viz.schedules import reg_scale
from ijepa_viz.train import Trainer, schedule

from tiny import tiny_config

torch.set_num_threads(1)

IMG, PATCH, GRID = 16, 4, 4
N_PATCHES = GRID * GRID
# E[EP] for N(0, 1) samples: integral of (1 - exp(-t^2)) exp(-t^2/2) over the real line (truncation ignored)
EP_GAUSS = math.sqrt(2 * math.pi) * (1 - 1 / math.sqrt(3))
# EP / N for N equal samples at 0: integral of (1 - exp(-t^2/2))^2 exp(-t^2/2)
EP_POINT = math.sqrt(2 * math.pi) - 2 * math.sqrt(math.pi) + math.sqrt(2 * math.pi / 3)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def standardised(n, d, seed=0) -> torch.Tensor:
    """(n, d) samples whose columns have mean 0 and unbiased variance exactly 1."""
    z = torch.randn(n, d, generator=gen(seed), dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    return z.float()


# -- VICReg variance --------------------------------------------------------------------------------

def test_variance_is_zero_when_every_std_is_at_least_gamma():
    z = standardised(64, 8) * torch.linspace(1.01, 3.0, 8)  # stds 1.01 .. 3
    assert vicreg_variance(z).item() == 0.0


def test_variance_matches_its_equation():
    z = torch.randn(32, 6, generator=gen(1)) * torch.tensor([0.1, 0.5, 0.9, 1.5, 2.0, 0.0])
    std = torch.sqrt(z.double().var(0) + 1e-4)
    expect = torch.clamp(1.0 - std, min=0).mean()
    torch.testing.assert_close(vicreg_variance(z).double(), expect, rtol=1e-6, atol=1e-7)


def test_variance_of_collapsed_features_is_about_gamma():
    z = torch.ones(16, 5) * 3.0
    torch.testing.assert_close(vicreg_variance(z), torch.tensor(1.0 - math.sqrt(1e-4)))


# -- VICReg covariance ------------------------------------------------------------------------------

def test_covariance_is_zero_for_decorrelated_features():
    # the 2^3 full factorial design: zero-mean, mutually orthogonal +-1 columns, scaled differently
    levels = torch.tensor([[(i >> b) & 1 for b in range(3)] for i in range(8)], dtype=torch.float32) * 2 - 1
    z = levels * torch.tensor([1.0, 2.0, 5.0]) + torch.tensor([3.0, -1.0, 0.5])
    assert vicreg_covariance(z).item() == pytest.approx(0.0, abs=1e-10)


def test_covariance_matches_its_equation():
    z = torch.randn(40, 5, generator=gen(2))
    z[:, 1] = 0.7 * z[:, 0] + 0.1 * z[:, 1]  # correlate two dimensions
    zd = z.double()
    cov = np.cov(zd.numpy(), rowvar=False)  # unbiased, (D, D)
    expect = (cov ** 2).sum() - (np.diag(cov) ** 2).sum()
    assert vicreg_covariance(z).item() == pytest.approx(expect / 5, rel=1e-5)


def test_covariance_of_duplicated_dimensions():
    x = standardised(50, 1, seed=3)  # variance 1
    z = x.repeat(1, 4)  # 4 identical dimensions: every off-diagonal entry is 1
    assert vicreg_covariance(z).item() == pytest.approx(4 * 3 / 4, rel=1e-5)


def test_regularisers_need_two_samples():
    for fn in (vicreg_variance, vicreg_covariance, sigreg):
        with pytest.raises(ValueError, match="at least 2 samples"):
            fn(torch.randn(1, 4))


# -- Epps-Pulley and SIGReg -------------------------------------------------------------------------

def test_epps_pulley_matches_a_direct_evaluation_of_its_integral():
    """The symmetric half-line quadrature equals the trapezoid rule on [-t_max, t_max] with 2*knots-1 points."""
    x = torch.randn(50, 3, generator=gen(4)).double()
    t = np.linspace(-SIGREG_T_MAX, SIGREG_T_MAX, 2 * SIGREG_KNOTS - 1)
    expect = []
    for k in range(3):
        ecf = np.exp(1j * np.outer(x[:, k].numpy(), t)).mean(0)  # phi_N(t)
        integrand = np.abs(ecf - np.exp(-t ** 2 / 2)) ** 2 * np.exp(-t ** 2 / 2)
        dt = t[1] - t[0]
        expect.append(50 * dt * (integrand.sum() - 0.5 * (integrand[0] + integrand[-1])))
    np.testing.assert_allclose(epps_pulley(x).numpy(), expect, rtol=1e-5)


def test_epps_pulley_is_small_for_gaussian_samples_and_grows_with_n_for_a_point():
    x = torch.randn(512, 256, generator=gen(5))
    ep = epps_pulley(x)
    assert ep.mean().item() == pytest.approx(EP_GAUSS, rel=0.15)  # about 1.06, whatever N
    for n in (64, 512):
        point = epps_pulley(torch.zeros(n, 2))
        torch.testing.assert_close(point / n, torch.full((2,), EP_POINT), rtol=0.02, atol=0)


def test_sigreg_small_for_isotropic_gaussian_large_for_collapse():
    z = torch.randn(256, 32, generator=gen(6))
    gauss = sigreg(z, 128, generator=gen(7)).item()
    assert gauss < 2.0
    assert sigreg(torch.full((256, 32), 0.3), 128, generator=gen(7)).item() > 50  # every image the same
    assert sigreg(z[:, :1].repeat(1, 32), 128, generator=gen(7)).item() > 10 * gauss  # one direction only
    assert sigreg(3.0 * z, 128, generator=gen(7)).item() > 10 * gauss  # right shape, wrong scale


def test_sigreg_draws_fresh_unit_directions_from_the_given_generator():
    z = torch.randn(64, 8, generator=gen(8))
    a = sigreg(z, 16, generator=gen(9))
    assert torch.equal(a, sigreg(z, 16, generator=gen(9)))
    assert not torch.equal(a, sigreg(z, 16, generator=gen(10)))
    g = torch.randn(8, 16, generator=gen(9))
    torch.testing.assert_close(a, epps_pulley(z @ (g / g.norm(dim=0))).mean())


def test_regularisers_run_in_float32_under_bf16_autocast():
    z = torch.randn(64, 16, generator=gen(11))
    plain = [vicreg_variance(z * 0.5), vicreg_covariance(z), sigreg(z, 32, generator=gen(12))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = z.to(torch.bfloat16).float()  # what an autocast network hands over, widened
        auto = [vicreg_variance(zb * 0.5), vicreg_covariance(zb), sigreg(zb, 32, generator=gen(12))]
    for p, a in zip(plain, auto):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, p, rtol=0.05, atol=1e-3)


# -- in the model ---------------------------------------------------------------------------------------

def tiny_cfg(**kw) -> ModelConfig:
    base = dict(img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                pred_embed_dim=16, pred_depth=1)
    base.update(kw)
    return ModelConfig(**base)


def batch(B=6, M=2, nc=6, k=3, seed=0):
    g = gen(seed)
    ctx, tgt = [], []
    for _ in range(B):
        perm = torch.randperm(N_PATCHES, generator=g)
        ctx.append(perm[:nc].sort().values)
        tgt.append(torch.stack([perm[nc + m * k: nc + (m + 1) * k].sort().values for m in range(M)]))
    none = torch.full((B, 4), -1, dtype=torch.long)
    masks = Masks(torch.stack(ctx), torch.stack(tgt), none, none[:, None].expand(B, M, 4).clone(), (GRID, GRID))
    return torch.randn(B, 3, IMG, IMG, generator=g), masks


def model_with(seed=0, **kw) -> IJEPA:
    torch.manual_seed(seed)
    return IJEPA(tiny_cfg(**kw))


def test_default_loss_is_the_prediction_loss_alone_and_draws_no_random_numbers():
    x, masks = batch()
    model = model_with()
    state = torch.get_rng_state()
    out = model(x, masks)
    assert torch.equal(torch.get_rng_state(), state)  # no SIGReg directions drawn
    assert list(out.loss_terms) == ["pred"] and out.loss_terms["pred"] is out.loss
    assert torch.equal(out.loss, F.smooth_l1_loss(out.pred.float(), out.target.float()))


def test_zero_weights_leave_loss_and_gradients_bit_identical():
    x, masks = batch()
    a, b = model_with(), model_with(reg_features="predictor", sigreg_projections=7)
    la, lb = a(x, masks).loss, b(x, masks).loss
    assert torch.equal(la, lb)
    la.backward(), lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), name


@pytest.mark.parametrize("features", ["context", "predictor"])
def test_loss_is_prediction_plus_weighted_terms(features):
    x, masks = batch()
    model = model_with(var_weight=25.0, cov_weight=1.0, sigreg_weight=0.05, reg_features=features)
    torch.manual_seed(3)
    out = model(x, masks)
    terms = out.loss_terms
    assert set(terms) == {"pred", "var", "cov", "sigreg"}
    torch.testing.assert_close(out.loss, terms["pred"] + 25.0 * terms["var"] + 1.0 * terms["cov"]
                               + 0.05 * terms["sigreg"])
    feats = out.context.mean(1) if features == "context" else out.pred.reshape(-1, out.pred.shape[-1])
    assert feats.shape[0] == (6 if features == "context" else 6 * 2 * 3)
    torch.testing.assert_close(terms["var"], vicreg_variance(feats))
    torch.testing.assert_close(terms["cov"], vicreg_covariance(feats))
    torch.manual_seed(3)  # the same directions as in the forward (its only draw from the global generator)
    torch.testing.assert_close(terms["sigreg"], sigreg(feats, model.cfg.sigreg_projections))


def grads(term, params):
    """The non-zero gradients of `term` on the trainable parameters among `params`."""
    params = [p for p in params if p.requires_grad]
    gs = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [g for g in gs if g is not None and g.abs().sum() > 0]


@pytest.mark.parametrize("name", ["var", "cov", "sigreg"])
def test_context_terms_train_the_context_encoder_only(name):
    x, masks = batch()
    model = model_with(**{f"{name}_weight": 1.0}, reg_features="context")
    out = model(x, masks)
    term = out.loss_terms[name]
    assert grads(term, list(model.encoder.parameters()))
    assert not grads(term, list(model.predictor.parameters()))
    assert all(not p.requires_grad for p in model.target_encoder.parameters())


@pytest.mark.parametrize("name", ["var", "cov", "sigreg"])
def test_predictor_terms_train_predictor_and_context_encoder(name):
    x, masks = batch()
    model = model_with(**{f"{name}_weight": 1.0}, reg_features="predictor")
    term = model(x, masks).loss_terms[name]
    assert grads(term, list(model.predictor.parameters()))
    assert grads(term, list(model.encoder.parameters()))


def test_a_positive_weight_changes_the_encoder_gradient():
    x, masks = batch()
    a, b = model_with(), model_with(var_weight=25.0)
    a(x, masks).loss.backward()
    b(x, masks).loss.backward()
    ga = torch.cat([p.grad.flatten() for p in a.encoder.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.flatten() for p in b.encoder.parameters() if p.grad is not None])
    assert not torch.allclose(ga, gb)
    for pa, pb in zip(a.predictor.parameters(), b.predictor.parameters()):  # 'context': predictor untouched
        if pa.requires_grad:
            assert torch.equal(pa.grad, pb.grad)


def test_expander_sits_between_the_features_and_the_terms():
    x, masks = batch()
    model = model_with(var_weight=1.0, cov_weight=0.04, reg_expander=24)
    out = model(x, masks)
    y = out.context.float().mean(1)  # (B, D): what the terms see without an expander
    h = model.expander(y)  # (B, 24): what they see with one
    assert h.shape == (6, 24)
    torch.testing.assert_close(out.loss_terms["var"], vicreg_variance(h))
    torch.testing.assert_close(out.loss_terms["cov"], vicreg_covariance(h))
    term = out.loss_terms["var"] + out.loss_terms["cov"]
    assert grads(term, list(model.expander.parameters()))  # the expander learns from the terms ...
    assert grads(term, list(model.encoder.parameters()))  # ... and passes their gradient on to the encoder
    assert not grads(term, list(model.predictor.parameters()))


def test_var_gamma_sets_the_std_the_variance_term_asks_for():
    x, masks = batch()
    out = model_with(var_weight=1.0, var_gamma=0.25)(x, masks)
    feats = out.context.float().mean(1)
    torch.testing.assert_close(out.loss_terms["var"], vicreg_variance(feats, gamma=0.25))
    assert out.loss_terms["var"] < vicreg_variance(feats)  # a lower bar is never further away
    with pytest.raises(ConfigError, match="var_gamma"):
        override(Config(), ["model.var_gamma=0"])


def test_reg_dims_projects_the_features_on_a_fixed_orthonormal_basis():
    """model.reg_dims=k: the terms see (B, D) @ (D, k), a fixed random orthonormal basis that is the same in every
    model, is not learned and is not saved, so the paper's state dict is unchanged."""
    x, masks = batch()
    a, b = model_with(var_weight=1.0, cov_weight=0.04, reg_dims=4), model_with(reg_dims=4)
    q = a.reg_basis  # (D, 4)
    torch.testing.assert_close(q.T @ q, torch.eye(4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, b.reg_basis)
    out = a(x, masks)
    seen = out.context.float().mean(1) @ q  # (B, 4)
    torch.testing.assert_close(out.loss_terms["var"], vicreg_variance(seen))
    torch.testing.assert_close(out.loss_terms["cov"], vicreg_covariance(seen))
    assert set(a.state_dict()) == set(model_with().state_dict())
    assert not any(p is q for p in a.parameters())
    for bad in ("model.reg_dims=-1", f"model.reg_dims={Config().model.embed_dim + 1}"):
        with pytest.raises(ConfigError, match="reg_dims"):
            override(Config(), [bad])
    with pytest.raises(ConfigError, match="reg_dims"):
        override(Config(), ["model.reg_dims=8", "model.reg_expander=16"])


def test_no_expander_without_a_regulariser_or_by_default():
    assert model_with().expander is None
    assert model_with(reg_expander=24).expander is None  # no term to feed: no parameters added
    keys = set(model_with(var_weight=1.0).state_dict())  # the paper's state dict, unchanged
    assert keys == set(model_with().state_dict())
    with pytest.raises(ConfigError, match="reg_expander"):
        override(Config(), ["model.reg_expander=-1"])


def test_regularised_forward_under_bf16_autocast_is_finite():
    x, masks = batch()
    model = model_with(var_weight=1.0, cov_weight=1.0, sigreg_weight=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, masks)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.loss_terms.values())
    out.loss.backward()


# -- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in PRESETS if n != "cpu-demo"])
def test_every_preset_keeps_the_recipe_options_off(name):
    cfg = get_preset(name)
    m, o = cfg.model, cfg.optim
    assert (m.var_weight, m.cov_weight, m.sigreg_weight, o.ema_warmup_epochs, o.reg_fade) == (0, 0, 0, 0, None)


def test_cpu_demo_turns_on_only_the_variance_covariance_terms():
    m, o = get_preset("cpu-demo").model, get_preset("cpu-demo").optim
    assert (m.var_weight, m.cov_weight, m.sigreg_weight, o.ema_warmup_epochs, o.reg_fade) == (1.0, 0.04, 0, 0, None)
    assert m.reg_features == "context" and (o.ema_start, o.ema_end) == (0.99, 0.999)


@pytest.mark.parametrize("assignment,field", [
    ("model.var_weight=-1", "model.var_weight"),
    ("model.cov_weight=nan", "model.cov_weight"),
    ("model.sigreg_weight=inf", "model.sigreg_weight"),
    ("model.sigreg_projections=0", "model.sigreg_projections"),
    ("model.reg_features=tokens", "model.reg_features"),
    ("optim.ema_warmup_epochs=-0.5", "optim.ema_warmup_epochs"),
    ("optim.ema_warmup_epochs=nan", "optim.ema_warmup_epochs"),
    ("optim.reg_fade=[0.6,0.3]", "optim.reg_fade"),
    ("optim.reg_fade=[0.2,1.5]", "optim.reg_fade"),
])
def test_bad_recipe_values_name_the_field(assignment, field):
    with pytest.raises(ConfigError) as e:
        override(Config(), [assignment])
    assert field in str(e.value)


def test_ema_warmup_start_must_not_exceed_ema_start():
    with pytest.raises(ConfigError, match="optim.ema_warmup_start"):
        override(Config(), ["optim.ema_warmup_epochs=1", "optim.ema_warmup_start=0.999"])
    override(Config(), ["optim.ema_warmup_start=0.999"])  # unused while the warmup is off
    override(Config(), ["optim.ema_warmup_epochs=1", "optim.ema_warmup_start=0.99"])


def test_predictor_features_with_pixel_targets_are_rejected():
    with pytest.raises(ConfigError, match="model.reg_features"):
        override(Config(), ["model.target=pixels", "model.reg_features=predictor", "model.var_weight=1"])
    override(Config(), ["model.target=pixels", "model.reg_features=predictor"])  # all weights 0: harmless
    override(Config(), ["model.target=pixels", "model.sigreg_weight=0.1"])  # context features: fine


# -- EMA warmup schedule ------------------------------------------------------------------------------

def official_momentum(step, total, o):
    return o.ema_start + (o.ema_end - o.ema_start) * min(step / total, 1.0)


def test_ema_warmup_off_is_the_official_schedule():
    o = OptimConfig()
    assert o.ema_warmup_epochs == 0
    total, warm = 1000, 100
    for s in (0, 1, 99, 100, 500, 999, 1000, 1200):
        assert schedule(s, total, warm, o) == schedule(s, total, warm, o, steps_per_epoch=50)
        assert schedule(s, total, warm, o)[2] == official_momentum(s, total, o)


def test_ema_warmup_follows_its_formula():
    o = OptimConfig(ema_warmup_epochs=2.0, ema_warmup_start=0.9)
    total, warm, spe = 1000, 100, 50
    w = 100  # 2 epochs of 50 steps
    m_w = official_momentum(w, total, o)  # 0.996 + 0.004 * 0.1
    assert schedule(0, total, warm, o, steps_per_epoch=spe)[2] == pytest.approx(0.9)
    assert schedule(25, total, warm, o, steps_per_epoch=spe)[2] == pytest.approx(0.9 + (m_w - 0.9) * 0.25)
    assert schedule(50, total, warm, o, steps_per_epoch=spe)[2] == pytest.approx((0.9 + m_w) / 2)
    for s in (100, 101, 500, 1000):  # from W on: the official line
        assert schedule(s, total, warm, o, steps_per_epoch=spe)[2] == pytest.approx(official_momentum(s, total, o))
    ms = [schedule(s, total, warm, o, steps_per_epoch=spe)[2] for s in range(total + 1)]
    assert all(a <= b + 1e-15 for a, b in zip(ms, ms[1:]))  # rises monotonically, continuous at W
    assert abs(ms[w] - ms[w - 1]) < 2 * (m_w - 0.9) / w
    # lr and weight decay are untouched by the EMA warmup
    plain = OptimConfig()
    for s in (0, 50, 300):
        assert schedule(s, total, warm, o, steps_per_epoch=spe)[:2] == schedule(s, total, warm, plain)[:2]


def test_ema_warmup_needs_steps_per_epoch_and_accepts_plain_namespaces():
    o = OptimConfig(ema_warmup_epochs=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        schedule(0, 100, 10, o)
    legacy = SimpleNamespace(**{k: v for k, v in vars(OptimConfig()).items()
                                if not k.startswith("ema_warmup")})  # an optim section from before the option
    assert schedule(5, 100, 10, legacy) == schedule(5, 100, 10, OptimConfig())


# -- fading the regularisers out (optim.reg_fade) -------------------------------------------------------------

def test_reg_fade_follows_its_formula():
    assert all(reg_scale(s, 100, OptimConfig()) == 1.0 for s in (0, 50, 100))  # None: constant weights
    o = OptimConfig(reg_fade=(0.2, 0.6))
    assert [reg_scale(s, 100, o) for s in (0, 19, 20, 30, 40, 50, 60, 99)] == pytest.approx(
        [1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    cut = OptimConfig(reg_fade=(0.5, 0.5))  # a = b: full weight, then none
    assert [reg_scale(s, 10, cut) for s in (4, 5, 9)] == [1.0, 0.0, 0.0]
    legacy = SimpleNamespace(**{k: v for k, v in vars(OptimConfig()).items() if k != "reg_fade"})
    assert reg_scale(3, 10, legacy) == 1.0  # an optim section from before the option


def test_trainer_scales_only_the_regularisers(tmp_path):
    terms = ["model.var_weight=1.0", "model.cov_weight=0.5", "train.collapse_every=0"]
    t = Trainer(tiny_config(tmp_path / "a", "train.steps=4", "optim.reg_fade=[0.25,0.75]", *terms),
                progress=False)
    images = next(iter(t._iter_epoch(0)))[0]
    losses = []
    for _ in range(4):  # scales 1, 1, 0.5, 0 at steps 0-3 of 4
        m = t.train_step(images)
        parts = m["out"].loss_terms
        weighted = 1.0 * parts["var"] + 0.5 * parts["cov"]
        losses.append((m["loss"], parts["pred"].item(), weighted.item()))
    for (loss, pred, reg), scale in zip(losses, (1, 1, 0.5, 0)):
        assert loss == pytest.approx(pred + scale * reg, rel=1e-5, abs=1e-6)
    assert losses[3][2] > 0  # the terms are still measured (and logged) at scale 0
