"""One GPU check, one command (issue 40): on a lent GPU machine, within 8 minutes on one H100 and the
64 MiB of working tree it is sent, install the carried wheels, run the CUDA tier, then measure, each
stage's JSON record written to --out as it finishes (a timeout leaves the records before it).

    python -m scripts.gpu_check --prepare             # here, once: wheels/ and data/ (both ignored by git)
    python -m scripts.gpu_check --dry-run --out DIR   # here, on the CPU: every stage, tiny settings
    python3 -m scripts.gpu_check --out $OUT           # on the GPU machine

The machine is bare (its Python 3.12, torch, timm, torchvision, tqdm; no hydra-core, omegaconf,
antlr4 or pytest) and reaches nothing outside it, so the check carries what --prepare makes:
wheels/ (hydra-core, omegaconf, antlr4-python3-runtime, pytest and their needs, 2.9 MiB),
data/cifar10.pack (17.7 MiB: scripts/pack_cifar10.py) and data/shakespeare_char/input.txt
(1.1 MiB): with the tracked tree (~6 MiB), about 28 MiB of the 64. The run tool's call:

    run(command="PYTHONUNBUFFERED=1 python3 -m scripts.gpu_check --out $OUT", carry=["wheels", "data"], timeout_s=540)

Stages, in the order the issue needs their answers, each in a process of its own under its own
limit; one that cannot have its floor before the --budget-s deadline is not started, and says so.
Estimates on an H100, in seconds (STAGES holds them with each cap): install 10 (nine wheels,
offline); cuda_tests 90 (tests/gpu: 16 model cases, two FlexAttention compiles per precision,
five runs of 512 images); fastnet 70 (a warm-up that decodes the pack into the cache and lets cuDNN
tune, then airbench94's recipe in full, 9.9 epochs in bf16 with the data on the GPU, then sundew,
memory scoring and packed, and random, packed, at 0.5: ~10 s each with their evaluations);
report_config 35 (`python train.py`'s defaults for 3 epochs: 782 launch-bound batches of 64 an
epoch); baby_gpt 35 (+experiment=shakespeare_char_baby: 2,000 launch-bound steps); attention 100
(scripts/bench_flex.py: its checks and contexts 2K-32K, each compiled, ~8 s a compile);
flex_tests 90 (tests/library/test_flex.py's CUDA test: 12 compiled cases). 430 s of the 470.

Records: check.json (the GPU, each stage's status, time and test outcomes), fastnet.json,
report_config.json, baby_gpt.json, attention.json (bench_flex's own) and gpu_check.log (every
stage's output, as it runs); scripts/gpu_records.py makes docs/bench/gpu/ and docs/measuring.md's
GPU section of them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "wheels"
DATA = ROOT / "data"  # ignored by git (/data/), carried: the GPU machine cannot reach ../shared
PACK, CORPUS = DATA / "cifar10.pack", DATA / "shakespeare_char" / "input.txt"
CARRIED = (WHEELS, PACK, CORPUS)
# what the GPU machine lacks, at this checkout's versions (antlr4 4.9 is the series hydra-core 1.3 pins)
REQUIREMENTS = ["hydra-core==1.3.8", "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3", "pytest==9.2.0"]
GPU_PYTHON = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              "--platform", "manylinux_2_17_x86_64"]
SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "clocks.max.mem", "power.draw", "temperature.gpu")
SUMMARY_KEYS = ("train_time_s", "epoch_times_s", "eval_time_s", "val_acc", "val_acc_tta0", "val_acc_tta1",
                "val_acc_tta2", "val_loss", "val_bpc", "activation_rate", "samples_seen", "samples_trained",
                "epochs_trained", "gate", "model", "precision", "device", "hardware", "torch", "data_source",
                "git_commit", "git_dirty")
PHASES = ("data_time_s", "scoring_time_s", "select_time_s", "train_step_time_s")
# the dry run's sizes: the same stages and code paths in seconds on a CPU
TINY = {"fastnet": {"model.widths": "[16,32,32]", "training.batch_size": "16", "training.epochs": "2",
                    "training.limit_train_batches": "2", "dataset.expected_counts": "null"},
        "report_config": {"training.epochs": "1", "training.limit_train_batches": "2",
                          "dataset.expected_counts": "null"},
        "baby_gpt": {"training.epochs": "1", "training.limit_train_batches": "2"}}
GATED = {"sundew_memory_packed_0.5": {"gate": "sundew_memory", "gate.target_rate": "0.5", "gate.pack": "true"},
         "random_packed_0.5": {"gate": "random", "gate.target_rate": "0.5", "gate.pack": "true"}}


class Skipped(Exception):
    """A stage that has nothing to run here; the message says why."""


@dataclass(frozen=True)
class Settings:
    out: Path
    work: Path  # run directories, the dataset cache, the installed wheels; the dry run's data
    dry_run: bool

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def pack(self) -> Path:
        return self.work / "tiny.pack" if self.dry_run else PACK

    @property
    def corpus(self) -> Path:
        return self.work / "corpus.txt" if self.dry_run else CORPUS

    @property
    def site(self) -> Path:
        return self.work / "site"

    def child_args(self) -> list[str]:
        return ["--out", str(self.out), "--work", str(self.work), *(["--dry-run"] if self.dry_run else [])]

    def child_env(self) -> dict[str, str]:
        """Pytest without the machine's plugins (built for another pytest); on the GPU the wheels
        first on the path. The dry run installs them only to check them: they are Python 3.12's."""
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}
        if not self.dry_run:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site), env.get("PYTHONPATH")) if p)
        return env


# --------------------------------------------------------------------------- the stages' commands

def install_command(s: Settings) -> list[str]:
    if not WHEELS.is_dir():
        raise Skipped("no wheels/ folder (python -m scripts.gpu_check --prepare makes it)")
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-compile", "--find-links",
            str(WHEELS), *GPU_PYTHON, "--target", str(s.site), *REQUIREMENTS]


def pytest_command(*args: str) -> Callable[[Settings], list[str]]:
    return lambda s: [sys.executable, "-m", "pytest", "-v", "-rfEs", "--tb=short", "-p", "no:cacheprovider", *args]


def child_command(stage: str) -> Callable[[Settings], list[str]]:
    return lambda s: [sys.executable, "-m", "scripts.gpu_check", "--stage", stage, *s.child_args()]


@dataclass(frozen=True)
class Stage:
    name: str
    estimate_s: int  # on an H100 (the module's docstring says why)
    cap_s: int
    floor_s: int  # started only with this much of the budget left
    command: Callable[[Settings], list[str]]
    tests: bool = False  # a pytest run: its outcomes go into check.json


STAGES = (Stage("install", 10, 60, 10, install_command),
          Stage("cuda_tests", 90, 150, 30, pytest_command("tests/gpu"), tests=True),
          Stage("fastnet", 70, 150, 40, child_command("fastnet")),
          Stage("report_config", 35, 90, 20, child_command("report_config")),
          Stage("baby_gpt", 35, 90, 20, child_command("baby_gpt")),
          Stage("attention", 100, 150, 30, child_command("attention")),
          Stage("flex_tests", 90, 150, 30, pytest_command("tests/library/test_flex.py", "-k", "on_cuda"), tests=True))


# --------------------------------------------------------------------------- the parent: stages under a deadline

def check(s: Settings, budget_s: float) -> int:
    """Every stage in order, check.json rewritten after each; 0 when each ran to success or had
    nothing to run (the dry run without wheels/), 1 when one failed, timed out or was not started."""
    deadline = time.monotonic() + budget_s
    report = {"check": "scripts/gpu_check.py", "dry_run": s.dry_run, "budget_s": budget_s,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": nvidia_smi(),
              "carried_bytes": {p.name: folder_bytes(p) if p.exists() else None for p in CARRIED}, "stages": []}
    for stage in STAGES:
        result = run_stage(stage, s, deadline - time.monotonic())
        report["stages"].append(result)
        write_json(s.out / "check.json", report)
        print(f"gpu_check: {stage.name} {result['status']}" + "".join(
            f", {k} {result[k]}" for k in ("seconds", "tests", "why") if k in result), flush=True)
    bad = [r["name"] for r in report["stages"] if r["status"] in ("failed", "timed out", "not started")]
    print(f"gpu_check: {len(STAGES) - len(bad)} of {len(STAGES)} stages ok or with nothing to run; "
          f"records in {s.out}" + (f"; not: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


def run_stage(stage: Stage, s: Settings, left_s: float) -> dict:
    """One stage's process, its output appended to gpu_check.log; its status, time and test outcomes."""
    result = {"name": stage.name, "estimate_s": stage.estimate_s, "cap_s": stage.cap_s}
    if left_s < stage.floor_s:
        why = f"{left_s:.0f} s of the budget left, {stage.floor_s} s needed"
        return {**result, "status": "not started", "why": why}
    try:
        command = stage.command(s)
    except Skipped as why:
        return {**result, "status": "skipped", "why": str(why)}
    log = s.out / "gpu_check.log"
    with log.open("a") as handle:
        handle.write(f"\n==== {stage.name}: {' '.join(command)}\n")
    offset, start, limit = log.stat().st_size, time.monotonic(), min(stage.cap_s, left_s)
    code = run_limited(command, limit, s.child_env(), log)
    output = log.read_text(errors="replace")[offset:]
    status = "timed out" if code is None else "ok" if code == 0 else "failed"
    result.update(status=status, seconds=round(time.monotonic() - start, 1), limit_s=round(limit))
    if stage.tests:
        result.update(pytest_outcomes(output))
    if status != "ok":
        result["tail"] = output[-3000:]
    return result


def run_limited(command: list[str], limit_s: float, env: dict[str, str], log: Path) -> int | None:
    """Run `command` with its output appended to `log`; its exit code, or None when the limit ended
    it. A process group of its own, so that a timeout kills the whole group (compile workers too);
    the same session, so that the run tool's end of the session ends it too."""
    with log.open("a") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   process_group=0)
        try:
            return process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.MULTILINE)


def pytest_outcomes(output: str) -> dict:
    """pytest -v's outcomes: counts, the failing tests, the skip reasons and its closing line."""
    outcomes = OUTCOME.findall(output)
    closing = re.findall(r"^=+ (.* in [\d.]+s.*?) =+$", output, re.MULTILINE)
    return {"tests": dict(Counter(outcome.lower() for _, outcome in outcomes)),
            "failing": [name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")],
            "skip_reasons": sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", output, re.MULTILINE))),
            "pytest": closing[-1] if closing else None}


def nvidia_smi() -> dict | None:
    """The GPU's name, driver, memory and clocks as nvidia-smi reads them now; None without one."""
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(SMI_FIELDS, (value.strip() for value in line.split(","))))


def folder_bytes(path: Path) -> int:
    """A file's size, or a folder's files' together."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json(path: Path, record: dict) -> None:
    """Whole or not at all: a stage killed mid-write leaves its previous record."""
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)


def make_dry_run_data(s: Settings) -> None:
    """A pack of a tiny CIFAR-10-like folder (4 training and 2 test JPEGs a class) and a short corpus."""
    import numpy as np
    from PIL import Image

    from adaptive_sparse.training.data import CIFAR10_CLASSES
    from scripts.pack_cifar10 import pack_folder

    rng, folder = np.random.default_rng(0), s.work / "folder"
    for split, count in (("train", 4), ("test", 2)):
        for name in CIFAR10_CLASSES:
            (folder / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / name / f"{i:04d}.jpg", quality=75)
    pack_folder(folder, s.pack)
    s.corpus.write_text("".join(chr(97 + (i * 7) % 13) for i in range(8000)))


# --------------------------------------------------------------------------- the measuring stages (children)

def common(s: Settings, stage: str) -> dict[str, str]:
    """What every measured run shares: the device, no W&B or progress bars, the cache in the work folder."""
    return {"device": s.device, "seed": "0", "wandb.mode": "disabled", "progress": "false",
            "dataset.cache_dir": str(s.work / "cache"), **(TINY[stage] if s.dry_run else {})}


def train_run(s: Settings, name: str, overrides: dict[str, str]) -> dict:
    """train.py's train() on this composed config (as tests/conftest.py's train_directly calls it),
    in this process: cuDNN's tuning and the decoded data stay warm between runs. Its record."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import train as train_script
    from adaptive_sparse.training.runtime import HydraRun

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{k}={v}" for k, v in overrides.items()],
                      return_hydra_config=True)
    hydra = HydraRun(dict(cfg.hydra.runtime.choices), list(cfg.hydra.overrides.task))
    with open_dict(cfg):
        del cfg["hydra"]
    run_dir, start = s.work / "runs" / name, time.monotonic()
    summary = train_script.train(cfg, run_dir, hydra)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record = {"overrides": overrides, "wall_s": round(time.monotonic() - start, 2),
              **{k: summary[k] for k in SUMMARY_KEYS if k in summary},
              "phases_s": {k: sum(e[k] for e in epochs) for k in PHASES},
              "optimizer_steps": sum(e["optimizer_steps"] for e in epochs), "gpu_after": nvidia_smi()}
    print(f"gpu_check: {name}: {summary['train_time_s']:.2f} s training, {summary['metric']} "
          f"{summary[summary['metric']]:.4g}", flush=True)
    return record


def stage_record(stage: str, s: Settings) -> dict:
    import platform

    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "gpu": torch.cuda.get_device_name() if s.device == "cuda" else None}
    return {"stage": stage, "dry_run": s.dry_run, "environment": facts, "runs": {}}


def stage_fastnet(s: Settings) -> None:
    """A warm-up (3 batches and the TTA evaluation: the pack decoded, cuDNN tuned for these shapes),
    then full training and the two gates at 0.5, their training time as a share of full's."""
    base = {"+experiment": "fastnet", "dataset.root": str(s.pack), "training.precision": "bf16", **common(s, "fastnet")}
    plan = {"warmup": {"training.epochs": "1", "training.limit_train_batches": "3"}, "full": {}, **GATED}
    record = stage_record("fastnet", s)
    for name, extra in plan.items():
        run = record["runs"][name] = train_run(s, f"fastnet_{name}", {**base, **extra})
        if name in GATED:
            run["time_share_of_full"] = run["train_time_s"] / record["runs"]["full"]["train_time_s"]
        write_json(s.out / "fastnet.json", record)


def stage_report_config(s: Settings) -> None:
    """`python train.py`'s defaults (SimpleCNN, sundew at 6%, batch 64, 3 epochs) on the GPU."""
    record = stage_record("report_config", s)
    overrides = {"dataset.root": str(s.pack), **common(s, "report_config")}
    record["runs"]["defaults"] = train_run(s, "report_config", overrides)
    write_json(s.out / "report_config.json", record)


def stage_baby_gpt(s: Settings) -> None:
    record = stage_record("baby_gpt", s)
    overrides = {"+experiment": "shakespeare_char_baby", "dataset.root": str(s.corpus), **common(s, "baby_gpt")}
    record["runs"]["baby_gpt"] = train_run(s, "baby_gpt", overrides)
    write_json(s.out / "baby_gpt.json", record)


def stage_attention(s: Settings) -> None:
    """scripts/bench_flex.py as its own command runs it, writing attention.json as it goes; the dry
    run (no CUDA: no compiled FlexAttention, no flash kernel) checks its arguments and records them."""
    from scripts import bench_flex

    sys.argv = ["scripts.bench_flex", "--out", str(s.out / "attention.json")]
    if not s.dry_run:
        bench_flex.main()
        return
    settings = {k: str(v) for k, v in vars(bench_flex.parse_args()).items()}
    write_json(s.out / "attention.json", {"stage": "attention", "dry_run": True, "settings": settings,
                                          "skipped": "FlexAttention's compiled kernels and flash SDPA need CUDA"})


CHILD_STAGES = {"fastnet": stage_fastnet, "report_config": stage_report_config, "baby_gpt": stage_baby_gpt,
                "attention": stage_attention}


# --------------------------------------------------------------------------- here: what the check carries

def prepare(shared: Path) -> None:
    """wheels/ (REQUIREMENTS and their needs for the GPU machine's Python 3.12; antlr4-python3-runtime
    4.9.3 is published as source alone, so it is built here: pure Python, one wheel for every
    platform), the CIFAR-10 folder packed and the corpus copied into data/."""
    from scripts.pack_cifar10 import pack_folder

    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(WHEELS), REQUIREMENTS[2]], check=True)
    subprocess.run([*pip, "download", *GPU_PYTHON, "--find-links", str(WHEELS), "-d", str(WHEELS), *REQUIREMENTS],
                   check=True)
    pack_folder(shared / "cifar10", PACK)
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / "shakespeare_char" / "input.txt", CORPUS)
    print(", ".join(f"{path.relative_to(ROOT)} {folder_bytes(path) / 2**20:.1f} MiB" for path in CARRIED))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where the records go ($OUT on the GPU machine)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny settings, made-up data")
    parser.add_argument("--budget-s", type=float, default=470.0, help="no stage starts whose floor would pass this")
    parser.add_argument("--prepare", action="store_true", help="make wheels/ and data/ here (pip needs a network)")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data",
                        help="--prepare's source of cifar10/ and shakespeare_char/")
    parser.add_argument("--stage", choices=sorted(CHILD_STAGES), help=argparse.SUPPRESS)  # the parent's children
    parser.add_argument("--work", type=Path, help="run directories, the dataset cache, the installed wheels "
                        "(default: a new temporary folder)")
    args = parser.parse_args(argv)
    if not (args.prepare or args.out):
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        prepare(args.shared)
        return 0
    if args.stage:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # train's epoch lines
        CHILD_STAGES[args.stage](Settings(args.out, args.work, args.dry_run))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.out.resolve(), work, args.dry_run)
    if args.dry_run:
        make_dry_run_data(settings)
    return check(settings, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
