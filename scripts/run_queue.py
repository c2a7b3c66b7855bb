"""Work through a study's queue of runs, in its order, with as many workers as there are cores.

    python scripts/run_queue.py docs/results/convergence/queue.txt --out multirun/convergence/runs \\
        -- dataset.root=../shared/data/cifar10 training.num_threads=1 wandb.mode=disabled

Each non-empty line of the queue file (after `#` comments) is one run: train.py overrides.
A run's directory is OUT/<its overrides as a short name>. A worker skips runs that finished
(summary.json) or that the study's committed record already holds (runs.jsonl beside the
queue file, written by `python -m scripts.studies.report OUT --export`: a fresh machine does not redo
them), claims the first free one (OUT/<name>.claim, holding its process id, made
atomically), and runs `python train.py ... resume=auto`, so a run interrupted in an earlier
session continues from its last checkpoint. Start one worker per core; stop them at any time
(a run loses at most its unfinished epoch). A claim whose process is gone is taken over.
Workers read the queue file again before each run, so lines added or reordered while they
work are taken up at their next run. A run that starts from another's checkpoint
(`init_from=PATH`) is not claimed before PATH exists: a worker takes the next free run instead,
and when only such runs are left while other runs are still in progress, it waits for them.
Overrides after `--` go to every run and stay out of the directory names.

A run that fails (a non-zero exit other than a stop signal's) is marked failed,
OUT/<name>.failed holding its exit code and log, and skipped by every worker: the queue goes on
with its other lines, `--list` shows it, and each worker's exit code is 1 while any line is
marked. Delete the marker to run the line again. A run stopped by SIGTERM or Ctrl-C is not
failed: its worker stops, and the next worker resumes the run from its checkpoint.

`--precision bf16` keeps a study in one precision across machines: a run that leaves
`training.precision` to the machine (`auto`) is taken only by a worker whose machine resolves
`auto` to bf16 on the device the run names (`device=`, default auto), so a worker on a CPU without native bf16 does not train the study's next seed in
fp32 beside its bf16 seeds (an arm of its own, with nothing to pair with); it takes the lines
that name their precision and leaves the rest, as `--list` shows ("elsewhere").
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from adaptive_sparse.training.records import parse_overrides, read_queue, run_name
from adaptive_sparse.training.runtime import resolve_device, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(claim_file: Path) -> bool:
    """Whether the process that wrote a claim (its process id) still runs."""
    try:
        owner = int(claim_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return owner > 0 and alive(owner)


def claim(claim_file: Path) -> bool:
    """Create the claim atomically; take over one left by a process that is gone."""
    try:
        fd = os.open(claim_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if owner_alive(claim_file):
            return False
        claim_file.unlink(missing_ok=True)  # stale: its worker died with the last session
        return claim(claim_file)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def recorded_runs(queue_file: Path) -> set[str]:
    """Names of the runs in the record file beside the queue (none if there is none)."""
    record = queue_file.parent / "runs.jsonl"
    if not record.exists():
        return set()
    return {Path(json.loads(line)["run"]).name for line in record.read_text().splitlines() if line.strip()}


def missing_checkpoint(overrides: list[str]) -> Path | None:
    """The init_from checkpoint a run starts from, if it does not exist yet (relative to the repo)."""
    for override in overrides:
        if override.startswith("init_from="):
            path = Path(override.split("=", 1)[1].strip("'\""))
            path = path if path.is_absolute() else ROOT / path
            return None if path.exists() else path
    return None


def finished(run_dir: Path, recorded: set[str]) -> bool:
    """A run is done when it wrote its summary here or the study's record already holds it."""
    return (run_dir / "summary.json").exists() or run_dir.name in recorded


def names_precision(overrides: list[str]) -> bool:
    """Whether the overrides set training.precision themselves (rather than leave it to `auto`)."""
    return "training.precision" in parse_overrides(overrides)


def auto_precision(overrides: list[str]) -> str:
    """What `training.precision=auto` trains in on this machine, on the device the overrides
    name (`device=cpu` on a machine with a GPU trains on its CPU, in the CPU's auto)."""
    return resolve_precision("auto", resolve_device(parse_overrides(overrides).get("device", "auto")))


def for_another_machine(overrides: list[str], study_precision: str | None, machine_precision: str) -> bool:
    """A run that leaves its precision to the machine, where the machine's `auto` is not the
    study's precision (None: any machine will do)."""
    return study_precision not in (None, machine_precision) and not names_precision(overrides)


def failed_marker(run_dir: Path) -> Path:
    """OUT/<name>.failed: the run failed; its exit code and log (see mark_failed)."""
    return run_dir.with_name(f"{run_dir.name}.failed")


# A run's exit codes that mean it was stopped, not that it failed: 128 + signal (train.py saved a
# checkpoint first), or the signal's negative number (killed before it could).
STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def mark_failed(run_dir: Path, code: int) -> Path:
    """Write the run's failure marker: its exit code and where its log is."""
    log = run_dir / "train.log"
    where = f"log {log}" if log.exists() else "no train.log (it failed before training started): see the worker's output"
    marker = failed_marker(run_dir)
    marker.write_text(f"exit code {code}, {where}\n")
    return marker


def failed_runs(queue: list[list[str]], out: Path, recorded: set[str]) -> list[list[str]]:
    """Unfinished runs marked failed."""
    return [o for o in queue if failed_marker(out / run_name(o)).exists() and not finished(out / run_name(o), recorded)]


def next_run(queue: list[list[str]], out: Path, recorded: set[str] = frozenset(),
             skip: Callable[[list[str]], bool] = lambda overrides: False) -> tuple[list[str], Path] | None:
    """The first run of the queue that is not finished, not failed, not waiting for a checkpoint
    and not `skip`ped, claimed for this process; None when there is none."""
    for overrides in queue:
        run_dir = out / run_name(overrides)
        if (finished(run_dir, recorded) or failed_marker(run_dir).exists() or missing_checkpoint(overrides)
                or skip(overrides)):
            continue
        if claim(out / f"{run_dir.name}.claim"):
            return overrides, run_dir
    return None


def runs_in_progress(out: Path) -> bool:
    """Whether any claim in OUT belongs to a live process (a run that may yet write a checkpoint)."""
    return any(owner_alive(claim_file) for claim_file in out.glob("*.claim"))


def blocked_runs(queue: list[list[str]], out: Path, recorded: set[str]) -> list[list[str]]:
    """Unfinished runs that wait for another run's checkpoint."""
    return [o for o in queue if missing_checkpoint(o) and not finished(out / run_name(o), recorded)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queue", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--list", action="store_true", help="print each run's state and exit")
    parser.add_argument("--poll-s", type=float, default=60.0,
                        help="while only runs waiting for a checkpoint are left, look again this often")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="the study's precision: runs that leave it to the machine (auto) are taken "
                             "only on a machine whose auto resolves to it")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = auto_precision(common)
    def elsewhere(overrides: list[str]) -> bool:
        line = [*overrides, *common]
        return for_another_machine(line, args.precision, auto_precision(line))
    if args.list:
        list_runs(args.queue, args.out, elsewhere)
        return 0
    # the queue and the record are read again before each run: edit the queue while workers run
    while True:
        queue, recorded = read_queue(args.queue), recorded_runs(args.queue)
        job = next_run(queue, args.out, recorded, skip=elsewhere)
        if job is None:
            blocked = blocked_runs(queue, args.out, recorded)
            if blocked and runs_in_progress(args.out):
                time.sleep(args.poll_s)  # another worker's run may yet write the checkpoint they start from
                continue
            for overrides in blocked:
                print(f"never started (no {missing_checkpoint(overrides)}): {' '.join(overrides)}", flush=True)
            left = [o for o in queue if not finished(args.out / run_name(o), recorded) and elsewhere(o)]
            if left:
                print(f"{len(left)} runs left for a machine that trains {args.precision} "
                      f"(this one trains {machine} at training.precision=auto)", flush=True)
            break
        code = run(*job, common)
        if code in STOPPED:
            print(f"run stopped with exit code {code}: {job[1]} (a worker's resume=auto continues it)", flush=True)
            return code
    failed = failed_runs(queue, args.out, recorded)
    for overrides in failed:
        print(f"failed ({failed_marker(args.out / run_name(overrides)).read_text().strip()}): "
              f"{' '.join(overrides)}", flush=True)
    if failed:
        print(f"queue done but for {len(failed)} failed run(s): delete {args.out}/<name>.failed to run one again",
              flush=True)
        return 1
    print("queue done", flush=True)
    return 0


def run(overrides: list[str], run_dir: Path, common: list[str]) -> int:
    """train.py on one claimed run; a failure is marked before the claim goes, so no other worker
    takes the run in between."""
    # quoted: the directory's name holds '=' and ',', which Hydra's override grammar would parse
    command = [sys.executable, "train.py", *overrides, *common, f"hydra.run.dir='{run_dir}'", "resume=auto"]
    print("$", " ".join(command), flush=True)
    try:
        code = subprocess.call(command, cwd=ROOT)
        if code != 0 and code not in STOPPED:
            print(f"run failed with exit code {code}, marked {mark_failed(run_dir, code)}; the queue goes on",
                  flush=True)
    finally:
        run_dir.with_name(f"{run_dir.name}.claim").unlink(missing_ok=True)
    return code


def list_runs(queue_file: Path, out: Path, elsewhere: Callable[[list[str]], bool]) -> None:
    """Each run's state, one line each; a failed run with its exit code and log."""
    recorded = recorded_runs(queue_file)
    for overrides in read_queue(queue_file):
        run_dir = out / run_name(overrides)
        failed = failed_marker(run_dir)
        state = ("done" if (run_dir / "summary.json").exists() else
                 "recorded" if run_dir.name in recorded else
                 "failed" if failed.exists() else
                 "claimed" if (out / f"{run_dir.name}.claim").exists() else
                 "blocked" if missing_checkpoint(overrides) else
                 "elsewhere" if elsewhere(overrides) else
                 "started" if run_dir.exists() else "waiting")
        detail = f"  ({failed.read_text().strip()})" if state == "failed" else ""
        print(f"{state:8s} {' '.join(overrides)}{detail}")


if __name__ == "__main__":
    sys.exit(main())
