"""Synthetic impression logs with a hidden ground-truth model, so every task has a known oracle AUC.

One row per exposure. Users and items are Zipf-distributed; an item carries category/brand/shop, a user
carries age/gender/city and a behaviour sequence of categories drawn around the user's taste; the
context is hour, device and position. Labels come from a hidden model over the full exposure space:

    click   ~ Bernoulli(p_click)
    convert ~ Bernoulli(p_cvr) if click else 0        p_convert = p_click * p_cvr

Each task's logit follows the MMoE paper's synthetic recipe on a shared latent input x (per-value latent
vectors of every feature, plus the dense features): ``w_t . x + sum_i sin(a_i w_t . x + b_i)``, where the
click and conversion weight vectors have cosine ``task_correlation`` (1.0 = the same objective, 0.0 =
unrelated). With ``sequence_effect`` the history's entries in the candidate's category add to both
logits, the recent ones more, with another decay and weight per task. The true probabilities are written to ``p_click`` / ``p_convert`` (and ``p_cvr``), which are
never features: AUC(label, p) is the Bayes ceiling of a task on any split.

Generation is chunked (bounded memory) and deterministic by seed: chunk k of a split is drawn from
``SeedSequence([seed, split, k])`` (plus the day, past day 0); the world (latent tables, item/user attributes)
from ``seed`` alone, and a drifting log's day d (``day``) from it and the d days of drift drawn from
``SeedSequence([seed, 7919, day])``: new users and items, shifted popularity, a little drift of the truth.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = ("train", "valid", "test")
SPEC_PATH = Path(__file__).parent / "specs" / "synthetic.yaml"


@dataclass
class SyntheticConfig:
    rows: dict[str, int] = None  # split -> number of rows
    num_users: int = 100_000
    num_items: int = 200_000
    num_categories: int = 400
    num_brands: int = 2_000
    num_shops: int = 5_000
    zipf_a: float = 1.1  # popularity skew of users and items
    max_seq_len: int = 20
    latent_dim: int = 8
    task_correlation: float = 0.8  # cosine between the click and conversion weight vectors
    nonlinearity: int = 3  # number of sin terms per task (MMoE paper: 10; 0 = linear in x)
    ctr_scale: float = 0.8  # logit scale (score standardised): sets the oracle CTR AUC
    cvr_scale: float = 0.8
    target_ctr: float = 0.08
    target_cvr: float = 0.12  # among clicks
    rows_per_file: int = 250_000
    row_group_rows: int = 65_536  # Parquet row group size: the unit a split is cut into for parallel reading
    seed: int = 0
    # a drifting log: day d is the world of day 0 with d days of drift applied in order, each drawn from
    # (seed, day): new users and items appear (at random popularity ranks), a share of the popularity ranks
    # is reshuffled, and each task's ground-truth weights move by truth_drift of their norm
    day: int = 0
    new_users_per_day: float = 0.05  # of num_users
    new_items_per_day: float = 0.05  # of num_items
    popularity_shift: float = 0.1  # share of the ranks reshuffled per day
    truth_drift: float = 0.1
    # an order- and target-dependent effect of the behaviour sequence on the truth: each history entry in the
    # candidate's category adds to the click logit sequence_effect * 0.6^age (age 0: the most recent entry),
    # and to the conversion logit sequence_effect * 0.5 * 0.9^age (a weaker, longer memory); 0: none
    sequence_effect: float = 0.0

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = {"train": 1_000_000, "valid": 100_000, "test": 100_000}
        if not -1.0 <= self.task_correlation <= 1.0:
            raise ValueError(f"task_correlation must be in [-1, 1], got {self.task_correlation}")


# Feature groups of the hidden model and the weight of each group's latent vector in x. Side features
# carry most of the signal; raw user/item ids carry a little (learnable for head ids only), so a model
# that learns the embeddings can get close to the oracle.
_GROUP_SCALE = {
    "user_id": 0.25, "item_id": 0.25, "item_category": 0.8, "item_brand": 0.5, "item_shop": 0.4,
    "user_age": 0.6, "user_gender": 0.4, "user_city": 0.5, "hour": 0.5, "device": 0.4,
}
_NUM_DENSE = 3  # item_price (log-normal), user_activity, item_quality


class _World:
    """Everything drawn once per seed: attribute maps, latent tables, task weights, calibration."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7919]))
        d = cfg.latent_dim
        self.sizes = {
            "user_id": cfg.num_users, "item_id": cfg.num_items, "item_category": cfg.num_categories,
            "item_brand": cfg.num_brands, "item_shop": cfg.num_shops, "user_age": 8, "user_gender": 3,
            "user_city": 6, "hour": 24, "device": 4,
        }
        self.latent = {g: (rng.standard_normal((n, d)) * _GROUP_SCALE[g] / np.sqrt(d)).astype(np.float32)
                       for g, n in self.sizes.items()}
        # item attributes: brand and shop nest loosely inside category
        self.item_category = _zipf_choice(rng, cfg.num_categories, cfg.num_items, 1.0)
        self.item_brand = (self.item_category * 7 + rng.integers(0, 50, cfg.num_items)) % cfg.num_brands
        self.item_shop = rng.integers(0, cfg.num_shops, cfg.num_items)
        self.item_price = np.exp(rng.normal(3.0, 1.0, cfg.num_items)).astype(np.float32)
        self.item_quality = rng.normal(0, 1, cfg.num_items).astype(np.float32)
        self.user_age = rng.integers(0, 8, cfg.num_users)
        self.user_gender = rng.integers(0, 3, cfg.num_users)
        self.user_city = rng.integers(0, 6, cfg.num_users)
        self.user_activity = rng.gamma(2.0, 1.0, cfg.num_users).astype(np.float32)
        # each user's taste: 3 favourite categories; the behaviour sequence is drawn mostly from them
        self.user_taste = _zipf_choice(rng, cfg.num_categories, (cfg.num_users, 3), 1.0)
        # ids are shuffled so that popularity is not visible in the id value itself
        self.user_perm = rng.permutation(cfg.num_users)
        self.item_perm = rng.permutation(cfg.num_items)
        # task weight vectors over x = [latents of all groups, dense]: cos(w_click, w_cvr) = correlation
        dim_x = d * len(self.sizes) + _NUM_DENSE
        u1 = _unit(rng.standard_normal(dim_x))
        u2 = rng.standard_normal(dim_x)
        u2 = _unit(u2 - (u2 @ u1) * u1)  # orthogonal to u1
        rho = cfg.task_correlation
        self.w = {"click": u1 * np.sqrt(dim_x), "cvr": (rho * u1 + np.sqrt(1 - rho**2) * u2) * np.sqrt(dim_x)}
        self.sin_a = rng.normal(0, 1, cfg.nonlinearity).astype(np.float32)
        self.sin_b = rng.normal(0, 1, cfg.nonlinearity).astype(np.float32)
        self.position_bias = -0.12 * np.arange(20, dtype=np.float32)  # position 0 is the top slot
        self.taste_bonus = 0.6  # the target item's category is among the user's favourites
        self.bias = {"click": 0.0, "cvr": 0.0}
        self.z_std = {"click": 1.0, "cvr": 1.0}
        self.user_rank, self.item_rank = np.arange(cfg.num_users), np.arange(cfg.num_items)  # popularity rank -> entity
        for day in range(1, cfg.day + 1):  # their own streams: day 0 is the same world whatever the day
            self._drift(np.random.default_rng(np.random.SeedSequence([cfg.seed, 7919, day])))
        self._calibrate(rng)  # calibrated on the day's world: the same target rates every day

    def _drift(self, rng: np.random.Generator) -> None:
        """One day of drift: new users and items, shifted popularity, ground truth moved a little."""
        cfg, d = self.cfg, self.cfg.latent_dim
        new_users, new_items = round(cfg.new_users_per_day * cfg.num_users), round(cfg.new_items_per_day * cfg.num_items)
        for group, n in (("user_id", new_users), ("item_id", new_items)):
            self.latent[group] = np.concatenate([self.latent[group], (rng.standard_normal((n, d)) * _GROUP_SCALE[group]
                                                                      / np.sqrt(d)).astype(np.float32)])
            self.sizes[group] += n
        category = _zipf_choice(rng, cfg.num_categories, new_items, 1.0)
        self.item_category = np.concatenate([self.item_category, category])
        self.item_brand = np.concatenate([self.item_brand, (category * 7 + rng.integers(0, 50, new_items)) % cfg.num_brands])
        self.item_shop = np.concatenate([self.item_shop, rng.integers(0, cfg.num_shops, new_items)])
        self.item_price = np.concatenate([self.item_price, np.exp(rng.normal(3.0, 1.0, new_items)).astype(np.float32)])
        self.item_quality = np.concatenate([self.item_quality, rng.normal(0, 1, new_items).astype(np.float32)])
        self.user_age = np.concatenate([self.user_age, rng.integers(0, 8, new_users)])
        self.user_gender = np.concatenate([self.user_gender, rng.integers(0, 3, new_users)])
        self.user_city = np.concatenate([self.user_city, rng.integers(0, 6, new_users)])
        self.user_activity = np.concatenate([self.user_activity, rng.gamma(2.0, 1.0, new_users).astype(np.float32)])
        self.user_taste = np.concatenate([self.user_taste, _zipf_choice(rng, cfg.num_categories, (new_users, 3), 1.0)])
        # new raw ids follow the old ones, shuffled among themselves
        self.user_perm = np.concatenate([self.user_perm, len(self.user_perm) + rng.permutation(new_users)])
        self.item_perm = np.concatenate([self.item_perm, len(self.item_perm) + rng.permutation(new_items)])
        self.user_rank = _shifted_ranks(rng, self.user_rank, new_users, cfg.popularity_shift)
        self.item_rank = _shifted_ranks(rng, self.item_rank, new_items, cfg.popularity_shift)
        for task, w in self.w.items():
            self.w[task] = w + cfg.truth_drift * np.linalg.norm(w) * _unit(rng.standard_normal(w.shape))

    def _calibrate(self, rng: np.random.Generator) -> None:
        """Standardise each task's score, then set its bias so that the mean rate hits its target
        (bisection on a probe sample); the scale knobs then mean the same thing for every seed."""
        probe_rng = rng.integers(1 << 31)
        probe = self.draw(np.random.default_rng(probe_rng), 100_000, with_labels=False)
        self.z_std = {t: float(probe[f"z_{t}"].std()) for t in ("click", "cvr")}
        probe = self.draw(np.random.default_rng(probe_rng), 100_000, with_labels=False)
        for task, target, weights in (("click", self.cfg.target_ctr, None), ("cvr", self.cfg.target_cvr, "click")):
            lo, hi = -15.0, 5.0
            for _ in range(40):
                mid = (lo + hi) / 2
                p = _sigmoid(probe[f"logit_{task}"] + mid)
                rate = np.average(p, weights=probe["p_click"] if weights else None)
                lo, hi = (mid, hi) if rate < target else (lo, mid)
            self.bias[task] = (lo + hi) / 2
            if task == "click":
                probe["p_click"] = _sigmoid(probe["logit_click"] + self.bias["click"])

    def draw(self, rng: np.random.Generator, n: int, with_labels: bool = True) -> dict[str, np.ndarray]:
        cfg = self.cfg
        users = self.user_rank[_zipf_choice(rng, len(self.user_rank), n, cfg.zipf_a)]
        items = self.item_rank[_zipf_choice(rng, len(self.item_rank), n, cfg.zipf_a)]
        ids = {
            "user_id": users, "item_id": items, "item_category": self.item_category[items],
            "item_brand": self.item_brand[items], "item_shop": self.item_shop[items],
            "user_age": self.user_age[users], "user_gender": self.user_gender[users],
            "user_city": self.user_city[users], "hour": rng.integers(0, 24, n), "device": rng.integers(0, 4, n),
        }
        position = np.minimum(rng.geometric(0.15, n) - 1, 19)
        dense = np.stack([
            np.log(self.item_price[items]) - 3.0, self.user_activity[users] - 2.0, self.item_quality[items],
        ], axis=1).astype(np.float32)
        x = np.concatenate([self.latent[g][ids[g]] for g in self.sizes] + [dense * 0.3], axis=1)

        # behaviour sequence: length ~ U[0, max_len], each entry a favourite category w.p. 0.7, else random
        seq_len = rng.integers(0, cfg.max_seq_len + 1, n)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(seq_len, out=offsets[1:])
        owner = np.repeat(np.arange(n), seq_len)
        favourite = self.user_taste[users[owner], rng.integers(0, 3, owner.size)]
        noise = rng.integers(0, cfg.num_categories, owner.size)
        hist = np.where(rng.random(owner.size) < 0.7, favourite, noise)
        liked = (self.user_taste[users] == ids["item_category"][:, None]).any(axis=1) & (seq_len > 0)
        age = (seq_len[owner] - 1 - (np.arange(owner.size) - offsets[owner])).astype(np.float32)
        match = hist == ids["item_category"][owner]
        sequence = {task: cfg.sequence_effect * scale * np.bincount(owner, match * decay ** age, minlength=n)
                    for task, scale, decay in (("click", 1.0, 0.6), ("cvr", 0.5, 0.9))}

        out = {}
        for task, scale in (("click", cfg.ctr_scale), ("cvr", cfg.cvr_scale)):
            z = x @ self.w[task].astype(np.float32)
            z = z + np.sin(np.outer(z, self.sin_a) + self.sin_b).sum(axis=1)
            out[f"z_{task}"] = z
            logit = scale * z / self.z_std[task] + self.taste_bonus * liked + sequence[task]
            if task == "click":
                logit = logit + self.position_bias[position]
            out[f"logit_{task}"] = logit
        p_click = _sigmoid(out["logit_click"] + self.bias["click"])
        out["p_click"] = p_click
        if not with_labels:
            return out
        p_cvr = _sigmoid(out["logit_cvr"] + self.bias["cvr"])
        click = rng.random(n) < p_click
        convert = click & (rng.random(n) < p_cvr)
        cols = {
            "user_id": self.user_perm[users].astype(np.int64),
            "item_id": self.item_perm[items].astype(np.int64),
            **{g: ids[g].astype(np.int64) for g in ("item_category", "item_brand", "item_shop", "user_age",
                                                     "user_gender", "user_city", "hour", "device")},
            "position": position.astype(np.int64),
            "item_price": self.item_price[items],
            "user_activity": self.user_activity[users],
            "item_quality": self.item_quality[items],
            "hist_category": pa.ListArray.from_arrays(offsets, hist.astype(np.int64)),
            "click": click.astype(np.int64),
            "convert": convert.astype(np.int64),
            "p_click": p_click.astype(np.float32),
            "p_cvr": p_cvr.astype(np.float32),
            "p_convert": (p_click * p_cvr).astype(np.float32),
        }
        return cols


def generate(out_dir: str | Path, cfg: SyntheticConfig, workers: int = 2) -> Path:
    """Write ``out_dir/{train,valid,test}/part-*.parquet`` plus ``generator.json``; returns out_dir.

    Files are written to a temporary directory and renamed at the end, so an interrupted run never
    leaves a half-written dataset that looks complete."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    t0 = time.time()
    world = _World(cfg)
    jobs = []
    for split_index, split in enumerate(SPLITS):
        (tmp / split).mkdir(parents=True, exist_ok=True)
        n = cfg.rows.get(split, 0)
        for k, start in enumerate(range(0, n, cfg.rows_per_file)):
            jobs.append((split_index, split, k, min(cfg.rows_per_file, n - start)))

    def write(job: tuple[int, str, int, int]) -> None:
        split_index, split, k, n = job
        # a later day draws its rows from streams of its own (day 0's are those from before the knob)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, split_index, k] + ([cfg.day] if cfg.day else [])))
        table = pa.table(world.draw(rng, n))
        pq.write_table(table, tmp / split / f"part-{k:05d}.parquet", row_group_size=cfg.row_group_rows)

    # numpy and pyarrow release the GIL for the heavy parts, so threads overlap draw and write
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(write, jobs))
    (tmp / "generator.json").write_text(json.dumps(asdict(cfg), indent=2))
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} appeared while generating; not overwriting it")
    tmp.rename(out_dir)
    print(f"generated {sum(cfg.rows.values()):,} rows into {out_dir} in {time.time() - t0:.1f}s")
    return out_dir


def _zipf_choice(rng: np.random.Generator, n: int, size, a: float) -> np.ndarray:
    """Draw ranks in [0, n) with P(rank r) proportional to 1/(r+1)^a (a bounded Zipf law)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)


def _shifted_ranks(rng: np.random.Generator, ranks: np.ndarray, new: int, shift: float) -> np.ndarray:
    """The popularity ranking after a day: ``new`` entities (numbered after the existing ones) inserted at
    uniformly random ranks, then a ``shift`` share of the ranks permuted among themselves."""
    ranks = np.insert(ranks, np.sort(rng.integers(0, len(ranks) + 1, new)), np.arange(len(ranks), len(ranks) + new))
    moved = rng.choice(len(ranks), int(shift * len(ranks)), replace=False)
    ranks[moved] = ranks[rng.permutation(moved)]
    return ranks


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))
