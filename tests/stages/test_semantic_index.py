"""stages.semantic's index: int8 vectors give the verdicts of exact float32 search, shards (in this
process and as Ray actors) give the verdicts of one shard, and no duplicate crosses classes, on
generated class-structured embeddings with near-duplicates planted on either side of the thresholds."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from stages import semantic
from stages.base import RunScope, fingerprint_of
from stages.semantic import SemanticDedup, SemanticIndex, SemanticParams, StoredEmbeddings, index_name

DIMS = {"image": 96, "text": 48}
CLASSES = 8
# The pipeline test's thresholds, and the default one.
PARAMS = [{"modalities": ["image", "text"], "thresholds": {"image": 0.97, "text": 0.7}},
          {"modalities": ["image", "text"]}]
GAP = 0.003   # planted pairs' cosines keep this far from a threshold: int8 moves a cosine by ~1e-4


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def turned(v: np.ndarray, cos: np.ndarray, rng) -> np.ndarray:
    """Unit vectors at exactly cosine ``cos`` from the unit vectors ``v``."""
    u = rng.normal(size=v.shape)
    u = unit(u - (u * v).sum(-1, keepdims=True) * v)
    return cos[:, None] * v + np.sqrt(1 - cos ** 2)[:, None] * u


@dataclass
class Rows:
    ids: list[str]
    labels: np.ndarray
    vectors: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    def take(self, rows) -> "Rows":
        return Rows([self.ids[i] for i in rows], self.labels[rows], {m: v[rows] for m, v in self.vectors.items()},
                    {m: p[rows] for m, p in self.present.items()})

    def args(self):
        return self.ids, self.vectors, self.present


def fresh(n: int, prefix: str, centres: dict[str, np.ndarray], rng) -> Rows:
    """Rows of random classes: class centre plus noise (two rows of a class: cosine ~0.3)."""
    labels = rng.integers(0, CLASSES, n)
    vectors = {m: unit(centres[m][labels] + 1.5 * unit(rng.normal(size=(n, d)))) for m, d in DIMS.items()}
    kind = rng.random(n)   # 70 % image and text, 15 % image only, 15 % text only
    present = {"image": kind < 0.85, "text": (kind < 0.7) | (kind >= 0.85)}
    return Rows([f"{prefix}{k}" for k in range(n)], labels, vectors, present)


def near(source: Rows, prefix: str, p: SemanticParams, rng, within: bool = True) -> Rows:
    """A copy of each source row at a cosine past its thresholds (``within``), or with one
    modality just short of its threshold."""
    n = len(source.ids)
    vectors, present = {}, {m: v.copy() for m, v in source.present.items()}
    short = rng.integers(0, 2, n)   # which modality misses, when one does
    for k, (m, v) in enumerate(source.vectors.items()):
        t = p.limit(m)
        cos = rng.uniform(t + GAP, 1.0 - 1e-4, n)
        if not within:
            miss = (short == k) | ~source.present[list(DIMS)[1 - k]]
            cos = np.where(miss, rng.uniform(max(0.0, t - 0.05), t - GAP, n), cos)
        vectors[m] = turned(v, cos, rng)
    return Rows([f"{prefix}{k}" for k in range(n)], source.labels.copy(), vectors, present)


def world(p: SemanticParams, stored_rows: int = 2400, blocks: int = 4, block_rows: int = 240, seed: int = 0):
    """Stored rows, and blocks of new rows: near copies of stored rows, of earlier new rows, near
    misses, and fresh rows, shuffled."""
    rng = np.random.default_rng(seed)
    centres = {m: unit(rng.normal(size=(CLASSES, d))) for m, d in DIMS.items()}
    stored = fresh(stored_rows, "s", centres, rng)
    out, earlier = [], []
    for b in range(blocks):
        new = fresh(block_rows // 2, f"b{b}f", centres, rng)
        parts = [new, near(stored.take(rng.integers(0, stored_rows, block_rows // 4)), f"b{b}n", p, rng),
                 near(stored.take(rng.integers(0, stored_rows, block_rows // 8)), f"b{b}m", p, rng, within=False)]
        pool = earlier + [new]
        src = pool[int(rng.integers(0, len(pool)))]
        parts.append(near(src.take(rng.integers(0, len(src.ids), block_rows // 8)), f"b{b}r", p, rng))
        earlier.append(new)
        rows = Rows(sum((r.ids for r in parts), []), np.concatenate([r.labels for r in parts]),
                    {m: np.concatenate([r.vectors[m] for r in parts]) for m in DIMS},
                    {m: np.concatenate([r.present[m] for r in parts]) for m in DIMS})
        out.append(rows.take(rng.permutation(len(rows.ids))))
    return stored, out


def batches(stored: Rows, columns: list[str], size: int = 500):
    """``RunScope.stored`` over ``stored``: record batches of the feature table's columns."""
    for start in range(0, len(stored.ids), size):
        part = stored.take(np.arange(start, min(start + size, len(stored.ids))))
        cols = {"id": pa.array(part.ids)}
        for m in DIMS:
            cols[f"has_{m}"] = pa.array(part.present[m])
            emb = np.where(part.present[m][:, None], part.vectors[m], 0).astype(np.float32)
            cols[f"{m}_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]).cast(
                pa.list_(pa.float32()))
        yield pa.record_batch({c: cols[c] for c in columns}) if columns else pa.record_batch({"id": cols["id"]}).select([])


def exact(stored: Rows, blocks: list[Rows], p: SemanticParams) -> list[list[str | None]]:
    """The rule by brute force in float32: per row, the first of its nearest rows seen before its
    block (per modality it has, nearest first, at most ``candidates``, within the threshold) that is
    within the threshold in every modality the row has; else the first earlier kept row of its block
    that is."""
    seen = stored
    out = []
    for block in blocks:
        verdicts, kept = [], []
        for r in range(len(block.ids)):
            have = [m for m in DIMS if block.present[m][r]]

            def close(rows: Rows, i: int) -> bool:
                return all(rows.present[m][i] and rows.vectors[m][i] @ block.vectors[m][r] >= p.limit(m) for m in have)

            order = []
            for m in have:
                sims = np.where(seen.present[m], seen.vectors[m] @ block.vectors[m][r], -np.inf)
                order += [int(i) for i in np.argsort(-sims, kind="stable")[:p.candidates] if sims[i] >= p.limit(m)]
            found = next((seen.ids[i] for i in dict.fromkeys(order) if seen.ids[i] != block.ids[r] and close(seen, i)), None)
            if found is None and have:
                found = next((block.ids[j] for j in kept if close(block, j)), None)
                if found is None:
                    kept.append(r)
            verdicts.append(found)
        out.append(verdicts)
        seen = Rows(seen.ids + [block.ids[j] for j in kept], np.concatenate([seen.labels, block.labels[kept]]),
                    {m: np.concatenate([seen.vectors[m], block.vectors[m][kept]]) for m in DIMS},
                    {m: np.concatenate([seen.present[m], block.present[m][kept]]) for m in DIMS})
    return out


def never_across_classes(stored: Rows, blocks: list[Rows], verdicts) -> int:
    labels = dict(zip(stored.ids, stored.labels.tolist()))
    for block in blocks:
        labels.update(zip(block.ids, block.labels.tolist()))
    pairs = [(i, kept) for block, out in zip(blocks, verdicts) for i, kept in zip(block.ids, out) if kept is not None]
    assert all(labels[i] == labels[kept] for i, kept in pairs)
    return len(pairs)


@pytest.fixture(scope="module", params=range(len(PARAMS)), ids=["pipeline-thresholds", "default-threshold"])
def case(request):
    p = SemanticParams.model_validate(PARAMS[request.param])
    stored, blocks = world(p, seed=request.param)
    return p, stored, blocks, exact(stored, blocks, p)


def test_int8_verdicts_equal_exact_float32_verdicts(case):
    p, stored, blocks, expected = case
    index = SemanticIndex(p, StoredEmbeddings(functools.partial(batches, stored)))
    assert index.size() == len(stored.ids)
    verdicts = [index.check(*block.args()) for block in blocks]
    assert verdicts == expected
    found = never_across_classes(stored, blocks, verdicts)
    copies = [v for block, out in zip(blocks, verdicts) for i, v in zip(block.ids, out) if i[2] == "n"]
    assert all(v is not None for v in copies) and found > len(copies)   # and copies of this run's rows


def test_sharded_verdicts_equal_one_shard_verdicts(case):
    """At the default probe; at the text threshold 0.7 with a wider margin: a copy at cosine 0.7 of a
    48-d vector may lie about as far from the row as the row's class centre, and the default margin
    missed one text-only copy there."""
    p, stored, blocks, expected = case
    if p.limit("text") < 0.9:
        p = p.model_copy(update={"probe_margin": 0.3})
    index = SemanticIndex(p, StoredEmbeddings(functools.partial(batches, stored)), shards=3)
    sizes = [s.size() for s in index.shards]
    assert sum(sizes) == len(stored.ids) and min(sizes) > len(stored.ids) / 8   # spread, roughly balanced
    assert [index.check(*block.args()) for block in blocks] == expected


def test_a_vector_is_looked_up_where_it_is_registered():
    p = SemanticParams.model_validate({**PARAMS[0], "probe": 1, "probe_margin": 0.0})
    stored, blocks = world(p, stored_rows=800, blocks=1)
    router = semantic._fit_router(StoredEmbeddings(functools.partial(batches, stored)), p, 4)
    q = semantic._Query.of(*blocks[0].args())
    keys = np.arange(len(q.ids))
    owners, lookups = router.owners(q, keys, np.ones(len(q.ids), bool)), router.lookups(q)
    for m in DIMS:
        owned = np.stack([o[m] for o in owners])
        assert (owned.sum(axis=0) == q.present[m]).all()                 # one shard per vector
        looked = np.stack([look[m] for look in lookups])
        assert (looked.sum(axis=0) == q.present[m]).all() and (looked == owned).all()   # probe 1: its own


def test_where_the_index_lives_leaves_the_fingerprint_alone():
    before = {"modalities": ["image", "text"], "threshold": 0.95, "thresholds": {}, "candidates": 10}
    assert SemanticDedup.fingerprint({}) == fingerprint_of("semantic_dedup", 1, before)
    assert SemanticDedup.fingerprint({"rows_per_shard": 5, "shards": 3, "probe": 1, "probe_margin": 0.1}) == \
        SemanticDedup.fingerprint({})
    assert SemanticDedup.fingerprint({"threshold": 0.9}) != SemanticDedup.fingerprint({})


def test_shard_actors_give_the_verdicts_of_one_shard(ray_session):
    """Through the stage's run hooks: a store of more than ``rows_per_shard`` rows is spread over
    shard actors (three: 1,200 rows over 500 a shard, more than the test cluster's two CPUs) that
    read the stored batches themselves."""
    ray = ray_session
    p = SemanticParams.model_validate({**PARAMS[0], "rows_per_shard": 500})
    stored, blocks = world(p, stored_rows=1200, blocks=3, seed=3)
    expected = exact(stored, blocks, p)
    scope = RunScope("semantic-shards", p, local=False, stored=functools.partial(batches, stored))
    name = index_name(scope.run_id)
    SemanticDedup.open_run(scope)
    try:
        actor = ray.get_actor(name)
        assert ray.get(actor.shards.remote(), timeout=60) == 3
        check = semantic._open(name, p)
        assert [check(*block.args()) for block in blocks] == expected
        assert ray.get(actor.size.remote()) == len(stored.ids) + sum(v is None for out in expected for v in out)
    finally:
        SemanticDedup.close_run(scope, failed=False)
    with pytest.raises(ValueError):
        ray.get_actor(f"{name}-shard-0")
