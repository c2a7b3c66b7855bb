"""The convergence study's page: does gating beat simply training less?

    python -m scripts.studies.report multirun/convergence --export docs/results/convergence/runs.jsonl
    python -m scripts.studies.convergence docs/results/convergence/runs.jsonl
    python -m scripts.studies.convergence docs/results/fastnet/runs.jsonl --title "..." \
        --idle-bench docs/bench/bench_gates_fastnet_0.5.json

Reads a budget study's runs (a sweep directory or the compact record file: the convergence
study's `+study=convergence`, `convergence_baseline` and `convergence_infobatch`, or the
fast recipe's) and writes its page, README.md, and its plots beside the record file (or into
--out); `scripts.studies.report` writes the generic sweep report (report.md) of the same record
beside it. Arms are (gate, target rate, packing, epochs, selection rule); seeds are paired.
The runs of the study's queue file (queue.txt beside the record, as scripts/run_queue.py runs it)
that have no record yet are listed as not yet run.

- Full training: gate=none over the longest schedule (E epochs).
- Full training at equal FLOPs for budget b: gate=none over b * E epochs, its cosine schedule
  decayed over its own length ("No Train No Gain"'s fair baseline).
- A gated arm at target rate b sees all E epochs and trains about b of the samples.
- Full training at equal time, the baseline the goal judges a gate against: gate=none over the
  whole number of epochs nearest the gate's time (whole batches where full training itself ends
  inside an epoch, as airbench94's 9.9 epochs do: `epochs_trained` in summary.json). The gate's time is its epoch time as a share of
  gate=none's measured on an idle machine by scripts/bench_gates.py (`idle_bench*.json` beside
  the record, or --idle-bench), because the study's own runs share the machine two at a time and
  their recorded times move with whichever run is their neighbour. Without such a measurement the
  schedule nearest in recorded wall-clock stands in, and the page says so.

A run with overrides off the study's axes (AXES; e.g. `training.lookahead=null`) is a variant, an
arm of its own: full training's variants are the recipe's ablation, tabled against it. Runs that
recorded test-time augmentation levels (`val_acc_tta<N>`) get a table of them.

Runs are judged by the metric their summary.json names (`metric`: val_acc for classification,
val_loss for task=char_lm, where lower is better), with the goals of `GOALS` in its unit.
Intervals are scripts.studies.analysis's: 95% Student-t over seeds (none for one seed); paired differences take
the same seed of both arms (arm minus baseline: positive is better for accuracy, negative for a loss). Times are training wall-clock (evaluation excluded) as recorded by
each run, as a share of full training's mean on the same machine (summary.json's `hardware` and `precision`): a
study that outlives a session spans machines, and a time from one is never divided by another's.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from adaptive_sparse.training import records
from adaptive_sparse.training.checkpoint import resumable_change
from adaptive_sparse.training.records import Metric, metric_of
from scripts.studies import analysis
from scripts.studies.analysis import Arm, Estimate, Run, interval, paired, pm

GATES = ("sundew_memory", "random", "sundew_proxy")  # plot colours, in this order
TITLE = "Convergence study: does gating beat simply training less?"


@dataclass(frozen=True)
class Goals:
    """A study's goals at budget 0.5, in its metric's unit (points of accuracy, or nats)."""
    beat: float            # beat full training at equal time by at least this (interval excluding 0)
    time_margin: float     # the arms table's "time to full training's final metric, this much worse"
    lossless: float        # or: come within this of full training's final metric ...
    lossless_share: float  # ... in at most this share of its time


GOALS = {"val_acc": Goals(beat=1.0, time_margin=0.5, lossless=0.3, lossless_share=0.5),
         "val_loss": Goals(beat=0.02, time_margin=0.02, lossless=0.01, lossless_share=0.6)}
# the scripts/bench_gates.py configuration that runs each study arm's gate, by (gate, packed, selection)
BENCH_CONFIGS = {("random", False, None): "random", ("random", True, None): "random-packed",
                 ("sundew_memory", False, None): "sundew-memory", ("sundew_memory", True, None): "sundew-memory-packed",
                 ("sundew_proxy", False, None): "sundew-proxy", ("sundew_proxy", True, None): "sundew-proxy-packed",
                 ("sundew_proxy", False, "top"): "keep-top-proxy"}


# Overrides that place a run on the study's axes (read from its summary) or say where and how it
# ran; any other override makes the run a variant of its arm (an ablation), an arm of its own. The
# preset is `study` (or, in records from before conf/study, `experiment`); `budget` sets a gate's
# target rate as `gate.target_rate` does.
AXES = ("experiment", "study", "gate", "gate.pack", "gate.target_rate", "budget", "seed", "training.epochs",
        "training.last_epoch_fraction", "training.precision", "training.loss_reduction")


@dataclass(frozen=True)
class ArmKey:
    gate: str
    rate: float | None  # target rate; None for InfoBatch, 1.0 for none
    packed: bool
    epochs: float       # epochs trained (9.917: airbench94's 10 with a last epoch of 44 of 48 batches)
    precision: str = "bf16"
    selection: str | None = None  # sundew's rule when it is not the default percentile
    variant: str = ""   # the overrides off the study's axes, e.g. "training.lookahead=null"
    loss: str = "mean"  # training.loss_reduction: airbench's keep-half sums, so its arms say which
    step_loss: str = ""  # InfoBatch's step loss where it is not its own mean(w * loss) (older runs)

    def label(self, study_precision: str = "bf16") -> str:
        """The arm's name on the page; its precision is named when it is not the study's."""
        loss = ", summed loss" if self.loss == "sum" else ", mean loss" if self.selection == "top" else ""
        other = ("" if self.precision == study_precision else f", {self.precision}") + (
            f", {self.variant}" if self.variant else "")
        if self.gate == "none":
            return f"none, {epochs_text(self.epochs)} epochs{loss}{other}"
        rate = "" if self.rate is None else f" {self.rate:g}"
        rule = f", {self.selection}" if self.selection else ""
        step_loss = f", {self.step_loss}" if self.step_loss else ""
        return f"{self.gate}{rate}{rule}{loss}{step_loss}{', packed' if self.packed else ''}{other}"


def epochs_text(epochs: float) -> str:
    """10 -> '10', 5.104166 -> '5.104'."""
    return f"{epochs:.4g}"


def arm_key(run: Run) -> ArmKey:
    s = run.summary
    packed = str(run.overrides.get("gate.pack", "false")).lower() == "true"
    selection = s.get("selection") if s.get("selection") != "percentile" else None  # older records: none
    variant = ",".join(f"{k}={v}" for k, v in sorted(run.overrides.items())
                       if k not in AXES and not resumable_change(k))
    loss = s.get("loss_reduction") or run.overrides.get("training.loss_reduction", "mean")  # older summaries: the override
    return ArmKey(s["gate"], s["target_rate"], packed and s["gate"] != "none", round(epochs_trained(run), 4),
                  s.get("precision") or "fp32", selection, variant, str(loss), infobatch_step_loss(run, packed))


def infobatch_step_loss(run: Run, packed: bool) -> str:
    """'' for InfoBatch's own step loss, mean(w * loss) over the step's samples (what summary.json's
    `gate_loss_form: mean` records) and for other gates; else the form InfoBatch's runs of that time
    trained on, which undoes its rescaling, so that the two are arms apart."""
    if run.summary["gate"] != "infobatch" or run.summary.get("gate_loss_form") == "mean":
        return ""
    return "sum(w * loss) / sum(w)" if packed else "sum(w * loss) / B"


def epochs_trained(run: Run) -> float:
    """summary.json's epochs_trained; for runs that finished before it existed, the same from
    their records (the last epoch's samples seen over the first's), else their whole epochs."""
    if "epochs_trained" in run.summary:
        return run.summary["epochs_trained"]
    if run.epochs and all(e.get("samples_seen") for e in run.epochs):
        return records.epochs_trained(run.epochs)
    return run.summary["epochs"]


def group_arms(runs: list[Run], metric: Metric) -> dict[ArmKey, Arm]:
    arms: dict[ArmKey, Arm] = {}
    for run in (r for r in runs if r.complete):
        arms.setdefault(arm_key(run), Arm(arm_key(run), metric)).add(run)
    return dict(sorted(arms.items(), key=lambda kv: (kv[0].gate != "none", -kv[0].epochs, kv[0].gate,
                                                     -(kv[0].rate or 0), not kv[0].packed)))


def bench_target_rate(bench: dict) -> float:
    """The target rate a bench_gates.py JSON ran at (older files say it in their command only)."""
    if "target_rate" in bench:
        return bench["target_rate"]
    found = re.search(r"--target-rate[ =](\S+)", bench["command"])
    return float(found.group(1)) if found else 0.1  # bench_gates.py's default


def idle_shares(bench_files: list[Path]) -> dict[tuple[str, float, bool, str | None], float]:
    """Each gate's epoch time as a share of gate=none's in the same idle benchmark (1 / its
    speedup), by (gate, target rate, packed, selection rule)."""
    shares = {}
    for path in bench_files:
        bench = json.loads(path.read_text())
        rows = {row["config"]: row for row in bench["rows"]}
        for (gate, packed, selection), config in BENCH_CONFIGS.items():
            if config in rows:
                shares[(gate, bench_target_rate(bench), packed, selection)] = 1.0 / rows[config]["speedup_vs_none"]
    return shares


@dataclass
class Study:
    arms: dict[ArmKey, Arm]
    full: Arm
    metric: Metric    # what the runs are judged by (their records' `metric`)
    full_times: dict[str, float]  # mean training seconds of full training, by the hardware it ran on
    idle: dict[tuple[str, float, bool, str | None], float] = field(default_factory=dict)  # see idle_shares

    @property
    def goals(self) -> Goals:
        return GOALS[self.metric.key]

    def label(self, arm: Arm) -> str:
        return arm.key.label(self.full.key.precision)

    @property
    def epoch_step(self) -> float:
        """The finest schedule length the study's full training can be cut to: a whole epoch
        where it trains whole epochs, else one batch (its first epoch's optimiser steps)."""
        if float(self.full.key.epochs).is_integer():
            return 1.0
        return 1.0 / self.full.runs[min(self.full.runs)].epochs[0]["optimizer_steps"]

    def schedule_at(self, share: float) -> float:
        """Full training's schedule nearest `share` of its length, in epoch steps (halves round up)."""
        step = self.epoch_step
        return round(math.floor(share * self.full.key.epochs / step + 0.5) * step, 4)

    def none_over(self, epochs: float) -> Arm | None:
        """Full training (no variant) over the schedule nearest this many epochs, within half an
        epoch step or 1% of full training's length, whichever is more (so gates whose idle
        times differ by a batch or two share one cut of full training)."""
        within = max(self.epoch_step / 2, 0.01 * self.full.key.epochs)
        nones = [(abs(k.epochs - epochs), a) for k, a in self.arms.items() if k.gate == "none" and not k.variant
                 and k.precision == self.full.key.precision and abs(k.epochs - epochs) <= within]
        return min(nones, key=lambda pair: pair[0])[1] if nones else None

    @cached_property
    def curve(self) -> Metric:
        """What the curves and times to a target read every epoch: the metric, or, where full
        training evaluates with TTA at its end only (`eval_tta_every_epoch=false`), the accuracy
        without TTA (`val_acc_tta0`) that every epoch has."""
        tta0 = Metric("val_acc_tta0")  # an epoch recorded before the key: not evaluated on this curve
        at_end = [r.epochs[-1].get(tta0.key) for r in self.full.runs.values()]
        tta_at_end_only = all(v is not None for v in at_end) and any(
            r.epochs[-1][tta0.key] != r.epochs[-1].get(self.metric.key) for r in self.full.runs.values())
        return tta0 if self.metric.is_accuracy and tta_at_end_only else self.metric

    @cached_property
    def curve_full(self) -> float:
        """Full training's mean final value of the curve's metric (the study's metric's, unless
        `curve` reads the accuracy without TTA)."""
        return statistics.fmean(r.summary[self.curve.key] for r in self.full.runs.values())

    def curve_target(self, margin: float) -> float:
        return self.curve.worse_by(self.curve_full, margin)

    def run_share(self, run: Run, seconds: float | None = None) -> float | None:
        """`seconds` (default: the run's training time) as a share of full training's mean on the
        same hardware; None where full training has not run on it (a study that spans machines:
        times recorded on two machines are never divided by each other)."""
        full = self.full_times.get(hardware_of(run))
        return None if full is None else (run.summary["train_time_s"] if seconds is None else seconds) / full

    def times_to(self, arm: Arm, margin: float) -> list[float | None]:
        """Each run's training time until its curve first comes within `margin` of full training's
        final, as a share of full training's on the same hardware (None: not reached); runs on
        hardware full training has not run on are left out."""
        target = self.curve_target(margin)
        timed = [r for r in arm.runs.values() if self.run_share(r) is not None]
        seconds = [records.time_to_metric(r.epochs, target, self.curve) for r in timed]
        return [None if s is None else self.run_share(r, s) for r, s in zip(timed, seconds)]

    def matched(self, budget: float) -> Arm | None:
        """Full training over budget * E epochs: equal FLOPs."""
        return self.none_over(self.schedule_at(budget))

    def idle_share(self, arm: Arm) -> float | None:
        return self.idle.get((arm.key.gate, arm.key.rate, arm.key.packed, arm.key.selection))

    def time_matched(self, arm: Arm) -> tuple[float, Arm | None, str]:
        """The full-training schedule at the gate's time (epochs, its arm if run, how chosen):
        the schedule nearest the gate's idle-measured time, in whole epochs (or, for a study
        whose full training ends inside an epoch, whole batches; halves round up); without an
        idle measurement, the schedule nearest in recorded wall-clock."""
        share = self.idle_share(arm)
        if share is None:
            nearest = self.nearest_in_time(arm)
            if nearest is None:
                return math.nan, None, "no idle measurement, and no run beside full training's hardware"
            return nearest.key.epochs, nearest, "nearest in recorded wall-clock; no idle measurement"
        epochs = self.schedule_at(share)
        return epochs, self.none_over(epochs), f"equal time: the gate's epoch costs {share:.3f} of full training's, idle"

    def share(self, arm: Arm) -> float | None:
        """The arm's mean recorded training time as a share of full training's, each run against
        full training on its own hardware (None: none of its runs has such a partner)."""
        shares = [s for s in map(self.run_share, arm.runs.values()) if s is not None]
        return statistics.fmean(shares) if shares else None

    def nearest_in_time(self, arm: Arm) -> Arm | None:
        """The gate=none schedule whose mean wall-clock is closest to this arm's: the baseline
        at equal time when the gate's overheads make it slower than its FLOPs say."""
        if self.share(arm) is None:
            return None
        nones = [a for k, a in self.arms.items() if k.gate == "none" and not k.variant
                 and k.precision == self.full.key.precision and self.share(a) is not None]
        return min(nones, key=lambda a: abs(self.share(a) - self.share(arm)))

    def budgets(self) -> list[float]:
        """The gated arms' target rates, largest first."""
        return sorted({k.rate for k in self.arms if k.gate != "none" and k.rate is not None}, reverse=True)


def build_study(runs: list[Run], bench_files: list[Path] = ()) -> Study:
    metric = metric_of(r.summary for r in runs if r.complete)
    arms = group_arms(runs, metric)
    nones = [a for k, a in arms.items() if k.gate == "none"]
    if not nones:
        raise SystemExit("no gate=none run: the study needs full training to compare with")
    full = max(nones, key=lambda a: (not a.key.variant, a.key.epochs, len(a.runs)))
    full_times = {hw: statistics.fmean(r.summary["train_time_s"] for r in runs) for hw, runs in by_hardware(full).items()}
    return Study(arms, full, metric, full_times, idle_shares(list(bench_files)))


def hardware_of(run: Run) -> str:
    """The machine a run trained on and the precision it trained in, as its summary.json names them
    ('?' for a record without): 'AMD EPYC, 1 threads, bf16', or 'AMD EPYC (no native bf16), 1
    threads, fp32'. Two kinds of machine share a CPU name and differ in native bf16, and with it in
    speed by 2x or more: runs written since summaries carry `native_bf16` name it; for older ones
    the precision alone tells them apart (bf16 ran only where it was native)."""
    hardware = run.summary.get("hardware", "?")
    if run.summary.get("native_bf16") is False:
        cpu, _, threads = hardware.partition(", ")
        hardware = f"{cpu} (no native bf16)" + (f", {threads}" if threads else "")
    precision = run.summary.get("precision")
    return hardware if precision is None else f"{hardware}, {precision}"


def by_hardware(arm: Arm) -> dict[str, list[Run]]:
    """The arm's runs by the machine each trained on, in seed order."""
    groups: dict[str, list[Run]] = {}
    for run in arm.runs.values():
        groups.setdefault(hardware_of(run), []).append(run)
    return groups


def share_text(share: float | None) -> str:
    return "–" if share is None else f"{share:.3f}"


# --------------------------------------------------------------------------- tables

def infobatch_note(study: Study) -> list[str]:
    """Which loss InfoBatch's arms trained on: InfoBatch's own mean(w * loss) over a step's samples
    where summary.json says so (`gate_loss_form: mean`), else the form the code of their time had."""
    old = [arm for arm in study.arms.values() if arm.key.gate == "infobatch" and arm.key.step_loss]
    if not old:
        return []
    forms = sorted({f"{arm.key.step_loss} over {'a packed step' if arm.key.packed else 'each loader batch of B'}"
                    for arm in old})
    runs = sum(len(arm.runs) for arm in old)
    own = any(arm.key.gate == "infobatch" and not arm.key.step_loss for arm in study.arms.values())
    return [f"InfoBatch's arms named by that form ({runs} runs) trained on {' and '.join(forms)}, not InfoBatch's "
            "own mean(w * loss) over a step's samples, which later runs record (`gate_loss_form: mean`)" +
            (" and the InfoBatch arm without a form in its name ran" if own else "") +
            ": their pruned epochs moved the weights less than InfoBatch's would have.", ""]


def arms_table(study: Study, margins: tuple[float, ...] | None = None) -> str:
    """Every arm's figures; a time-to-target column for each of `margins` (default: the goal's)."""
    metric, margins = study.metric, margins or (study.goals.time_margin,)
    curve = "" if study.curve == metric else f" {study.curve.key}"
    targets = [f"{study.curve_target(m):.2f}%{curve} (full - {m:g} pt)" if metric.is_accuracy
               else f"{study.curve_target(m):.4f} (full + {m:g} nats)" for m in margins]
    best = not metric.is_accuracy  # a loss can end above its best epoch (overfitting): both are shown
    head = ["arm", "seeds", f"final {metric.name}", *([f"best {metric.name}"] if best else []), "train time (s)",
            "share of full's time", "share of full's FLOPs", "optimiser steps / full's",
            *(f"time to {target}, share of full's" for target in targets)]
    full_flops = statistics.fmean(study.full.values("flops_executed"))
    full_steps = statistics.fmean(optimizer_steps(r) for r in study.full.runs.values())
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in study.arms.values():
        flops = statistics.fmean(arm.values("flops_executed")) / full_flops
        steps = statistics.fmean(optimizer_steps(r) for r in arm.runs.values()) / full_steps
        cells = []
        for margin in margins:
            reached = study.times_to(arm, margin)
            done = [t for t in reached if t is not None]
            cells.append("–" if not reached else pm(interval(done)) if len(done) == len(reached)
                         else f"not reached by {len(reached) - len(done)} of {len(reached)}")
        lines.append(f"| {study.label(arm)} | {','.join(map(str, sorted(arm.runs)))} | "
                     f"{pm(interval(list(arm.finals().values())), 2 if metric.is_accuracy else 4)} | "
                     + (f"{pm(interval(arm.best()), 4)} | " if best else "")
                     + f"{times_text(study, arm)} | "
                     f"{share_text(study.share(arm))} | {flops:.3f} | {steps:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def times_text(study: Study, arm: Arm) -> str:
    """The arm's recorded training seconds over seeds; on each machine apart when the study
    spans more than one (a mean across machines would mix their speeds)."""
    if len(study.full_times) == 1:
        return pm(interval(arm.times()), 0)
    return "; ".join(f"{pm(interval([r.summary['train_time_s'] for r in runs]), 0)} on {hardware}"
                     for hardware, runs in by_hardware(arm).items())


def optimizer_steps(run: Run) -> int:
    """The run's optimiser steps. Epochs recorded before the optimizer_steps key existed (the
    first gate=none epochs of the study) stepped once per batch of 64 trained samples."""
    return sum(e["optimizer_steps"] if e.get("optimizer_steps") is not None
               else math.ceil(e["samples_trained"] / 64) for e in run.epochs)


def versus(result: Estimate | None, digits: int, note: str = "") -> list[str]:
    """Two table cells: a paired difference (with `note` after it) and its number of seeds."""
    return ["–", "–"] if result is None else [pm(result, digits) + note, str(result.n)]


def differences_table(study: Study) -> tuple[str, list[tuple[str, float, Estimate]]]:
    unit, digits = study.metric.unit, study.metric.digits
    head = ["gated arm", "share of full's time, recorded", "share of full's time, idle",
            f"vs none over b·E epochs: equal FLOPs ({unit})", "seeds",
            f"vs none at equal idle time ({unit})", "seeds",
            f"vs the none schedule nearest in recorded wall-clock ({unit})", "seeds",
            f"vs random, same budget and packing ({unit})", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    forest = []
    for arm in study.arms.values():
        k, label = arm.key, study.label(arm)
        if k.gate == "none":
            continue
        # InfoBatch sets no target rate: no budget to match, but the nearest schedule in time still pairs
        versus_flops = paired(arm, study.matched(k.rate)) if k.rate is not None else None
        share = study.idle_share(arm)
        cells = [label, share_text(study.share(arm)), share_text(share)]
        cells += versus(versus_flops, digits)
        if share is None:
            cells += ["–", "–"]
        else:
            epochs, same_time, _ = study.time_matched(arm)
            versus_time = paired(arm, same_time)
            cells += (versus(versus_time, digits, f" ({epochs_text(epochs)} epochs)") if same_time
                      else [f"– ({epochs_text(epochs)} epochs not yet run)", "–"])
            if versus_time:
                forest.append((f"{label} vs {epochs_text(epochs)} epochs (equal idle time)", k.rate, versus_time))
        nearest = study.nearest_in_time(arm)
        cells += versus(None if nearest is None else paired(arm, nearest), digits,
                        "" if nearest is None else f" ({epochs_text(nearest.key.epochs)} epochs, {study.share(nearest):.3f})")
        random = study.arms.get(ArmKey("random", k.rate, k.packed, k.epochs, k.precision))
        cells += versus(paired(arm, random) if k.gate != "random" else None, digits)
        lines.append("| " + " | ".join(cells) + " |")
        if versus_flops:
            forest.append((f"{label} vs {epochs_text(study.matched(k.rate).key.epochs)} epochs (equal FLOPs)", k.rate,
                           versus_flops))
    return "\n".join(lines), forest


def variants_table(study: Study) -> str:
    """Full training's variants over its epochs (the recipe's ablation: full training minus one
    part, or in another precision) against full training itself, paired by seed; empty when the
    study has none."""
    variants = [a for a in study.arms.values() if a.key.gate == "none" and a is not study.full
                and (a.key.variant or a.key.precision != study.full.key.precision)
                and a.key.epochs == study.full.key.epochs]
    if not variants:
        return ""
    unit, digits = study.metric.unit, study.metric.digits
    lines = [f"| variant | seeds | final {study.metric.name} | vs full training, same seed ({unit}) | "
             "share of full's time, recorded |", "|---|---|---|---|---|"]
    for arm in variants:
        difference = paired(arm, study.full)
        lines.append(f"| {study.label(arm)} | {','.join(map(str, sorted(arm.runs)))} | "
                     f"{pm(interval(list(arm.finals().values())), digits)} | "
                     f"{'–' if difference is None else pm(difference, digits)} | {share_text(study.share(arm))} |")
    return "\n".join(lines)


def tta_table(study: Study) -> str:
    """Each arm's final accuracy at every test-time augmentation level its runs recorded
    (`val_acc_tta<N>`: 0 none, 1 mirror, 2 mirror and translate); empty when none did."""
    levels = sorted({int(k.removeprefix("val_acc_tta")) for a in study.arms.values() for r in a.runs.values()
                     for k in r.summary if k.startswith("val_acc_tta")})
    if not levels:
        return ""
    names = {0: "none", 1: "mirror", 2: "mirror + translate"}
    lines = ["| arm | seeds | " + " | ".join(f"TTA {n} ({names.get(n, n)}), %" for n in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for arm in study.arms.values():
        figures = [arm.values(f"val_acc_tta{n}") for n in levels]
        if any(figures):
            lines.append(f"| {study.label(arm)} | {','.join(map(str, sorted(arm.runs)))} | "
                         + " | ".join(pm(interval(f)) if f else "–" for f in figures) + " |")
    return "\n".join(lines)


@dataclass
class Verdict:
    """A gated arm judged by the goal: against full training at its time (Study.time_matched)."""
    epochs: float              # the equal-time schedule of full training
    how: str                   # how that schedule was chosen
    result: Estimate | None    # arm minus that schedule, paired by seed
    in_time: int               # seeds within the lossless margin in the allowed share of full's time
    seeds: int
    verdict: str               # met | missed | undecided (...)


def judge(study: Study, arm: Arm) -> Verdict:
    metric, goal = study.metric, study.goals
    epochs, same_time, how = study.time_matched(arm)
    result = paired(arm, same_time)
    gain = None if result is None else metric.sign * result.mean  # > 0: the gate is better
    beat = result is not None and result.half is not None and gain >= goal.beat and gain - result.half > 0
    lossless = study.times_to(arm, goal.lossless)
    in_time = sum(t is not None and t <= goal.lossless_share for t in lossless)
    if beat or (lossless and in_time == len(lossless)):  # no run timed against full training: not met by time
        verdict = "met"
    elif result is None:
        verdict = f"undecided (full training over {epochs_text(epochs)} epochs not yet run)"
    elif result.half is None:
        verdict = "undecided (fewer than two paired seeds)"
    else:
        verdict = "missed"
    return Verdict(epochs, how, result, in_time, len(lossless), verdict)


def goal_verdict(study: Study) -> str:
    """The issue's goal at budget 0.5, met or missed, with the figures: judged against full
    training at the gate's time (Study.time_matched); the equal-FLOPs schedule is quoted beside it."""
    lines = []
    metric, goal, digits = study.metric, study.goals, study.metric.digits
    for arm in study.arms.values():
        if arm.key.gate == "none" or arm.key.rate != 0.5 or arm.key.variant:  # variants: their own tables
            continue
        judged = judge(study, arm)
        result = judged.result
        diff = "–" if result is None else f"{pm(result, digits)} {metric.unit} over {result.n} seed(s)"
        flops = paired(arm, study.matched(0.5))
        flops_text = "" if flops is None else (f"; against {epochs_text(study.matched(0.5).key.epochs)} epochs (equal FLOPs): "
                                               f"{pm(flops, digits)} over {flops.n}")
        share = "half" if goal.lossless_share == 0.5 else f"{goal.lossless_share:g} of"
        lines.append(f"- {study.label(arm)}: against full training over {epochs_text(judged.epochs)} epochs ({judged.how}): "
                     f"{diff}{flops_text}; within {goal.lossless} {metric.unit} of full training in at most {share} "
                     f"its time on {judged.in_time} of {judged.seeds} seeds: goal **{judged.verdict}**")
    return "\n".join(lines) or "- no gated arm at budget 0.5 yet"


# --------------------------------------------------------------------------- plots

def plot_frontier(study: Study, path: Path, idle: bool = False) -> None:
    """Final accuracy (95% interval) against time share; gate=none's schedules joined as the
    frontier a gate must beat. Time is as recorded or, with `idle`, as measured idle: full
    training over n epochs costs n / E, a gate its idle share (arms without one are left out)."""
    def x(arm: Arm) -> float | None:
        if not idle:
            return study.share(arm)
        return arm.key.epochs / study.full.key.epochs if arm.key.gate == "none" else study.idle_share(arm)

    fig, ax = analysis.pyplot().subplots(figsize=(7, 4.5))
    nones = sorted((a for a in study.arms.values() if a.key.gate == "none" and not a.key.variant
                    and a.key.precision == study.full.key.precision),
                   key=lambda a: a.key.epochs)
    ys = [interval(list(a.finals().values())) for a in nones]
    epochs = ", ".join(epochs_text(a.key.epochs) for a in nones)
    ax.errorbar([x(a) for a in nones], [y.mean for y in ys], yerr=[y.half or 0 for y in ys], color="black",
                marker="s", capsize=3, label=f"none ({epochs} epochs): train less")
    colours = {g: f"C{i}" for i, g in enumerate((*GATES, "infobatch"))}
    for arm in study.arms.values():
        if arm.key.gate == "none" or x(arm) is None:
            continue
        y = interval(list(arm.finals().values()))
        colour = colours.get(arm.key.gate, "grey")
        ax.errorbar([x(arm)], [y.mean], yerr=[y.half or 0], marker="o", capsize=3, color=colour,
                    markerfacecolor=colour if arm.key.packed else "white", linestyle="none",
                    label=f"{study.label(arm)} (n={len(arm.runs)})")
    clock = "measured idle (none: epochs / E; gates: idle_bench share)" if idle else "as recorded"
    ax.set(xlabel=f"training wall-clock, share of full training's, {clock}",
           ylabel=study.metric.axis_label(final=True))
    ax.set_title("mean over seeds, bars: 95% interval; filled: packed", fontsize=9)
    analysis.finish(fig, ax, path)


def plot_curves(study: Study, budget: float, path: Path) -> None:
    """Validation accuracy against training wall-clock at one budget (mean over seeds)."""
    fig, ax = analysis.pyplot().subplots(figsize=(7, 4.5))
    arms = [study.full, *(a for a in [study.matched(budget)] if a)]
    arms += [a for a in study.arms.values() if a.key.gate != "none" and a.key.rate == budget]
    for i, arm in enumerate(arms):
        # each run's seconds over full training's on the same hardware (1 / its time there)
        xs, mean, _, _ = analysis.curve(arm, "epoch_time_s", study.curve.key, x_scale=lambda r: study.run_share(r, 1.0))
        ax.plot(xs, mean, marker=".", color="black" if i == 0 else f"C{i}",
                linestyle="--" if arm.key.gate == "none" else "-", label=f"{study.label(arm)} (n={len(arm.runs)})")
    metric, margin, final = study.curve, study.goals.time_margin, study.curve_full
    ax.axhline(study.curve_target(margin), color="grey", linewidth=0.8, linestyle=":")
    if metric.is_accuracy:
        ax.set(ylim=(max(0, final - 25), final + 3))
        target = f"full training's final accuracy - {margin}"
    else:
        ax.set(ylim=(final - 0.1, final + 0.6))
        target = f"full training's final loss + {margin}"
    ax.set(xlabel="training wall-clock, share of full training's", ylabel=metric.axis_label())
    ax.set_title(f"budget {budget}: mean over seeds; dotted: {target}", fontsize=9)
    analysis.finish(fig, ax, path)


def plot_differences(study: Study, forest: list[tuple[str, float, Estimate]], path: Path) -> None:
    plt = analysis.pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * max(1, len(forest))))
    for i, (_, _, diff) in enumerate(forest):
        ax.errorbar([diff.mean], [i], xerr=[diff.half or 0], marker="o", capsize=3, color="C0" if diff.half else "C1")
    ax.set_yticks(range(len(forest)), [f"{label} (n={diff.n})" for label, _, diff in forest], fontsize=7)
    ax.axvline(0, color="grey", linewidth=0.8)
    metric = study.metric
    ax.axvline(metric.sign * study.goals.beat, color="grey", linewidth=0.8, linestyle=":")
    what = "accuracy" if metric.is_accuracy else "loss"
    ax.set(xlabel=f"final {what} minus full training's over the named epochs, same seed ({metric.unit})")
    ax.set_title("paired difference, bars: 95% interval (orange: one seed, no interval); dotted: the goal",
                 fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- page

def full_text(study: Study) -> str:
    """Full training's final metric over seeds: '80.48 ± 2.31%' or 'val_loss 1.5000 ± 0.0100'."""
    figure = interval(list(study.full.finals().values()))
    if study.metric.is_accuracy:
        return f"{pm(figure)}%"
    return f"{study.metric.key} {pm(figure, 4)}"


def hardware_text(study: Study) -> str:
    """Where the study's runs trained: one machine's name, or each with its count of runs."""
    counts = Counter(hardware_of(r) for a in study.arms.values() for r in a.runs.values())
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{hardware} ({n} run{'' if n == 1 else 's'})" for hardware, n in counts.most_common())


def full_time_text(study: Study) -> str:
    """Full training's mean training seconds, on each machine it ran on when more than one."""
    if len(study.full_times) == 1:
        return f"{next(iter(study.full_times.values())):.0f} s"
    return ", ".join(f"{seconds:.0f} s on {hardware}" for hardware, seconds in study.full_times.items())


def default_idle_benches(source: Path) -> list[Path]:
    """The idle benchmarks beside a record file (idle_bench*.json); none for a sweep directory."""
    return sorted(source.parent.glob("idle_bench*.json")) if source.is_file() else []


def write_page(source: Path, out_dir: Path, title: str = TITLE, queue_file: Path | None = None,
               bench_files: list[Path] | None = None, margins: tuple[float, ...] | None = None) -> Path:
    runs = analysis.collect_runs(source)
    bench_files = default_idle_benches(source) if bench_files is None else bench_files
    study = build_study(runs, bench_files)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_frontier(study, out_dir / "frontier.png")
    if study.idle:
        plot_frontier(study, out_dir / "frontier_idle.png", idle=True)
    for budget in study.budgets():
        plot_curves(study, budget, out_dir / f"curves_budget_{budget}.png")
    differences, forest = differences_table(study)
    variants, tta = variants_table(study), tta_table(study)
    plot_differences(study, forest, out_dir / "paired_differences.png")
    facts = study.full.runs[min(study.full.runs)].summary
    missing = analysis.missing_runs(runs, queue_file)
    command = (f"python -m scripts.studies.convergence {source}" + ("" if title == TITLE else f' --title "{title}"')
               + ("" if bench_files == default_idle_benches(source) else
                  "".join(f" --idle-bench {b}" for b in bench_files))
               + (f" --time-margins {','.join(f'{m:g}' for m in margins)}" if margins else ""))
    idle = (f"Idle shares: epoch 2 of `scripts/bench_gates.py` on an otherwise idle machine "
            f"({', '.join(f'`{b}`' for b in bench_files)}; each file names its command and hardware)."
            if bench_files else "No idle benchmark: equal time falls back to the recorded wall-clock.")
    text = "\n".join([
        f"# {title}", "",
        f"Made by `{command}` from {sum(len(a.runs) for a in study.arms.values())} "
        f"runs. Model {facts['model']}, dataset {facts['dataset']} ({facts.get('data_source', '?')}), "
        f"{hardware_text(study)}; full training: {epochs_text(study.full.key.epochs)} "
        f"epochs, {full_text(study)} in {full_time_text(study)}.", "",
        "## The goal at budget 0.5", "", goal_verdict(study), "",
        "## Every arm", "", arms_table(study, margins), "", *infobatch_note(study),
        f"{analysis.INTERVAL_NOTE} Time: training wall-clock as each run recorded it "
        "(evaluation excluded), two runs sharing the machine, so a run's time depends on its "
        "neighbour" + ("" if len(study.full_times) == 1 else
                       "; each run's share is of full training's on the same machine (runs on a machine "
                       "full training has not run on have none)") + ". FLOPs: counted with torch.utils.flop_counter (scoring included). "
        "Optimiser steps: counted per epoch (`optimizer_steps`); for epochs run before that key "
        "existed, one per batch of 64."
        + ("" if study.curve == study.metric else
           f" Times to a target and the curves read `{study.curve.key}`, the accuracy without test-time "
           "augmentation that every epoch records (full training evaluates with TTA at its end only), "
           "against full training's final figure of the same."), "",
        "## Paired differences (same seed)", "", differences, "", idle, "",
        *(["## Full training's variants (the ablation)", "", variants, ""] if variants else []),
        *(["## Test-time augmentation levels (the same final weights)", "", tta, "",
           "Every evaluation with TTA also scores the plain image and its mirrored pair from the "
           "same forwards, so each run is its own TTA ablation.", ""] if tta else []),
        "## Plots", "",
        *(["![final accuracy against idle-measured training time: the goal's clock](frontier_idle.png)", ""]
          if study.idle else []),
        "![final accuracy against training time as recorded, gate=none's schedules as the frontier](frontier.png)", "",
        *(line for b in study.budgets() for line in (f"![curves at budget {b}](curves_budget_{b}.png)", "")),
        "![paired differences](paired_differences.png)", "",
        *analysis.not_yet_run_section(missing, queue_file),
        ""])
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the study's sweep directory or its runs.jsonl")
    parser.add_argument("--out", type=Path, help="where README.md and the plots go (default: beside the record file)")
    parser.add_argument("--title", default=TITLE, help="the page's heading")
    parser.add_argument("--queue", type=Path, help="the study's queue file (default: queue.txt beside the record file)")
    parser.add_argument("--idle-bench", type=Path, action="append",
                        help="a scripts/bench_gates.py JSON measured idle at the study's settings, to match "
                             "time (repeatable; default: idle_bench*.json beside the record file)")
    parser.add_argument("--time-margins", help="comma-separated margins below full training's final metric "
                                               "for the time-to-target columns (default: the goal's, e.g. 0.5)")
    args = parser.parse_args(argv)
    out, queue_file = analysis.page_locations(args.source, args.out, args.queue)
    margins = tuple(float(m) for m in args.time_margins.split(",")) if args.time_margins else None
    path = write_page(args.source, out, args.title, queue_file, args.idle_bench, margins)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
