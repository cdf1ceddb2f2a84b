"""The ``distcl`` command line: one entry point for data, training, evaluation and tuning.

distcl data build jobs/quickstart.yaml      # WebDataset shards + manifest
distcl data verify jobs/quickstart.yaml     # check shards against the manifest
distcl run jobs/quickstart.yaml [--smoke] [--set train.epochs=3]
distcl eval runs/quickstart [--ray [ADDR]]  # recompute metrics + report (search as Ray tasks)
distcl backfill runs/quickstart [--transform] [--apply --model T --fraction F --policy P]
distcl compare jobs/fashion_mnist/*.yaml    # methods side by side
distcl tune jobs/fashion_mnist/tune_cl2r.yaml
distcl submit JOB --address http://HOST:8265 [--wait]
distcl doctor [JOB] [--address ADDR]        # will it run here / on every node?
distcl bench {train,search,eval,memory,sequence,data}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from distcl import storage
from distcl.bench import BENCHES
from distcl.config import ConfigError, JobConfig, load_job
from distcl.rundir import RunDir, RunDirBusy


def _job(args) -> JobConfig:
    return load_job(args.job, overrides=args.set or (), smoke=True if args.smoke else None)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="YAML job file (see jobs/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a field, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--smoke", action="store_true", help="shrink the job to seconds")


def _add_token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token", help="auth token (visible in ps: prefer --token-file or $RAY_JOB_TOKEN)"
    )
    p.add_argument("--token-file", metavar="FILE", help="file holding the auth token")


def cmd_data_build(args) -> int:
    from rich.progress import Progress

    from distcl.data.shards import build_shards, verify_shards

    job = _job(args)
    if not args.local:  # one Ray task per shard
        from distcl.localray import init_ray

        init_ray()
    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        tid = bar.add_task("writing shards", total=None)
        out, scenario, rebuilt = build_shards(
            job, progress=lambda done, total: bar.update(tid, completed=done, total=total)
        )
    info = verify_shards(out)
    size = sum(e.size for e in storage.listdir(out) if e.name.endswith(".tar"))
    verb = "built" if rebuilt else "up to date (nothing rewritten)"
    print(
        f"{out}: {verb}; {info['shards']} shards, {info['samples']} samples, "
        f"{size / 2**20:.1f} MiB, {scenario.num_tasks} tasks, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return 0


def cmd_data_verify(args) -> int:
    from distcl.data.shards import verify_shards

    job = _job(args)
    info = verify_shards(job.shards_dir, deep=args.deep)
    print(f"{job.shards_dir}: OK ({info['shards']} shards, {info['samples']} samples)")
    return 0


def cmd_run(args) -> int:
    from distcl.localray import init_ray
    from distcl.pipeline import run_job, time_breakdown

    job = _job(args)
    t0 = time.perf_counter()
    if args.address:
        init_ray(args.address)
    out = run_job(job, progress=not args.no_progress, evaluate=not args.no_eval)
    wall = time.perf_counter() - t0
    print(f"run finished in {wall:.0f}s -> {out['run_dir']}")
    print(f"  where the time went: {time_breakdown(out, wall)}")
    return 0


def _ray_option(p, help: str) -> None:
    """``--ray [ADDRESS]``: absent None, bare "" (RAY_ADDRESS or an embedded Ray)."""
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=help)


def cmd_eval(args) -> int:
    from distcl.eval.evaluate import evaluate_run

    rd = RunDir(args.run_dir).require("scenario_json")
    if args.set:  # other evaluation settings for a finished run: eval.* only, kept in job.yaml
        from distcl.config import dump_job, parse_job, to_dict
        from distcl.rundir import atomic_write

        bad = [s for s in args.set if not s.startswith("eval.")]
        if bad:
            raise ConfigError(f"--set {bad[0]}: distcl eval changes eval.* settings only (the "
                              "rest of a finished run is what it was trained with)")  # fmt: skip
        job = parse_job(to_dict(rd.load_job()) | {"resolved": True}, str(rd.job_yaml), args.set)
        atomic_write(rd.job_yaml, dump_job(job))
    if args.ray is not None:  # the search then runs as Ray tasks (distcl.eval.distributed)
        from distcl.localray import init_ray

        init_ray(args.ray or None)
    evaluate_run(rd.root)  # a path or a URI
    return 0


def cmd_backfill(args) -> int:
    from distcl.eval.backfill_scan import backfill_run

    run_dir = RunDir(args.run_dir).require("scenario_json").root
    if args.apply:
        from distcl.reindex import apply_backfill

        apply_backfill(run_dir, model=args.model, fraction=args.fraction,
                       policy=(args.policy or ["random"])[0], ray_address=args.ray,
                       transform=args.transform)  # fmt: skip
        return 0
    if args.ray is not None:  # the passes run as Ray tasks (distcl.eval.distributed)
        from distcl.localray import init_ray

        init_ray(args.ray or None)
    policies = args.policy or ["random", "oldest", "distance", "class_mean"] + (
        ["uncertainty"] if args.transform else [])  # fmt: skip
    backfill_run(run_dir, pairs=args.pairs, policies=policies, steps=args.steps,
                 protocols=args.protocol, map_k=None if args.no_map else 100,
                 transform=args.transform)  # fmt: skip
    return 0


def cmd_report(args) -> int:
    from distcl.eval.report import write_report

    rd = RunDir(args.run_dir).require("metrics_json")
    print(write_report(rd.root, storage.read_json(rd.metrics_json)))
    return 0


def cmd_compare(args) -> int:
    from distcl.pipeline import compare_jobs

    jobs = [
        load_job(j, overrides=args.set or (), smoke=True if args.smoke else None) for j in args.jobs
    ]
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else None
    compare_jobs(jobs, Path(args.out), run=not args.no_run, seeds=seeds, protocol=args.protocol)
    return 0


def cmd_tune(args) -> int:
    from distcl.tune.search import tune_job

    if args.report and args.confirm:
        raise ValueError("--report runs nothing; --confirm runs 2K jobs: use one of them")
    if args.best and (args.report or not args.confirm):
        raise ValueError("--best FILE confirms FILE's values: use it with --confirm K")
    best = load_job(args.best) if args.best else None
    tune_job(_job(args), report_only=args.report, confirm=args.confirm, pick=args.pick,
             best_from=best)  # fmt: skip
    return 0


def cmd_submit(args) -> int:
    from distcl.submit import submit_job

    return submit_job(args)


def cmd_jobs(args) -> int:
    from distcl.submit import jobs_command

    return jobs_command(args)


def cmd_doctor(args) -> int:
    from distcl.doctor import doctor

    if args.job:
        job = _job(args)
    else:  # the defaults of every section (Fashion-MNIST, ResNet-32, runs/)
        from distcl.config import parse_job

        job = parse_job({"name": "doctor"}, "<defaults>", args.set or ())
    return doctor(job, address=args.address)


def cmd_bench(args) -> int:
    from distcl.bench import run_bench

    return run_bench(args.name, args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distcl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or verify a job's WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser(
        "build", help="write shards per task/split + manifest.json (atomic, idempotent)"
    )
    _add_job_args(p)
    p.set_defaults(func=cmd_data_build)
    p.add_argument("--local", action="store_true", help="write shards in this process, no Ray")
    p = dsub.add_parser(
        "verify", help="check shard sizes against the manifest (--deep: sha256, decode, count)"
    )
    _add_job_args(p)
    p.add_argument("--deep", action="store_true", help="also decode and count every sample")
    p.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("run", help="train every task (resuming), evaluate, write the report")
    _add_job_args(p)
    p.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray on 127.0.0.1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "eval",
        help="recompute the compatibility matrix and stale-gallery "
        "metrics of a run dir, rewrite its report",
    )
    p.add_argument("run_dir")
    _ray_option(p, "search as Ray tasks: on the cluster at ADDRESS (or $RAY_ADDRESS), else on "
                "an embedded local Ray")  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="eval.KEY=VALUE",
        help="evaluate with other eval settings (e.g. eval.protocols=[closed,openset]); "
        "recorded in the run's job.yaml",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "backfill",
        help="backfilling curves of a run (quality as the gallery is re-embedded in a "
        "policy's order), or --apply: re-embed a fraction of the stored gallery",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--pairs",
        default="last",
        help="last (every older model against the last), all, or J,I (1-indexed)",
    )
    p.add_argument(
        "--policy",
        action="append",
        metavar="P",
        help="random, oldest, distance, class_mean, uncertainty (repeatable; "
        "default: the first four; --apply: one, default random)",
    )
    p.add_argument("--steps", type=int, default=20, help="K: the curve has K + 2 points")
    p.add_argument(
        "--protocol",
        action="append",
        choices=["closed", "open"],
        help="default: those the run was evaluated on",
    )
    p.add_argument("--no-map", action="store_true", help="CMC@1 only (no mAP@100 lists)")
    p.add_argument(
        "--apply",
        action="store_true",
        help="re-embed the first FRACTION of the stored gallery (in the policy's "
        "order) with model MODEL, as a new gallery version",
    )
    p.add_argument(
        "--transform",
        action="store_true",
        help="method fct: curves also with the old rows sent through h (uncertainty: "
        "ordered by h's sigma); --apply: write every stored row older than MODEL through h "
        "(no image read) as a gallery version",
    )
    p.add_argument("--model", type=int, help="--apply: the model (1-indexed task) that embeds")
    p.add_argument("--fraction", type=float, help="--apply: share of the gallery, in [0, 1]")
    _ray_option(p, "run the passes as Ray tasks (on ADDRESS, $RAY_ADDRESS or an embedded Ray)")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("report", help="re-render report.md and plots from metrics.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="run several jobs and compare them side by side")
    p.add_argument("jobs", nargs="+")
    p.add_argument("--out", default="runs/compare", help="folder for the table and figure")
    p.add_argument(
        "--no-run", action="store_true", help="only tabulate finished runs (their metrics.json)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--smoke", action="store_true")
    p.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="run every job once per seed; cells are mean ± std over the seeds",
    )
    p.add_argument("--protocol", help="the matrices the figure shows (default: all)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tune", help="Ray Tune search over the job's tune: block")
    _add_job_args(p)
    p.add_argument(
        "--report",
        action="store_true",
        help="run nothing: tabulate the trials stored so far (a running or interrupted search)",
    )
    p.add_argument(
        "--confirm",
        type=int,
        metavar="K",
        help="after the search, rerun the best trial and the job's own values on K seeds "
        "each; report mean and spread (default: tune.confirm_seeds)",
    )
    p.add_argument(
        "--best",
        metavar="FILE",
        help="with --confirm: run no search, confirm FILE's values of the searched keys "
        "(a best.yaml an earlier search wrote) against the job's own",
    )
    p.add_argument(
        "--pick",
        metavar="METRIC|W1,W2",
        help="Pareto search: the trade-off best.yaml is written for, e.g. am, ac or 0.7,0.3 "
        "(weights in the order of tune.objectives; default: tune.pick, else equal weights)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    _add_job_args(p)
    p.add_argument("--address", required=True, help="http://HOST:8265")
    p.add_argument("--tune", action="store_true", help="run `distcl tune` instead of run")
    p.add_argument("--wait", action="store_true", help="stream logs, exit with job status")
    p.add_argument("--working-dir", default=".", help="project folder shipped to the cluster")
    _add_token_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list submitted jobs, show logs, stop one")
    p.add_argument("action", choices=["list", "logs", "stop", "status"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", required=True)
    _add_token_args(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "doctor",
        help="check that a job can run here (versions, process groups, a DDP step, faiss-gpu, "
        "data and output roots, loopback), or on every node of a cluster with --address",
    )
    p.add_argument("job", nargs="?", help="YAML job file (default: every section's defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--address", help="a Ray cluster: one check task per node")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "bench", help="benchmarks, reported as ratios against a baseline measured in the same run"
    )
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RunDirBusy) as e:
        print(f"distcl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
