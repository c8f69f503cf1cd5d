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


def test_layer_map_pairs_every_student_layer_with_a_teacher_layer():
    """A student deeper than its teacher paired its first layer with -1: the embedding output for the
    hidden-state loss (hidden_states[0]) but the teacher's last layer for the attention loss."""
    from edgekd.tasks.text.distill import layer_map

    for n_student, n_teacher in ((3, 6), (4, 6), (6, 6), (12, 6), (7, 2), (1, 12)):
        got = layer_map(n_student, n_teacher, None)
        assert len(got) == n_student and all(0 <= t < n_teacher for t in got), (n_student, n_teacher, got)
        assert got == sorted(got) and got[-1] == n_teacher - 1
    assert layer_map(3, 6, None) == [1, 3, 5] and layer_map(3, 12, [0, 2, 4]) == [0, 2, 4]


def test_hidden_state_projections_start_from_the_seed_alone():
    """The projections of a student narrower than its teacher were drawn from whatever the process had drawn
    before (a whole `edgekd run` and `edgekd distill` alone started them differently); now from the seed,
    and the global generator is left as it was."""
    from transformers import BertConfig, BertModel

    from edgekd.recipe import DistillConfig
    from edgekd.tasks.text.distill import DistillLoss

    def bert(hidden):
        return BertModel(BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=16))

    student, teacher = bert(8), bert(16)
    d = DistillConfig(hidden_weight=1.0)

    def projections(draws: int):
        torch.manual_seed(123)
        torch.rand(draws)  # what earlier stages of the process drew
        before = torch.random.get_rng_state()
        loss = DistillLoss(student, d, soft_logits=torch.zeros(4, 2), teacher=teacher, mapping=[0, 1], seed=7)
        assert torch.equal(torch.random.get_rng_state(), before)
        return [p.detach().clone() for p in loss.extra_params()]

    a, b = projections(1), projections(1000)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
