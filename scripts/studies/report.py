"""A shareable report on a sweep, made offline from its run directories.

    python -m scripts.studies.report SWEEP_DIR            # SWEEP_DIR/report.md and PNG plots beside it
    python -m scripts.studies.report SWEEP_DIR --wandb    # also publishes a W&B Report for the sweep's group
    python -m scripts.studies.report SWEEP_DIR --export docs/results/NAME/runs.jsonl   # the compact record
    python -m scripts.studies.report docs/results/NAME/runs.jsonl   # the same report, from the record alone

Every run below SWEEP_DIR (a directory with .hydra/overrides.yaml, summary.json or
metrics.jsonl) is read. Runs are grouped into rows by the overrides whose values differ
between runs, seed excepted, so a row's figures are means over its seeds, with 95% Student-t
intervals. Runs without a readable summary.json (failed, or still running) are listed in the
report, never dropped in silence. The work is scripts.studies.analysis's; this is its command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.studies import analysis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, or a runs.jsonl record file")
    parser.add_argument("--wandb", action="store_true", help="also publish a W&B Report for the sweep's group")
    parser.add_argument("--export", type=Path, metavar="RUNS_JSONL",
                        help="write the complete runs' compact record to this file (a record already "
                             "there keeps the runs the sweep directory does not hold)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.exists():
        parser.error(f"{args.sweep_dir} is neither a directory nor a record file")
    if args.export:
        runs = analysis.collect_runs(args.sweep_dir)
        count = analysis.export_records(runs, args.sweep_dir, args.export)
        print(f"{args.export}: {count} runs, {sum(r.complete for r in runs)} of them from {args.sweep_dir}")
    path, rows, runs = analysis.write_report(args.sweep_dir)
    print(analysis.table_markdown(rows) if rows else "no complete runs")
    for run in runs:
        if not run.complete:
            print(f"incomplete: {run.path}: {run.problem}")
    print(f"wrote {path} and {len(analysis.PLOTS) if rows else 0} plots beside it")
    if args.wandb:
        groups, project, entity = analysis.wandb_target(args.sweep_dir, runs)
        report = analysis.build_wandb_report(groups, project, entity, rows, f"Sweep {args.sweep_dir.name}")
        print(analysis.publish(report))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
