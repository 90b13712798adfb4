"""Operating threshold and collapse checks for classifiers: what the argmax alone hides.

Under label skew FedAvg can settle on a model that calls every image the majority class: its AUC
may be high (the scores still rank) while its accuracy equals the majority share and its balanced
accuracy is 0.5. Two remedies, both computed here:

* **A federated operating threshold (binary tasks).** Each site evaluates the global model on its
  validation split and reports, per true class, how many images fall in each of :data:`BINS`
  fixed bins of the positive-class score (integer counts; :func:`score_histograms`). The bins are
  equal on the log-odds scale, log(p / (1 - p)) from -:data:`LOGIT_RANGE` to +:data:`LOGIT_RANGE`
  (the outer two also hold everything beyond), so they are as fine near p = 0.97 as near 0.5: a
  model trained under label skew or DP noise often scores every image within a few hundredths of
  1, where bins of equal probability width (0.02) held the whole validation split in two or three
  bins and the chosen threshold did not carry to test. The coordinator sums the counts and picks
  the bin edge with the largest Youden's J = sensitivity + specificity - 1
  (:func:`youden_threshold`). The threshold is chosen on validation only; the global test split is
  then scored at it (:func:`metrics_at_threshold`), never used to choose it. What a site reveals:
  the number of its validation images of each class, and how the global model's scores on them are
  distributed, at a resolution of 2 x :data:`LOGIT_RANGE` / :data:`BINS` in log-odds; no image and
  no per-image score.
* **A collapse warning**: when the global model predicts one class for more than
  :data:`COLLAPSE_SHARE` of the test images (:func:`collapse_warnings`).

scikit-learn's ``roc_curve`` needs per-image scores, which a site does not send, and MONAI has no
threshold selection; so Youden's J over histogram bin edges is written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medflower import keys

BINS = 160  # histogram bins of the positive-class score; thresholds are their edges (bin_edges)
LOGIT_RANGE = 8.0  # the bins split log-odds [-8, 8] (p 0.0003..0.9997) evenly: 0.1 log-odds each
COLLAPSE_SHARE = 0.95  # a model predicting one class for more than this share of test images is flagged
HIST_PREFIX = keys.SCORE_HIST  # metric names: score-hist-0 (true negatives' scores), score-hist-1 (positives')


def bin_edges(bins: int = BINS) -> np.ndarray:
    """The ``bins + 1`` edges as probabilities: 0, sigmoid(z_1), ..., sigmoid(z_{bins-1}), 1, with
    z_k = -LOGIT_RANGE + 2 * LOGIT_RANGE * k / bins (edge ``bins // 2`` is 0.5 for an even ``bins``)."""
    z = -LOGIT_RANGE + 2.0 * LOGIT_RANGE * np.arange(bins + 1, dtype=np.float64) / bins
    edges = 1.0 / (1.0 + np.exp(-z))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def score_histograms(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict[str, list[int]]:
    """Per true class (0, 1), the counts of the positive-class score in ``bins`` log-odds bins.

    Bin ``k`` holds log-odds z = logit_1 - logit_0 in ``[z_k, z_{k+1})`` (the first also holds all
    below, the last all above), so "score >= edge k" is exactly "bin >= k" and a threshold at an edge
    can be scored from the counts alone. The log-odds come from the logits, not a rounded
    probability: scores of 0.9999 and 0.99999 stay apart.
    """
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(
            f"score histograms are for binary classifiers: logits must be (N, 2), got {tuple(logits.shape)}"
        )
    z = (logits[:, 1].double() - logits[:, 0].double()).numpy()
    idx = np.clip(np.floor((z + LOGIT_RANGE) * bins / (2.0 * LOGIT_RANGE)), 0, bins - 1).astype(np.int64)
    y = labels.long().numpy()
    return {f"{HIST_PREFIX}{c}": np.bincount(idx[y == c], minlength=bins).astype(int).tolist() for c in (0, 1)}


def youden_threshold(neg: Sequence[int], pos: Sequence[int]) -> tuple[float, float] | None:
    """The bin edge (a probability, :func:`bin_edges`; predict positive when the score >= it) with the
    largest Youden's J, and that J; None when a class has no image (J is undefined).

    Candidate edges are the inner ones, 1..bins-1 (edges 0 and 1 call everything one class, J = 0).
    Ties (plateaus between occupied bins) go to the edge closest to 0.5, the argmax rule's threshold,
    then to the lower edge: the choice moves away from the default only when the data say so.
    """
    n_neg, n_pos = np.asarray(neg, dtype=np.int64), np.asarray(pos, dtype=np.int64)
    if n_neg.shape != n_pos.shape or n_neg.ndim != 1 or len(n_neg) < 2:
        raise ValueError(f"histograms must be two equal-length lists, got {len(neg)} and {len(pos)} bins")
    total_neg, total_pos = int(n_neg.sum()), int(n_pos.sum())
    if total_neg == 0 or total_pos == 0:
        return None
    bins = len(n_neg)

    def rank(k: int) -> tuple[float, float, int]:  # J (rounded: equal counts tie exactly), then closeness to 0.5
        j = n_pos[k:].sum() / total_pos + n_neg[:k].sum() / total_neg - 1.0
        return round(float(j), 12), -abs(k - bins / 2), -k

    k = max(range(1, bins), key=rank)
    return float(bin_edges(bins)[k]), rank(k)[0]


def metrics_at_threshold(neg: Sequence[int], pos: Sequence[int], threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity and specificity when "score >= threshold" is positive.

    ``threshold`` must be a bin edge of the histograms (as :func:`youden_threshold` returns). A
    metric a class's absence leaves undefined is NaN.
    """
    n_neg, n_pos = np.asarray(neg, dtype=np.int64), np.asarray(pos, dtype=np.int64)
    edges = bin_edges(len(n_neg))
    k = int(np.argmin(np.abs(edges - threshold)))
    if not np.isclose(edges[k], threshold, rtol=1e-9, atol=0.0):
        raise ValueError(f"threshold {threshold} is not an edge of {len(n_neg)} bins (medflower.threshold.bin_edges)")
    tp, fn = int(n_pos[k:].sum()), int(n_pos[:k].sum())
    tn, fp = int(n_neg[:k].sum()), int(n_neg[k:].sum())
    nan = float("nan")
    sens = tp / (tp + fn) if tp + fn else nan
    spec = tn / (tn + fp) if tn + fp else nan
    total = tp + fn + tn + fp
    return {
        "threshold": threshold,
        "accuracy": (tp + tn) / total if total else nan,
        "balanced-accuracy": float(np.nanmean([sens, spec])) if total else nan,
        "sensitivity": sens,
        "specificity": spec,
    }


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Rows: true class; columns: the argmax prediction (counts)."""
    c = logits.shape[1]
    pred = logits.argmax(dim=1).long()
    flat = labels.long() * c + pred
    return torch.bincount(flat, minlength=c * c).reshape(c, c).tolist()


def collapse_warnings(
    confusion: Sequence[Sequence[int]], *, class_names: Sequence[str] = (), what: str = "the global model"
) -> list[str]:
    """A warning when one class takes more than :data:`COLLAPSE_SHARE` of the predictions."""
    predicted = np.asarray(confusion, dtype=np.int64).sum(axis=0)
    total = int(predicted.sum())
    if total == 0:
        return []
    k = int(predicted.argmax())
    share = predicted[k] / total
    if share <= COLLAPSE_SHARE:
        return []
    name = class_names[k] if k < len(class_names) else f"class {k}"
    return [
        f"{what} predicts {name!r} for {100 * share:.1f}% of the {total} test images (more than "
        f"{100 * COLLAPSE_SHARE:.0f}%): it has collapsed onto one class; look at balanced accuracy and, "
        "for a binary task, the metrics at the selected threshold"
    ]
