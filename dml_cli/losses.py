"""The Deep Mutual Learning objective: cross-entropy on the labels plus a mimicry term.

For a cohort of K students with logits z_1..z_K, student k minimises

    loss_k = CE(labels, z_k) + mimicry_weight * T^2 * mean over peers l != k of KL(p_l || p_k)

with p = softmax(z / T). Each peer's probabilities are constants for student k, so no gradient
flows from student k's loss into a peer (Zhang, Xiang, Hospedales and Lu, "Deep Mutual
Learning", CVPR 2018, equations 1 to 4). The KL is averaged over the batch and over the K - 1
peers. In `ensemble` mimicry (the paper's DML_e), student k mimics the mean of its peers'
probabilities instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MIMICRY_MODES = ("pairwise", "ensemble")


@dataclass
class CohortLoss:
    """Per-student loss terms of one batch, each a tensor of shape (K,)."""

    total: Tensor
    ce_loss: Tensor
    kl_loss: Tensor


def mimicry_kl(
    logits: Tensor,
    temperature: float = 1.0,
    mimicry: str = "pairwise",
) -> Tensor:
    """Compute each student's mimicry term, T^2 times the KL from its peers to itself.

    `logits` has shape (K, B, C). Gradients flow only into each student's own log-probabilities.
    Returns a tensor of shape (K,), zero when K == 1.
    """
    if mimicry not in MIMICRY_MODES:
        raise ValueError(f"mimicry must be one of {MIMICRY_MODES}, got {mimicry!r}")
    cohort_size = logits.shape[0]
    if cohort_size < 2:
        return logits.new_zeros(cohort_size)

    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    peer_log_probs = log_probs.detach()
    peer_probs = peer_log_probs.exp()
    num_peers = cohort_size - 1

    # Sums over the peers l != k come from the sum over the whole cohort minus student k's own
    # term, so the cost stays linear in K instead of a loop over K * (K - 1) pairs.
    peer_probs_sum = peer_probs.sum(dim=0, keepdim=True) - peer_probs
    if mimicry == "pairwise":
        neg_entropy = (peer_probs * peer_log_probs).sum(dim=-1)
        peer_neg_entropy = neg_entropy.sum(dim=0, keepdim=True) - neg_entropy
        cross = (peer_probs_sum * log_probs).sum(dim=-1)
        kl = (peer_neg_entropy - cross) / num_peers
    else:
        peer_mean = peer_probs_sum / num_peers
        kl = (torch.xlogy(peer_mean, peer_mean) - peer_mean * log_probs).sum(dim=-1)

    return kl.mean(dim=1) * temperature**2


def cohort_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    mimicry_weight: float = 1.0,
    mimicry: str = "pairwise",
) -> CohortLoss:
    """Compute every student's DML loss from stacked logits of shape (K, B, C).

    Summing `total` and calling backward once gives each student exactly the gradient of its own
    loss, because each student's parameters appear only in its own term.
    """
    cohort_size, batch_size, num_classes = logits.shape
    flat_logits = logits.float().reshape(cohort_size * batch_size, num_classes)
    ce_loss = F.cross_entropy(flat_logits, labels.repeat(cohort_size), reduction="none")
    ce_loss = ce_loss.view(cohort_size, batch_size).mean(dim=1)
    if mimicry_weight == 0 or logits.shape[0] < 2:
        kl_loss = torch.zeros_like(ce_loss)
    else:
        kl_loss = mimicry_kl(logits, temperature, mimicry)
    return CohortLoss(total=ce_loss + mimicry_weight * kl_loss, ce_loss=ce_loss, kl_loss=kl_loss)


def pairwise_kl_reference(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Compute the pairwise mimicry term with an explicit loop over peers, for tests.

    The straightforward per-pair definition, kept to check the vectorised `mimicry_kl`.
    """
    cohort_size = logits.shape[0]
    terms = []
    for k in range(cohort_size):
        log_probs = F.log_softmax(logits[k] / temperature, dim=-1)
        peer_terms = []
        for peer in range(cohort_size):
            if peer == k:
                continue
            peer_log_probs = F.log_softmax(logits[peer].detach() / temperature, dim=-1)
            kl = F.kl_div(log_probs, peer_log_probs, reduction="batchmean", log_target=True)
            peer_terms.append(kl)
        terms.append(torch.stack(peer_terms).mean() * temperature**2)
    return torch.stack(terms)
