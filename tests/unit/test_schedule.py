import math

import pytest
import torch

from medim.diffusion import SCHEDULES, CosineSchedule, LinearSchedule, LogLinearSchedule, get_schedule

T = torch.tensor([1e-3, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)


def test_loglinear_closed_form():
    s = get_schedule("loglinear")
    assert isinstance(s, LogLinearSchedule) and s.eps == 1e-3
    expected = [-math.log(1 - (1 - 1e-3) * t) for t in T.tolist()]
    torch.testing.assert_close(s.sigma(T), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(s.move_chance(T), (1 - 1e-3) * T)
    torch.testing.assert_close(s.move_chance(T), 1 - torch.exp(-s.sigma(T)))
    torch.testing.assert_close(s.alpha(T), 1 - (1 - 1e-3) * T)
    # The MDLM weight of the log-linear schedule is exactly 1/t.
    torch.testing.assert_close(s.loss_weight(T), 1 / T)


def test_linear_and_cosine_closed_form():
    lin = get_schedule("linear", sigma_min=0.5, sigma_max=3.0)
    torch.testing.assert_close(lin.sigma(T), 0.5 + 2.5 * T)
    torch.testing.assert_close(lin.move_chance(T), 1 - torch.exp(-(0.5 + 2.5 * T)))
    cos = CosineSchedule(eps=1e-3)
    alpha = 1e-3 + (1 - 1e-3) * torch.cos(T * math.pi / 2)
    torch.testing.assert_close(cos.alpha(T), alpha)
    torch.testing.assert_close(cos.move_chance(T), 1 - alpha)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_dsigma_is_the_derivative(name):
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(s.sigma(t).sum(), t)
    torch.testing.assert_close(s.dsigma(t.detach()), grad)
    # Monotone: noisier with time, move chance in [0, 1].
    mc = s.move_chance(t.detach())
    assert (mc.diff() > 0).all() and (mc >= 0).all() and (mc <= 1).all()


def test_registry_errors_and_passthrough():
    inst = LinearSchedule()
    assert get_schedule(inst) is inst
    with pytest.raises(ValueError, match="schedule.*'loglinear'"):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match="only apply when passing a name"):
        get_schedule(inst, eps=1e-4)
