"""The sparse-attention ViT study's page (issue 14): DeepSeek's two-stage recipe against dense
training at equal epochs, sparse attention from scratch, the keep-ratio curve, the combined claim.

    python scripts/report.py multirun/vit-recipe/runs --export docs/results/vit-recipe/runs.jsonl
    python scripts/vit_recipe_report.py docs/results/vit-recipe/runs.jsonl --extra docs/results/vit/runs.jsonl

Reads the study's record (or sweep directory), plus any `--extra` records (an earlier study's
from-scratch runs), and writes README.md and plots beside the record. A run is
- dense: attention=dense, gate=none (`vit_recipe_dense`: 5 epochs at a constant learning rate,
  its epoch-4 checkpoint kept, so its first 4 epochs are a 4-epoch run);
- recipe: sparse attention started from a dense checkpoint (`init_from=.../epoch_D.pt`): its
  first `attention.warmup_epochs` epochs train only the indexer (the backbone still has D
  epochs), each later one is backbone epoch D + 1, D + 2, ...;
- restart: dense attention started from a dense checkpoint the same way (a fresh optimiser, no
  warm-up): the control that separates the recipe's fresh Adam from its sparse attention;
- scratch: sparse attention from random weights (`vit_keep_ratio`, or attention=sparse);
- combined: `vit_combined` (gate and attention crossed), compared with dense's same epochs.
Runs pair by seed. Intervals are 95% Student-t over seeds; times are training wall-clock as
each run recorded it (evaluation excluded); FLOPs come from torch.utils.flop_counter.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from adaptive_sparse import analysis
from adaptive_sparse.analysis import Run, interval, pm

HERE = Path(__file__).resolve().parent
CONF = HERE.parent / "conf"
DEFAULT_TOP_K = OmegaConf.load(CONF / "attention" / "sparse.yaml").top_k
RECIPE_WARMUP = OmegaConf.load(CONF / "experiment" / "vit_recipe_sparse.yaml").attention.warmup_epochs
GOAL_POINTS = 1.0  # "recipe-trained sparse within 1.0 point of dense at equal total epochs"
GOAL_TOP_K = 32


@dataclass
class ViTRun:
    run: Run
    kind: str  # dense | recipe | restart | scratch | combined
    seed: int
    top_k: int | None  # sparse attention's keys per query; None for dense
    start_epoch: int = 0  # backbone epochs already trained when the run started (recipe: D)
    warmup: int = 0       # of its epochs, how many trained only the indexer
    extra: bool = False   # from an --extra record: another sitting, so its times are not compared

    @property
    def name(self) -> str:
        k = "" if self.top_k is None else f" k{self.top_k}"
        return f"{self.kind}{k} s{self.seed}" + (" (earlier study)" if self.extra else "")

    @property
    def final(self) -> float:
        return self.run.summary["val_acc"]

    def backbone_epoch(self, epoch: int) -> int | None:
        """The backbone's epochs after this run's epoch `epoch` (None: a warm-up epoch)."""
        return None if epoch <= self.warmup else self.start_epoch + epoch - self.warmup

    @property
    def after_warmup(self) -> float | None:
        """Validation accuracy after the indexer warm-up (the backbone as it started)."""
        return next((e.get("val_acc") for e in self.run.epochs if e["epoch"] == self.warmup), None)

    def summed(self, key: str, upto_epoch: int) -> float:
        """A per-epoch figure (time, FLOPs) summed over this run's epochs 1..upto_epoch."""
        return sum(e[key] for e in self.run.epochs if e["epoch"] <= upto_epoch)

    def acc_at(self, backbone_epochs: int) -> float | None:
        return next((r.get("val_acc") for r in self.run.epochs
                     if self.backbone_epoch(r["epoch"]) == backbone_epochs), None)


def classify(run: Run) -> ViTRun:
    s, o = run.summary, run.overrides
    top_k = int(o.get("attention.top_k", DEFAULT_TOP_K)) if s["attention"] == "sparse" else None
    if o.get("experiment") == "vit_combined":
        return ViTRun(run, "combined", s["seed"], top_k)
    if o.get("init_from"):
        start = re.search(r"epoch_(\d+)\.pt", str(o["init_from"]))
        if start is None:
            raise SystemExit(f"{run.path}: init_from={o['init_from']} names no epoch_N.pt, so its "
                             "starting epoch is unknown")
        if s["attention"] == "dense":
            return ViTRun(run, "restart", s["seed"], None, int(start.group(1)))
        warmup = int(o.get("attention.warmup_epochs", RECIPE_WARMUP))
        return ViTRun(run, "recipe", s["seed"], top_k, int(start.group(1)), warmup)
    if s["attention"] == "dense":
        return ViTRun(run, "dense", s["seed"], None)
    return ViTRun(run, "scratch", s["seed"], top_k)


def vit_runs(runs: list[Run], extra: bool = False) -> list[ViTRun]:
    found = [classify(r) for r in runs if r.complete and r.summary.get("model") == "vit"]
    for r in found:
        r.extra = extra
    return found


def of(runs: list[ViTRun], kind: str, top_k: int | None = None) -> dict[int, ViTRun]:
    """The runs of one kind (and top_k), by seed; of two for one seed the first listed wins
    (the study's own record comes before --extra ones)."""
    found: dict[int, ViTRun] = {}
    for r in runs:
        if r.kind == kind and (top_k is None or r.top_k == top_k):
            found.setdefault(r.seed, r)
    return found


def at_goal(runs: list[ViTRun], kind: str) -> dict[int, ViTRun]:
    """The runs of one kind the goal compares: sparse ones at the goal's top_k, dense ones all."""
    return of(runs, kind, GOAL_TOP_K if kind in ("recipe", "scratch") else None)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------- tables

def goal_section(runs: list[ViTRun]) -> str:
    dense, recipe, restart = of(runs, "dense"), of(runs, "recipe", GOAL_TOP_K), of(runs, "restart")
    seeds = sorted(set(dense) & set(recipe))
    if not seeds:
        return "No recipe run with its dense run yet."
    end = {s: recipe[s].start_epoch + recipe[s].run.summary["epochs"] - recipe[s].warmup for s in seeds}
    lines = ["| seed | dense after D epochs | recipe after the warm-up | recipe after D + S | dense after D + S "
             "| recipe - dense | dense restarted at D (fresh Adam), after D + S | recipe - restarted |",
             "|---|---|---|---|---|---|---|---|"]
    diffs, controls = [], []
    signed = lambda x: "–" if x is None else f"{x:+.2f}"  # noqa: E731
    for s in seeds:
        r, d = recipe[s], dense[s]
        line = d.acc_at(end[s])
        diff = None if line is None else r.final - line
        diffs.append(diff)
        again = restart[s].acc_at(end[s]) if s in restart and restart[s].start_epoch == r.start_epoch else None
        control = None if again is None else r.final - again
        controls.append(control)
        lines.append(f"| {s} | {percent(d.acc_at(r.start_epoch))} (D = {r.start_epoch}) | {percent(r.after_warmup)} | "
                     f"{percent(r.final)} (D + S = {end[s]}) | {percent(line)} | {signed(diff)} | "
                     f"{percent(again)} | {signed(control)} |")
    known = [d for d in diffs if d is not None]
    if not known:
        return "\n".join(lines)
    against_restart = [c for c in controls if c is not None]
    control_line = ([f"Recipe minus dense restarted from the same weights with a fresh Adam (what sparse "
                     f"attention and the warm-up cost by themselves): {pm(interval(against_restart))} points "
                     f"over {len(against_restart)} seed(s)."] if against_restart else [])
    within = sum(d >= -GOAL_POINTS for d in known)
    verdict = ("met" if within == len(known) and len(known) >= 2 else
               "missed" if within < len(known) else "undecided (fewer than two seeds)")
    return "\n".join([*lines, "",
                      f"Recipe minus dense at equal backbone epochs, top_k {GOAL_TOP_K}: "
                      f"{pm(interval(known))} points over {len(known)} seed(s); within "
                      f"{GOAL_POINTS:g} point of dense on {within} of {len(known)}: goal **{verdict}**.",
                      *([""] + control_line if control_line else [])])


def epochs_table(runs: list[ViTRun]) -> str:
    """Validation accuracy after each backbone epoch: dense, scratch and recipe at top_k 32."""
    columns = [(r.name, r) for kind in ("dense", "restart", "scratch", "recipe")
               for _, r in sorted(at_goal(runs, kind).items())]
    if not columns:
        return "No runs yet."
    last = max(r.backbone_epoch(r.run.epochs[-1]["epoch"]) or 0 for _, r in columns)
    lines = ["| backbone epochs | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for epoch in range(1, last + 1):
        lines.append(f"| {epoch} | " + " | ".join(percent(r.acc_at(epoch)) for _, r in columns) + " |")
        warm = [r for _, r in columns if r.warmup and r.start_epoch == epoch]
        if warm:
            lines.append(f"| {epoch} + indexer warm-up | " + " | ".join(
                percent(r.after_warmup) if r in warm else "" for _, r in columns) + " |")
    kl = [(name, r) for name, r in columns if any(e.get("indexer_loss") is not None for e in r.run.epochs)]
    if kl:
        width = max(len(r.run.epochs) for _, r in kl)
        lines += ["", "Indexer KL divergence from the main attention (nats, mean over the epoch's steps; in a "
                  "warm-up epoch against the full dense distribution, in a sparse epoch over the selected keys):", "",
                  "| run | " + " | ".join(f"epoch {e}" for e in range(1, width + 1)) + " |", "|---|" + "---|" * width]
        for name, r in kl:
            cells = ["–" if e.get("indexer_loss") is None else f"{e['indexer_loss']:.3f}" for e in r.run.epochs]
            lines.append(f"| {name} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    return "\n".join(lines)


def cost_table(runs: list[ViTRun]) -> str:
    """Training time and FLOPs of each way to D + S backbone epochs, as a share of dense's
    (this study's own runs only: times from another sitting do not compare)."""
    runs = [r for r in runs if not r.extra]
    dense = of(runs, "dense")
    if not dense:
        return "No dense run yet."
    rows = [("dense", [(d.run.summary["train_time_s"], d.run.summary["flops_executed"]) for d in dense.values()])]
    recipe = [r for r in of(runs, "recipe", GOAL_TOP_K).values() if r.seed in dense]
    if recipe:  # the dense epochs it started from count too
        rows.append(("recipe (dense epochs 1..D + warm-up + sparse)", [
            (dense[r.seed].summed("epoch_time_s", r.start_epoch) + r.run.summary["train_time_s"],
             dense[r.seed].summed("flops_executed", r.start_epoch) + r.run.summary["flops_executed"])
            for r in recipe]))
    scratch = list(of(runs, "scratch", GOAL_TOP_K).values())
    if scratch:
        rows.append(("sparse from scratch", [(r.run.summary["train_time_s"], r.run.summary["flops_executed"])
                                             for r in scratch]))
    base_time = statistics.fmean(t for t, _ in rows[0][1])
    base_flops = statistics.fmean(f for _, f in rows[0][1])
    lines = ["| way to 5 backbone epochs (top_k 32) | runs | training time (s) | share of dense's | TFLOP | share of dense's |",
             "|---|---|---|---|---|---|"]
    for name, figures in rows:
        time, flops = statistics.fmean(t for t, _ in figures), statistics.fmean(f for _, f in figures)
        lines.append(f"| {name} | {len(figures)} | {time:.0f} | {time / base_time:.2f} | {flops / 1e12:.0f} | "
                     f"{flops / base_flops:.3f} |")
    return "\n".join(lines)


def keep_ratio_table(runs: list[ViTRun]) -> str:
    top_ks = sorted({r.top_k for r in runs if r.kind in ("recipe", "scratch")})
    dense = of(runs, "dense")
    if not top_ks:
        return "No sparse runs yet."
    line = {s: d.run.summary["val_acc"] for s, d in dense.items()}
    lines = ["| top_k of 65 | recipe final (%) | seeds | scratch final (%) | seeds | dense (%), same seeds as the recipe |",
             "|---|---|---|---|---|---|"]
    for k in top_ks:
        recipe, scratch = of(runs, "recipe", k), of(runs, "scratch", k)
        cells = []
        for arm in (recipe, scratch):
            finals = [r.final for r in arm.values()]
            cells += [pm(interval(finals)) if finals else "–", ",".join(map(str, sorted(arm))) or "–"]
        ref = [line[s] for s in recipe if s in line]
        lines.append(f"| {k} | {' | '.join(cells)} | {pm(interval(ref)) if ref else '–'} |")
    return "\n".join(lines)


def combined_table(runs: list[ViTRun]) -> str:
    combined = [r for r in runs if r.kind == "combined"]
    dense = of(runs, "dense")
    if not combined:
        return "Not run yet."
    lines = ["| attention | gate | seed | final val acc (%) | dense gate=none (%) | activation rate | "
             "training time (s) | speedup vs dense gate=none, same epochs |", "|---|---|---|---|---|---|---|---|"]
    for r in combined:
        s = r.run.summary
        d = dense.get(r.seed)
        epochs = s["epochs"]
        base = None if d is None else d.summed("epoch_time_s", epochs)
        attention = s["attention"] + ("" if r.top_k is None else f" (top_k {r.top_k})")
        speedup = "–" if base is None else f"{base / s['train_time_s']:.2f}x"
        lines.append(f"| {attention} | {s['gate']} | {r.seed} | {percent(s['val_acc'])} | "
                     f"{percent(None if d is None else d.acc_at(epochs))} | {s['activation_rate']:.3f} | "
                     f"{s['train_time_s']:.0f} | {speedup} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def plot_epochs(runs: list[ViTRun], path: Path) -> None:
    fig, ax = analysis.pyplot().subplots(figsize=(7, 4.5))
    styles = {"dense": ("black", "-"), "restart": ("grey", ":"), "scratch": ("C1", "--"), "recipe": ("C0", "-")}
    for kind, (colour, style) in styles.items():
        for seed, r in sorted(at_goal(runs, kind).items()):
            points = [(r.backbone_epoch(e["epoch"]), e.get("val_acc")) for e in r.run.epochs]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if kind in ("recipe", "restart"):  # joined to the dense epoch it started from
                start = of(runs, "dense").get(seed)
                points = ([(r.start_epoch, start.acc_at(r.start_epoch))] if start else []) + points
            ax.plot(*zip(*points), color=colour, linestyle=style, marker="o", markersize=3,
                    label=r.name)
    ax.set(xlabel="backbone training epochs", ylabel="validation accuracy (%)")
    ax.set_title("ViT on CIFAR-10: dense, sparse from scratch, and DeepSeek's recipe", fontsize=9)
    analysis.finish(fig, ax, path)


def plot_keep_ratio(runs: list[ViTRun], path: Path) -> None:
    fig, ax = analysis.pyplot().subplots(figsize=(6, 4))
    for kind, colour in (("recipe", "C0"), ("scratch", "C1")):
        ks = sorted({r.top_k for r in runs if r.kind == kind})
        finals = [interval([r.final for r in of(runs, kind, k).values()]) for k in ks]
        if ks:
            ax.errorbar(ks, [f.mean for f in finals], yerr=[f.half or 0 for f in finals], color=colour, marker="o",
                        capsize=3, label=kind)
    dense = [d.run.summary["val_acc"] for d in of(runs, "dense").values()]
    if dense:
        ax.axhline(statistics.fmean(dense), color="black", linewidth=1, label="dense (mean)")
    ax.set(xlabel="attention.top_k (keys per query, of 65)", ylabel="final validation accuracy (%)")
    analysis.finish(fig, ax, path)


# --------------------------------------------------------------------------- page

def write_page(sources: list[Path], out_dir: Path, queue_file: Path | None) -> Path:
    own = analysis.collect_runs(sources[0])
    runs = vit_runs(own) + [r for source in sources[1:] for r in vit_runs(analysis.collect_runs(source), extra=True)]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_epochs(runs, out_dir / "accuracy_by_epoch.png")
    plot_keep_ratio(runs, out_dir / "keep_ratio.png")
    facts = next((r.run.summary for r in runs if r.kind == "dense"), runs[0].run.summary if runs else {})
    missing = analysis.missing_runs(own, queue_file)
    command = "python scripts/vit_recipe_report.py " + " ".join(
        [str(sources[0]), *(f"--extra {s}" for s in sources[1:])])
    text = "\n".join([
        "# Sparse-attention ViT: DeepSeek's two-stage recipe, the keep-ratio curve, the combined claim", "",
        f"Made by `{command}` from {len(runs)} runs. Dataset {facts.get('dataset', '?')} "
        f"({facts.get('data_source', '?')}), precision {facts.get('precision', '?')}, {facts.get('hardware', '?')}. "
        f"{analysis.INTERVAL_NOTE}",
        "", "## The goal: recipe-trained sparse within a point of dense at equal epochs (top_k 32 of 65)", "",
        goal_section(runs), "",
        "## Accuracy after each backbone epoch", "", epochs_table(runs), "",
        "![accuracy by backbone epoch](accuracy_by_epoch.png)", "",
        "## What each way to 5 backbone epochs cost", "", cost_table(runs), "",
        "Times as each run recorded them (evaluation excluded; runs shared the machine two at a time, "
        "so read shares, not seconds). The recipe's total includes the dense epochs it started from.", "",
        "## The keep-ratio curve", "", keep_ratio_table(runs), "",
        "![final accuracy against top_k](keep_ratio.png)", "",
        "## The combined claim (sundew 6% with sparse attention)", "", combined_table(runs), "",
        "Speedups here divide recorded training times of runs that shared the machine; the idle "
        "benchmark in docs/sparse-attention.md (the report's combined claim, measured) is the one to quote.", "",
        *analysis.not_yet_run_section(missing, queue_file),
        ""])
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the study's sweep directory or its runs.jsonl")
    parser.add_argument("--extra", type=Path, action="append", default=[],
                        help="another record whose ViT runs join the page (e.g. earlier from-scratch runs)")
    parser.add_argument("--out", type=Path, help="where README.md and the plots go (default: beside the record)")
    parser.add_argument("--queue", type=Path, help="the study's queue file (default: queue.txt beside the record)")
    args = parser.parse_args(argv)
    out, queue_file = analysis.page_locations(args.source, args.out, args.queue)
    print(write_page([args.source, *args.extra], out, queue_file).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
