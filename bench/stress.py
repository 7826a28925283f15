"""Stress: run a training job N times and count the Ray workers that died, from each run's own Ray logs.

Each run is its own process (``python jobs/train_ple.py ...``, which starts its own local Ray) with its own
Ray temp dir (``RAY_TMPDIR``), output and storage path, so a run's logs are its alone and no run resumes
another. After a run, every file under its Ray session's ``logs/`` is read for the marks of a process that
died: a fatal signal (``*** SIGSEGV``, ``*** SIGABRT`` ... ``received``), ``Fatal Python error``, glibc's heap
checks (``malloc(): ...``, ``free(): ...``, ``double free``, ``corrupted ...``), and Train's
``Error count: N``; the job's ``metrics.json`` gives its ``resumes``. A process whose stack shows it was
ending (``~CoreWorker`` / ``TerminateHandler``, after the run's work) counts as a shutdown abort, apart from
the deaths in mid-run.

    python bench/stress.py --runs 50                                  # the default job, 50 times
    python bench/stress.py --runs 20 --label before -- --train-rows 300000 --epochs 1
    python bench/stress.py --runs 20 --env MALLOC_PERTURB_=165 --load 1 -- --train-rows 300000

``--script`` runs another job with the same arguments, e.g. ``bench/stress_startups.py`` (many worker
start-ups per run). ``--load K`` runs K
busy-loop processes beside each job (a loaded machine); ``--env`` sets variables for the job and every Ray
process it starts; ``--cores`` lets crashed processes dump core (read with gdb) into the run's directory.
Arguments after ``--`` go to the job. Results: ``bench/results/stress.md`` and ``stress.json`` (``runs``,
``worker_deaths``, ... of the latest run, and every label's figures). Not in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, machine

FATAL = re.compile(r"\*\*\* (SIG[A-Z]+) received|Fatal Python error: (\w+)|"
                   r"(malloc\(\)[^\n]*|free\(\)[^\n]*|double free[^\n]*|corrupted [^\n]*)$", re.M)
SHUTDOWN = re.compile(r"~CoreWorker|TerminateHandler")
ERROR_COUNT = re.compile(r"Error count: (\d+)")
UNEXPECTED_EXIT = re.compile(r"Worker unexpectedly exits")


def scan_logs(session: Path) -> dict:
    """Deaths (one per process log with a fatal mark) and Train's error count, from a Ray session's logs."""
    deaths, shutdown_aborts, error_count, unexpected = [], [], 0, 0
    for f in sorted((session / "logs").rglob("*")):
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        error_count = max([error_count, *map(int, ERROR_COUNT.findall(text))])
        unexpected += len(UNEXPECTED_EXIT.findall(text)) if f.name.startswith("raylet") else 0
        marks = [next(g for g in m.groups() if g) for m in FATAL.finditer(text)]
        if not marks:
            continue
        entry = {"log": str(f.relative_to(session)), "marks": sorted(set(marks))}
        (shutdown_aborts if SHUTDOWN.search(text) and not any("SEGV" in m for m in marks) else deaths).append(entry)
    return {"deaths": deaths, "shutdown_aborts": shutdown_aborts, "error_count": error_count,
            "unexpected_exits": unexpected}


def end_leftovers(run_dir: Path) -> int:
    """Kill what is left of a run's Ray instance (its processes name the run's dir, or are a raylet's
    children); returns how many there were. A finished job leaves none; a killed or timed-out one may."""
    pids = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(run_dir).encode() in (d / "cmdline").read_bytes():
                pids.add(int(d.name))
        except OSError:
            continue
    for d in Path("/proc").iterdir():  # Ray workers: children of the run's raylet
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) in pids:
                pids.add(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return len(pids)


def busy_loops(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def one_run(i: int, work: Path, job: list[str], env: dict[str, str], cores: bool, load: int, timeout: int,
            script: str = "jobs/train_ple.py") -> dict:
    run_dir = work / f"{i:03d}"  # short: Ray's socket paths under it must stay within 107 bytes
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "r").mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / script), *job, "--name", f"stress-{i}",
           "--output", str(run_dir / "out"), "--storage-path", str(run_dir / "results")]
    limit = (lambda: resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)) if cores else None
    hogs = busy_loops(load)
    t0 = time.time()
    try:
        with open(run_dir / "job.log", "w") as log:
            try:
                rc = subprocess.run(cmd, env=os.environ | env | {"RAY_TMPDIR": str(run_dir / "r")}, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=run_dir, timeout=timeout, preexec_fn=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
    finally:
        for h in hogs:
            h.kill()
        leftovers = end_leftovers(run_dir)
    seconds = time.time() - t0
    sessions = sorted((run_dir / "r" / "ray").glob("session_2*"))
    found = scan_logs(sessions[-1]) if sessions else {"deaths": [], "shutdown_aborts": [], "error_count": 0,
                                                      "unexpected_exits": 0}
    job_log = (run_dir / "job.log").read_text(errors="replace")
    metrics = run_dir / "out" / "metrics.json"
    resumes = json.loads(metrics.read_text()).get("resumes", 0) if metrics.exists() else None
    last = job_log.strip().splitlines()[-1:] if rc != 0 else []
    return {"run": i, "rc": rc, "leftover_processes": leftovers, "last_line": last[0][:300] if last else "", "seconds": round(seconds, 1), "resumes": resumes, **found,
            "job_log_fatal": sorted({next(g for g in m.groups() if g) for m in FATAL.finditer(job_log)}),
            "cores": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("core*") if p.is_file())}


def _processes(entries: list[dict]) -> set[str]:
    """Distinct processes among log entries: a process's .err and its core-worker log name the same pid."""
    return {re.split(r"[_-]", e["log"].rsplit(".", 1)[0])[-1] for e in entries}


def summarize(label: str, runs: list[dict], args) -> dict:
    return {"label": label, "runs": len(runs), "script": args.script, "job_args": args.job, "env": args.env, "load": args.load,
            "worker_deaths": sum(len(_processes(r["deaths"])) for r in runs),
            "runs_with_deaths": sum(bool(r["deaths"]) for r in runs),
            "restarts": sum(r["error_count"] for r in runs),
            "resumes": sum(r["resumes"] or 0 for r in runs),
            "shutdown_aborts": sum(len(_processes(r["shutdown_aborts"])) for r in runs),
            "failed_runs": sum(r["rc"] != 0 for r in runs),
            "seconds_per_run": round(sum(r["seconds"] for r in runs) / max(len(runs), 1), 1)}


def write(label: str, summary: dict, runs: list[dict], quiet: bool = False) -> None:
    path = RESULTS / "stress.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    labels = saved.get("labels", {}) | {label: {**summary, "per_run": runs, "machine": machine()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "machine": machine(), "labels": labels}, indent=2))
    cols = ["label", "runs", "worker_deaths", "runs_with_deaths", "restarts", "resumes", "shutdown_aborts",
            "failed_runs", "seconds_per_run", "script", "job_args", "env", "load"]
    lines = ["# Stress: worker deaths over repeated runs", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in labels.values():
        s = {"script": "jobs/train_ple.py"} | s  # labels written before --script existed
        lines.append("| " + " | ".join(f"`{' '.join(s[c])}`" if c in ("job_args", "env") else str(s[c]) for c in cols) + " |")
    lines += ["", "Deaths (process logs with a fatal signal, `Fatal Python error` or a glibc heap check):", ""]
    for s in labels.values():
        for r in s["per_run"]:
            for d in r["deaths"]:
                lines.append(f"- {s['label']} run {r['run']}: `{d['log']}`: {', '.join(d['marks'])}")
    lines += ["", "Command: `python bench/stress.py` (see its docstring); each label's machine:", ""]
    lines += [f"- {s['label']}: " + ", ".join(f"{k} {v}" for k, v in s["machine"].items()) for s in labels.values()]
    (RESULTS / "stress.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def saved_runs(args) -> list[dict]:
    """The label's runs so far, refused if they ran another job: appending must not mix configs."""
    path = RESULTS / "stress.json"
    saved = json.loads(path.read_text()).get("labels", {}).get(args.label) if path.exists() else None
    if saved is None:
        return []
    for key, now in {"job_args": args.job, "env": args.env, "load": args.load}.items():
        if saved[key] != now:
            sys.exit(f"--append: label {args.label!r} ran with {key} {saved[key]!r}, not {now!r}")
    if saved.get("script", "jobs/train_ple.py") != args.script:
        sys.exit(f"--append: label {args.label!r} ran {saved.get('script')}, not {args.script}")
    return saved["per_run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--script", default="jobs/train_ple.py", help="the job, relative to the repo (e.g. "
                   "bench/stress_startups.py: many worker start-ups per run)")
    p.add_argument("--label", default="run", help="the figures' name in stress.md/json (e.g. before, after)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job and its Ray processes")
    p.add_argument("--load", type=int, default=0, help="busy-loop processes beside each run")
    p.add_argument("--cores", action="store_true", help="let crashed processes dump core into the run's dir")
    p.add_argument("--work", default="/tmp/ms", help="runs' directories (kept: their logs)")
    p.add_argument("--timeout", type=int, default=900, help="seconds a run may take")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    p.add_argument("--append", action="store_true", help="continue the label's saved runs (same job, env and "
                   "load) instead of replacing them: a 50-run figure can be gathered over several sittings")
    p.add_argument("--scan", metavar="RAY_TMPDIR", help="only scan every Ray session under this temp root (e.g. "
                   "the one a test run used) for dead processes, and exit 1 if there are any")
    p.add_argument("job", nargs="*", help="arguments for jobs/train_ple.py (after --)")
    args = p.parse_args()
    if args.scan:
        found = {str(s): scan_logs(s) for s in sorted(Path(args.scan).rglob("session_2*")) if s.is_dir()}
        for session, f in found.items():
            for kind in ("deaths", "shutdown_aborts"):
                for d in f[kind]:
                    print(f"{kind[:-1]}: {session}/{d['log']}: {', '.join(d['marks'])}")
        bad = sum(len(f["deaths"]) + len(f["shutdown_aborts"]) for f in found.values())
        print(f"{len(found)} Ray sessions scanned: {bad} processes with a fatal signal or heap error, "
              f"Train error counts {[f['error_count'] for f in found.values() if f['error_count']]}")
        sys.exit(1 if bad else 0)
    env = dict(e.split("=", 1) for e in args.env)
    work = Path(args.work) / args.label
    runs = saved_runs(args) if args.append else []
    for i in range(len(runs), len(runs) + args.runs):
        r = one_run(i, work, args.job, env, args.cores, args.load, args.timeout, args.script)
        runs.append(r)
        print(f"[{args.label}] run {i}: rc {r['rc']} in {r['seconds']} s, deaths {len(r['deaths'])}, "
              f"error count {r['error_count']}, resumes {r['resumes']}, shutdown aborts {len(r['shutdown_aborts'])}"
              + (f"\n    job failed: {r['last_line']}" if r["rc"] != 0 else "")
              + "".join(f"\n    {d['log']}: {d['marks']}" for d in r["deaths"]), flush=True)
        if not args.no_write:  # after every run: an interrupted stress still leaves its figures so far
            write(args.label, summarize(args.label, runs, args), runs, quiet=True)
    summary = summarize(args.label, runs, args)
    print(json.dumps(summary))
    if not args.no_write:
        write(args.label, summary, runs)


if __name__ == "__main__":
    main()
