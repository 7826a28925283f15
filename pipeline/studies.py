"""Studies that train many models: the task-correlation sweep (the MMoE paper's synthetic experiment,
on our impression logs) and the multi-seed quality benchmark. Each run is a normal training run."""
from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import ray
import torch

from pipeline.config import DataPaths, JobConfig, ModelConfig, TrainConfig
from pipeline.synthetic import SPEC_PATH, SyntheticConfig, generate

CORRELATIONS = (1.0, 0.9, 0.5, 0.0)
STUDY_MODELS = ("shared_bottom", "omoe", "mmoe", "ple")


def environment() -> str:
    return (f"{date.today()} | {platform.platform()} | {platform.processor() or platform.machine()} "
            f"| {int(ray.cluster_resources().get('CPU', 0))} CPUs | Python {platform.python_version()} "
            f"| torch {torch.__version__} | ray {ray.__version__}")


def correlation_study(out_dir: Path, train_rows: int = 300_000, eval_rows: int = 50_000, epochs: int = 1,
                      workers: int = 1, models=STUDY_MODELS, correlations=CORRELATIONS, seed: int = 0) -> list[dict]:
    """Train every model on logs generated at each task correlation; returns one row per (rho, model)."""
    from pipeline.job import connect_ray

    connect_ray()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rho in correlations:
        data = out_dir / "data" / f"rho{rho}"
        if not data.exists():
            generate(data, SyntheticConfig(rows={"train": train_rows, "valid": eval_rows, "test": eval_rows},
                                           task_correlation=rho, seed=seed))
        for model in models:
            job = JobConfig(data=DataPaths(str(data), str(SPEC_PATH)), model=ModelConfig(name=model),
                            train=TrainConfig(epochs=epochs, num_workers=workers, seed=seed),
                            name=f"corr-{rho}-{model}", storage_path=str((out_dir / "ray_results").resolve()),
                            output=str(out_dir / "runs" / f"rho{rho}-{model}"))
            t0 = time.time()
            m = _run_once(job)
            rows.append({"correlation": rho, "model": model, "seconds": round(time.time() - t0, 1),
                         **{f"{t}_auc": m["test"][t]["auc"] for t in ("click", "convert")},
                         **{f"{t}_oracle_auc": m["test"][t]["oracle_auc"] for t in ("click", "convert")},
                         "cvr_auc": m["test"]["convert"]["cvr_auc"]})
            print(json.dumps(rows[-1]))
    _write_correlation_outputs(out_dir, rows)
    return rows


def _run_once(job: JobConfig) -> dict:
    """A study restarted after an interruption reuses the runs that already finished."""
    from pipeline.job import run

    done = Path(job.output) / "metrics.json"
    return json.loads(done.read_text()) if done.exists() else run(job)


def _write_correlation_outputs(out_dir: Path, rows: list[dict]) -> None:
    with open(out_dir / "correlation_study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Test AUC by task correlation ({environment()})", "",
             "| correlation | model | click AUC | click oracle | convert (CTCVR) AUC | convert oracle | CVR AUC |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['correlation']} | {r['model']} | {r['click_auc']:.4f} | {r['click_oracle_auc']:.4f} | "
              f"{r['convert_auc']:.4f} | {r['convert_oracle_auc']:.4f} | {r['cvr_auc']:.4f} |" for r in rows]
    lines += ["", "Each model trained 1 epoch on a log generated at each correlation; plot: correlation_study.png. "
              "Command: `python jobs/correlation_study.py`"]
    (out_dir / "correlation_study.md").write_text("\n".join(lines) + "\n")
    models = list(dict.fromkeys(r["model"] for r in rows))
    _plot_tasks(out_dir / "correlation_study.png", lambda task: [
        (m, sorted((r["correlation"], r[f"{task}_auc"]) for r in rows if r["model"] == m), {"marker": "o"}) for m in models]
        + [("oracle", sorted({(r["correlation"], r[f"{task}_oracle_auc"]) for r in rows}), {"linestyle": ":", "color": "k"})],
        "{task}: test AUC vs task correlation", "task correlation (cosine of the tasks' weight vectors)", "AUC")


def _plot_tasks(path: Path, lines, title: str, xlabel: str, ylabel: str, xticks=None) -> None:
    """A study's figure: one panel per task (click, convert); ``lines(task)`` gives its (label, points, style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task in zip(axes, ("click", "convert")):
        for label, pts, style in lines(task):
            if pts:
                ax.plot(*zip(*pts), label=label, **style)
        if xticks is not None:
            ax.set_xticks(xticks)
        ax.set_title(title.format(task=task))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def quality_benchmark(data: str, spec: str, out_dir: Path, models, seeds, epochs: int, workers: int = 2,
                      reference: dict | None = None, batch_size: int = 512, lr: float = 1e-3) -> list[dict]:
    """Every model over several seeds; writes test AUC mean ± std per task beside reference figures."""
    from pipeline.config import DatasetSpec
    from pipeline.job import connect_ray

    from pipeline.models import MODELS

    connect_ray()
    loaded = DatasetSpec.load(spec)
    tasks = loaded.task_names
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for model in models:
        if MODELS[model].reads_sequences and not loaded.sequences:  # in the table, as not applicable, with why
            runs.append({"model": model, "seed": None, "note": f"n/a: {model} reads a behaviour sequence; spec "
                                                                f"{loaded.name!r} has none"})
            _write_quality_table(out_dir, runs, tasks, workers, reference)
            continue
        for seed in seeds:
            job = JobConfig(data=DataPaths(data, spec), model=ModelConfig(name=model),
                            train=TrainConfig(epochs=epochs, num_workers=workers, seed=seed, batch_size=batch_size,
                                              lr=lr, patience=3),
                            name=f"quality-{model}-s{seed}", storage_path=str((out_dir / "ray_results").resolve()),
                            output=str(out_dir / "runs" / f"{model}-s{seed}"))
            m = _run_once(job)
            runs.append({"model": model, "seed": seed, **{t: m["test"][t]["auc"] for t in tasks},
                         "best_epoch": m["best_epoch"]})
            print(json.dumps(runs[-1]))
            _write_quality_table(out_dir, runs, tasks, workers, reference)  # after every run: a partial table survives
    return runs


def _write_quality_table(out_dir: Path, runs: list[dict], tasks: list[str], workers: int, reference: dict | None) -> None:
    saved = out_dir / "quality_runs.json"  # runs of earlier invocations (other models or seeds) stay
    keep = [r for r in (json.loads(saved.read_text()) if saved.exists() else [])
            if (r["model"], r["seed"]) not in {(n["model"], n["seed"]) for n in runs}]
    runs = keep + runs
    models = list(dict.fromkeys(r["model"] for r in runs))
    table = [f"Test AUC (%) mean ± std over seeds, {workers} Ray Train workers ({environment()})", "",
             "| model | seeds | " + " | ".join(tasks) + " | reference or note |", "|---" * (len(tasks) + 3) + "|"]
    for model in models:
        note = next((r["note"] for r in runs if r["model"] == model and "note" in r), None)
        if note:
            table.append(f"| {model} | - | " + " | ".join("n/a" for _ in tasks) + f" | {note} |")
            continue
        cells = []
        for t in tasks:
            vals = [100 * r[t] for r in runs if r["model"] == model]
            cells.append(f"{statistics.mean(vals):.2f} ± {statistics.pstdev(vals):.2f}")
        ref = (reference or {}).get(model)
        model_seeds = [r["seed"] for r in runs if r["model"] == model]
        table.append(f"| {model} | {model_seeds} | " + " | ".join(cells) + f" | {' / '.join(map(str, ref)) if ref else ''} |")
    table += ["", "Adult protocol: train on adult.data, adult.test split 1:1 (seed 0) into valid/test; the best "
              "validation epoch's model is scored on test. Command: `python bench/adult_quality.py`"]
    (out_dir / "quality.md").write_text("\n".join(table) + "\n")
    (out_dir / "quality_runs.json").write_text(json.dumps(runs, indent=2))
    print("\n".join(table))



def warm_start_study(out_dir: Path, train_rows: int = 500_000, eval_rows: int = 50_000, epochs: int = 1,
                     workers: int = 2, model: str = "ple", seed: int = 0) -> list[dict]:
    """Day 1, then day 2 of a drifting synthetic log three ways: the day-1 model as it is (exported, scored by
    ``pipeline.serving`` on day 2's test: unseen ids go to the out-of-vocabulary row), a cold start on day 2,
    and a warm start from day 1 on day 2 with the same budget (epochs, rows). Returns one row per way."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from pipeline.export import export_run
    from pipeline.job import connect_ray
    from pipeline.serving import Scorer
    from pipeline.validate import split_files

    connect_ray()
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = {}
    for day in (1, 2):
        logs[day] = out_dir / "data" / f"day{day}"
        if not logs[day].exists():
            generate(logs[day], SyntheticConfig(rows={"train": train_rows, "valid": eval_rows, "test": eval_rows},
                                                day=day, seed=seed))

    def job(name: str, day: int, init_from: str = "") -> JobConfig:
        return JobConfig(data=DataPaths(str(logs[day]), str(SPEC_PATH)), model=ModelConfig(name=model),
                         train=TrainConfig(epochs=epochs, num_workers=workers, seed=seed), name=f"warm-study-{name}",
                         storage_path=str((out_dir / "ray_results").resolve()), output=str(out_dir / "runs" / name),
                         init_from=init_from)

    def row(way: str, m: dict, seconds: float) -> dict:
        return {"day 2 model": way, "seconds": round(seconds, 1),
                **{f"{t}_auc": m["test"][t]["auc"] for t in ("click", "convert")},
                **{f"{t}_oracle_auc": m["test"][t]["oracle_auc"] for t in ("click", "convert")}}

    t0 = time.time()
    _run_once(job("day1", 1))
    day1_seconds = time.time() - t0
    # the day-1 model on day 2's test, through its export
    export_run(out_dir / "runs" / "day1", out_dir / "export-day1")
    _, files = split_files(str(logs[2]), "test")
    test = pa.concat_tables(pq.read_table(f) for f in files)
    t0 = time.time()
    scored = Scorer.load(out_dir / "export-day1").score(test)
    stale = {"test": {t: {"auc": float(roc_auc_score(test[t].to_numpy(), scored[f"p_{t}"].to_numpy())),
                          "oracle_auc": float(roc_auc_score(test[t].to_numpy(), test[f"p_{t}"].to_numpy()))}
                      for t in ("click", "convert")}}
    rows = [row("day-1 model, not retrained", stale, time.time() - t0)]
    for way, name, init in (("cold start on day 2", "day2-cold", ""),
                            ("warm start from day 1 on day 2", "day2-warm", str(out_dir / "runs" / "day1"))):
        t0 = time.time()
        rows.append(row(way, _run_once(job(name, 2, init)), time.time() - t0))
    warm = json.loads((out_dir / "runs" / "day2-warm" / "metrics.json").read_text()).get("warm_start", {})
    write_warm_start_table(out_dir, rows, warm, day1_seconds, model, train_rows, eval_rows, epochs, workers, seed)
    return rows


def write_warm_start_table(out_dir: Path, rows: list[dict], warm: dict, day1_seconds: float, model: str,
                           train_rows: int, eval_rows: int, epochs: int, workers: int, seed: int) -> None:
    """The study's table (warm_start.md, printed) and rows (warm_start.json)."""
    lines = [f"# Warm start on a drifting log: day 2 three ways ({model}, {train_rows:,} train rows a day, "
             f"{epochs} epoch(s), {workers} workers)", "", environment(), "",
             "| day 2 model | click AUC | click oracle | gap | convert (CTCVR) AUC | convert oracle | gap | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['day 2 model']} | {r['click_auc']:.4f} | {r['click_oracle_auc']:.4f} | "
              f"{r['click_oracle_auc'] - r['click_auc']:.4f} | {r['convert_auc']:.4f} | {r['convert_oracle_auc']:.4f} | "
              f"{r['convert_oracle_auc'] - r['convert_auc']:.4f} | {r['seconds']} |" for r in rows]
    lines += ["", f"- day 1: {model} trained on day 1's log in {day1_seconds:.0f} s (the same budget as each day-2 run)",
              "- day 2 is the same world a day of drift later (`SyntheticConfig.day`): 5 % new users and items, "
              "10 % of the popularity ranks reshuffled, the ground truth moved by 10 % of its norm",
              "- seconds: the whole job (start-up, validation, fit, training, evaluation); for the day-1 model, scoring "
              "the test split through its export",
              "- the warm start's vocabularies: " + "; ".join(f"{t}: {c['kept']} kept, {c['new']} new, {c['evicted']} evicted"
                                                              for t, c in warm.items() if isinstance(c, dict)),
              f"- command: `python jobs/warm_start_study.py --train-rows {train_rows} --eval-rows {eval_rows}` (seed {seed})"]
    (out_dir / "warm_start.md").write_text("\n".join(lines) + "\n")
    (out_dir / "warm_start.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


SEQUENCE_CONFIGS = (  # (label, model config): the five, small sequence layers as everywhere
    ("mmoe, mean pooling", {"name": "mmoe"}),
    ("mmoe, target attention", {"name": "mmoe", "sequence_encoder": "target_attention"}),
    ("dupn", {"name": "dupn"}),
    ("mose", {"name": "mose"}),
    ("ple, target attention", {"name": "ple", "sequence_encoder": "target_attention"}),
)
SEQUENCE_EFFECTS = (1.0, 2.0)


def sequence_study(out_dir: Path, train_rows: int = 300_000, eval_rows: int = 50_000, epochs: int = 1,
                   workers: int = 2, effects=SEQUENCE_EFFECTS, configs=SEQUENCE_CONFIGS, seed: int = 0,
                   batch_size: int = 512) -> list[dict]:
    """Every config on logs generated at each sequence effect (``SyntheticConfig.sequence_effect``); one row per
    (effect, config): test AUC per task, its gap to the oracle, and training samples/s. Mean-pooled MMoE also
    runs at effect 0: its gap there is what no sequence layer can close (the rest of the features' share), so
    the table can say how much of the gap the sequence causes and how much of that each model closes."""
    from pipeline.job import connect_ray

    connect_ray()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for effect in (0.0, *effects):
        data = out_dir / "data" / f"effect{effect}"
        if not data.exists():
            generate(data, SyntheticConfig(rows={"train": train_rows, "valid": eval_rows, "test": eval_rows},
                                           sequence_effect=effect, seed=seed))
        for label, model in configs[:1] if effect == 0.0 else configs:
            slug = label.replace(", ", "-").replace(" ", "_")
            job = JobConfig(data=DataPaths(str(data), str(SPEC_PATH)), model=ModelConfig(**model),
                            train=TrainConfig(epochs=epochs, num_workers=workers, seed=seed, batch_size=batch_size),
                            name=f"seq-{effect}-{slug}", storage_path=str((out_dir / "ray_results").resolve()),
                            output=str(out_dir / "runs" / f"effect{effect}-{slug}"))
            m = _run_once(job)
            rows.append({"effect": effect, "model": label, "samples_per_s": round(m["history"][-1]["train/samples_per_s"]),
                         **{f"{t}_auc": m["test"][t]["auc"] for t in ("click", "convert")},
                         **{f"{t}_oracle_auc": m["test"][t]["oracle_auc"] for t in ("click", "convert")}})
            print(json.dumps(rows[-1]))
    _write_sequence_outputs(out_dir, rows, train_rows, eval_rows, epochs, workers, seed, batch_size)
    return rows


def _write_sequence_outputs(out_dir: Path, rows: list[dict], train_rows: int, eval_rows: int, epochs: int,
                            workers: int, seed: int, batch_size: int) -> None:
    lines = [f"# Sequence models on a log where the behaviour sequence matters ({train_rows:,} train rows, {epochs} "
             f"epoch(s), batch {batch_size}, {workers} workers)", "", environment(), "",
             "| effect | model | click AUC | click gap | mean pooling's click gap closed | its sequence-caused part "
             "closed | convert (CTCVR) AUC | convert gap | convert gap closed | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gap = lambda r, t: r[f"{t}_oracle_auc"] - r[f"{t}_auc"]  # noqa: E731
    pooled = SEQUENCE_CONFIGS[0][0]
    floor = next((r for r in rows if r["effect"] == 0.0 and r["model"] == pooled), None)
    for r in rows:
        base = next(b for b in rows if b["effect"] == r["effect"] and b["model"] == pooled)
        closed = {t: "" if r is base else f"{(gap(base, t) - gap(r, t)) / gap(base, t):+.0%}" for t in ("click", "convert")}
        caused = gap(base, "click") - gap(floor, "click") if floor else 0.0
        part = "" if r is base or caused <= 0 else f"{(gap(base, 'click') - gap(r, 'click')) / caused:+.0%}"
        lines.append(f"| {r['effect']} | {r['model']} | {r['click_auc']:.4f} | {gap(r, 'click'):.4f} | {closed['click']} | "
                     f"{part} | {r['convert_auc']:.4f} | {gap(r, 'convert'):.4f} | {closed['convert']} | {r['samples_per_s']:,} |")
    oracles = {e: next(r for r in rows if r["effect"] == e) for e in dict.fromkeys(r["effect"] for r in rows)}
    lines += ["", "Oracle test AUC (the true probabilities): " + "; ".join(
        f"effect {e}: click {r['click_oracle_auc']:.4f}, convert {r['convert_oracle_auc']:.4f}" for e, r in oracles.items()),
        "", "- effect: `SyntheticConfig.sequence_effect`; each history entry in the candidate's category adds "
        "effect x 0.6^age to the click logit and effect x 0.5 x 0.9^age to the conversion logit (age 0: most recent)",
        "- gap: oracle AUC - model AUC on test; gap closed: (mean pooling's gap - the model's) / mean pooling's, at "
        "the same effect", "- the sequence-caused part of mean pooling's click gap: its gap at this effect minus its gap "
        "at effect 0 (the log without the effect: what the other features leave, which no sequence layer closes); "
        "its part closed: (mean pooling's gap - the model's) / that part",
        "- samples/s: training throughput of the run (both workers)",
        f"- command: `python jobs/sequence_study.py --train-rows {train_rows} --eval-rows {eval_rows} --batch-size "
        f"{batch_size}` (seed {seed})"]
    (out_dir / "sequence_study.md").write_text("\n".join(lines) + "\n")
    (out_dir / "sequence_study.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    _plot_tasks(out_dir / "sequence_study.png", lambda task: [
        (label, [(r["effect"], gap(r, task)) for r in rows if r["model"] == label], {"marker": "o"})
        for label, _ in SEQUENCE_CONFIGS], "{task}: gap to the oracle AUC (test)", "sequence effect",
        "oracle AUC - model AUC", xticks=list(oracles))
