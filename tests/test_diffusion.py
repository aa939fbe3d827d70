import math

import pytest
import torch

from embroidery_core.diffusion import (DiscreteSchedule, add_noise, contrastive_loss, denoised,
                                       diffusion_loss, model_input, target)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_target_inverts_to_x0(prediction):
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma = torch.tensor([0.03, 1.0, 0.9 if prediction == "flow" else 14.6])
    x_t = add_noise(prediction, x0, noise, sigma)
    out = target(prediction, x0, noise, sigma)
    assert torch.allclose(denoised(prediction, out, x_t, sigma), x0, atol=1e-4)


def test_v_target_is_alpha_eps_minus_sigma_x0():
    x0, noise, s = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([2.0])
    alpha, sigma_vp = 1 / math.sqrt(5), 2 / math.sqrt(5)
    assert torch.allclose(target("v", x0, noise, s), alpha * noise - sigma_vp * x0, atol=1e-6)


def test_eps_model_input_is_variance_preserving():
    x0, noise, s = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([3.0])
    x_in = model_input("eps", add_noise("eps", x0, noise, s), s)
    assert torch.allclose(x_in, (x0 + 3 * noise) / math.sqrt(10))


def test_discrete_schedule_matches_sd():
    sigmas = DiscreteSchedule().sigmas()
    assert sigmas.shape == (1000,)
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-3)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_diffusion_loss_weights():
    out, goal = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    goal[1] *= 2
    assert diffusion_loss(out, goal).item() == pytest.approx((1 + 4) / 2)
    assert diffusion_loss(out, goal, torch.tensor([1.0, 0.1])).item() == pytest.approx(1 + 0.4)


def _formula(eps_star, eps_des, tau):
    """The METHODS.md formula written out with loops."""
    cos = lambda a, b: torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
    b = eps_star.shape[0]
    pos = [math.exp(cos(eps_star[i], eps_star[j]) / tau) for i in range(b) for j in range(b) if i < j]
    neg = [math.exp(cos(eps_star[i], eps_des[j]) / tau) for i in range(b) for j in range(b) if i != j]
    return -math.log((sum(pos) / len(pos)) / (sum(neg) / len(neg)))


@pytest.mark.parametrize("b,tau", [(2, 1.0), (3, 1.0), (4, 0.5)])
def test_contrastive_loss_equals_formula(b, tau):
    torch.manual_seed(b)
    eps_star, eps_des = torch.randn(b, 4, 3, 3), torch.randn(b, 4, 3, 3)
    assert contrastive_loss(eps_star, eps_des, tau).item() == pytest.approx(_formula(eps_star, eps_des, tau), rel=1e-5)


def test_contrastive_loss_hand_made():
    # Style residuals identical (cos 1), each orthogonal to the other's design residual (cos 0):
    # L = -log(e^1 / e^0) = -1.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    eps_star = torch.stack([e1, e1])
    eps_des = torch.stack([e2, e2])
    assert contrastive_loss(eps_star, eps_des).item() == pytest.approx(-1.0, abs=1e-6)
    # Style residual equal to the other image's design residual: numerator e^(cos(a,b)), denominator e^1.
    eps_des = torch.stack([e1, e1])
    assert contrastive_loss(eps_star, eps_des).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_loss_rejects_single_sample():
    with pytest.raises(ValueError, match=">= 2"):
        contrastive_loss(torch.randn(1, 4), torch.randn(1, 4))
