"""Ray Tune over training runs: search spaces as YAML, one TorchTrainer per trial (Train V2's pattern: a
function trainable that launches the trainer with ``TuneReportCallback``), ASHA on the validation
objective or a multi-objective Optuna search returning the Pareto front, and outputs a person can use
(results table, Pareto PNG, best config as a JobConfig YAML)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune

from pipeline.config import ConfigError, JobConfig, ModelName, Objective, from_dict, load_yaml, merge_overrides

# distribution -> number of arguments
DISTRIBUTIONS = {"choice": None, "uniform": 2, "loguniform": 2, "randint": 2, "qrandint": 3, "quniform": 3}


@dataclass
class TuneSpace:
    """A search space file (tune_spaces/*.yaml)."""

    model: ModelName
    space: dict[str, dict[str, Any]]  # dotted JobConfig key -> {distribution: arguments}
    num_samples: int = 8
    epochs: int = 2  # the most epochs a trial may train (ASHA stops bad trials earlier)
    objective: Objective = "mean_auc"  # weighted_auc: weighted by train.objective_weights
    multi_objective: bool = False  # Optuna over the per-task validation AUCs; returns the Pareto front
    base: dict[str, Any] = field(default_factory=dict)  # JobConfig overrides every trial starts from

    @staticmethod
    def load(path: str | Path) -> "TuneSpace":
        space = load_yaml(path, TuneSpace)
        try:
            space.validate()
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        return space

    def validate(self) -> None:
        if self.num_samples < 1 or self.epochs < 1:
            raise ConfigError("num_samples and epochs must be >= 1")
        base = self.base_job()
        for key, dist in self.space.items():
            if not isinstance(dist, dict) or len(dist) != 1:
                raise ConfigError(f"space.{key}: expected one {{distribution: arguments}}, got {dist!r}")
            (kind, args), = dist.items()
            if kind not in DISTRIBUTIONS:
                raise ConfigError(f"space.{key}: unknown distribution {kind!r}; known: {sorted(DISTRIBUTIONS)}")
            if not isinstance(args, list) or not args:
                raise ConfigError(f"space.{key}.{kind}: expected a non-empty list, got {args!r}")
            n = DISTRIBUTIONS[kind]
            if n is not None:
                if len(args) != n or not all(isinstance(a, (int, float)) for a in args):
                    raise ConfigError(f"space.{key}.{kind}: expected {n} numbers, got {args!r}")
                if not args[0] < args[1]:
                    raise ConfigError(f"space.{key}.{kind}: lower bound {args[0]} must be below upper {args[1]}")
                if kind == "loguniform" and args[0] <= 0:
                    raise ConfigError(f"space.{key}.loguniform: bounds must be > 0")
            for sample in (args if kind == "choice" else args[:2]):  # every value must make a valid config
                try:
                    merge_overrides(base, {key: sample})
                except (ConfigError, KeyError, TypeError) as e:
                    raise ConfigError(f"space.{key}: {sample!r} is not a valid value for this key ({e})") from None

    def base_job(self) -> JobConfig:
        job = from_dict(JobConfig, self.base) if self.base else JobConfig()
        job.model.name = self.model
        job.train.epochs = self.epochs
        job.train.early_stop_metric = self.objective
        return job

    def param_space(self) -> dict[str, Any]:
        def domain(kind: str, args: list) -> Any:
            if kind == "choice":
                return tune.choice(args)
            if kind == "randint":  # inclusive upper bound, as people write ranges
                return tune.randint(int(args[0]), int(args[1]) + 1)
            if kind == "qrandint":
                return tune.qrandint(int(args[0]), int(args[1]), int(args[2]))
            return getattr(tune, kind)(*args)

        return {key: domain(*next(iter(d.items()))) for key, d in self.space.items()}


def _trial(config: dict[str, Any]) -> None:
    """One trial: a normal training run of the sampled config, its reports forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.job import run

    base = from_dict(JobConfig, config["__base__"])
    job = merge_overrides(base, {k: v for k, v in config.items() if k != "__base__"})
    trial = tune.get_context().get_trial_name()
    job.name = f"{base.name}-{trial}"
    job.output = str(Path(base.output) / "trials" / trial)
    run(job, callbacks=[TuneReportCallback()])


def tune_model(space: TuneSpace, job: JobConfig, name: str, storage_path: str, trial_workers: int = 1,
               max_failures: int = 1) -> tune.ResultGrid:
    """Run (or resume, when ``storage_path/name`` holds an interrupted search) the search."""
    from ray.tune.schedulers import ASHAScheduler

    base = job.to_dict()
    base["train"]["num_workers"] = trial_workers
    concurrent = trials_at_once(trial_workers, bool(job.train.use_gpu))
    trainable = tune.with_resources(_trial, {"CPU": 0, "memory": 256 * 1024**2})  # the driver only waits
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"resuming the search in {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                  param_space={**space.param_space(), "__base__": base}).fit()
    tasks = _tasks(job)
    if space.multi_objective:
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("multi_objective searches need Optuna: pip install -e '.[tune]'") from None
        from ray.tune.search.optuna import OptunaSearch

        tune_config = tune.TuneConfig(
            search_alg=OptunaSearch(metric=[f"valid/{t}/auc" for t in tasks], mode=["max"] * len(tasks)),
            num_samples=space.num_samples, max_concurrent_trials=concurrent)
    else:
        tune_config = tune.TuneConfig(
            metric=f"valid/{space.objective}", mode="max", num_samples=space.num_samples, max_concurrent_trials=concurrent,
            # one report per epoch plus the final one: ASHA compares trials epoch by epoch
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=space.epochs + 1, grace_period=1))
    tuner = tune.Tuner(
        trainable, param_space={**space.param_space(), "__base__": base}, tune_config=tune_config,
        run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)))
    return tuner.fit()


def trials_at_once(trial_workers: int, use_gpu: bool) -> int:
    """Concurrent trials the cluster holds: each trial's workers get a GPU or about one CPU, and on CPU one
    CPU stays free for Ray Data (on 2 CPUs: one trial at a time)."""
    res = ray.cluster_resources()
    if use_gpu:
        return max(1, int(res.get("GPU", 0) // trial_workers))
    return max(1, int((res.get("CPU", 1) - 1) // trial_workers))


def _tasks(job: JobConfig) -> list[str]:
    from pipeline.config import DatasetSpec

    return DatasetSpec.load(job.data.spec).task_names


def write_results(results: tune.ResultGrid, space: TuneSpace, job: JobConfig, out: Path) -> dict[str, Any]:
    """results.csv / results.md of all trials, pareto.png, best.yaml; returns the best trial's summary."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = _tasks(job)
    rows = []
    for r in results:
        if r.metrics is None or f"valid/{tasks[0]}/auc" not in r.metrics:
            rows.append({"trial": Path(r.path).name, "status": f"failed: {type(r.error).__name__}" if r.error else "no result"})
            continue
        sampled = {k: v for k, v in r.config.items() if k != "__base__"}
        rows.append({"trial": Path(r.path).name, "status": "ok", "epochs": r.metrics.get("epoch", -1) + 1,
                     **{f"valid_{t}_auc": r.metrics[f"valid/{t}/auc"] for t in tasks},
                     "valid_objective": r.metrics[f"valid/{space.objective}"],
                     **{f"test_{t}_auc": r.metrics.get(f"test/{t}/auc") for t in tasks},
                     **{k: json.dumps(v) if isinstance(v, list) else v for k, v in sampled.items()}})
    df = pd.DataFrame(rows)
    ok = df[df["status"] == "ok"].copy()
    ok["pareto"] = _pareto(ok[[f"valid_{t}_auc" for t in tasks]].to_numpy())
    df = df.merge(ok[["trial", "pareto"]], on="trial", how="left")
    df.sort_values("valid_objective", ascending=False).to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(_markdown(df.sort_values("valid_objective", ascending=False)))
    best = ok.sort_values("valid_objective", ascending=False).iloc[0]  # chosen on validation, never test
    best_result = next(r for r in results if Path(r.path).name == best["trial"])
    best_job = merge_overrides(from_dict(JobConfig, best_result.config["__base__"]),
                               {k: v for k, v in best_result.config.items() if k != "__base__"})
    best_job.name, best_job.output = f"{job.name}-best", str(out / "best_run")
    best_job = portable_paths(best_job)
    (out / "best.yaml").write_text(
        f"# best trial {best['trial']} of {len(ok)} (validation {space.objective} {best['valid_objective']:.4f})\n"
        + yaml.safe_dump(best_job.to_dict(), sort_keys=False))
    if len(tasks) >= 2:
        _plot_pareto(ok, tasks[:2], out / "pareto.png")
    failed = df[df["status"] != "ok"]
    if len(failed):
        print(f"{len(failed)} trial(s) failed after retries: {failed['trial'].tolist()}")
    return {"best_trial": best["trial"], "valid_objective": float(best["valid_objective"]), "trials": len(df),
            "failed": len(failed)}


def portable_paths(job: JobConfig) -> JobConfig:
    """A copy whose local paths are relative when under the working directory (the repo) and start with
    ~/ when under the home directory, so that an exported config works from another clone or machine."""
    def short(p: str) -> str:
        if not p or "://" in p:
            return p
        path = Path(p).resolve()
        for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
            if path.is_relative_to(base):
                return prefix + str(path.relative_to(base))
        return p

    out = from_dict(JobConfig, job.to_dict())
    out.data.path, out.data.spec = short(job.data.path), short(job.data.spec)
    out.storage_path, out.output = short(job.storage_path), short(job.output)
    return out


def _markdown(df: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _pareto(points) -> list[bool]:
    """Non-dominated rows (maximising every column)."""
    return [not any((q >= p).all() and (q > p).any() for q in points) for p in points]


def _plot_pareto(ok: pd.DataFrame, tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    x, y = f"valid_{tasks[0]}_auc", f"valid_{tasks[1]}_auc"
    ax.scatter(ok[x], ok[y], c="lightgray", edgecolor="k", label="trials")
    front = ok[ok["pareto"]].sort_values(x)
    ax.plot(front[x], front[y], "o-", color="tab:red", label="Pareto front")
    ax.set_xlabel(f"{tasks[0]} validation AUC")
    ax.set_ylabel(f"{tasks[1]} validation AUC")
    ax.set_title("per-task AUC across trials (the seesaw)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def compare_with_default(space: TuneSpace, job: JobConfig, out: Path) -> dict[str, Any]:
    """Train the search's starting config (its ``base``, nothing tuned) and the exported best.yaml, each
    chosen on validation and evaluated once on test; writes comparison.md and returns both test objectives."""
    from pipeline.job import run

    default = from_dict(JobConfig, job.to_dict())
    default.name, default.output = f"{job.name}-default", str(out / "default_run")
    best = JobConfig.load(out / "best.yaml")
    default.train.num_workers = best.train.num_workers  # as many workers as the trials had
    tasks = _tasks(job)
    results = {"default": run(default), "best": run(best)}
    metric = space.objective
    lines = [f"Test split: the search's starting config vs its best trial's config (objective: {metric})", "",
             "| config | " + " | ".join(f"test {t} AUC" for t in tasks) + f" | test {metric} | valid {metric} |",
             "|---" * (len(tasks) + 3) + "|"]
    for label, m in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{m['test'][t]['auc']:.4f}" for t in tasks)
                     + f" | {m['test'][metric]:.4f} | {m['valid'][metric]:.4f} |")
    gain = results["best"]["test"][metric] - results["default"]["test"][metric]
    lines += ["", f"best - default on the test {metric}: {gain:+.4f}"]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {label: m["test"][metric] for label, m in results.items()}

