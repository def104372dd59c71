import math

import pytest
import torch
import torch.nn.functional as F

from dml_cli.losses import cohort_loss, mimicry_kl, pairwise_kl_reference


def hand_kl(peer_logits, student_logits, temperature):
    peer = [math.exp(z / temperature) for z in peer_logits]
    student = [math.exp(z / temperature) for z in student_logits]
    peer = [p / sum(peer) for p in peer]
    student = [q / sum(student) for q in student]
    return sum(p * math.log(p / q) for p, q in zip(peer, student, strict=True))


def test_kl_matches_hand_value_t1():
    logits = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])

    kl = mimicry_kl(logits, temperature=1.0)

    assert kl[0].item() == pytest.approx(1.48377, abs=1e-5)
    assert kl[0].item() == pytest.approx(hand_kl([0, 1, 0], [3, 0, 0], 1.0), abs=1e-6)


def test_kl_matches_hand_value_t2():
    logits = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])

    kl = mimicry_kl(logits, temperature=2.0)

    assert kl[0].item() == pytest.approx(1.55773, abs=1e-5)
    assert kl[0].item() == pytest.approx(4 * hand_kl([0, 1, 0], [3, 0, 0], 2.0), abs=1e-6)


def test_identical_logits_give_zero_kl():
    logits = torch.randn(1, 6, 5).repeat(3, 1, 1)

    for mimicry in ("pairwise", "ensemble"):
        kl = mimicry_kl(logits, temperature=1.5, mimicry=mimicry)
        assert torch.allclose(kl, torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("cohort_size", [2, 3, 5])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_vectorised_kl_equals_per_pair(cohort_size, temperature):
    torch.manual_seed(cohort_size)
    logits = torch.randn(cohort_size, 16, 10) * 3

    vectorised = mimicry_kl(logits, temperature=temperature)
    reference = pairwise_kl_reference(logits, temperature=temperature)

    assert torch.allclose(vectorised, reference, atol=1e-5)


def test_kl_is_mean_over_batch_and_peers():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)

    kl = mimicry_kl(logits)

    expected = 0.0
    for peer in (1, 2):
        for row in range(4):
            expected += hand_kl(logits[peer, row].tolist(), logits[0, row].tolist(), 1.0)
    assert kl[0].item() == pytest.approx(expected / (2 * 4), abs=1e-5)


def test_ensemble_mimics_mean_peer_probs():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 4)

    kl = mimicry_kl(logits, mimicry="ensemble")

    probs = logits.softmax(dim=-1)
    peer_mean = (probs[1] + probs[2]) / 2
    expected = (peer_mean * (peer_mean.log() - probs[0].log())).sum(dim=-1).mean()
    assert kl[0].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("mimicry", ["pairwise", "ensemble"])
def test_student_loss_gives_peers_no_gradient(mimicry):
    logits = torch.randn(3, 8, 5, requires_grad=True)
    labels = torch.randint(0, 5, (8,))

    loss = cohort_loss(logits, labels, mimicry=mimicry)
    loss.total[1].backward()

    assert torch.count_nonzero(logits.grad[0]) == 0
    assert torch.count_nonzero(logits.grad[2]) == 0
    assert torch.count_nonzero(logits.grad[1]) > 0


def test_summed_loss_gives_each_own_gradient():
    torch.manual_seed(2)
    logits = torch.randn(3, 8, 5, requires_grad=True)
    labels = torch.randint(0, 5, (8,))

    cohort_loss(logits, labels).total.sum().backward()
    summed_grad = logits.grad.clone()

    for k in range(3):
        logits.grad = None
        cohort_loss(logits, labels).total[k].backward()
        assert torch.allclose(summed_grad[k], logits.grad[k], atol=1e-6)


def test_loss_combines_weighted_terms():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 4)
    labels = torch.randint(0, 4, (6,))

    loss = cohort_loss(logits, labels, temperature=2.0, mimicry_weight=0.5)

    for k in range(2):
        ce = F.cross_entropy(logits[k], labels)
        assert loss.ce_loss[k].item() == pytest.approx(ce.item(), abs=1e-6)
    kl = pairwise_kl_reference(logits, temperature=2.0)
    assert torch.allclose(loss.kl_loss, kl, atol=1e-6)
    assert torch.allclose(loss.total, loss.ce_loss + 0.5 * kl, atol=1e-6)


def test_zero_weight_or_single_student_no_kl():
    logits = torch.randn(2, 4, 3)
    labels = torch.randint(0, 3, (4,))

    assert torch.equal(cohort_loss(logits, labels, mimicry_weight=0).kl_loss, torch.zeros(2))
    assert torch.equal(cohort_loss(logits[:1], labels).kl_loss, torch.zeros(1))
