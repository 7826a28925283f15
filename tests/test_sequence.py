"""The sequence layers and models (target attention, packed LSTM, attention pooling; dupn, mose, metaheac),
MetaHeac's meta step checked against a hand-computed one and under DDP, the generator's sequence effect,
their export, and (slow) every new model trained by 2 Ray Train workers on a log where sequences matter."""
from __future__ import annotations

import copy
import json
import socket

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.config import ConfigError, DatasetSpec, ModelConfig, from_dict
from pipeline.data import Collate
from pipeline.export import ExportedHeads, export_program
from pipeline.models import build_model, model_spec
from pipeline.models.metaheac import adapted_logits
from pipeline.sequence import AttentionPooling, RecurrentEncoder, TargetAttention, padded, recency

SPEC = {
    "name": "seq",
    "sparse": [{"name": "user", "vocab_size": 30, "dim": 8},
               {"name": "item_category", "vocab_size": 20, "dim": 8, "table": "category"},
               {"name": "hour", "vocab_size": 25, "dim": 4}],
    "sequences": [{"name": "hist_category", "table": "category", "max_len": 6, "pooling": "mean"}],
    "dense": [{"name": "a"}],
    "tasks": [{"name": "click"}, {"name": "convert", "depends_on": "click"}],
}
SMALL = dict(expert_hidden=[16], tower_hidden=[8], num_experts=3, sequence_hidden=8, attention_hidden=[8])


def spec_with(**sequence) -> DatasetSpec:
    raw = copy.deepcopy(SPEC)
    raw["sequences"][0] |= sequence
    return from_dict(DatasetSpec, raw)


def make_rows(spec: DatasetSpec, n=48, seed=0) -> pa.Table:
    """Preprocessed rows: ids, sequences of 0..6 ids (rows 0 and 1 empty), dense, funnel labels."""
    g = np.random.default_rng(seed)
    cols = {f.name: pa.array(g.integers(0, spec.tables[f.table_name].num_rows, n).astype(np.int32)) for f in spec.sparse}
    for s in spec.sequences:
        lengths = g.integers(0, s.max_len + 1, n)
        lengths[:2] = 0
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        cols[s.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(g.integers(1, 20, offsets[-1]).astype(np.int32)))
    cols |= {d.name: pa.array(g.normal(size=n).astype(np.float32)) for d in spec.dense}
    click = (g.random(n) < 0.4).astype(np.float32)
    return pa.table(cols | {"click": pa.array(click), "convert": pa.array(click * (g.random(n) < 0.5).astype(np.float32))})


def batch_of(spec, n=48, seed=0):
    return Collate(spec)(make_rows(spec, n, seed))


# ----------------------------------------------------------------------------- layers


def test_padded_lays_out_jagged_rows_and_their_recency():
    values = torch.arange(12.0).view(6, 2)  # rows of 3, 0, 2 and 1 ids
    seq, mask = padded(values, torch.tensor([3, 0, 2, 1]), 4)
    assert seq.shape == (4, 4, 2)
    torch.testing.assert_close(seq[0, :3], values[:3])
    torch.testing.assert_close(seq[2, :2], values[3:5])
    torch.testing.assert_close(seq[3, :1], values[5:])
    assert mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert float(seq[~mask].abs().sum()) == 0.0
    assert recency(mask).tolist() == [[2, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def _jagged(g, lengths, dim=4):
    return torch.randn(int(sum(lengths)), dim, generator=g), torch.tensor(lengths)


@pytest.mark.parametrize("layer", ["target_attention", "lstm", "gru", "attention_pooling"])
def test_padding_and_empty_sequences_contribute_nothing(layer):
    """A row's encoding is the same whatever the padding holds and however long the layout is; an empty row
    encodes to zeros."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    values, lengths = _jagged(g, [3, 0, 5, 1])
    query = torch.randn(4, 4, generator=g)
    module = {"target_attention": lambda: TargetAttention(4, [8], 8), "lstm": lambda: RecurrentEncoder(4, 6),
              "gru": lambda: RecurrentEncoder(4, 6, cell="gru"), "attention_pooling": lambda: AttentionPooling(4, 4, [8])}[layer]()

    def encode(seq, mask):
        if layer in ("target_attention", "attention_pooling"):  # the layers with a query
            return module(seq, mask, query)
        return module(seq, mask)[1]

    seq, mask = padded(values, lengths, 5)
    out = encode(seq, mask)
    longer, long_mask = padded(values, lengths, 8)
    garbage = torch.where(long_mask[:, :, None], longer, torch.randn(longer.shape, generator=g) * 100)
    torch.testing.assert_close(encode(garbage, long_mask), out, rtol=1e-5, atol=1e-6)
    assert float(out[1].detach().abs().sum()) == 0.0
    assert float(out[0].detach().abs().sum()) > 0


def test_packed_lstm_equals_its_padded_path_the_one_export_takes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    values, lengths = _jagged(g, [2, 6, 0, 4, 1])
    seq, mask = padded(values, lengths, 6)
    rnn = RecurrentEncoder(4, 5)
    states, last = rnn(seq, mask)
    padded_states, padded_last = rnn.padded_forward(seq, mask)
    torch.testing.assert_close(states, padded_states, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last, padded_last, rtol=1e-5, atol=1e-6)
    # the last state is the one at each row's last real step
    torch.testing.assert_close(last[3], states[3, 3])


# ----------------------------------------------------------------------------- spec


def test_target_attention_takes_the_feature_sharing_its_table_as_query_and_unpools_the_table():
    spec = spec_with(encoder="target_attention")
    assert spec.feature("hist_category").query == "item_category"
    assert spec.tables["category"].pooling is None and spec.unpooled_keys == ["item_category", "hist_category"]
    assert spec_with().tables["category"].pooling == "mean"  # pooled as before


def test_sequence_encoder_and_query_errors_name_the_feature():
    with pytest.raises(ConfigError, match="query 'nope' is not a single-id feature"):
        spec_with(encoder="target_attention", query="nope")
    with pytest.raises(ConfigError, match="query 'hour' has dim 4, the sequence 8"):
        spec_with(encoder="target_attention", query="hour")
    raw = copy.deepcopy(SPEC)
    raw["sparse"] = [f for f in raw["sparse"] if f["name"] != "item_category"]
    raw["sequences"][0] = {"name": "hist_category", "vocab_size": 20, "dim": 8, "encoder": "target_attention"}
    with pytest.raises(ConfigError, match="'hist_category' \\(encoder: target_attention\\) needs a query"):
        from_dict(DatasetSpec, raw)
    with pytest.raises(ConfigError, match="encoder: must be one of pool\\|target_attention\\|lstm"):
        spec_with(encoder="gru")
    flat = from_dict(DatasetSpec, {**SPEC, "sequences": []})
    with pytest.raises(ConfigError, match="model 'dupn' reads behaviour sequences; spec 'seq' has none"):
        build_model(flat, ModelConfig(name="dupn"))
    with pytest.raises(ConfigError, match="meta_support"):
        ModelConfig(name="metaheac", meta_support=1.0)


# ----------------------------------------------------------------------------- models


def _all_parameters_reached(model, out, labels):
    (model.task_losses(out, labels).sum() + model.regularizer(out, labels)).backward()
    return [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]


@pytest.mark.parametrize("cfg", [
    ModelConfig(name="mmoe", sequence_encoder="target_attention", **SMALL),
    ModelConfig(name="mmoe", sequence_encoder="lstm", **SMALL),
    ModelConfig(name="ple", sequence_encoder="target_attention", num_levels=1, **SMALL),
    ModelConfig(name="esmm", sequence_encoder="target_attention", **SMALL),
    ModelConfig(name="dupn", **SMALL), ModelConfig(name="mose", **SMALL), ModelConfig(name="metaheac", **SMALL),
], ids=lambda c: f"{c.name}-{c.sequence_encoder or 'own'}")
def test_sequence_models_shapes_gradients_and_funnel(cfg):
    """Shapes; the funnel (pCTCVR <= pCTR); every parameter, each expert, critic, LSTM and attention
    included, gets a gradient."""
    spec = from_dict(DatasetSpec, SPEC)
    torch.manual_seed(0)
    model = build_model(spec, cfg)
    batch = batch_of(model.spec)
    out = model(batch)
    assert out["prob"].shape == (48, 2) and torch.all(out["prob"][:, 1] <= out["prob"][:, 0])
    assert not _all_parameters_reached(model, out, batch["labels"])
    if cfg.name in ("dupn", "mose"):  # the model reads the sequence itself, in order
        assert model.spec.feature("hist_category").encoder == "lstm" and not model.front.encoders
    elif cfg.name == "mmoe":
        assert list(model.front.encoders) == ["hist_category"]


def test_a_batch_built_from_the_spec_before_model_spec_gives_the_same_outputs():
    spec = from_dict(DatasetSpec, SPEC)
    model = build_model(spec, ModelConfig(name="mmoe", sequence_encoder="target_attention", **SMALL)).eval()
    rows = make_rows(spec)
    torch.testing.assert_close(model(Collate(spec)(rows))["prob"], model(Collate(model.spec)(rows))["prob"])


def test_target_attention_reads_the_candidate_and_the_order():
    """Reordering a history, or changing the candidate, changes the encoding (mean pooling changes with neither)."""
    torch.manual_seed(0)
    layer = TargetAttention(4, [8], 6)
    seq, mask = padded(torch.randn(4, 4), torch.tensor([4]), 6)
    q = torch.randn(1, 4)
    base = layer(seq, mask, q)
    assert not torch.allclose(base, layer(seq, mask, torch.randn(1, 4)))
    assert not torch.allclose(base, layer(seq[:, [3, 2, 1, 0, 4, 5]], mask, q))


def test_metaheac_refuses_per_task_towers_and_predicts_with_theta_in_eval():
    spec = from_dict(DatasetSpec, SPEC)
    with pytest.raises(ConfigError, match="metaheac's critics are shared"):
        build_model(spec, ModelConfig(name="metaheac", towers={"click": [4]}))
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="metaheac", **SMALL))
    batch = batch_of(model.spec)
    plain = model.heads_from(model.front(batch["ids"], batch["dense"]))["prob"]
    meta = model(batch)  # training: rows past the support part are predicted with the adapted theta'
    support = round(48 * 0.5)
    torch.testing.assert_close(meta["prob"][:support], plain[:support])
    assert not torch.allclose(meta["prob"][support:], plain[support:])
    assert meta["query"].tolist() == [False] * support + [True] * (48 - support)
    torch.testing.assert_close(model.eval()(batch)["prob"], plain)


def test_metaheac_meta_step_equals_a_hand_computed_two_step_update():
    """On a tiny head, in float64: the adapted parameters are theta - a * dL_s/dtheta, and the meta-gradient
    (of the query loss at theta') equals its finite differences in theta (the second-order terms included)."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), (torch.rand(10, 2) < 0.5).double()
    lr, s = 0.3, 4
    inner = lambda logits: F.binary_cross_entropy_with_logits(logits, y[:s])  # noqa: E731

    def query_loss(h):
        return F.binary_cross_entropy_with_logits(adapted_logits(h, x, s, inner, lr)[s:], y[s:])

    loss = query_loss(head)
    meta = torch.autograd.grad(loss, list(head.parameters()))
    # by hand: one plain gradient step on the support rows, then the query loss at the stepped weights
    stepped = copy.deepcopy(head)
    grads = torch.autograd.grad(inner(stepped(x[:s])), list(stepped.parameters()))
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads):
            p -= lr * g
    by_hand = F.binary_cross_entropy_with_logits(stepped(x[s:]), y[s:])
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=1e-12)
    eps = 1e-6
    for p, g in zip(head.parameters(), meta):
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
            up = query_loss(head).item()  # (the inner step needs autograd: outside no_grad)
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            down = query_loss(head).item()
            with torch.no_grad():
                p.view(-1)[i] += eps
            assert g.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), abs=1e-7)
    # the second-order term matters: the first-order (no create_graph) gradient differs
    first_order = torch.autograd.grad(F.binary_cross_entropy_with_logits(stepped(x[s:]), y[s:]), list(stepped.parameters()))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(meta, first_order))


def _ddp_meta_worker(rank, port, batches, state, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(from_dict(DatasetSpec, SPEC), ModelConfig(name="metaheac", **SMALL))
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = batches[rank]
    loss = model.task_losses(ddp(batch), batch["labels"]).sum()
    loss.backward()
    out[rank] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "front" not in n}
    dist.destroy_process_group()


def test_metaheac_meta_gradient_under_ddp_is_the_mean_of_the_workers_own():
    """Each worker adapts on its own support rows; DDP averages the outer (meta) gradients, and the inner step's
    autograd.grad does not disturb its hooks."""
    spec = from_dict(DatasetSpec, SPEC)
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(name="metaheac", **SMALL))
    batches = [batch_of(model.spec, seed=s) | {"rows": 48} for s in (1, 2)]
    own = []
    for b in batches:
        m = copy.deepcopy(model)
        m.task_losses(m(b), b["labels"]).sum().backward()
        own.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and "front" not in n})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_meta_worker, args=(port, batches, model.state_dict(), out), nprocs=2)
    assert own[0].keys() == out[0].keys() and any(k.startswith("head.critics") for k in own[0])
    for name in own[0]:
        mean = (own[0][name] + own[1][name]) / 2
        torch.testing.assert_close(out[0][name], mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out[1][name], mean, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("cfg", [
    ModelConfig(name="mmoe", sequence_encoder="target_attention", **SMALL),
    ModelConfig(name="mmoe", sequence_encoder="lstm", **SMALL),
    ModelConfig(name="dupn", **SMALL), ModelConfig(name="mose", **SMALL), ModelConfig(name="metaheac", **SMALL),
], ids=lambda c: f"{c.name}-{c.sequence_encoder or 'own'}")
def test_sequence_models_export_and_score_as_eager(cfg):
    """torch.export with every size dynamic: any batch (one row included), empty and full sequences."""
    torch.manual_seed(0)
    model = build_model(from_dict(DatasetSpec, SPEC), cfg).eval()
    program = export_program(model).module()
    wrapped = ExportedHeads(model)
    for n, seed in ((48, 3), (1, 4), (2, 0)):  # seed 0: rows 0 and 1 have empty histories
        batch = batch_of(model.spec, n, seed)
        ids = batch["ids"]
        values = [ids[k].values().long() for k in model.spec.id_keys]
        lengths = [ids[k].lengths().int() for k in model.spec.id_keys]
        with torch.no_grad():
            got, want = program(values, lengths, batch["dense"]), wrapped(values, lengths, batch["dense"])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(want[0], model(batch)["prob"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the generator


def test_the_generators_sequence_effect_is_recent_target_matching_and_per_task():
    """logit(effect e) - logit(effect 0) is, per row, e * sum over history entries in the candidate's
    category of 0.6^age (click) and 0.5 * 0.9^age (conversion); the rest of the draw is unchanged."""
    from pipeline.synthetic import SyntheticConfig, _World

    base = dict(rows={"train": 10}, num_users=2000, num_items=3000, num_categories=20)
    none, strong = _World(SyntheticConfig(**base)), _World(SyntheticConfig(**base, sequence_effect=1.5))
    logits = [w.draw(np.random.default_rng(7), 3000, with_labels=False) for w in (none, strong)]
    rows = strong.draw(np.random.default_rng(7), 3000)
    want = {"click": np.zeros(3000), "cvr": np.zeros(3000)}
    for i, (hist, category) in enumerate(zip(rows["hist_category"].to_pylist(), rows["item_category"])):
        for age, h in enumerate(reversed(hist)):
            if h == category:
                want["click"][i] += 1.5 * 0.6 ** age
                want["cvr"][i] += 1.5 * 0.5 * 0.9 ** age
    assert want["click"].max() > 1.0  # the draw has matching histories
    for task in ("click", "cvr"):
        np.testing.assert_allclose(logits[1][f"logit_{task}"] - logits[0][f"logit_{task}"], want[task], rtol=1e-5, atol=1e-5)
    # effect 0 draws what the generator drew before the knob: same rows, same labels
    plain = none.draw(np.random.default_rng(7), 3000)
    assert plain["hist_category"].equals(rows["hist_category"]) and (plain["user_id"] == rows["user_id"]).all()


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def sequence_log(tmp_path_factory):
    from pipeline.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("seqdata") / "synthetic"
    return generate(out, SyntheticConfig(rows={"train": 40_000, "valid": 5_000, "test": 5_000}, rows_per_file=20_000, row_group_rows=2_500,
                                         num_users=3_000, num_items=5_000, seed=5, sequence_effect=2.0))


@pytest.mark.slow
@pytest.mark.parametrize("model", [dict(name="dupn"), dict(name="mose"), dict(name="metaheac"),
                                   dict(name="ple", sequence_encoder="target_attention")], ids=lambda m: m["name"])
def test_sequence_models_train_with_two_workers(ray_local, sequence_log, tmp_path, model):
    """Every new model trains with 2 Ray Train workers (sharded tables, DDP) on the sequence log and learns;
    no worker restarts; DUPN's export scores the test split as the training code does."""
    from pipeline.config import DataPaths, JobConfig, TrainConfig
    from pipeline.job import run
    from pipeline.synthetic import SPEC_PATH

    metrics = run(JobConfig(
        data=DataPaths(path=str(sequence_log), spec=str(SPEC_PATH)),
        model=ModelConfig(**model, expert_hidden=[32], tower_hidden=[16], sequence_hidden=16, attention_hidden=[16]),
        train=TrainConfig(epochs=2, batch_size=512, lr=3e-3, num_workers=2, patience=5, precision="fp32"),
        name=model["name"], storage_path=str(tmp_path / "results"), output=str(tmp_path / "out")))
    for task in ("click", "convert"):
        assert metrics["test"][task]["auc"] > 0.6, (task, metrics["test"][task])
    assert [h["train/rows_trained"] for h in metrics["history"]] == [40_000, 40_000]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["restarts"]["count"] == 0 and metrics["resumes"] == 0
    if model["name"] == "dupn":
        import subprocess
        import sys
        from pathlib import Path

        import pyarrow.parquet as pq
        from sklearn.metrics import roc_auc_score

        from pipeline.serving import Scorer

        root = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, str(root / "jobs" / "export.py"), "--run", str(tmp_path / "out"), "--out",
                        str(tmp_path / "export"), "--no-aoti"], check=True)
        raw = pa.concat_tables(pq.read_table(f) for f in sorted((sequence_log / "test").glob("*.parquet")))
        scored = Scorer.load(tmp_path / "export").score(raw)
        assert scored.num_rows == raw.num_rows
        auc = roc_auc_score(raw["click"].to_numpy(), scored["p_click"].to_numpy())
        assert auc == pytest.approx(metrics["test"]["click"]["auc"], abs=1e-5)
