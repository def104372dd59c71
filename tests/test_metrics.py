"""Metrics on hand-built inputs, with the expected values worked out in each test."""

import math

import pytest
import torch

from dml_cli.metrics import (
    PROB_EPSILON,
    classification_metrics,
    cohort_metrics,
    ensemble_probs,
    expected_calibration_error,
    mean_nll,
    pairwise_agreement,
    pairwise_kl,
    topk_accuracy,
)


def one_hot_logits(predictions: list[int], num_classes: int, scale: float = 3.0) -> torch.Tensor:
    """Logits whose argmax is predictions[n] for each sample n."""
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = scale
    return logits


def softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(value) for value in row]
    return [value / sum(exps) for value in exps]


# Six classes. Samples 0 and 1 rank classes 0..5 in order, samples 2 and 3 in reverse order.
# Sample 0 (label 0): top-1 hit. Sample 1 (label 1): top-1 miss, top-2 and top-5 hit.
# Sample 2 (label 0): class 0 ranks sixth, so a miss for every k < 6.
# Sample 3 (label 5): top-1 hit.
TOPK_LOGITS = torch.tensor(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
    ]
)
TOPK_LABELS = torch.tensor([0, 1, 0, 5])


def test_topk_accuracy_four_samples():
    assert topk_accuracy(TOPK_LOGITS, TOPK_LABELS, k=1) == pytest.approx(2 / 4)
    assert topk_accuracy(TOPK_LOGITS, TOPK_LABELS, k=2) == pytest.approx(3 / 4)
    assert topk_accuracy(TOPK_LOGITS, TOPK_LABELS, k=5) == pytest.approx(3 / 4)


def test_topk_accuracy_clips_k_to_classes():
    assert topk_accuracy(TOPK_LOGITS, TOPK_LABELS, k=6) == pytest.approx(1.0)
    assert topk_accuracy(TOPK_LOGITS, TOPK_LABELS, k=50) == pytest.approx(1.0)


def test_topk_accuracy_same_for_probs():
    probs = torch.softmax(TOPK_LOGITS, dim=1)
    assert topk_accuracy(probs, TOPK_LABELS, k=1) == pytest.approx(2 / 4)
    assert topk_accuracy(probs, TOPK_LABELS, k=5) == pytest.approx(3 / 4)


def test_topk_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels must have shape"):
        topk_accuracy(TOPK_LOGITS, TOPK_LABELS[:3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        topk_accuracy(TOPK_LOGITS, torch.tensor([0, 1, 0, 6]))
    with pytest.raises(ValueError, match="k must be at least 1"):
        topk_accuracy(TOPK_LOGITS, TOPK_LABELS, k=0)


def test_mean_nll_known_probs():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.1, 0.9]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.1)) / 3
    assert mean_nll(probs.log(), labels) == pytest.approx(expected, rel=1e-12)


def test_ece_constant_confidence_gap():
    # Every sample has confidence 0.8 on class 0, and 6 of 10 labels are class 0, so all samples
    # share one bin with accuracy 0.6: ECE = 10/10 * |0.6 - 0.8| = 0.2.
    probs = torch.tensor([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2, abs=1e-6)


def test_ece_zero_when_calibrated():
    # Bin of confidence 0.6: 5 samples, 3 correct (accuracy 0.6).
    # Bin of confidence 1.0: 2 samples, both correct (accuracy 1.0).
    probs = torch.tensor([[0.6, 0.4]] * 5 + [[1.0, 0.0]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_confidence_one_in_last_bin():
    # Two bins, (0, 0.5] and (0.5, 1]. Sample A: confidence 1.0 and wrong. Sample B: confidence
    # 0.6 and right. Both in the last bin: 2/2 * |0.5 - 0.8| = 0.3. Dropping A would give 0.2,
    # and A in a bin of its own would give 0.7.
    probs = torch.tensor([[1.0, 0.0], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.3, abs=1e-12)


def test_ece_bin_upper_edge_inclusive():
    # Two bins. Sample C: confidence exactly 0.5 and right, so it belongs to (0, 0.5].
    # Sample D: confidence 0.6 and wrong, in (0.5, 1]. ECE = 1/2 * 0.5 + 1/2 * 0.6 = 0.55.
    # Had C gone to the upper bin, ECE would be 2/2 * |0.5 - 0.55| = 0.05.
    probs = torch.tensor([[0.5, 0.5], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.55, abs=1e-12)


def test_ensemble_averages_probs_not_logits():
    # Student A is sure of class 1. Student B prefers class 0 and puts logit -20 on class 1.
    # The mean logits [2, -6, 0] pick class 0, but the mean probs pick class 1.
    logits_a = [2.0, 8.0, 0.0]
    logits_b = [2.0, -20.0, 0.0]
    logits = torch.tensor([[logits_a], [logits_b]], dtype=torch.float64)

    probs_a = softmax_by_hand(logits_a)
    probs_b = softmax_by_hand(logits_b)
    expected = [(a + b) / 2 for a, b in zip(probs_a, probs_b, strict=True)]

    ensemble = ensemble_probs(logits)
    assert ensemble.shape == (1, 3)
    assert ensemble[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert int(ensemble[0].argmax()) == 1
    assert int(logits.mean(dim=0)[0].argmax()) == 0


def test_ensemble_probs_keeps_dtype():
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    ensemble = ensemble_probs(logits)
    assert ensemble.dtype == torch.float32
    assert ensemble.sum(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-6)


def test_classification_metrics_from_probs():
    # Three classes, so top5 clips to 3 and is 1.0. Sample 0 is right with p=0.7. Sample 1 is
    # wrong and gives its label p=0, which NLL clamps to PROB_EPSILON.
    probs = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    metrics = classification_metrics(probs, labels)

    assert set(metrics) == {"acc", "top5", "nll", "ece"}
    assert metrics["acc"] == pytest.approx(0.5)
    assert metrics["top5"] == pytest.approx(1.0)
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(PROB_EPSILON)) / 2)
    # Confidence 0.7 (right) and 1.0 (wrong) fall in different bins of the 15.
    assert metrics["ece"] == pytest.approx((0.3 + 1.0) / 2, abs=1e-12)


def test_agreement_three_students():
    # Predictions on four samples:
    #   student 0: 0 1 2 0
    #   student 1: 0 1 1 1   agrees with student 0 on samples 0, 1 -> 2/4
    #   student 2: 2 1 2 0   agrees with student 0 on 1, 2, 3 -> 3/4, with student 1 on 1 -> 1/4
    logits = torch.stack(
        [
            one_hot_logits([0, 1, 2, 0], num_classes=3),
            one_hot_logits([0, 1, 1, 1], num_classes=3),
            one_hot_logits([2, 1, 2, 0], num_classes=3),
        ]
    )
    expected = torch.tensor(
        [
            [1.0, 0.5, 0.75],
            [0.5, 1.0, 0.25],
            [0.75, 0.25, 1.0],
        ],
        dtype=torch.float64,
    )
    agreement = pairwise_agreement(logits)
    assert agreement.shape == (3, 3)
    assert torch.equal(agreement, expected)


def test_pairwise_kl_matches_formula():
    logits_a = [[1.0, 0.0], [0.0, 0.0]]
    logits_b = [[0.0, 2.0], [1.0, 0.0]]
    logits = torch.tensor([logits_a, logits_b], dtype=torch.float64)

    def kl_by_hand(rows_p: list[list[float]], rows_q: list[list[float]]) -> float:
        total = 0.0
        for row_p, row_q in zip(rows_p, rows_q, strict=True):
            p = softmax_by_hand(row_p)
            q = softmax_by_hand(row_q)
            pairs = zip(p, q, strict=True)
            total += sum(p_c * (math.log(p_c) - math.log(q_c)) for p_c, q_c in pairs)
        return total / len(rows_p)

    kl = pairwise_kl(logits)
    assert kl[0, 1].item() == pytest.approx(kl_by_hand(logits_a, logits_b), rel=1e-12)
    assert kl[1, 0].item() == pytest.approx(kl_by_hand(logits_b, logits_a), rel=1e-12)
    assert kl[0, 0].item() == 0.0
    assert kl[1, 1].item() == 0.0


def test_pairwise_kl_is_asymmetric():
    logits = torch.tensor([[[3.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]]])
    kl = pairwise_kl(logits)
    assert kl[0, 1].item() > 0.0
    assert kl[1, 0].item() > 0.0
    assert kl[0, 1].item() != pytest.approx(kl[1, 0].item(), rel=1e-3)


def test_pairwise_kl_zero_for_identical():
    one_student = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(1))
    logits = one_student.expand(3, 6, 5)
    assert torch.equal(pairwise_kl(logits), torch.zeros(3, 3, dtype=torch.float64))


def test_pairwise_kl_skips_zero_probability_classes():
    # p = [1, 0] against q = [0.5, 0.5]: KL(p || q) = 1 * log(1 / 0.5) = log 2. The p = 0 class
    # contributes 0 even though log p is -inf.
    logits = torch.tensor([[[0.0, -math.inf]], [[0.0, 0.0]]])
    kl = pairwise_kl(logits)
    assert kl[0, 1].item() == pytest.approx(math.log(2), rel=1e-12)
    assert kl[1, 0].item() == math.inf


def test_cohort_metrics_keys_and_spread():
    # Student 0 is right on all 4 samples, student 1 on 2 of 4 (samples 2 and 3 wrong).
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.stack(
        [
            one_hot_logits([0, 1, 2, 0], num_classes=3),
            one_hot_logits([0, 1, 0, 1], num_classes=3),
        ]
    )
    names = ["student_0", "student_1"]
    result = cohort_metrics(logits, labels, names)

    assert set(result) == {
        "students",
        "ensemble",
        "student_mean",
        "student_std",
        "agreement",
        "kl",
    }
    assert list(result["students"]) == names
    metric_keys = {"acc", "top5", "nll", "ece"}
    assert set(result["students"]["student_0"]) == metric_keys
    assert set(result["ensemble"]) == metric_keys
    assert set(result["student_mean"]) == metric_keys
    assert set(result["student_std"]) == metric_keys

    assert result["students"]["student_0"]["acc"] == pytest.approx(1.0)
    assert result["students"]["student_1"]["acc"] == pytest.approx(0.5)
    assert result["student_mean"]["acc"] == pytest.approx(0.75)
    # Population std (ddof=0) of [1.0, 0.5] is 0.25, where the sample std (ddof=1) is 0.354.
    assert result["student_std"]["acc"] == pytest.approx(0.25)
    assert result["student_std"]["top5"] == pytest.approx(0.0)

    nll_0 = result["students"]["student_0"]["nll"]
    nll_1 = result["students"]["student_1"]["nll"]
    assert result["student_mean"]["nll"] == pytest.approx((nll_0 + nll_1) / 2)
    assert result["student_std"]["nll"] == pytest.approx(abs(nll_0 - nll_1) / 2)

    # The two students agree on samples 0 and 1 only.
    assert result["agreement"] == {"student_0/student_1": pytest.approx(0.5)}
    kl_matrix = pairwise_kl(logits)
    assert result["kl"] == {
        "student_0||student_1": pytest.approx(kl_matrix[0, 1].item()),
        "student_1||student_0": pytest.approx(kl_matrix[1, 0].item()),
    }
    expected_ensemble = classification_metrics(ensemble_probs(logits.double()), labels)
    assert result["ensemble"] == pytest.approx(expected_ensemble)


def test_cohort_metrics_single_student():
    labels = torch.tensor([0, 1])
    logits = one_hot_logits([0, 0], num_classes=2).unsqueeze(0)
    result = cohort_metrics(logits, labels, ["student_0"])
    assert result["student_std"]["acc"] == 0.0
    assert result["agreement"] == {}
    assert result["kl"] == {}
    assert result["ensemble"]["acc"] == pytest.approx(result["students"]["student_0"]["acc"])


def test_cohort_metrics_rejects_bad_names():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="one entry per student"):
        cohort_metrics(logits, labels, ["student_0"])
    with pytest.raises(ValueError, match="must be unique"):
        cohort_metrics(logits, labels, ["student_0", "student_0"])
