"""Every model of the zoo, longer funnels, AITM's constraint, the loss weighting strategies and the
gate diagnostics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from pipeline.config import DatasetSpec, JobConfig, ModelConfig, TrainConfig, from_dict
from pipeline.diagnostics import GateStats, summarize
from pipeline.models import MODELS, build_model
from pipeline.weighting import LossWeighting

FUNNEL = {
    "name": "funnel",
    "sparse": [{"name": "user", "vocab_size": 30, "dim": 8}, {"name": "item", "vocab_size": 40, "dim": 8}],
    "sequences": [{"name": "hist", "table": "item", "max_len": 4}],  # what dupn and mose read
    "dense": [{"name": "price"}],
    "tasks": [{"name": "click"}, {"name": "cart", "depends_on": "click"}, {"name": "purchase", "depends_on": "cart"}],
}


def funnel_batch(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.4).float()
    cart = click * (torch.rand(n, generator=g) < 0.5).float()
    purchase = cart * (torch.rand(n, generator=g) < 0.5).float()
    hist = torch.randint(0, 5, (n,), generator=g, dtype=torch.int32)
    ids = torch.cat([torch.randint(0, 30, (n,), generator=g), torch.randint(0, 40, (n + int(hist.sum()),), generator=g)])
    lengths = torch.cat([torch.ones(2 * n, dtype=torch.int32), hist])
    return {"ids": KeyedJaggedTensor(keys=["user", "item", "hist"], values=ids, lengths=lengths),
            "dense": torch.randn(n, 1, generator=g), "labels": torch.stack([click, cart, purchase], 1)}


@pytest.fixture
def spec():
    return from_dict(DatasetSpec, FUNNEL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_on_a_three_step_funnel(spec, name):
    torch.manual_seed(1)  # (seed 0 leaves PLE's third tower with a dead ReLU on this batch: no gradient)
    cfg = ModelConfig(name=name, expert_hidden=[16], tower_hidden=[8], num_experts=3, num_levels=2)
    model = build_model(spec, cfg)
    batch = funnel_batch()
    out = model(batch)
    for k in ("logits", "cond_prob", "prob"):
        assert out[k].shape == (128, 3)
        assert torch.all((out[k] >= 0) & (out[k] <= 1)) if k != "logits" else True
    if model.chains_probabilities:  # ESMM-style chaining: the funnel holds by construction
        assert torch.all(out["prob"][:, 1] <= out["prob"][:, 0]) and torch.all(out["prob"][:, 2] <= out["prob"][:, 1])
    losses = model.task_losses(out, batch["labels"])
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    (losses.sum() + model.regularizer(out, batch["labels"])).backward()
    # every parameter of the model is reached by the loss (no dead branch), the embeddings included
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"{name}: parameters without gradient: {dead}"


def test_aitm_constraint_pulls_towards_the_funnel(spec):
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="aitm", expert_hidden=[16], aitm_constraint_weight=10.0))
    batch = funnel_batch()
    with torch.no_grad():  # force a violation: purchase head far above cart
        model.heads[2].bias.fill_(5.0)
    out = model(batch)
    assert model.regularizer(out, batch["labels"]) > 0
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        out = model(batch)
        loss = model.regularizer(out, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(batch)
    assert (out["prob"][:, 2] - out["prob"][:, 1]).clamp(min=0).mean() < 0.01


def test_esmm_refuses_masked_loss(spec):
    with pytest.raises(ValueError, match="dependent_loss must be 'esmm'"):
        build_model(spec, ModelConfig(name="esmm", dependent_loss="masked"))


def test_esmm_towers_have_their_own_sizes(spec):
    model = build_model(spec, ModelConfig(name="esmm", towers={"click": [32, 16], "cart": [8]}, tower_hidden=[4]))
    assert [model.towers[j].mlp.out_dim for j in range(3)] == [16, 8, 4]
    default = build_model(spec, ModelConfig(name="esmm", expert_hidden=[64, 32], tower_hidden=[16]))
    assert [len(t.mlp) for t in default.towers] == [6, 6, 6]  # bottom + tower depth by default


def _strategy(name, **kw):
    return LossWeighting(["a", "b"], TrainConfig(loss_weighting=name, **kw))


def test_fixed_and_decay_weights():
    losses = torch.tensor([1.0, 2.0])
    fixed = _strategy("fixed", loss_weights={"a": 0.5})
    assert fixed(losses).item() == pytest.approx(0.5 + 2.0)
    decay = _strategy("decay", loss_weights={"a": 2.0}, loss_weight_decay={"a": 0.5, "b": 0.9})
    decay.set_epoch(2)
    assert decay.log() == pytest.approx({"loss_weight/a": 2.0 * 0.25, "loss_weight/b": 0.81})
    with pytest.raises(ValueError, match="unknown tasks"):
        _strategy("fixed", loss_weights={"zzz": 1.0})
    with pytest.raises(ValueError, match=r"train.loss_weighting: must be one of fixed\|decay"):  # the config loader's check
        from_dict(JobConfig, {"train": {"loss_weighting": "magic"}})


def test_uncertainty_weighting_learns_to_down_weight_the_noisier_task():
    w = _strategy("uncertainty")
    opt = torch.optim.SGD([w.log_var], lr=0.1)
    for _ in range(200):
        loss = w(torch.tensor([0.1, 2.0]))  # task b's loss stays high (noisy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the optimum is s_k = log L_k: weight exp(-s_k) = 1 / L_k
    assert w.log()["loss_weight/a"] == pytest.approx(10.0, rel=0.05)
    assert w.log()["loss_weight/b"] == pytest.approx(0.5, rel=0.05)


def test_gradnorm_raises_the_weight_of_the_task_with_small_gradients():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4, 4))
    w = _strategy("gradnorm", gradnorm_lr=0.05)
    x = torch.randn(32, 4)
    for _ in range(50):
        h = x @ shared
        losses = torch.stack([(h ** 2).mean(), 0.01 * (h ** 2).mean()])  # b's gradient is 100x smaller
        w.gradnorm_step(losses, shared)
    assert w.log()["loss_weight/b"] > 1.5 > w.log()["loss_weight/a"]
    assert sum(w.log().values()) == pytest.approx(2.0, rel=1e-4)


def test_gate_diagnostics_flags():
    stats = GateStats()
    collapsed = torch.tensor([[[0.97, 0.01, 0.02], [0.97, 0.02, 0.01]]]).repeat(10, 1, 1)
    stats.update({"experts": collapsed})
    out = summarize(stats.state(), ["a", "b"])
    assert out["gates/experts/collapsed"] == 1.0 and out["gates/experts/identical"] == 1.0
    assert out["gates/experts/a/expert0"] == pytest.approx(0.97)
    uniform = GateStats()
    uniform.update({"experts": torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]]).repeat(4, 1, 1)})
    out = summarize(uniform.state(), ["a", "b"])
    assert out["gates/experts/collapsed"] == 0.0 and out["gates/experts/identical"] == 0.0
    assert out["gates/experts/a/entropy"] == pytest.approx(-sum(p * np.log(p) for p in (0.5, 0.3, 0.2)), rel=1e-5)


def test_models_record_gates_for_diagnostics(spec):
    for name, keys in (("mmoe", {"experts"}), ("omoe", {"experts"}), ("ple", {"level0", "level1"})):
        model = build_model(spec, ModelConfig(name=name, expert_hidden=[8], num_levels=2))
        model(funnel_batch())
        assert set(model.last_gates) == keys
        for g in model.last_gates.values():
            assert g.shape[:2] == (128, 3)


def test_gate_heatmap_and_learning_curves_are_written(tmp_path):
    from pipeline.diagnostics import gate_matrix
    from pipeline.plots import plot_gates, plot_learning_curves

    stats = GateStats()
    stats.update({"experts": torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]]).repeat(4, 1, 1),
                  "level0": torch.tensor([[[0.6, 0.4], [0.9, 0.1]]]).repeat(4, 1, 1)})
    metrics = {f"valid/{k}": v for k, v in summarize(stats.state(), ["a", "b"]).items()}
    np.testing.assert_allclose(gate_matrix(metrics, "valid", "experts", ["a", "b"]), [[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], rtol=1e-6)
    assert plot_gates(metrics, ["a", "b"], tmp_path / "gates.png").stat().st_size > 1000
    history = [{"epoch": e, "valid/a/auc": 0.7 + e / 100, "valid/b/auc": 0.8, "valid/a/oracle_auc": 0.75} for e in range(3)]
    assert plot_learning_curves(history, ["a", "b"], tmp_path / "curves.png").stat().st_size > 1000
