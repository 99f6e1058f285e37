"""A stage from the user's own package runs when the config names it: its rejects (with its
declared reason) reach the rejects table, its rows the run record's stage table and its series
the Prometheus metrics; a bad entry fails when the plan is built, before any row moves."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from deltalake import DeltaTable

from core.config import ConfigError, load_config
from pipeline.plan import resolve_stages
from pipeline.runner import run

from tests.pipeline.test_metrics import free_port, scrape, totals

PLUGIN = '''
from stages.base import Stage, StageParams, live_rows


class MinWords(Stage):
    """Rejects rows whose text has fewer than ``min_words`` words."""

    name = "acme.min_words"
    reads = ("text",)
    reasons = {"too_few_words": "the text has fewer than min_words words"}

    class Params(StageParams):
        min_words: int = 3

    def process(self, batch):
        for i in live_rows(batch, "text", redo_only=False):
            n = len(batch["text"][i].split())
            if n < self.params.min_words:
                self.reject(batch, i, "too_few_words", f"{n} words < min_words {self.params.min_words}")
        return batch
'''

TEXTS = ["just two", "one", "a sentence of five words", "four words right here", "three words here",
         "x", "cats and dogs and birds", "alpha beta gamma delta", "short one", "the quick brown fox"]


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """``acme_filters`` in a folder of its own, importable here and by Ray's workers (PYTHONPATH)."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "acme_filters.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{Path(__file__).resolve().parents[2]}")
    yield pkg
    sys.modules.pop("acme_filters", None)


def _config(tmp_path: Path, stages: dict, extra: dict | None = None):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"t{i}", "text": t, "label": "ab"[i % 2]}) + "\n"
                                for i, t in enumerate(TEXTS)))
    data = {"ray": {"dashboard": False, "progress_bars": False, "num_cpus": 2},
            "execution": {"batch_size": 4, "local_max_rows": 0, "concurrency": 1},
            "stages": stages, **(extra or {})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path, values={"source.path": str(manifest), "store": str(tmp_path / "store")})


def test_a_stage_from_the_users_package_runs_from_yaml_alone(tmp_path, plugin):
    port = free_port()
    stages = {"cleanup": {"text": {}},
              "acme": {"uses": "acme_filters:MinWords", "params": {"min_words": 3}},
              "features": {"text": {"encoder": "hashed"}}}
    cfg = _config(tmp_path, stages, {"ray": {"dashboard": False, "progress_bars": False, "num_cpus": 2,
                                             "metrics_export_port": port}})
    assert [s.name for s in resolve_stages(cfg)] == ["ingest", "cleanup.text", "dedup", "acme.min_words",
                                                     "features.text"]
    try:
        record = run(cfg, log=lambda s: None).record
        expected = {"too_few_words": sum(len(t.split()) < 3 for t in TEXTS)}
        rejects = DeltaTable(str(tmp_path / "store" / "rejects")).to_pyarrow_table().to_pylist()
        assert {r["id"] for r in rejects if r["stage"] == "acme.min_words"} == \
            {f"t{i}" for i, t in enumerate(TEXTS) if len(t.split()) < 3}
        assert all(r["reason"] == "too_few_words" for r in rejects if r["stage"] == "acme.min_words")
        table = record["stages"]["acme.min_words"]
        assert table["rows"] == len(TEXTS) and table["rejected"] == expected
        assert record["rejects_by_reason"]["too_few_words"] == expected["too_few_words"]
        deadline = time.monotonic() + 60   # workers ship metrics to the agent every few seconds
        while True:
            families = scrape(port)
            rows_in = totals(families, "mmpipe_rows_in")
            if rows_in.get(("acme.min_words",)) == len(TEXTS) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert rows_in[("acme.min_words",)] == len(TEXTS)
        assert totals(families, "mmpipe_rejects", ("stage", "reason"))[("acme.min_words", "too_few_words")] == \
            expected["too_few_words"]
    finally:
        ray.shutdown()


def test_after_places_a_stage_and_requires_drops_what_is_useless(tmp_path, plugin):
    stages = {"cleanup": {"text": {}}, "features": {"text": {"encoder": "hashed"}},
              "augment": {"text": {}},   # no augment.copies: nothing to augment, left out
              "acme": {"uses": "acme_filters:MinWords", "after": "cleanup"}}
    assert [s.name for s in resolve_stages(_config(tmp_path, stages))] == \
        ["ingest", "cleanup.text", "acme.min_words", "dedup", "features.text"]


def test_the_stages_meaning_orders_them_where_the_yaml_does_not(tmp_path):
    """A config that lists augmentation after the features (as a merged override does) still
    augments before computing features: features and augmenters declare what runs before them."""
    stages = {"cleanup": {"text": {}}, "features": {"text": {"encoder": "hashed"}},
              "augment": {"copies": {"params": {"copies": 1}}, "text": {}}}
    assert [s.name for s in resolve_stages(_config(tmp_path, stages))] == \
        ["ingest", "cleanup.text", "dedup", "augment.copies", "augment.text", "features.text"]


@pytest.mark.parametrize("stages, message", [
    ({"acme": {"uses": "acme_filters:Nope"}}, "cannot import stage 'acme_filters:Nope'"),
    ({"acme": {"uses": "no_such_package.mod:Stage"}}, "cannot import stage"),
    ({"acme": {"uses": "acme_filters:MinWords", "params": {"min_wrods": 3}}}, "bad parameters for stage acme.min_words"),
    ({"acme": {"uses": "acme_filters:MinWords", "colour": "red"}}, "unknown config key 'stages.acme.colour'"),
    ({"acme": {"uses": "acme_filters:MinWords", "before": "nothing"}}, "no stage 'nothing'"),
    ({"cleanup": {"smell": {}}}, "unknown config key 'stages.cleanup.smell'"),
    ({"features": {"text": {"encoder": "nosuch"}}}, "stages.features.text"),
    ({"features": {"text": {}}}, "needs an encoder"),
    # reads a column that only a later stage writes: caught before any row moves
    ({"acme": {"uses": "tests.pipeline.test_custom_stage:ReadsEmbedding"}, "features": {"text": {"encoder": "hashed"}}},
     "reads column\\(s\\) text_emb"),
])
def test_a_bad_stage_entry_fails_when_the_plan_is_built(tmp_path, plugin, stages, message):
    with pytest.raises(ConfigError, match=message):
        resolve_stages(_config(tmp_path, stages))


from stages.base import Stage  # noqa: E402


class ReadsEmbedding(Stage):
    name = "acme.reads_embedding"
    reads = ("text_emb",)


def test_an_entry_point_names_a_stage(tmp_path, plugin, monkeypatch):
    """An installed package can declare its stages under the ``mmpipe.stages`` entry point group."""
    dist = plugin / "acme_filters-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-filters\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mmpipe.stages]\nacme.min_words = acme_filters:MinWords\n")
    stages = {"cleanup": {"text": {}}, "acme": {"min_words": {"params": {"min_words": 2}}}}
    specs = resolve_stages(_config(tmp_path, stages))
    assert [(s.name, s.params) for s in specs][-1] == ("acme.min_words", {"min_words": 2})
