"""medflower's torch AUC against MONAI's ``compute_roc_auc``, and the imports it spares a classification run."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from monai.metrics import compute_roc_auc

from medflower.metrics import classification_metrics, roc_auc


def test_roc_auc_by_hand() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) 1, (0.8>0.1) 1, (0.4=0.4) 0.5, (0.4>0.1) 1 -> 3.5/4
    assert roc_auc(torch.tensor([0.8, 0.4, 0.4, 0.1]), torch.tensor([1, 1, 0, 0])) == 0.875
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.2]), torch.tensor([0, 1])) == 0.0
    assert math.isnan(roc_auc(torch.tensor([0.3, 0.7]), torch.tensor([1, 1])))  # one class: undefined


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_monai(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 200 + 37 * seed
    labels = (torch.rand(n, generator=g) < 0.3).long()
    scores = torch.rand(n, generator=g) + 0.4 * labels
    scores = (scores * 20).round() / 20  # many ties, as probabilities of a small model have
    expected = float(compute_roc_auc(scores, labels))
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_multiclass_auc_is_monai_one_vs_rest_macro() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 4, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    labels[:10] = 2
    probs = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 4)
    expected = sum(float(compute_roc_auc(probs[:, k], onehot[:, k])) for k in range(4)) / 4
    assert classification_metrics(logits, labels)["auc"] == pytest.approx(expected, abs=1e-12)


def test_the_apps_load_without_monai() -> None:
    """MONAI costs seconds per process; loading the apps (and a classification model) must not import it."""
    code = (
        "import sys, medflower.server.app, medflower.client.app, medflower.simulation.local\n"
        "from medflower.config import quickstart_experiment\n"
        "from medflower.modelspec import build_experiment_model\n"
        "build_experiment_model(quickstart_experiment())\n"
        "print('monai' in sys.modules, 'opacus' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
