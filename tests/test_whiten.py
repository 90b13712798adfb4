"""model.whiten_features: the head's data-free whitening, by hand, in the prior, through model.init and under DP-SGD."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medflower.cli import main as cli_main
from medflower.config import ExperimentConfig, quickstart_experiment
from medflower.modelspec import WhitenedHead, build_experiment_model, initial_model
from medflower.prior import (
    WHITEN_SHRINKAGE,
    last_linear,
    load_trunk,
    pretrain_prior,
    synthetic_features,
    trunk_prefixes,
    whitening,
)
from medflower.schema import ConfigError
from medflower.server.app import FINAL_MODEL_FILE
from medflower.simulation.inprocess import simulate_inprocess


def _tiny(
    *, whiten: bool = True, privacy: str = "none", init: str | None = None, freeze: bool = False
) -> ExperimentConfig:
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=120),
        model=replace(exp.model, whiten_features=whiten, init=init, freeze=("features",) if freeze else ()),
        train=replace(exp.train, rounds=2),
        privacy=replace(exp.privacy, mode=privacy),
    )


def test_whitening_by_hand() -> None:
    """Four points on the axes: mean 0, sample covariance diag(2/3, 8/3) (n - 1 = 3), mean eigenvalue 5/3.
    Shrinkage s adds s * 5/3 to each eigenvalue before the inverse square root."""
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]) + torch.tensor([3.0, -1.0])
    mean, t = whitening(f, shrinkage=0.1)
    assert torch.allclose(mean, torch.tensor([3.0, -1.0]))
    want = torch.diag(torch.tensor([(2 / 3 + 1 / 6) ** -0.5, (8 / 3 + 1 / 6) ** -0.5]))
    assert torch.allclose(t, want, atol=1e-6)
    # no shrinkage: exactly unit covariance, also for correlated features (ZCA: the transform is symmetric)
    g = torch.randn(500, 3, generator=torch.Generator().manual_seed(0)) @ torch.tensor(
        [[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.2]]
    )
    mean, t = whitening(g, shrinkage=0.0)
    assert torch.allclose(torch.cov(((g - mean) @ t).T), torch.eye(3), atol=1e-4)
    assert torch.allclose(t, t.T, atol=1e-5)
    assert WHITEN_SHRINKAGE == 0.1  # the value stage 24 chose; bench/RESULTS.md says so


def test_whitening_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match=r"features must be \(n >= 2, d\)"):
        whitening(torch.ones(1, 4))
    with pytest.raises(ValueError, match="shrinkage must be >= 0"):
        whitening(torch.ones(3, 2), shrinkage=-0.1)


def test_client_level_dp_is_refused_naming_both_keys() -> None:
    """Flower's client-level DP wrappers noise every array the coordinator aggregates: the whitening's too."""
    with pytest.raises(ConfigError, match=r"model.whiten_features cannot be combined with privacy.mode 'client'"):
        _tiny(privacy="client")


def test_the_whitened_head_by_hand() -> None:
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lin.bias.fill_(0.5)
    head = WhitenedHead(lin)
    x = torch.tensor([[3.0, 4.0]])
    assert head(x).item() == pytest.approx(3 + 8 + 0.5)  # as built: the identity map
    head.mean, head.transform = torch.tensor([1.0, 1.0]), torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    assert head(x).item() == pytest.approx(1.0 * 1 + 6.0 * 2 + 0.5)  # (3-1)*0.5, (4-1)*2
    assert set(head.state_dict()) == {"mean", "transform", "linear.weight", "linear.bias"}
    assert [n for n, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]  # buffers never train
    with pytest.raises(ValueError, match="linear must be an nn.Linear"):
        WhitenedHead(torch.nn.Identity())  # type: ignore[arg-type]


def test_the_model_wraps_its_head_and_the_trunk_is_unchanged() -> None:
    plain, white = build_experiment_model(_tiny(whiten=False)), build_experiment_model(_tiny(freeze=True))
    assert isinstance(white.head, WhitenedHead)
    assert trunk_prefixes(white) == trunk_prefixes(plain) == ["features"]
    assert [n for n, p in white.named_parameters() if p.requires_grad] == ["head.linear.weight", "head.linear.bias"]
    parent, attr = last_linear(white)
    assert parent is white.head and attr == "linear"


def test_the_prior_fits_the_whitening_on_synthetic_images_only() -> None:
    """The file's map whitens the trunk's features of *other* synthetic images (another seed): mean ~0, and the
    covariance's eigenvalues those of the raw features, lambda, mapped to lambda / (lambda + 0.1 mean(lambda))
    (sampling error aside): unit scale, shrunk below 1 where the synthetic images barely vary, where the raw
    spreads differ a hundredfold."""
    exp = _tiny()
    state = pretrain_prior(exp, steps=3, batch_size=16, seed=0, whiten_samples=1024)
    model = build_experiment_model(exp)
    model.load_state_dict(state)
    head = model.head
    assert isinstance(head, WhitenedHead)
    model.head = torch.nn.Identity()  # the trunk's raw features
    raw = synthetic_features(model, exp, samples=1024, generator=torch.Generator().manual_seed(99))
    white = (raw - head.mean) @ head.transform
    assert raw.mean(0).norm() > 2.0 and white.mean(0).norm() < 0.5
    ev_raw, ev = torch.linalg.eigvalsh(torch.cov(raw.T)), torch.linalg.eigvalsh(torch.cov(white.T))
    assert ev_raw.max() / ev_raw.min() > 100
    want = ev_raw / (ev_raw + WHITEN_SHRINKAGE * ev_raw.mean())
    assert (ev - want).abs().mean() < 0.05 and (ev - want).abs().max() < 0.25  # 1,024 samples of 64 features


def test_zero_steps_from_an_earlier_prior_keep_its_trunk_and_add_the_whitening() -> None:
    old = pretrain_prior(_tiny(whiten=False), steps=2, batch_size=8, seed=1)
    new = pretrain_prior(_tiny(), steps=0, init=old, seed=1, whiten_samples=256)
    assert all(torch.equal(new[k], v) for k, v in old.items() if k.startswith("features."))
    assert torch.equal(new["head.linear.weight"], old["head.weight"])  # both the seed's head
    assert not torch.equal(new["head.transform"], torch.eye(len(new["head.transform"])))
    with pytest.raises(ValueError, match="steps must be >= 1 without init"):
        pretrain_prior(_tiny(), steps=0)
    broken = {k: v for k, v in old.items() if k != "features.0.weight"}
    with pytest.raises(ConfigError, match=r"init: .*missing or mis-shaped \['features.0.weight'\]"):
        load_trunk(build_experiment_model(_tiny()), broken)


def test_a_negative_shrinkage_is_refused_before_any_pretraining(monkeypatch: pytest.MonkeyPatch) -> None:
    import medflower.prior as prior_module

    monkeypatch.setattr(prior_module, "dead_leaves", lambda *a, **k: pytest.fail("pretraining started"))
    with pytest.raises(ValueError, match="whiten_shrinkage must be >= 0, got -0.1"):
        pretrain_prior(_tiny(), steps=5, whiten_shrinkage=-0.1)


def test_an_unwhitened_prior_is_refused_with_the_way_to_whiten_it(tmp_path: Path) -> None:
    torch.save(build_experiment_model(_tiny(whiten=False)).state_dict(), tmp_path / "old.pt")
    with pytest.raises(ConfigError, match=r"model.init: .*missing \['head.linear.bias'.*--init OLD.pt --steps 0"):
        initial_model(_tiny(init=str(tmp_path / "old.pt")))


def test_the_cli_adds_the_whitening_to_an_earlier_prior(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.yaml").write_text("data: {kind: synthetic, synthetic_samples: 60}\nmodel: {name: cnn}\n")
    (tmp_path / "new.yaml").write_text(
        "data: {kind: synthetic, synthetic_samples: 60}\nmodel: {name: cnn, whiten_features: true}\n"
    )
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    assert cli_main(["prior", str(tmp_path / "old.yaml"), "-o", str(old), "--steps", "2", "--batch-size", "8"]) == 0
    args = ["prior", str(tmp_path / "new.yaml"), "-o", str(new), "--init", str(old), "--steps", "0"]
    assert cli_main([*args, "--whiten-samples", "128"]) == 0
    assert "fitted on 128 synthetic images" in capsys.readouterr().out
    state = torch.load(new, weights_only=True)
    assert torch.equal(state["features.0.weight"], torch.load(old, weights_only=True)["features.0.weight"])
    milder = tmp_path / "milder.pt"  # a larger shrinkage: the same trunk, a smaller transform
    assert cli_main([*args[:-5], str(milder), *args[-4:], "--whiten-samples", "128", "--whiten-shrinkage", "1"]) == 0
    mild = torch.load(milder, weights_only=True)
    assert torch.equal(mild["head.mean"], state["head.mean"])
    assert torch.linalg.matrix_norm(mild["head.transform"]) < torch.linalg.matrix_norm(state["head.transform"])
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    assert cli_main([*args[:-4], "--init", str(tmp_path / "bad.pt"), "--steps", "0"]) == 2
    assert f"--init {tmp_path / 'bad.pt'}: cannot read it" in capsys.readouterr().err


@pytest.mark.slow
def test_a_dp_federation_trains_the_whitened_head_only(tmp_path: Path) -> None:
    """Two rounds under DP-SGD (Opacus) from a whitened prior: the trunk and the whitening end where they
    started (to float rounding of the weighted average), the head's linear layer moves."""
    exp = _tiny(privacy="sample")
    torch.save(pretrain_prior(exp, steps=2, batch_size=8, whiten_samples=256), tmp_path / "prior.pt")
    start = torch.load(tmp_path / "prior.pt", weights_only=True)
    simulate_inprocess(_tiny(privacy="sample", init=str(tmp_path / "prior.pt"), freeze=True), tmp_path / "run")
    final = torch.load(tmp_path / "run" / FINAL_MODEL_FILE, weights_only=True)
    for k, v in start.items():
        moved = (final[k] - v).abs().max().item()
        if k.startswith("head.linear."):
            assert moved > 1e-4, k
        else:
            assert moved < 1e-5, k
