"""Classification and cohort metrics computed from a whole split's logits at once.

Every function takes the full split (no running averages), so the numbers do not depend on the
batch size used to collect the logits. Inputs are CPU float32 or float64 tensors, and the
arithmetic runs in float64. Results are Python floats or float64 tensors, except ensemble_probs,
which returns the dtype of its logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Lower bound on probabilities before taking the log, so a zero probability on the true class
# gives a large finite NLL (-log(1e-12) is about 27.6) in place of infinity.
PROB_EPSILON = 1e-12

CLASSIFICATION_METRIC_KEYS = ("acc", "top5", "nll", "ece")


def _check_scores(scores: Tensor, labels: Tensor, name: str) -> None:
    """Raise ValueError unless scores is (N, C) and labels is (N,) with values in [0, C)."""
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape (N, C), got shape={tuple(scores.shape)}")
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must have shape ({scores.shape[0]},) to match {name}, "
            f"got shape={tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError(f"{name} contains no samples, but metrics need at least one")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype={labels.dtype}")
    num_classes = scores.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got min={int(labels.min())} "
            f"max={int(labels.max())}"
        )


def _check_cohort_logits(logits: Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(
            f"cohort logits must have shape (K, N, C), got shape={tuple(logits.shape)}"
        )
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            "cohort logits need at least one student and one sample, "
            f"got shape={tuple(logits.shape)}"
        )


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Return the fraction of samples whose label is among the k highest logits.

    Works on logits, probs or log_probs alike because softmax keeps the order. k larger than the
    number of classes C is clipped to C, so the result is then 1.0.
    """
    _check_scores(logits, labels, "logits")
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    k = min(k, logits.shape[1])
    top_indices = logits.topk(k, dim=1).indices
    hits = (top_indices == labels.unsqueeze(1)).any(dim=1)
    return hits.double().mean().item()


def mean_nll(log_probs: Tensor, labels: Tensor) -> float:
    """Return the mean negative log-likelihood of the labels under log_probs of shape (N, C)."""
    _check_scores(log_probs, labels, "log_probs")
    label_log_probs = log_probs.double().gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return (-label_log_probs).mean().item()


def expected_calibration_error(probs: Tensor, labels: Tensor, num_bins: int = 15) -> float:
    """Return the expected calibration error of the top-1 prediction.

    Confidence is the maximum probability of each sample. Bins have equal width over (0, 1],
    bin b covering (b/num_bins, (b+1)/num_bins], so a confidence of exactly 1.0 falls in the last
    bin. ECE = sum over bins of |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|.
    """
    _check_scores(probs, labels, "probs")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got num_bins={num_bins}")
    probs = probs.double()
    confidences, predictions = probs.max(dim=1)
    correct = (predictions == labels).double()

    # With right=False, bucketize returns i such that edges[i-1] < x <= edges[i], which gives
    # the (lower, upper] bins. Confidences above the last inner edge, 1.0 included, get index
    # num_bins - 1.
    inner_edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[1:-1]
    bin_indices = torch.bucketize(confidences, inner_edges, right=False)

    num_samples = probs.shape[0]
    bin_correct = torch.bincount(bin_indices, weights=correct, minlength=num_bins)
    bin_confidence = torch.bincount(bin_indices, weights=confidences, minlength=num_bins)
    # |sum of correct - sum of confidences| in a bin, divided by N, is |B_b|/N * |acc - conf|.
    gaps = (bin_correct - bin_confidence).abs()
    return (gaps.sum() / num_samples).item()


def ensemble_probs(logits: Tensor) -> Tensor:
    """Average the students' softmax probabilities: (K, N, C) logits to (N, C) probs.

    The average is over probabilities, not logits, so it can pick a different class than the
    softmax of the mean logits. The result has the dtype of logits.
    """
    _check_cohort_logits(logits)
    probs = torch.softmax(logits.double(), dim=-1)
    return probs.mean(dim=0).to(logits.dtype)


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Compute top-1 accuracy, top-5 accuracy, NLL and ECE from (N, C) probs.

    Accuracies are fractions in [0, 1]. NLL uses log(probs) with probs clamped to PROB_EPSILON,
    so ensemble probs (which have no logits) work too.
    """
    _check_scores(probs, labels, "probs")
    probs = probs.double()
    log_probs = probs.clamp_min(PROB_EPSILON).log()
    return {
        "acc": topk_accuracy(probs, labels, k=1),
        "top5": topk_accuracy(probs, labels, k=5),
        "nll": mean_nll(log_probs, labels),
        "ece": expected_calibration_error(probs, labels),
    }


def pairwise_agreement(logits: Tensor) -> Tensor:
    """Return the (K, K) float64 fraction of samples where students i and j predict the same class.

    The matrix is symmetric with ones on the diagonal.
    """
    _check_cohort_logits(logits)
    predictions = logits.argmax(dim=-1)
    same = predictions.unsqueeze(1) == predictions.unsqueeze(0)
    return same.double().mean(dim=-1)


def pairwise_kl(logits: Tensor) -> Tensor:
    """Return the (K, K) float64 matrix of mean KL(p_i || p_j) over samples.

    p_i is student i's softmax. Entry [i, j] is the mean over samples of
    sum_c p_i[c] * (log p_i[c] - log p_j[c]). The diagonal is 0, and the matrix is not symmetric.
    """
    _check_cohort_logits(logits)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    probs = log_probs.exp()
    cohort_size = logits.shape[0]
    kl = torch.zeros(cohort_size, cohort_size, dtype=torch.float64)
    for i in range(cohort_size):
        for j in range(cohort_size):
            if i == j:
                continue
            terms = probs[i] * (log_probs[i] - log_probs[j])
            # A class with p_i = 0 contributes 0 to KL, even where log p_j is -inf.
            terms = torch.where(probs[i] > 0, terms, torch.zeros_like(terms))
            # Rounding can leave a tiny negative value for near-identical students.
            kl[i, j] = terms.sum(dim=-1).mean().clamp_min(0.0)
    return kl


def cohort_metrics(logits: Tensor, labels: Tensor, names: list[str]) -> dict:
    """Compute per-student, ensemble and pairwise metrics for a cohort's (K, N, C) logits.

    Returns a dict with keys:

    - "students": {name: classification_metrics} for each student, in the order of names.
    - "ensemble": classification_metrics of the averaged probs (see ensemble_probs).
    - "student_mean", "student_std": {metric: value} over the K students. The std is the
      population standard deviation (ddof=0, divide by K), so a cohort of one has std 0.0.
    - "agreement": {"name_i/name_j": fraction of equal top-1 predictions} for i < j.
    - "kl": {"name_i||name_j": mean KL(p_i || p_j)} for every ordered pair i != j.
    """
    _check_cohort_logits(logits)
    cohort_size = logits.shape[0]
    if len(names) != cohort_size:
        raise ValueError(f"names must have one entry per student ({cohort_size}), got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be unique, got {names}")
    logits = logits.double()

    students = {
        name: classification_metrics(torch.softmax(logits[k], dim=-1), labels)
        for k, name in enumerate(names)
    }
    ensemble = classification_metrics(ensemble_probs(logits), labels)

    student_mean = {}
    student_std = {}
    for key in CLASSIFICATION_METRIC_KEYS:
        values = torch.tensor([students[name][key] for name in names], dtype=torch.float64)
        student_mean[key] = values.mean().item()
        student_std[key] = values.std(correction=0).item()

    agreement_matrix = pairwise_agreement(logits)
    kl_matrix = pairwise_kl(logits)
    agreement = {}
    kl = {}
    for i, name_i in enumerate(names):
        for j, name_j in enumerate(names):
            if i < j:
                agreement[f"{name_i}/{name_j}"] = agreement_matrix[i, j].item()
            if i != j:
                kl[f"{name_i}||{name_j}"] = kl_matrix[i, j].item()

    return {
        "students": students,
        "ensemble": ensemble,
        "student_mean": student_mean,
        "student_std": student_std,
        "agreement": agreement,
        "kl": kl,
    }
