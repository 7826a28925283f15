"""Layers and models: fused lookup equals per-feature lookup, batched experts equal separate ones,
shapes, funnel constraint, gradients reach every expert, losses behave as documented."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DatasetSpec, ModelConfig, TrainConfig, from_dict
from pipeline.layers import MLP, EmbeddingFront, Experts, Gate, Tower
from pipeline.models import MODELS, build_model
from pipeline.models.base import multitask_loss
from pipeline.train import BatchStep, build_optimizers
from pipeline.weighting import LossWeighting

SPEC = {
    "name": "t",
    "sparse": [{"name": "user", "vocab_size": 30, "dim": 8},
               {"name": "item_category", "vocab_size": 50, "dim": 8, "table": "category"},
               {"name": "hour", "vocab_size": 25, "dim": 4}],
    "sequences": [{"name": "hist_category", "table": "category", "max_len": 5, "pooling": "mean"},
                  {"name": "hist_hour", "table": "hour", "max_len": 5, "pooling": "max"},
                  {"name": "hist_user", "table": "user", "max_len": 5, "pooling": "sum"}],
    "dense": [{"name": "a"}, {"name": "b"}],
    "tasks": [{"name": "click"}, {"name": "convert", "depends_on": "click"}],
}


@pytest.fixture
def spec():
    return from_dict(DatasetSpec, SPEC)


def make_batch(spec, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, spec.tables[f.table_name].num_rows, (n,), generator=g) for f in spec.sparse], 1)
    seq = torch.stack([torch.randint(0, spec.tables[s.table_name].num_rows, (n, 5), generator=g) for s in spec.sequences], 1)
    seq[0] = 0  # an all-padding row
    seq[1, :, 3:] = 0
    click = (torch.rand(n, generator=g) < 0.3).float()
    convert = click * (torch.rand(n, generator=g) < 0.5).float()
    return {"sparse": sparse, "seq": seq, "dense": torch.randn(n, 2, generator=g), "labels": torch.stack([click, convert], 1)}


def test_fused_lookup_equals_per_feature_lookup(spec):
    front = EmbeddingFront(spec)
    batch = make_batch(spec)
    out = front(batch["sparse"], batch["seq"], batch["dense"])
    assert out.shape == (64, front.out_dim) and front.out_dim == 8 + 8 + 4 + 8 + 4 + 8 + 2

    def table(name):  # the rows of one table inside its dim group's stacked weight
        dim = spec.tables[name].dim
        g = front.dims.index(dim)
        start = 0
        for t in spec.tables.values():
            if t.name == name:
                return front.weights[g][start:start + t.num_rows]
            if t.dim == dim:
                start += t.num_rows

    expected = {}
    for j, f in enumerate(spec.sparse):
        expected[f.name] = table(f.table_name)[batch["sparse"][:, j]]
    for j, s in enumerate(spec.sequences):
        ids = batch["seq"][:, j]
        emb, mask = table(s.table_name)[ids], (ids != 0).unsqueeze(-1).float()
        if s.pooling == "max":
            pooled = torch.where(mask.bool(), emb, torch.full_like(emb, -1e9)).max(1).values
            pooled = torch.where(mask.any(1), pooled, torch.zeros_like(pooled))
        else:
            pooled = (emb * mask).sum(1) / (mask.sum(1).clamp(min=1) if s.pooling == "mean" else 1)
        expected[s.name] = pooled
    # groups are laid out by dim: the 4-dim group (hour) first, then the 8-dim group
    order = ["hour", "user", "item_category", "hist_hour", "hist_category", "hist_user"]
    ref = torch.cat([expected[k] for k in order] + [batch["dense"]], 1)
    torch.testing.assert_close(out, ref)
    assert torch.all(out[0, 20:40] == 0)  # all-padding sequences pool to zeros


def test_shared_table_is_stored_once(spec):
    front = EmbeddingFront(spec)
    assert sum(p.numel() for p in front.parameters()) == (30 + 50) * 8 + 25 * 4


def test_batched_experts_equal_separate_experts():
    experts = Experts(10, [16, 8], num_experts=3)
    x = torch.randn(5, 10)
    out = experts(x)
    for e in range(3):
        h = x
        for w, b in zip(experts.weights, experts.biases):
            h = F.relu(h @ w[e] + b[e])
        torch.testing.assert_close(out[:, e], h)
    per_expert = torch.randn(5, 3, 10)
    torch.testing.assert_close(experts(per_expert)[:, 1], F.relu(F.relu(per_expert[:, 1] @ experts.weights[0][1] + experts.biases[0][1]) @ experts.weights[1][1] + experts.biases[1][1]))


@pytest.mark.parametrize("cfg", [ModelConfig(name="mmoe", num_experts=3), ModelConfig(name="ple", num_levels=1),
                                 ModelConfig(name="ple", num_levels=2, num_shared_experts=1, num_task_experts=2)])
def test_shapes_funnel_and_gradients(spec, cfg):
    torch.manual_seed(0)
    model = build_model(spec, cfg)
    batch = make_batch(spec)
    out = model(batch)
    for k in ("logits", "cond_prob", "prob", "log_prob"):
        assert out[k].shape == (64, 2)
    assert torch.all((out["prob"] > 0) & (out["prob"] < 1))
    assert torch.all(out["prob"][:, 1] <= out["prob"][:, 0])  # pCTCVR <= pCTR
    torch.testing.assert_close(out["prob"][:, 1], out["prob"][:, 0] * out["cond_prob"][:, 1])
    loss = model.task_losses(out, batch["labels"]).sum()
    loss.backward()
    experts = [model.experts] if cfg.name == "mmoe" else list(model.experts)
    for block in experts:
        for w in block.weights:  # every layer of every expert of every level
            assert w.grad is not None and torch.all(w.grad.abs().sum(dim=(1, 2)) > 0), "an expert got no gradient"
    gate_params = ([model.gates.weight] if cfg.name == "mmoe"
                   else [g.weight for g in [*model.task_gates, *model.shared_gates]])
    assert len(gate_params) == (1 if cfg.name == "mmoe" else 2 * cfg.num_levels - 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_params)
    used = batch["sparse"][:, 0].unique()
    emb_grad = model.front.weights[model.front.dims.index(8)].grad
    assert torch.all(emb_grad[used].abs().sum(1) > 0)
    gates = next(iter(model.last_gates.values()))
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_masked_loss_ignores_rows_without_parent(spec):
    model = build_model(spec, ModelConfig(name="mmoe", dependent_loss="masked"))
    batch = make_batch(spec)
    out = model(batch)
    labels = batch["labels"].clone()
    row = int((labels[:, 0] == 0).nonzero()[0])
    a = model.task_losses(out, labels)
    labels[row, 1] = 1.0  # a (bad) conversion label on a non-clicked row: outside the masked loss
    b = model.task_losses(out, labels)
    assert a[1] == b[1]
    model.cfg = ModelConfig(name="mmoe", dependent_loss="esmm")
    c = model.task_losses(out, batch["labels"])
    d = model.task_losses(out, labels)
    assert c[1] != d[1]  # the ESMM loss is over all exposures
    # the ESMM loss is the BCE of the chained probability
    ref = F.binary_cross_entropy(out["prob"][:, 1], batch["labels"][:, 1])
    torch.testing.assert_close(c[1], ref, rtol=1e-4, atol=1e-5)


def test_multitask_loss_function(spec):
    torch.manual_seed(0)
    batch = make_batch(spec)
    labels = batch["labels"].clone()
    row = int((labels[:, 0] == 0).nonzero()[0])
    flipped = labels.clone()
    flipped[row, 1] = 1.0  # a conversion label on a non-clicked row
    weights = torch.tensor([1.0, 0.5])
    for mode in ("esmm", "masked"):
        cfg = ModelConfig(name="mmoe", dependent_loss=mode)
        model = build_model(spec, cfg)
        out = model(batch)
        total, per_task = multitask_loss(out, labels, spec, cfg, weights)
        torch.testing.assert_close(per_task, model.task_losses(out, labels))
        torch.testing.assert_close(total, per_task[0] + 0.5 * per_task[1])
        torch.testing.assert_close(per_task[0], F.binary_cross_entropy_with_logits(out["logits"][:, 0], labels[:, 0]))
        _, moved = multitask_loss(out, flipped, spec, cfg, weights)
        if mode == "esmm":  # BCE of the chained probability over every exposure
            ref = F.binary_cross_entropy(out["prob"][:, 1].clamp(1e-7, 1 - 1e-7), labels[:, 1])
            torch.testing.assert_close(per_task[1], ref, rtol=1e-4, atol=1e-5)
            assert moved[1] != per_task[1]
        else:  # BCE of the convert head on clicked rows only
            clicked = labels[:, 0] == 1
            ref = F.binary_cross_entropy_with_logits(out["logits"][clicked, 1], labels[clicked, 1])
            torch.testing.assert_close(per_task[1], ref)
            assert moved[1] == per_task[1]
    # no clicked row: the masked loss is 0 yet still reaches the convert head
    none_clicked = torch.zeros_like(labels)
    total, per_task = multitask_loss(out, none_clicked, spec, cfg, weights)
    assert per_task[1] == 0 and per_task[1].requires_grad
    total.backward()


def test_small_layers():
    x = torch.randn(6, 10)
    mlp = MLP(10, [16, 8], dropout=0.1, out_dim=3)
    assert mlp.out_dim == 3 and mlp(x).shape == (6, 3)
    assert MLP(10, [16, 8]).out_dim == 8 and MLP(10, []).out_dim == 10
    gate = Gate(10, 4)
    g = gate(x)
    assert g.shape == (6, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(6))
    assert Gate(10, 4, num_gates=3)(x).shape == (6, 3, 4)
    assert Gate(10, 4, num_gates=3)(torch.randn(6, 3, 10)).shape == (6, 3, 4)
    assert Tower(10, [8])(x).shape == (6,)


def test_training_steps_reduce_loss(spec):
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="ple", expert_hidden=[16], tower_hidden=[8]))
    batch = make_batch(spec, n=256)
    batch["labels"][:, 0] = (batch["sparse"][:, 2] % 2 == 0).float()  # learnable from the hour id
    batch["labels"][:, 1] *= batch["labels"][:, 0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    click_losses = []
    for _ in range(80):
        per_task = model.task_losses(model(batch), batch["labels"])
        loss = per_task.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        click_losses.append(per_task[0].item())
    assert click_losses[-1] < 0.3 * click_losses[0]


def test_sparse_embedding_grads_match_dense_and_move_only_looked_up_rows(spec):
    """On CPU, weights with more rows than a batch looks up get sparse gradients (equal to the dense ones)
    and lazy Adam, which leaves the rows a batch did not look up as they were; on GPU all stay dense."""
    cfg = TrainConfig(batch_size=5, lr=1e-2)  # dims [4, 8]: 25 rows vs 5 x 6 ids (dense), 80 vs 5 x 12 (sparse)
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="ple", expert_hidden=[16], tower_hidden=[8]))
    dense_model = copy.deepcopy(model)
    optimizers = build_optimizers(model, cfg, torch.device("cpu"))
    assert [t.sparse for t in model.front.stacked] == [False, True]
    assert [type(o) for o in optimizers] == [torch.optim.Adam, torch.optim.SparseAdam]
    assert len(build_optimizers(copy.deepcopy(dense_model), cfg, torch.device("cuda"))) == 1

    batch = make_batch(spec, n=5)
    for m in (model, dense_model):
        m.task_losses(m(batch), batch["labels"]).sum().backward()
    table, dense_table = model.front.weights[1], dense_model.front.weights[1]
    assert table.grad.is_sparse and not dense_table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), dense_table.grad)
    torch.testing.assert_close(model.front.weights[0].grad, dense_model.front.weights[0].grad)

    before = table.detach().clone()
    for o in optimizers:
        o.step()
    moved = (table.detach() != before).any(dim=1)
    looked_up = dense_table.grad.abs().sum(dim=1) > 0
    assert moved.any() and (moved == looked_up).all()


def test_compiled_task_logits_match_eager(spec):
    """train.compile: the experts, gates and towers compiled (dynamic shapes) compute what eager mode does, for
    a training batch and a smaller one, with gradients into the sparse-gradient embedding tables intact."""
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="ple", expert_hidden=[16], tower_hidden=[8]))
    model.front.use_sparse_grads(4)
    compiled = copy.deepcopy(model)
    compiled.task_logits = torch.compile(compiled.task_logits, dynamic=True)
    for n in (64, 24):
        batch = make_batch(spec, n=n)
        outs = [m(batch)["prob"] for m in (model, compiled)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        for out in outs:
            out.sum().backward()
        torch.testing.assert_close(compiled.front.weights[1].grad.to_dense(), model.front.weights[1].grad.to_dense(),
                                   rtol=1e-4, atol=1e-6)
        model.zero_grad(), compiled.zero_grad()


def test_unknown_model_and_bad_task_order(spec):
    with pytest.raises(ValueError, match="unknown model 'xyz'"):
        build_model(spec, ModelConfig(name="xyz"))
    bad = from_dict(DatasetSpec, {**SPEC, "tasks": [{"name": "convert", "depends_on": "click"}, {"name": "click"}]})
    with pytest.raises(ValueError, match="listed before"):
        build_model(bad, ModelConfig())


def test_ple_routing_equals_a_loop_over_tasks_and_experts(spec):
    """PLE's fixed routing matrices compute what the paper's per-task loops compute: task t's gate mixes
    its own experts then the shared ones; the shared gate mixes all experts (every level but the last)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="ple", num_levels=2, num_shared_experts=2, num_task_experts=1, expert_hidden=[16, 8])
    model = build_model(spec, cfg)
    batch = make_batch(spec)
    x = model.front(batch["sparse"], batch["seq"], batch["dense"])
    S, K, T = 2, 1, 2

    def expert(level, e, inp):  # expert e of a level alone, from the batched weights
        for w, b in zip(model.experts[level].weights, model.experts[level].biases):
            inp = F.relu(inp @ w[e] + b[e])
        return inp

    shared, tasks = x, [x] * T
    for level in range(cfg.num_levels):
        outs = [expert(level, e, shared if e < S else tasks[(e - S) // K]) for e in range(S + T * K)]
        gate = model.task_gates[level]
        new_tasks = []
        for t in range(T):
            g = torch.softmax(tasks[t] @ gate.weight[:, t] + gate.bias[t], dim=-1)
            mine = [outs[e] for e in range(S + t * K, S + (t + 1) * K)] + outs[:S]
            new_tasks.append(sum(g[:, i:i + 1] * o for i, o in enumerate(mine)))
        if level < cfg.num_levels - 1:
            sg = model.shared_gates[level]
            g = torch.softmax(shared @ sg.weight[:, 0] + sg.bias[0], dim=-1)
            shared = sum(g[:, e:e + 1] * o for e, o in enumerate(outs))
        tasks = new_tasks
    expected = torch.stack([tower(tasks[t]) for t, tower in enumerate(model.towers)], dim=1)
    torch.testing.assert_close(model.task_logits(x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_keeps_heads_and_parameters_fp32(spec):
    from pipeline.train import mixed_precision, uses_bf16

    assert uses_bf16("bf16", torch.device("cpu")) and not uses_bf16("fp32", torch.device("cpu"))
    for name in ("ple", "mmoe", "esmm", "aitm"):
        model = build_model(spec, ModelConfig(name=name))
        batch = make_batch(spec, n=256)
        with mixed_precision("bf16", torch.device("cpu")):
            out = model(batch)
            loss = model.task_losses(out, batch["labels"]).sum() + model.regularizer(out, batch["labels"])
        loss.backward()
        # bf16 probabilities (~3 significant digits) would tie predictions and coarsen AUC
        assert out["logits"].dtype == out["prob"].dtype == torch.float32, name
        assert out["prob"][:, 0].unique().numel() > 250, name
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters()), name


@pytest.mark.parametrize("model_name, dependent_loss, weighting", [
    ("ple", "esmm", "fixed"), ("mmoe", "masked", "fixed"), ("ple", "esmm", "uncertainty"), ("aitm", "esmm", "decay")])
def test_a_step_split_across_threads_trains_as_the_whole_batch(spec, model_name, dependent_loss, weighting):
    """BatchStep with 2 or 3 threads (uneven row ranges, sparse tables, masked losses, a regulariser, learned
    weights) gives the gradients and losses of the whole batch in one thread, and after three optimiser steps
    (fused Adam reads a gradient as flat memory: its layout must be its parameter's) the same weights."""
    cfg = TrainConfig(batch_size=1, loss_weighting=weighting, loss_weight_decay={"convert": 0.5}, precision="fp32")
    results = {}
    for threads in (1, 2, 3):
        torch.manual_seed(0)
        model = build_model(spec, ModelConfig(name=model_name, num_experts=3, dependent_loss=dependent_loss))
        weighting_ = LossWeighting(spec.task_names, cfg)
        weighting_.set_epoch(1)
        with torch.no_grad():
            weighting_.log_var.copy_(torch.tensor([0.3, -0.2]))
        extra = [weighting_.log_var] if weighting == "uncertainty" else []
        optimizers = build_optimizers(model, cfg, torch.device("cpu"), extra)
        assert isinstance(optimizers[-1], torch.optim.SparseAdam)  # batch_size 1: the tables take sparse gradients
        step = BatchStep(model, weighting_, optimizers, contextlib.nullcontext, threads)
        steps = []
        for seed in range(3):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss, per_task = step(make_batch(spec, n=101, seed=seed))
            steps.append((loss, per_task, [p.grad.to_dense() for o in optimizers for p in o.param_groups[0]["params"]]))
            for optimizer in optimizers:
                optimizer.step()
        step.close()
        results[threads] = steps, [p.detach().clone() for p in [*model.parameters(), *extra]]
    whole_steps, whole_weights = results[1]
    assert all(g.abs().sum() > 0 for g in whole_steps[0][2][:3])
    for threads in (2, 3):
        steps, weights = results[threads]
        for (loss, per_task, grads), (loss_w, per_task_w, grads_w) in zip(steps, whole_steps, strict=True):
            torch.testing.assert_close(loss, loss_w)
            torch.testing.assert_close(per_task, per_task_w)
            for g, g_whole in zip(grads, grads_w, strict=True):
                torch.testing.assert_close(g, g_whole, rtol=1e-5, atol=1e-6)
        for w, w_whole in zip(weights, whole_weights, strict=True):
            torch.testing.assert_close(w, w_whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_buffers_are_constants_of_the_spec(spec, name):
    """DDP runs without its per-forward buffer sync (``pipeline.train.DDP_OPTIONS``): every model's buffers
    must be constants built from the spec, not state (no running statistics, nothing saved), the same on
    every worker whatever its seed, and untouched by training steps."""
    from pipeline.train import DDP_OPTIONS

    assert DDP_OPTIONS["forward_sync_buffers"] is False
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(spec, ModelConfig(name=name)))
    first, second = ({k: v.clone() for k, v in m.named_buffers()} for m in models)
    assert first.keys() == second.keys()
    assert not set(first) & set(models[0].state_dict()), "a persistent buffer is state: DDP would have to sync it"
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    model = models[0]
    optimizers = build_optimizers(model, TrainConfig(), torch.device("cpu"))
    step = BatchStep(model, LossWeighting(spec.task_names, TrainConfig()), optimizers, contextlib.nullcontext)
    for seed in range(2):
        step(make_batch(spec, seed=seed))
        for optimizer in optimizers:
            optimizer.step()
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, first[key], rtol=0, atol=0)
