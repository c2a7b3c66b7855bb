"""Where a run's numbers go: metrics.jsonl, summary.json, the console table, and W&B.

The files are the contract (flat keys, written whatever the W&B mode); W&B gets the same
numbers under namespaced keys (train/trained_loss, val/acc, time/epoch_s, ...). Logging never
stops training: a W&B failure is a warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from adaptive_sparse.gating.gates import InfoBatchGate
from adaptive_sparse.training.io import atomic_write_text
from adaptive_sparse.training.metering import summarise_run
from adaptive_sparse.training.records import Metric, wandb_identity
from adaptive_sparse.training.runtime import has_native_bf16

log = logging.getLogger(__name__)

# contract key in the files -> namespaced key in W&B
WANDB_KEYS = {
    "epoch": "epoch",
    "train_loss": "train/trained_loss",     # the mean loss of the samples the gate trained
    "train_eval_loss": "train/eval_loss",   # a fixed sample of training data in eval mode: compares across gates
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "val_bpc": "val/bpc",
    "activation_rate": "gate/activation_rate",
    "threshold": "gate/threshold",
    "sample_savings": "gate/sample_savings",
    "epoch_time_s": "time/epoch_s",
    "eval_time_s": "time/eval_s",
    "data_time_s": "time/data_s",
    "scoring_time_s": "time/scoring_s",
    "select_time_s": "time/select_s",
    "train_step_time_s": "time/train_step_s",
    "samples_per_s": "time/samples_per_s",
    "flops_executed": "flops/executed",
    "flops_scoring": "flops/scoring",
    "flops_training": "flops/training",
    "flops_full": "flops/full",
    "compute_savings": "flops/compute_savings",
    "indexer_loss": "train/indexer_loss",
}

# running totals logged to W&B each epoch: the x-axes of scripts/report.py's W&B panels
CUMULATIVE_WANDB_KEYS = {"epoch_time_s": "time/train_cumulative_s",
                         "flops_executed": "flops/executed_cumulative"}

def table_header(metric: Metric) -> str:
    """The report's table header, with the task's metric column (Val Acc, or Val Loss for text)."""
    return (f"| Epoch | Loss   | {metric.column:<7} | Activation Rate | Compute Savings (FLOPs) "
            "| Sample Savings | Time    |")


def table_row(record: dict[str, Any], epochs: int, metric: Metric) -> str:
    """One line of the report's table (the report's 'Energy Savings' column: measured FLOPs)."""
    return (f"| {record['epoch']}/{epochs:<3} | {record['train_loss']:.4f} | {metric.cell(record[metric.key])}"
            f"| {100 * record['activation_rate']:14.1f}% | {100 * record['compute_savings']:22.1f}% "
            f"| {100 * record['sample_savings']:13.1f}% | {record['epoch_time_s']:6.1f}s |")


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


class RunLog:
    """Writes one run's metrics; use as a context manager so W&B is always finished."""

    def __init__(self, run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig | None = None, *, enabled: bool = True,
                 resume_records: list[dict] | None = None, wandb_run_id: str | None = None):
        """`enabled=False` (torchrun ranks other than 0) writes nothing. On resume,
        `resume_records` (the checkpoint's epochs) become metrics.jsonl, dropping any line of
        an epoch that ran after that checkpoint, and W&B continues run `wandb_run_id`."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if enabled and resume_records is not None:
            atomic_write_text("".join(json.dumps(r) + "\n" for r in resume_records), self.metrics_path)
        # W&B group/tags/name, completed from the sweep in a multirun (one group per sweep)
        self.identity = wandb_identity(cfg.wandb, hydra_cfg)
        self.cumulative = dict.fromkeys(CUMULATIVE_WANDB_KEYS.values(), 0.0)
        self.wandb_run = self._start_wandb(cfg, wandb_run_id) if enabled else None

    @property
    def wandb_run_id(self) -> str | None:
        return getattr(self.wandb_run, "id", None)

    # ------------------------------------------------------------------ W&B
    def _start_wandb(self, cfg: DictConfig, run_id: str | None = None):
        wcfg = cfg.wandb
        if wcfg.mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed; logging to files only")
            return None
        settings = dict(project=wcfg.project, entity=wcfg.entity, dir=str(self.run_dir),
                        config=OmegaConf.to_container(cfg, resolve=True), **self.identity)
        if run_id is not None:  # resume: the same W&B run continues
            settings.update(id=run_id, resume="allow")
        # a short timeout: online without a network otherwise waits ~100 s per job, in silence
        timeout = float(wcfg.get("init_timeout_s", 30))
        failures = []
        for mode in dict.fromkeys([wcfg.mode, "offline"]):  # online first if asked, then offline
            before = set(self.wandb_dir.glob("*run-*"))
            try:
                run = wandb.init(mode=mode, reinit="finish_previous", settings=wandb.Settings(init_timeout=timeout),
                                 **settings)
            except Exception as err:  # no network, no API key, a broken install
                failures.append(f"mode={mode}: {first_line(err)}")
                with contextlib.suppress(Exception):  # release the run id the failed attempt reserved
                    wandb.teardown()
                for dead in set(self.wandb_dir.glob("*run-*")) - before:  # the failed attempt's folder
                    shutil.rmtree(dead, ignore_errors=True)
                continue
            if failures:
                warnings.warn(f"W&B {failures[0]}; logging offline instead (`wandb sync {self.wandb_dir}` later)")
            return run
        warnings.warn(f"W&B unavailable ({'; '.join(failures)}); logging to files only")
        return None

    @property
    def wandb_dir(self) -> Path:
        return self.run_dir / "wandb"

    def _wandb_log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.log(metrics, step=step)
        except Exception as err:
            warnings.warn(f"wandb.log failed ({err}); continuing without W&B")
            self.wandb_run = None

    # ------------------------------------------------------------------ records
    def log_step(self, step: int, gate, selection, batch_size: int, tally) -> None:
        """Every few loader batches: this batch's rate and the gate's threshold, and the last step's loss."""
        metrics = {"train/batch_rate": len(selection.index) / selection.seen(batch_size),
                   "gate/threshold": gate.threshold, "train/batch_loss": tally.last_batch_loss}
        self._wandb_log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        # running totals give W&B the report's x-axes: accuracy against training time and FLOPs
        for key, wandb_key in CUMULATIVE_WANDB_KEYS.items():
            self.cumulative[wandb_key] += record[key]
        self._wandb_log({**{WANDB_KEYS.get(k, k): v for k, v in record.items() if v is not None},
                         **self.cumulative}, step=step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        summary = {**summary, "wandb_group": self.identity["group"]}  # report.py --wandb reads it
        atomic_write_text(json.dumps(summary, indent=2) + "\n", self.run_dir / "summary.json")
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(
                    {k: v for k, v in summary.items() if not isinstance(v, float) or math.isfinite(v)})
            except Exception as err:
                warnings.warn(f"wandb summary update failed ({err})")

    def finish(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                warnings.warn(f"wandb.finish failed ({err})")
            self.wandb_run = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def environment_facts(device: torch.device) -> dict[str, Any]:
    return {"device": str(device), "hardware": hardware_description(device), "native_bf16": has_native_bf16(device),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "num_threads": torch.get_num_threads(),
            **code_version()}


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line (its type when it has no message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__


def code_version(root: Path = Path(__file__).resolve().parents[1]) -> dict[str, Any]:
    """The git commit the code ran from and whether its tracked files had uncommitted changes
    (None for both outside a git checkout): what a record needs to say which code made it."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(changes.strip())}


def run_summary(cfg: DictConfig, choices: dict[str, str], history: list[dict], gate, switches, flop_meter, task,
                data, test: dict[str, float], run, energy_meter, params: int) -> dict[str, Any]:
    """summary.json: the whole run's figures (summed from its epochs), the final validation and
    test figures, and what ran where (config choices, data copy, precision, hardware, code)."""
    last = history[-1]
    return {**summarise_run(history, gate.target_rate, flop_meter), **task.summary(),
            **{k: v for k, v in last.items() if k in task.metric_keys or k.startswith("val_acc_tta")}, **test,
            "gate": choices["gate"], "model": choices["model"], "attention": choices["attention"],
            "dataset": choices["dataset"], "data_source": data.source, "data_fingerprint": data.train.fingerprint, "seed": cfg.seed,
            "scoring": cfg.gate.get("scoring"), "selection": cfg.gate.get("selection"),  # sundew's own keys
            "select_before_loading": switches.select_before_loading, "loss_reduction": cfg.training.loss_reduction,
            "precision": run.precision, "energy_kwh": energy_meter.kwh, "energy_source": energy_meter.source,
            "gate_loss_form": "mean" if isinstance(gate, InfoBatchGate) else None,  # InfoBatch's own mean(w * loss)
            "params": params, **environment_facts(run.device)}
