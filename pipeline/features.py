"""The dataset spec and its features: one class per feature kind.

A feature kind owns everything about its columns: the Parquet types it accepts (``schema_problem``), its
bad rows and their reasons (``bad_rows``), what the preprocessing fits on it, its encoding in the Ray Data
tasks (``encode``), how a worker's collate turns the encoded column into jagged ids or a dense column, and,
for id kinds, the TorchRec table it is looked up in (``EmbeddingTable``). Adding a kind is a class here
plus a field of ``DatasetSpec``.

The id kinds encode in the Data tasks into the jagged layout that TorchRec takes: a single id is an int32
column (one id per row); an id list (a behaviour sequence) is a ``list<int32>`` column of at most
``max_len`` ids, the most recent ones, with no padding. A worker's collate concatenates the features'
values and lengths into one ``KeyedJaggedTensor`` (``pipeline.data.Collate``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class ConfigError(ValueError):
    """A spec or config that cannot be used; the message says where and why."""


Problem = tuple[str, str, np.ndarray]  # (reason, message, rows mask)
Encoder = Callable[[pa.Array, str], np.ndarray]  # (raw ids, table name) -> table rows, int32


def type_kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list<" + type_kind(t.value_type) + ">"
    return str(t)


def null_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if column.null_count == 0:
        return np.zeros(len(column), bool)
    return column.is_null().to_numpy(zero_copy_only=False)


def as_floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric or bool column as float64, nulls as NaN."""
    return column.to_numpy().astype(np.float64) if column.null_count == 0 else \
        column.cast(pa.float64()).fill_null(np.nan).to_numpy()


@dataclass
class EmbeddingTable:
    """One embedding table, as TorchRec configures it. Row 0 is the out-of-vocabulary row."""

    name: str
    num_rows: int  # including the out-of-vocabulary row 0
    dim: int
    encoding: Literal["vocab", "hash", "identity"]  # ordinal fit on train, hashed, or id i -> row i + 1
    features: list[str] = field(default_factory=list)  # the features looked up in it (a shared table: several)
    # the pooling of its id lists (a single id pools to itself under any); None: the table is looked up
    # un-pooled (an ``EmbeddingCollection``) and its features are pooled by the front (max pooling)
    pooling: Optional[Literal["sum", "mean"]] = "sum"

    @property
    def num_ids(self) -> Optional[int]:
        """The valid raw ids [0, num_ids) of an identity table; None for the others (any id is fine)."""
        return self.num_rows - 1 if self.encoding == "identity" else None

    def torchrec_config(self, init_std: float):
        """The table's ``EmbeddingBagConfig`` (pooled) or ``EmbeddingConfig`` (un-pooled)."""
        import functools

        import torch
        from torchrec import EmbeddingBagConfig, EmbeddingConfig, PoolingType

        common = dict(name=self.name, embedding_dim=self.dim, num_embeddings=self.num_rows, feature_names=list(self.features),
                      init_fn=functools.partial(torch.nn.init.normal_, mean=0.0, std=init_std))
        if self.pooling is None:
            return EmbeddingConfig(**common)
        return EmbeddingBagConfig(**common, pooling=PoolingType.SUM if self.pooling == "sum" else PoolingType.MEAN)


@dataclass
class _IdSizing:
    """What sizes an id feature's table. Exactly one of ``vocab_size``, ``hash_buckets`` or ``num_ids``,
    unless the feature uses a table another feature defines (``table:``)."""

    name: str
    vocab_size: Optional[int] = None  # ordinal encoding fit on train; index 0 is out-of-vocabulary
    hash_buckets: Optional[int] = None  # or: hash the raw id into this many buckets
    # or: the ids are already indices in [0, num_ids) (a pre-encoded log) and are used as they are; an
    # id outside that range is bad input (refused, or its row dropped under on_bad_rows: drop)
    num_ids: Optional[int] = None
    dim: int = 16
    table: Optional[str] = None  # share an embedding table with other features of this name

    @property
    def table_name(self) -> str:
        return self.table or self.name

    def sizing(self) -> Optional[tuple[str, int]]:
        sizes = {k: v for k, v in (("vocab_size", self.vocab_size), ("hash_buckets", self.hash_buckets),
                                   ("num_ids", self.num_ids)) if v is not None}
        if len(sizes) > 1:
            raise ConfigError(f"feature {self.name!r} sets both {' and '.join(sizes)}")
        return next(iter(sizes.items()), None)

    def _id_problems(self, flat: pa.Array, table: EmbeddingTable) -> Optional[tuple[str, str, np.ndarray]]:
        if not pa.types.is_integer(flat.type):
            return None
        ids = flat.fill_null(0).to_numpy(zero_copy_only=False)
        if table.num_ids is None:
            return "negative_id", "have a negative id", ids < 0
        return "id_out_of_range", f"have an id outside [0, {table.num_ids})", (ids < 0) | (ids >= table.num_ids)

    def accepted_types(self, table: EmbeddingTable) -> tuple[set[str], str]:
        if table.num_ids:
            return {"int"}, "an integer id"
        return {"int", "string"}, "an integer or string id"


@dataclass
class IdFeature(_IdSizing):
    """A single-valued id column (int64 or string): one id per row."""

    kind: ClassVar[str] = "id"
    pooling: ClassVar[None] = None  # one id: any pooling gives the id's embedding

    def bad_rows(self, column: pa.ChunkedArray, table: EmbeddingTable) -> list[Problem]:
        out = [("null", "are null", null_mask(column))]
        found = self._id_problems(column.combine_chunks(), table)
        return out + ([found] if found else [])

    def raw_ids(self, column: pa.Array) -> pa.Array:
        """The raw ids a vocabulary is fit on."""
        return column

    def encode(self, column: pa.Array, encode_ids: Encoder) -> pa.Array:
        return pa.array(encode_ids(column, self.table_name))

    @staticmethod
    def jagged(encoded: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths) of the encoded column: one id per row."""
        values = encoded.to_numpy(zero_copy_only=False)
        return values, np.ones(len(values), np.int32)


@dataclass
class IdListFeature(_IdSizing):
    """A multi-valued id column (``list<int64>`` or ``list<string>``): a behaviour sequence, most recent
    last. Its last ``max_len`` ids are kept (the most recent), pooled by ``pooling``."""

    max_len: int = 20
    pooling: Literal["mean", "sum", "max"] = "mean"
    # how the model reads the sequence (pipeline.sequence): pooled by ``pooling``; target attention (DIN) with
    # the ``query`` feature's embedding (the candidate); or an LSTM over it, its last state. Anything but pool
    # looks the sequence up un-pooled (an ``EmbeddingCollection``), the ids in their order
    encoder: Literal["pool", "target_attention", "lstm"] = "pool"
    # target attention's query: a single-id feature of the same dim; default: the one sharing this table
    query: Optional[str] = None
    kind: ClassVar[str] = "id_list"

    def accepted_types(self, table: EmbeddingTable) -> tuple[set[str], str]:
        return {"list<int>", "list<string>"}, "list<int64> (or list<string>)"

    def bad_rows(self, column: pa.ChunkedArray, table: EmbeddingTable) -> list[Problem]:
        out = [("null", "are null", null_mask(column))]
        values = column.combine_chunks()
        found = self._id_problems(pc.list_flatten(values), table)
        if found:  # a row is bad when any of its ids is
            reason, message, flat_bad = found
            rows = pc.list_parent_indices(values).to_numpy()
            out.append((reason, message, np.bincount(rows[flat_bad], minlength=len(values)) > 0))
        return out

    def raw_ids(self, column: pa.Array) -> pa.Array:
        return column.flatten()

    def encode(self, column: pa.Array, encode_ids: Encoder) -> pa.Array:
        """The last ``max_len`` ids of each list, encoded: a ``list<int32>`` column (a null list: empty)."""
        if column.null_count:  # only a row that is dropped has one
            column = column.fill_null(pa.scalar([], column.type))
        offsets = column.offsets.to_numpy()
        lengths = np.diff(offsets)
        keep = np.minimum(lengths, self.max_len)
        # the kept ids: from offsets[i + 1] - keep[i] to offsets[i + 1], for every row
        starts = offsets[1:] - keep
        src = np.repeat(starts - np.cumsum(keep) + keep, keep) + np.arange(keep.sum())
        whole = offsets[0] == 0 and keep.sum() == len(column.values)  # nothing cut: the values as they are
        flat = column.values if whole else column.values.take(pa.array(src))
        codes = encode_ids(flat, self.table_name)
        new_offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(codes))

    @staticmethod
    def jagged(encoded: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        offsets = encoded.offsets.to_numpy()
        values = encoded.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        return values, np.diff(offsets).astype(np.int32)


@dataclass
class DenseFeature:
    """A numeric column, normalised with the train split's moments."""

    name: str
    normalize: Literal["standard", "log_standard", "none"] = "standard"
    kind: ClassVar[str] = "dense"

    def accepted_types(self, table=None) -> tuple[set[str], str]:
        return {"int", "float"}, "numeric"

    def bad_rows(self, column: pa.ChunkedArray, table=None) -> list[Problem]:
        null = null_mask(column)
        v = as_floats(column)
        out = [("null", "are null", null), ("not_finite", "are NaN or infinite", ~np.isfinite(v) & ~null)]
        if self.normalize == "log_standard":
            out.append(("negative", "are negative (normalize: log_standard needs >= 0)", v < 0))
        return out

    def values(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """The values the moments are fit on and normalised: float64, log1p under ``log_standard``."""
        v = as_floats(column)
        return np.log1p(v, where=v >= 0, out=np.full_like(v, np.nan)) if self.normalize == "log_standard" else v

    def encode(self, column: pa.Array, mean: float, std: float) -> pa.Array:
        if self.normalize == "none":
            return pa.array(self.values(column).astype(np.float32))
        return pa.array(((self.values(column) - mean) / std).astype(np.float32))


@dataclass
class Task:
    """A binary task. ``depends_on`` names the task that must be positive first (the funnel:
    convert depends on click); its label is over the full exposure space (convert=1 implies click=1)."""

    name: str
    label: Optional[str] = None  # label column; defaults to the task name
    depends_on: Optional[str] = None

    @property
    def label_column(self) -> str:
        return self.label or self.name


@dataclass
class DatasetSpec:
    """One impression log: its id features (``sparse``: one id per row; ``sequences``: id lists), dense
    features and tasks. Embedding tables are derived from the id features: a feature owns a table unless
    it names a shared one with ``table:`` (e.g. the behaviour sequence of categories shares the
    ``category`` table with the target item's category)."""

    name: str
    tasks: list[Task]
    sparse: list[IdFeature] = field(default_factory=list)
    sequences: list[IdListFeature] = field(default_factory=list)
    dense: list[DenseFeature] = field(default_factory=list)
    # task name -> column with the true probability P(task label = 1 | exposure); never a feature.
    oracle: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.tables = self._derive_tables()
        except ConfigError as e:
            raise ConfigError(f"spec {self.name!r}: {e}") from None
        names = [t.name for t in self.tasks]
        if not names:
            raise ConfigError(f"spec {self.name!r}: at least one task is required")
        for t in self.tasks:
            if t.depends_on is not None and t.depends_on not in names:
                raise ConfigError(f"spec {self.name!r}: task {t.name!r} depends_on unknown task {t.depends_on!r}")
            if t.depends_on == t.name:
                raise ConfigError(f"spec {self.name!r}: task {t.name!r} depends on itself")
        cols = self.feature_columns + self.label_columns + list(self.oracle.values())
        dup = {c for c in cols if cols.count(c) > 1}
        if dup:
            raise ConfigError(f"spec {self.name!r}: columns used twice: {sorted(dup)}")
        if set(self.oracle) - set(names):
            raise ConfigError(f"spec {self.name!r}: oracle names unknown tasks {sorted(set(self.oracle) - set(names))}")

    def _derive_tables(self) -> dict[str, EmbeddingTable]:
        tables: dict[str, EmbeddingTable] = {}
        for f in self.id_features:
            sizing = f.sizing()
            if sizing is None:
                continue  # uses a table another feature defines (checked below)
            kind, size = sizing
            if size < (1 if kind == "num_ids" else 2):
                raise ConfigError(f"feature {f.name!r} {kind} is too small: {size}")
            encoding = {"vocab_size": "vocab", "hash_buckets": "hash", "num_ids": "identity"}[kind]
            table = EmbeddingTable(f.table_name, size + (kind == "num_ids"), f.dim, encoding)
            old = tables.get(f.table_name)
            if old is not None and old != table:
                raise ConfigError(f"shared table {f.table_name!r} defined differently: {old} vs {table}")
            tables[f.table_name] = table
        for f in self.id_features:
            if f.table_name not in tables:
                raise ConfigError(f"feature {f.name!r} needs vocab_size, hash_buckets or num_ids (or a shared table)")
            table = tables[f.table_name]
            if f.sizing() is None:
                f.dim = table.dim
            table.features.append(f.name)
        for f in self.sequences:
            f.query = self._query(f, tables) if f.encoder == "target_attention" else f.query
        for table in tables.values():  # pooled in TorchRec when all its id lists pool alike, by sum or mean
            lists = [f for f in self.sequences if f.table_name == table.name]
            poolings = {f.pooling for f in lists}
            if any(f.encoder != "pool" for f in lists):
                table.pooling = None  # a sequence read in order: looked up un-pooled
            elif not poolings:
                table.pooling = "sum"
            elif len(poolings) == 1 and poolings <= {"sum", "mean"}:
                (table.pooling,) = poolings
            else:
                table.pooling = None
        return tables

    def _query(self, f: IdListFeature, tables: dict[str, EmbeddingTable]) -> str:
        """Target attention's query feature: the one named, or the single-id feature sharing the sequence's table."""
        if f.query is None:
            same = [s.name for s in self.sparse if s.table_name == f.table_name]
            if len(same) != 1:
                raise ConfigError(f"sequence {f.name!r} (encoder: target_attention) needs a query: name the candidate's "
                                  f"feature with query: (single-id features sharing table {f.table_name!r}: {same})")
            return same[0]
        query = next((s for s in self.sparse if s.name == f.query), None)
        if query is None:
            raise ConfigError(f"sequence {f.name!r}: query {f.query!r} is not a single-id feature of the spec "
                              f"({[s.name for s in self.sparse]})")
        if tables[query.table_name].dim != tables[f.table_name].dim:
            raise ConfigError(f"sequence {f.name!r}: query {f.query!r} has dim {tables[query.table_name].dim}, the "
                              f"sequence {tables[f.table_name].dim}; target attention needs one dim")
        return f.query

    @property
    def id_features(self) -> list[IdFeature | IdListFeature]:
        return [*self.sparse, *self.sequences]

    @property
    def features(self) -> list[IdFeature | IdListFeature | DenseFeature]:
        return [*self.sparse, *self.sequences, *self.dense]

    @property
    def pooled_keys(self) -> list[str]:
        """The id features looked up pooled (an ``EmbeddingBagCollection``), in the order of its tables."""
        return [n for t in self.tables.values() if t.pooling is not None for n in t.features]

    @property
    def unpooled_keys(self) -> list[str]:
        """The id features looked up un-pooled (an ``EmbeddingCollection`` per dim), by dim, then table order."""
        tables = sorted((t for t in self.tables.values() if t.pooling is None), key=lambda t: t.dim)
        return [n for t in tables for n in t.features]

    @property
    def id_keys(self) -> list[str]:
        """The keys of a batch's ``KeyedJaggedTensor``: the pooled features, then the un-pooled ones."""
        return self.pooled_keys + self.unpooled_keys

    def feature(self, name: str):
        return next(f for f in self.features if f.name == name)

    @property
    def feature_columns(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def label_columns(self) -> list[str]:
        return [t.label_column for t in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)

    @staticmethod
    def load(path) -> "DatasetSpec":
        from pipeline.config import load_yaml

        return load_yaml(path, DatasetSpec)
