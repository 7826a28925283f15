"""Layers and models: the TorchRec front equals a per-feature lookup, batched experts equal separate ones,
shapes, funnel constraint, gradients reach every expert, losses behave as documented."""
from __future__ import annotations

import contextlib
import copy
import socket

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import DatasetSpec, JobConfig, ModelConfig, TrainConfig, from_dict
from pipeline.data import Collate
from pipeline.layers import MLP, EmbeddingFront, Experts, Gate, Tower
from pipeline.models import MODELS, build_model
from pipeline.models.base import multitask_loss
from pipeline.sharding import dense_parameters, gathered_state, shard
from pipeline.step import BatchStep
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


def make_rows(spec, n=64, seed=0) -> pa.Table:
    """Preprocessed rows (``Preprocessor.transform``'s layout): ids, id lists of 0..5 ids (row 0: all empty),
    dense values and funnel labels."""
    g = np.random.default_rng(seed)
    cols = {f.name: pa.array(g.integers(0, spec.tables[f.table_name].num_rows, n).astype(np.int32)) for f in spec.sparse}
    for s in spec.sequences:
        lengths = g.integers(0, 6, n)
        lengths[0] = 0
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = g.integers(1, spec.tables[s.table_name].num_rows, offsets[-1]).astype(np.int32)
        cols[s.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    cols |= {d.name: pa.array(g.normal(size=n).astype(np.float32)) for d in spec.dense}
    click = (g.random(n) < 0.3).astype(np.float32)
    return pa.table(cols | {"click": pa.array(click), "convert": pa.array(click * (g.random(n) < 0.5).astype(np.float32))})


def make_batch(spec, n=64, seed=0):
    return Collate(spec)(make_rows(spec, n, seed))


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, as a lone Ray Train worker has, for the sharded model; destroyed after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def table_weight(front, name):
    """An unsharded front's weight of one table."""
    if front.bags is not None and name in front.bags.embedding_bags:
        return front.bags.embedding_bags[name].weight
    return next(m.embeddings[name].weight for m in front.seqs if name in m.embeddings)


def test_front_equals_a_per_feature_lookup(spec):
    front = EmbeddingFront(spec)
    rows = make_rows(spec)
    batch = Collate(spec)(rows)
    out = front(batch["ids"], batch["dense"])
    assert out.shape == (64, front.out_dim) and front.out_dim == 8 + 8 + 4 + 8 + 4 + 8 + 2
    expected = {}
    for f in spec.sparse:
        expected[f.name] = table_weight(front, f.table_name)[torch.from_numpy(rows[f.name].to_numpy().astype(np.int64))]
    for s in spec.sequences:
        weight, lists = table_weight(front, s.table_name), rows[s.name].to_pylist()
        pooled = []
        for ids in lists:
            emb = weight[torch.tensor(ids, dtype=torch.long)] if ids else weight.new_zeros(1, weight.shape[1])
            pooled.append({"mean": emb.mean(0), "sum": emb.sum(0), "max": emb.max(0).values}[s.pooling] if ids else emb[0])
        expected[s.name] = torch.stack(pooled)
    # the pooled tables' features in table order, then the un-pooled (max-pooled) ones, then dense
    ref = torch.cat([expected[k] for k in spec.id_keys] + [batch["dense"]], 1)
    assert spec.id_keys == ["user", "hist_user", "item_category", "hist_category", "hour", "hist_hour"]
    torch.testing.assert_close(out, ref)
    assert torch.all(out[0, 8:16] == 0) and torch.all(out[0, 24:32] == 0)  # empty id lists pool to zeros


def test_shared_table_is_stored_once(spec):
    front = EmbeddingFront(spec)
    assert sum(p.numel() for p in front.parameters()) == (30 + 50) * 8 + 25 * 4


def test_padding_rows_are_empty_and_counted(spec):
    rows = make_rows(spec, n=10)
    batch = Collate(spec, pad_to=16)(rows)
    assert batch["rows"] == 10 and batch["rows_read"] == 10 and batch["labels"].shape == (16, 2)
    assert batch["ids"].stride() == 16 and all(jt.lengths()[10:].sum() == 0 for jt in batch["ids"].to_dict().values())
    assert torch.all(batch["dense"][10:] == 0)
    empty = Collate(spec, pad_to=16).empty()
    assert empty["rows"] == 0 and empty["ids"].values().numel() == 0 and empty["ids"].stride() == 16


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
    used = batch["ids"]["user"].values().unique()
    emb_grad = table_weight(model.front, "user").grad
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
    batch["labels"][:, 0] = (batch["ids"]["hour"].values() % 2 == 0).float()  # learnable from the hour id
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


def test_compiled_task_logits_match_eager(spec):
    """train.compile: the experts, gates and towers compiled (dynamic shapes) compute what eager mode does, for
    a training batch and a smaller one, with gradients into the embedding tables intact."""
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="ple", expert_hidden=[16], tower_hidden=[8]))
    compiled = copy.deepcopy(model)
    compiled.task_logits = torch.compile(compiled.task_logits, dynamic=True)
    for n in (64, 24):
        batch = make_batch(spec, n=n)
        outs = [m(batch)["prob"] for m in (model, compiled)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        for out in outs:
            out.sum().backward()
        torch.testing.assert_close(table_weight(compiled.front, "category").grad, table_weight(model.front, "category").grad,
                                   rtol=1e-4, atol=1e-6)
        model.zero_grad(), compiled.zero_grad()


def test_unknown_model_and_bad_task_order(spec):
    with pytest.raises(ValueError, match=r"model.name: must be one of single_task\|.*got 'xyz'"):
        from_dict(JobConfig, {"model": {"name": "xyz"}})
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
    x = model.front(batch["ids"], batch["dense"])
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
    from pipeline.step import mixed_precision, uses_bf16

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
        assert out["prob"][:, 0].unique().numel() > 200, name  # bf16 near 0.5 would give a handful of values
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters()), name


@pytest.mark.parametrize("model_name, dependent_loss, weighting", [
    ("ple", "esmm", "fixed"), ("mmoe", "masked", "fixed"), ("ple", "esmm", "uncertainty"), ("aitm", "esmm", "decay")])
def test_a_step_split_across_threads_trains_as_the_whole_batch(spec, one_rank_group, model_name, dependent_loss,
                                                                weighting):
    """BatchStep with 2 or 3 threads (uneven row ranges, padding rows, masked losses, a regulariser, learned
    weights) gives the losses and dense gradients of the whole batch in one thread, and after three steps
    (the tables' fused update inside the backward, fused Adam for the rest: it reads a gradient as flat
    memory, so its layout must be its parameter's) the same weights, tables included."""
    cfg = TrainConfig(loss_weighting=weighting, loss_weight_decay={"convert": 0.5}, precision="fp32")
    results = {}
    for threads in (1, 2, 3):
        torch.manual_seed(0)
        model, _ = shard(build_model(spec, ModelConfig(name=model_name, num_experts=3, dependent_loss=dependent_loss),
                                     table_device="meta"), "auto", "rowwise_adagrad", 0.05, torch.device("cpu"))
        weighting_ = LossWeighting(spec.task_names, cfg)
        weighting_.set_epoch(1)
        with torch.no_grad():
            weighting_.log_var.copy_(torch.tensor([0.3, -0.2]))
        extra = [weighting_.log_var] if weighting == "uncertainty" else []
        optimizer = torch.optim.Adam(dense_parameters(model) + extra, lr=cfg.lr, fused=True)
        step = BatchStep(model, weighting_, optimizer, contextlib.nullcontext, threads)
        steps = []
        for seed in range(3):
            batch = Collate(spec, pad_to=128)(make_rows(spec, n=101, seed=seed))
            optimizer.zero_grad(set_to_none=True)
            loss, per_task = step._forward_backward(batch)
            steps.append((loss, per_task, [p.grad.clone() for p in step.params]))
            weighting_.sync_grads()
            optimizer.step()
        step.close()
        results[threads] = steps, gathered_state(model.state_dict()) | {"log_var": weighting_.log_var.detach().clone()}
    whole_steps, whole_weights = results[1]
    assert all(g.abs().sum() > 0 for g in whole_steps[0][2][:3])
    for threads in (2, 3):
        steps, weights = results[threads]
        for (loss, per_task, grads), (loss_w, per_task_w, grads_w) in zip(steps, whole_steps, strict=True):
            torch.testing.assert_close(loss, loss_w)
            torch.testing.assert_close(per_task, per_task_w)
            for g, g_whole in zip(grads, grads_w, strict=True):
                torch.testing.assert_close(g, g_whole, rtol=1e-5, atol=1e-6)
        assert weights.keys() == whole_weights.keys()
        for key in weights:  # Adam divides by the root of a gradient's square: a rounding apart in a tiny gradient
            torch.testing.assert_close(weights[key], whole_weights[key], rtol=1e-5, atol=1e-5)  # is ~1e-6 in a weight


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_have_no_state_in_buffers(spec, name):
    """DDP runs without its buffer sync (TorchRec's data-parallel wrapper: ``broadcast_buffers=False``):
    every model's buffers must be constants built from the spec, not state (no running statistics, nothing
    saved), the same on every worker whatever its seed, and untouched by training steps."""
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
    optimizer = torch.optim.Adam(model.parameters())
    step = BatchStep(model, LossWeighting(spec.task_names, TrainConfig()), optimizer, contextlib.nullcontext)
    for seed in range(2):
        step(make_batch(spec, seed=seed))
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, first[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"metaheac"}))
def test_per_task_tower_sizes_are_used_by_every_model(spec, name):
    """``model.towers`` sizes one task's tower (ESMM's CTR/CVR towers, AITM's per-step networks): the task's
    tower has the layer asked for, the other task keeps the default, and the model still trains. (MetaHeac's
    critics are shared by the tasks: it refuses ``model.towers``, tests/test_sequence.py.)"""
    def widths(model):
        return {m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)}

    torch.manual_seed(0)
    default = build_model(spec, ModelConfig(name=name))
    sized = build_model(spec, ModelConfig(name=name, towers={"convert": [13, 7]}))
    assert {13, 7} <= widths(sized) and not {13, 7} & widths(default)
    out = sized(make_batch(spec))
    assert out["prob"].shape == (64, 2)
    out["prob"].sum().backward()


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_funnel_models_on_a_spec_without_a_funnel_are_warned_about(spec, name):
    from pipeline.models import warn_without_funnel

    flat = from_dict(DatasetSpec, {**SPEC, "tasks": [{"name": "click"}, {"name": "convert"}]})
    with pytest.warns(UserWarning, match=rf"model '{name}' needs a funnel: a task with depends_on .* spec 't' \(click, convert\)"):
        warn_without_funnel(flat, ModelConfig(name=name))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_without_funnel(spec, ModelConfig(name=name))  # the funnel spec: nothing to say
        warn_without_funnel(flat, ModelConfig(name="ple"))  # a model that needs none
