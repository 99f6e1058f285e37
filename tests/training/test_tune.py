"""``mmpipe tune``: an ASHA sweep on a tiny store writes its trials (best first) and trains the best
configuration, which reproduces its trial's validation curve; a stored sequence's branch is searched
too; an interrupted sweep resumes where it stopped; user errors are one line before Ray starts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.training.conftest import make_features, small_config, write_store
from tests.training.sequences import with_audio_sequences

TINY = {"hidden": [16, 32]}   # small models: the store has 80 rows


def sweep_config(epochs: int = 3, **tune):
    cfg = small_config(epochs=epochs, patience=5)
    settings = {"samples": 4, "grace_period": 1, "space": TINY, **tune}
    return cfg.model_copy(update={"tune": cfg.tune.model_copy(update=settings)})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("tune-store"), make_features(n=80))


@pytest.fixture(scope="module")
def with_sequences(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("tune-seq-store"), with_audio_sequences(make_features(n=80)))


@pytest.fixture(scope="module")
def swept(ray_session, tiny):
    from training.tune import plan, run

    cfg = sweep_config()
    return run(cfg, plan(cfg, tiny))


def test_sweep_writes_the_trials_best_first_and_a_model(swept, tiny):
    model_dir = Path(tiny) / "models" / "tune-mixed"
    assert swept.model_dir == model_dir and swept.table == model_dir / "tune.md"
    table = json.loads((model_dir / "tune.json").read_text())
    trials = table["trials"]
    assert len(trials) == 4 and table["settings"]["samples"] == 4
    assert "branches" not in table["settings"]["space"]   # no sequence stored: no branch to search
    scores = [t["best_val_macro_f1"] for t in trials]
    assert scores == sorted(scores, reverse=True)
    for t in trials:
        assert set(t["params"]) == {"fusion", "hidden", "lr", "dropout", "modality_dropout"}
        assert t["params"]["hidden"] in (16, 32) and 3e-4 <= t["params"]["lr"] <= 1e-2
        assert 1 <= t["epochs"] <= 3 and len(t["history"]) == t["epochs"]
        assert t["stopped_early"] == (t["stopped"] in ("asha", "patience")) and t["stopped"] != "error"
    assert any(t["stopped"] == "asha" for t in trials), "ASHA (grace 1 epoch) stopped no trial"
    text = swept.table.read_text()
    assert "| rank | trial | fusion | hidden | lr | dropout | modality_dropout | best val macro-F1 |" in text
    assert text.index(trials[0]["trial_id"]) < text.index(trials[-1]["trial_id"])
    assert "test macro-F1" in text and f"trial {trials[0]['trial_id']}" in text
    for name in ("model.pt", "metrics.json", "sweep.json"):
        assert (model_dir / name).is_file(), name


def test_the_best_model_reproduces_its_trial(swept):
    """Same data snapshot, seed, epoch budget and thread count: the retrained model's validation
    curve is the trial's over the epochs the trial ran. Its best val macro-F1 equals the trial's
    when the trial ran to its end (or stopped by patience, which the model replays); an ASHA-stopped
    trial's model trains on and can only do as well or better."""
    best, row = swept.best, swept.trials[0]
    assert best["trial_id"] == row.trial_id and best["params"] == row.params
    metrics = swept.metrics
    assert metrics["fusion"] == row.params["fusion"] and metrics["training"]["lr"] == row.params["lr"]
    curve = [h["val_macro_f1"] for h in metrics["history"]]
    assert curve[: row.epochs] == pytest.approx(row.history, abs=1e-6)
    if row.stopped == "asha":
        assert metrics["val_macro_f1"] >= row.best_val_macro_f1 - 1e-6
    else:
        assert metrics["val_macro_f1"] == pytest.approx(row.best_val_macro_f1, abs=1e-6)
    assert best["reproduced"] and best["test_macro_f1"] == metrics["macro_f1"]


def test_a_stored_sequence_s_branch_is_searched_and_the_best_model_uses_it(ray_session, with_sequences):
    """Only audio has stored sequences: each trial draws its audio branch from the default kinds; the
    best configuration is trained with its branch and reproduces its trial (the same columns)."""
    from training.tune import plan, run, stored_sequences

    assert stored_sequences(with_sequences, ["image", "text", "audio"]) == ["audio"]
    cfg = sweep_config(epochs=2, samples=3, name="branches")
    result = run(cfg, plan(cfg, with_sequences))
    table = json.loads((result.model_dir / "tune.json").read_text())
    assert table["settings"]["space"]["branches"] == {"kind": "choice", "values": ["pooled", "gru", "cnn"],
                                                      "modalities": ["audio"]}
    drawn = [t["params"]["branches"] for t in table["trials"]]
    assert all(set(b) == {"audio"} and b["audio"] in ("pooled", "gru", "cnn") for b in drawn)
    assert any(b["audio"] != "pooled" for b in drawn), drawn
    text = result.table.read_text()
    assert "| modality_dropout | branches | best val macro-F1 |" in text
    assert all(f"audio:{b['audio']}" in text for b in drawn)
    best = result.trials[0].params["branches"]
    assert result.best["params"]["branches"] == result.metrics["training"]["branches"] == best
    spec = torch.load(result.model_dir / "model.pt", weights_only=False)["spec"]
    temporal = {m: k for m, k in best.items() if k != "pooled"}
    assert spec["branches"] == temporal and set(spec["sequences"]) == set(temporal)
    assert spec["dims"]["audio"] == (4 * 3 + 1 if temporal else 6)   # the packed sequence, or the pooled vector
    assert result.best["reproduced"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_trial_reads_what_train_reads_for_its_branches(with_sequences, engine):
    """The inputs read once both ways, composed for a trial's branches, equal what ``train`` reads
    for them: the same columns (a packed sequence or the pooled vector), rows and dims."""
    from training.stream import open_snapshot, summarize
    from training.train import local_data
    from training.tune import plan, trial_inputs

    sweep = plan(sweep_config(engine=engine, name=f"inputs-{engine}"), with_sequences)
    inputs = trial_inputs(sweep)
    if engine == "local":
        assert set(inputs.sequences.train) == set(inputs.sequences.val) == {"audio_emb"}   # no second copy of the rest
    for branches in ({"audio": "pooled"}, {"audio": "cnn"}):
        tc = sweep.training({"branches": branches})
        got = inputs.for_branches(tc.branches)
        want = summarize(open_snapshot(with_sequences), tc.modalities, use_augmented=tc.use_augmented, branches=branches)
        if engine == "local":
            want = local_data(want, tc)
            for split in ("train", "val"):
                have, expected = getattr(got, split), getattr(want, split)
                assert have.keys() == expected.keys()
                for key, column in expected.items():
                    np.testing.assert_array_equal(have[key], column)
        else:
            assert (got.n_train, got.n_val, got.classes) == (want.n_train, want.n_val, want.classes)
        assert got.dims == want.dims and got.sequences == want.sequences
        assert got.dims["audio"] == (4 * 3 + 1 if branches["audio"] != "pooled" else 6)


def _reports(trial_dir: Path) -> list[int]:
    return [json.loads(line)["epochs"] for line in (trial_dir / "result.json").read_text().splitlines()]


@pytest.mark.slow   # ~20 s: make test-slow (CI runs it); the sweep itself is covered by the tests around it
def test_a_rerun_resumes_an_interrupted_sweep(ray_session, tiny, tmp_path, monkeypatch):
    from training.tune import FAULT_ENV, SweepIncomplete, plan, run

    cfg = sweep_config(epochs=2, samples=3, grace_period=2, name="resume")
    monkeypatch.setenv(FAULT_ENV, f"1:{tmp_path / 'fault'}")   # one trial dies after epoch 1
    with pytest.raises(SweepIncomplete, match="run the same command again"):
        run(cfg, plan(cfg, tiny))
    experiment = Path(plan(cfg, tiny).path)
    first = json.loads((Path(tiny) / "models" / "resume" / "tune.json").read_text())["trials"]
    failed = [t["trial_id"] for t in first if t["stopped"] == "error"]
    finished = {t["trial_id"]: (experiment / t["trial_id"] / "result.json").read_text()
                for t in first if t["stopped"] != "error"}
    assert len(failed) == 1 and len(finished) == 2 and _reports(experiment / failed[0]) == [1]

    monkeypatch.delenv(FAULT_ENV)
    with pytest.raises(ConfigError, match=r"other settings \(samples\)"):   # a rerun must be the same sweep
        plan(sweep_config(epochs=2, samples=4, grace_period=2, name="resume"), tiny)
    result = run(cfg, plan(cfg, tiny))
    assert {r.trial_id for r in result.trials} == {t["trial_id"] for t in first}   # restored, not started over
    assert {r.trial_id: r.params for r in result.trials} == {t["trial_id"]: t["params"] for t in first}
    for trial_id, before in finished.items():   # finished trials were not run again
        assert (experiment / trial_id / "result.json").read_text() == before
    assert _reports(experiment / failed[0]) == [1, 2]   # went on from its epoch-1 checkpoint
    assert all(r.stopped != "error" for r in result.trials) and result.best["reproduced"]


def test_search_space_checks_and_defaults():
    from training.fusion import FUSIONS
    from training.tune import _why_stopped, default_tune_name, search_space

    space = search_space({})
    assert space["fusion"] == {"kind": "choice", "values": sorted(FUSIONS)}
    assert space["lr"]["kind"] == "loguniform" and space["dropout"]["kind"] == "uniform"
    fixed = search_space({"fusion": "gated", "lr": 1e-3, "dropout": [0.2, 0.2]})
    assert fixed["fusion"]["values"] == ["gated"] and fixed["lr"] == {"kind": "choice", "values": [1e-3]}
    assert fixed["dropout"] == {"kind": "choice", "values": [0.2]} and default_tune_name(fixed) == "tune-gated"
    assert default_tune_name(space) == "tune-mixed"
    for bad, message in [({"fusion": ["concat", "nosuch"]}, r"tune\.space\.fusion: unknown fusion 'nosuch'"),
                         ({"lr": [1e-2, 1e-4]}, r"tune\.space\.lr: lo 0\.01 is above hi 0\.0001"),
                         ({"dropout": [0.0, 1.5]}, r"tune\.space\.dropout: 1\.5 is not a valid training\.dropout"),
                         ({"hidden": [0, 64]}, r"tune\.space\.hidden: 0 is not a valid"),
                         ({"lr": [1e-4, 1e-3, 1e-2]}, r"tune\.space\.lr takes \[lo, hi\]"),
                         ({"depth": [1, 2]}, r"tune\.space: unknown key\(s\) depth")]:
        with pytest.raises(ConfigError, match=message):
            search_space(bad)
    assert _why_stopped([0.2, 0.3, 0.4], 3, 2) == ""
    assert _why_stopped([0.2, 0.3], 3, 2) == "asha"
    assert _why_stopped([0.5, 0.4, 0.3], 5, 2) == "patience"


def test_branch_search_space():
    from training.tune import param_space, search_space

    assert "branches" not in search_space({})                    # no stored sequence: nothing to search
    assert "branches" not in search_space({"branches": "pooled"})
    space = search_space({"branches": ["gru", "lstm", "gru"]}, ["text", "audio"])
    assert space["branches"] == {"kind": "choice", "values": ["gru", "lstm"], "modalities": ["text", "audio"]}
    domains = param_space(space)["branches"]
    assert set(domains) == {"text", "audio"} and domains["text"] is not domains["audio"]   # drawn independently
    assert param_space(search_space({"branches": "cnn"}, ["audio"]))["branches"] == {"audio": "cnn"}
    with pytest.raises(ConfigError, match=r"tune\.space\.branches: unknown branch 'rnn'; known: pooled, gru"):
        search_space({"branches": ["gru", "rnn"]}, ["audio"])
    with pytest.raises(ConfigError, match=r"tune\.space\.branches: the features table holds no sequence .*params\.sequence"):
        search_space({"branches": ["pooled", "gru"]})


@pytest.mark.parametrize("args, message", [
    (["--store", "{empty}"], r"no features table at \S+/features; run `mmpipe run` first$"),
    (["--store", "{tiny}", "--samples", "0"], r"bad config value at 'tune\.samples': .*greater than or equal to 1$"),
    (["--store", "{tiny}", "--set", "tune.space.fusion=[concat,nosuch]"], r"tune\.space\.fusion: unknown fusion 'nosuch'"),
    (["--store", "{tiny}", "--set", "tune.space.branches=[pooled,gru]"],
     r"tune\.space\.branches: the features table holds no sequence"),
])
def test_cli_user_errors_are_one_line(tiny, tmp_path, monkeypatch, capsys, args, message):
    import re

    from pipeline import cli

    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.yaml").write_text("name: t\n")
    argv = [a.format(empty=tmp_path / "empty", tiny=tiny) for a in args]
    monkeypatch.setattr("sys.argv", ["mmpipe", "tune", str(tmp_path / "ok.yaml"), *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1 and re.match("mmpipe: error: " + message, err[0]), err


@pytest.mark.slow   # ~1 min on 2 CPUs: a Ray Train run per trial (workers, Ray Data) is slow to start
def test_ray_engine_trials_run_ray_train(ray_session, tmp_path):
    from training.tune import plan, run

    store = write_store(tmp_path, make_features(n=80))
    cfg = sweep_config(epochs=2, samples=1, grace_period=2, engine="ray")
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"num_workers": 1, "cpus_per_worker": 0.5})})
    result = run(cfg, plan(cfg, store))
    assert len(result.trials) == 1 and result.trials[0].epochs == 2
    assert (Path(plan(cfg, store).path) / "runs" / result.trials[0].trial_id).is_dir()   # its own Ray Train run
    assert result.metrics["engine"] == "ray" and len(result.metrics["history"]) == 2
