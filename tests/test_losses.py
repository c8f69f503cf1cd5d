import math

import pytest
import torch

from edgekd.losses import attention_loss, hidden_state_loss, kd_kl, soft_hard_loss


def test_kl_is_zero_when_logits_match():
    logits = torch.randn(8, 3)
    for kind in ("forward", "reverse"):
        assert kd_kl(logits, logits.clone(), temperature=3.0, kind=kind).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_definition_and_t_squared_scaling():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    for temp in (1.0, 2.0, 4.0):
        p_t = torch.softmax(t / temp, -1)
        p_s = torch.softmax(s / temp, -1)
        forward = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * temp**2
        reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean() * temp**2
        assert kd_kl(s, t, temp, "forward").item() == pytest.approx(forward.item(), rel=1e-5)
        assert kd_kl(s, t, temp, "reverse").item() == pytest.approx(reverse.item(), rel=1e-5)


def test_forward_and_reverse_kl_differ_and_are_positive():
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    f, r = kd_kl(s, t, 1.0, "forward").item(), kd_kl(s, t, 1.0, "reverse").item()
    assert f > 0 and r > 0 and not math.isclose(f, r)


def test_soft_hard_mix():
    torch.manual_seed(1)
    s, t = torch.randn(6, 2), torch.randn(6, 2)
    y = torch.randint(0, 2, (6,))
    ce = torch.nn.functional.cross_entropy(s, y)
    kd = kd_kl(s, t, 2.0)
    loss, logs = soft_hard_loss(s, t, y, alpha=0.3, temperature=2.0)
    assert loss.item() == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-6)
    assert set(logs) == {"ce", "kd"}
    hard, logs = soft_hard_loss(s, None, y, alpha=0.3, temperature=2.0)
    assert hard.item() == pytest.approx(ce.item()) and set(logs) == {"ce"}


def test_hidden_loss_ignores_padding_and_is_zero_on_match():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    other = h.clone()
    other[0, 3:] = 100.0  # differences only on padded positions
    for kind in ("mse", "cosine"):
        assert hidden_state_loss(h, other, mask, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(h, -h, mask, "cosine").item() == pytest.approx(2.0, rel=1e-5)


def test_attention_loss_zero_on_match_positive_otherwise():
    att = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    mask = torch.ones(2, 5)
    assert attention_loss(att, att, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_loss(other, att, mask).item() > 0
    # different head counts are compared head-averaged
    assert attention_loss(other[:, :2], att, mask).item() >= 0
