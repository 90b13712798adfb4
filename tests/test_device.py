"""``train.device``, ``train.precision`` and ``simulation.*_per_site`` on a machine without a GPU.

CI has no GPU: CUDA's presence is faked (``torch.cuda.is_available`` / ``device_count`` /
``get_device_name`` monkeypatched) only to reach the branches that *decide* something; nothing here
puts a tensor on a GPU. bf16 training really runs (CPUs have bf16 autocast); fp16 is refused on a CPU.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from sitekit import experiment, message, node, write_site
from torch import nn

from medflower import keys
from medflower.client.site import run_check
from medflower.client.train import make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig, quickstart_experiment
from medflower.data import ArraySplit
from medflower.device import Amp, host_state, inference_amp, resolve_amp, resolve_device, training_amp
from medflower.models import SmallCNN
from medflower.modelspec import build_experiment_model
from medflower.schema import ConfigError
from medflower.simulation.clientapp import app as simulation_app
from medflower.simulation.resources import client_resources

CPU = torch.device("cpu")


def fake_gpus(monkeypatch: pytest.MonkeyPatch, n: int, *, bf16: bool = True) -> None:
    """Pretend this machine has ``n`` CUDA devices (for the decisions only: no tensor goes there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Fake GPU {i}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def exp_with(**train: Any) -> ExperimentConfig:
    exp = quickstart_experiment()
    return replace(
        exp,
        data=replace(exp.data, synthetic_samples=120),
        train=replace(exp.train, rounds=1, local_epochs=1, batch_size=16, **train),
    )


def simulated_site_train(exp: ExperimentConfig, pid: int) -> tuple[Message, Context]:
    """A train message with the initial model, and simulated site ``pid``'s context."""
    cfg = ConfigRecord({keys.EXPERIMENT: exp.to_json(), keys.SERVER_ROUND: 1})
    arrays = ArrayRecord(build_experiment_model(exp).state_dict())
    msg = Message(content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg}), dst_node_id=1, message_type="train")
    node_config = {keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: exp.partition.num_sites}
    return msg, Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


# ---- device names and resolution -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_device_names_load(value: str) -> None:
    assert ExperimentConfig.from_dict({"train": {"device": value}}).train.device == value


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "cuda:-1"])
def test_an_unknown_device_lists_the_valid_choices(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.device: invalid value .*'auto', 'cpu', 'cuda', 'cuda:N'"):
        ExperimentConfig.from_dict({"train": {"device": value}})


def test_an_unknown_precision_lists_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match=r"train\.precision.*'fp32'.*'bf16'.*'fp16'"):
        ExperimentConfig.from_dict({"train": {"precision": "fp8"}})


def test_auto_is_the_cpu_without_cuda_and_cuda_0_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU


def test_cuda_without_cuda_names_train_device_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"^train\.device: 'cuda', but CUDA is not available.*CPU-only build.*'auto'"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(
        ConfigError, match=r"built with CUDA 12\.6 but finds no CUDA device \(CUDA_VISIBLE_DEVICES=''\)"
    ):
        resolve_device("cuda:0")


def test_a_missing_gpu_index_lists_the_devices_found(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"'cuda:3', but this machine has 1 CUDA device\(s\): cuda:0 \(Fake GPU 0\)"):
        resolve_device("cuda:3")


def test_a_site_s_error_names_the_site(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"^site 'st-mary': train\.device: 'cuda'"):
        resolve_amp("cuda", "fp32", where="site 'st-mary'")


def test_the_coordinator_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator without the hospitals' GPU still evaluates (on its CPU) instead of stopping the run."""
    fake_gpus(monkeypatch, 0)
    assert resolve_device("cuda", fallback=True) == CPU
    fake_gpus(monkeypatch, 1)
    assert resolve_device("cuda:3", fallback=True) == torch.device("cuda", 0)


# ---- precision ----------------------------------------------------------------------------------------


def test_fp16_is_refused_on_a_cpu_and_planned_with_a_scaler_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"train\.precision: 'fp16' needs a CUDA device.*'bf16'"):
        training_amp(CPU, "fp16")
    with pytest.raises(ConfigError, match=r"^site 'a': train\.precision"):
        resolve_amp("cpu", "fp16", where="site 'a'")
    fake_gpus(monkeypatch, 1)
    amp = training_amp(torch.device("cuda", 0), "fp16")
    assert amp.dtype == torch.float16 and amp.uses_scaler
    # evaluation of an fp16 experiment on a CPU (the coordinator's fallback) runs in float32
    assert inference_amp(CPU, "fp16").dtype is None
    assert Amp(CPU, "fp32").scaler() is None and Amp(CPU, "bf16").scaler() is None


def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1, bf16=False)
    with pytest.raises(ConfigError, match=r"train\.precision: 'bf16' is not supported by cuda:0 \(Fake GPU 0\)"):
        training_amp(torch.device("cuda", 0), "bf16")
    assert inference_amp(torch.device("cuda", 0), "bf16").dtype is None


def test_dp_sgd_in_16_bits_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"train\.precision 'bf16' cannot be combined with privacy\.mode 'sample'"):
        ExperimentConfig.from_dict({"train": {"precision": "bf16"}, "privacy": {"mode": "sample"}})


def _synthetic_split(n: int = 48, seed: int = 0) -> ArraySplit:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 1, 16, 16)).astype(np.float32) + y[:, None, None, None].astype(np.float32)
    return ArraySplit(x, y.astype(np.int64))


def test_bf16_training_runs_in_bf16_on_the_cpu_and_keeps_float32_weights() -> None:
    torch.manual_seed(0)
    model = SmallCNN(spatial_dims=2, in_channels=1, out_channels=2, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loader = make_loader(_synthetic_split(), 16, 0)
    stats = train_epochs(
        model, loader, make_optimizer(model, exp_with().train), epochs=2, task="classification", amp=Amp(CPU, "bf16")
    )
    assert seen and set(seen) == {torch.bfloat16}  # the convolutions really ran in bf16
    assert np.isfinite(stats.loss) and stats.num_steps == 6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _conv3d_weight_grad(amp: Amp | None, side: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, list]:
    """The weight gradient of a seeded ``Conv3d(16, 32, 3)`` on a seeded input, and its output dtypes."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, *side)
    seen: list[torch.dtype] = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with amp.training(conv) if amp else contextlib.nullcontext():
        with amp.autocast() if amp else contextlib.nullcontext():
            out = conv(x)
        out.float().square().sum().backward()
    return conv.weight.grad, seen


@pytest.mark.parametrize("side", [(2, 2, 2), (2, 6, 6), (8, 8, 8)])
def test_bf16_on_the_cpu_gives_3d_convolutions_their_true_gradient(side: tuple[int, int, int]) -> None:
    # torch 2.13's oneDNN bf16 conv3d backward gets the weight gradient wrong (relative error ~1,
    # sometimes NaN) on an input with an extent of 2; Amp.training runs those layers in float32
    for seed in range(5):
        want, _ = _conv3d_weight_grad(None, side, seed)
        got, seen = _conv3d_weight_grad(Amp(CPU, "bf16"), side, seed)
        assert torch.isfinite(got).all()
        assert float((got - want).norm() / want.norm()) < 0.02
        assert seen == [torch.float32 if 2 in side else torch.bfloat16]  # only those layers leave bf16


def test_the_bf16_guard_leaves_autocast_and_the_model_as_they_were() -> None:
    conv = nn.Conv3d(4, 4, 3, padding=1)
    with Amp(CPU, "bf16").training(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(1, 4, 2, 2, 2))
        assert torch.is_autocast_enabled("cpu")
    assert not conv._forward_pre_hooks and not conv._forward_hooks and not hasattr(conv, "_medflower_autocast")


def test_a_bf16_site_sends_float32_cpu_arrays(flower_identity) -> None:
    exp = exp_with(precision="bf16")
    reply = simulation_app(*simulated_site_train(exp, 0))
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    sent = reply.content[keys.ARRAYS]
    assert {a.dtype for a in sent.values()} == {"float32"}
    assert np.isfinite(reply.content[keys.METRICS][keys.TRAIN_LOSS])


def test_host_state_is_cpu_float32_and_keeps_integer_buffers() -> None:
    state = {"w": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(3, dtype=torch.int64)}
    out = host_state(state)
    assert out["w"].dtype == torch.float32 and out["w"].device == CPU
    assert out["n"].dtype == torch.int64 and out["n"].ndim == 0


# ---- simulation resources -------------------------------------------------------------------------------


def sim(**section: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"simulation": section})


def test_resources_map_to_flowers_client_resources() -> None:
    assert client_resources(sim(), cpus=4, gpus=0) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert client_resources(sim(cpus_per_site=0.5, gpus_per_site=0.25), cpus=4, gpus=1) == {
        "num_cpus": 0.5,
        "num_gpus": 0.25,
    }
    assert client_resources(sim(cpus_per_site=2, gpus_per_site=2), cpus=16, gpus=2)["num_gpus"] == 2.0


@pytest.mark.parametrize(
    "section, match",
    [
        ({"gpus_per_site": -0.5}, r"simulation\.gpus_per_site: must be >= 0"),
        ({"cpus_per_site": 0}, r"simulation\.cpus_per_site: must be > 0"),
        ({"gpus_per_site": 1.5}, r"simulation\.gpus_per_site: 1\.5 .*whole number"),
        ({"cpus_per_site": 2.5}, r"simulation\.cpus_per_site: 2\.5 .*whole number"),
        ({"gpu_per_site": 1}, r"gpu_per_site"),
    ],
)
def test_bad_resources_name_the_key(section: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sim(**section)


def test_resources_this_machine_cannot_give_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"simulation\.gpus_per_site: 0\.5, but this machine has no CUDA GPU"):
        client_resources(sim(gpus_per_site=0.5), cpus=4, gpus=0)
    fake_gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"gpus_per_site: 2 is more than the 1 GPU\(s\).*cuda:0 \(Fake GPU 0\)"):
        client_resources(sim(gpus_per_site=2), cpus=4, gpus=1)
    with pytest.raises(ConfigError, match=r"simulation\.cpus_per_site: 8 is more than the 4 CPU core"):
        client_resources(sim(cpus_per_site=8), cpus=4, gpus=0)
    cpu_exp = ExperimentConfig.from_dict({"simulation": {"gpus_per_site": 0.5}, "train": {"device": "cpu"}})
    with pytest.raises(ConfigError, match=r"gpus_per_site: 0\.5 reserves GPUs, but train\.device is 'cpu'"):
        client_resources(cpu_exp, cpus=4, gpus=1)
    indexed = ExperimentConfig.from_dict({"simulation": {"gpus_per_site": 0.5}, "train": {"device": "cuda:1"}})
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda:1' cannot be combined with simulation\.gpus_per_site"):
        client_resources(indexed, cpus=4, gpus=2)


def test_simulate_hands_the_resources_to_flower(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flwr.simulation

    from medflower.simulation import runner

    seen: dict[str, Any] = {}

    def fake_run_simulation(**kwargs: Any) -> None:
        seen.update(kwargs["backend_config"])

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    fake_gpus(monkeypatch, 1)
    exp = replace(exp_with(), simulation=replace(exp_with().simulation, cpus_per_site=1, gpus_per_site=0.25))
    with pytest.raises(RuntimeError, match="without writing"):  # the fake engine writes no summary
        runner.simulate(exp, tmp_path, engine="ray")  # the resources are the Ray engine's
    assert seen["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert seen["init_args"]["num_gpus"] == 1  # Ray is told the GPUs torch sees


def test_simulate_with_cuda_on_a_cpu_machine_fails_before_the_engine_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import flwr.simulation

    from medflower.simulation import runner

    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("the engine started"))
    with pytest.raises(ConfigError, match=r"^train\.device: 'cuda', but CUDA is not available"):
        runner.simulate(exp_with(device="cuda"), tmp_path)


# ---- a site: its ClientApp and `site check` -----------------------------------------------------------


def test_a_simulated_site_without_the_gpu_names_itself(monkeypatch: pytest.MonkeyPatch, flower_identity) -> None:
    fake_gpus(monkeypatch, 0)
    exp = exp_with(device="cuda")
    with pytest.raises(Exception, match=r"site 'site-1': train\.device: 'cuda', but CUDA is not available"):
        simulation_app(*simulated_site_train(exp, 1))


def test_site_check_reports_the_device_and_names_the_site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site_yaml = write_site(tmp_path / "h", "st-mary", n=12)
    for device, expect_rc, expect in [
        ("auto", 0, "device: cpu (train.device 'auto'), precision fp32"),
        ("cuda", 1, "ERROR: site 'st-mary': train.device: 'cuda', but CUDA is not available"),
    ]:
        exp_yaml = tmp_path / f"exp-{device}.yaml"
        exp_yaml.write_text(
            "data: {kind: synthetic, synthetic_size: 16}\nmodel: {name: cnn}\n" + f"train: {{device: {device}}}\n"
        )
        fake_gpus(monkeypatch, 0)
        out = io.StringIO()
        assert run_check(site_yaml, exp_yaml, out=out) == expect_rc
        assert expect in out.getvalue()


def test_dp_noise_is_drawn_on_the_models_device(monkeypatch: pytest.MonkeyPatch, flower_identity) -> None:
    """Opacus draws noise with the generator it is given, on the gradients' device: the two must match."""
    from opacus import PrivacyEngine

    from medflower.client.privacy import RoundPrivacy

    seen: list[torch.device] = []
    real = PrivacyEngine.make_private

    def spy(self: Any, **kw: Any) -> Any:
        seen.append(kw["noise_generator"].device)
        return real(self, **kw)

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    exp = ExperimentConfig.from_dict(
        {
            "data": {"kind": "synthetic", "synthetic_samples": 60, "synthetic_size": 16},
            "privacy": {"mode": "sample", "target_epsilon": 8.0, "target_delta": 1e-3},
            "train": {"rounds": 1, "batch_size": 8},
        }
    )
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    dp = RoundPrivacy.start(exp, ctx, site="s", num_train=48, server_round=1)
    model = SmallCNN(spatial_dims=2, in_channels=1, out_channels=2, width=8)
    loader = make_loader(_synthetic_split(48), 8, 0)
    dp.wrap(model, make_optimizer(model, exp.train), loader)
    assert seen == [CPU]  # the model's device (a GPU's, on a GPU: a CPU generator cannot draw there)


def test_a_hospital_without_the_gpu_names_itself_in_its_own_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, flower_identity
) -> None:
    from medflower.client.app import app as hospital_app

    fake_gpus(monkeypatch, 0)
    site_yaml = write_site(tmp_path / "h", "st-mary", n=12)
    reply = hospital_app(message(experiment(train={"device": "cuda"})), node(site_yaml))
    assert reply.has_error() and reply.error.reason.startswith("config-error: ")  # the coordinator: a code
    ref = reply.error.reason.rsplit("(ref ", 1)[1].rstrip(")")
    site_log = [r.getMessage() for r in caplog.records if r.name == "medflower.site"]
    assert any(ref in m and "site 'st-mary': train.device: 'cuda', but CUDA is not available" in m for m in site_log)
