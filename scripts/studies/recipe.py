"""A sparse-attention study's page: DeepSeek's two-stage recipe against dense training at equal
epochs, sparse attention from scratch, the keep-ratio curve, the combined claim. Two studies use
it, told apart by their runs' model: the ViT on CIFAR-10 (issue 14, accuracy, 65 tokens) and the
GPT on tiny-shakespeare at context 2,048 (issue 22, validation loss).

    python -m scripts.studies.report multirun/vit-recipe/runs --export docs/results/vit-recipe/runs.jsonl
    python -m scripts.studies.recipe docs/results/vit-recipe/runs.jsonl --extra docs/results/vit/runs.jsonl
    python -m scripts.studies.recipe docs/results/long-context/runs.jsonl

Reads the study's record (or sweep directory), plus any `--extra` records (an earlier study's
from-scratch runs), and writes README.md and plots beside the record. A run is
- dense: attention=dense, gate=none (its epoch-D checkpoint kept, so its first D epochs are a
  D-epoch run: `vit_recipe_dense` at a constant learning rate; `shakespeare_char_long`, whose
  recipe stage continues its schedule);
- recipe: sparse attention started from a dense checkpoint (`init_from=.../epoch_D.pt`): its
  first `attention.warmup_epochs` epochs train only the indexer (the backbone still has D
  epochs), each later one is backbone epoch D + 1, D + 2, ...;
- restart: dense attention started from a dense checkpoint the same way (a fresh optimiser, no
  warm-up): the control that separates the recipe's fresh Adam from its sparse attention;
- scratch: sparse attention from random weights (`vit_keep_ratio`, or attention=sparse);
- combined: a gated run (`vit_combined`, or any gate but none), compared with dense's same epochs.
Runs pair by seed. Intervals are 95% Student-t over seeds; times are training wall-clock as
each run recorded it (evaluation excluded); FLOPs are the FLOP meter's (training/metering.py), causal
attention counted as executed in runs that record `flops_counted_as`, as the full square before.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from adaptive_sparse.training.records import Metric, preset_of
from scripts.studies import analysis
from scripts.studies.analysis import Run, interval, pm

# Keys per query of each sparse attention option the studies' runs trained with, where a run does
# not override attention.top_k: its conf/attention preset's top_k. Stated here, so that a page is
# made from its records alone, and a preset edited later cannot relabel runs already recorded.
TOP_K = {"sparse": 32, "sparse_causal_long": 512}


@dataclass(frozen=True)
class Study:
    """What one study's page compares: its model, metric, goal and wording."""
    model: str
    title: str
    metric: Metric            # the summary's and epoch records' key, its direction and unit
    digits: int               # the page's precision for it
    tolerance: float          # the goal: the recipe at most this much worse than dense
    tolerance_words: str
    goal_top_k: int
    tokens: int               # a sequence's length, for "top_k of N"
    recipe_warmup: int        # a recipe run's indexer warm-up epochs where it does not override
                              # attention.warmup_epochs: its +study preset's, stated as TOP_K is
    metric_header: str        # "(%)" in "final (%)"
    plot_title: str
    combined_heading: str
    combined_note: str

    def worse_by(self, value: float, reference: float) -> float:
        """How much worse `value` is than `reference` (negative: better)."""
        return self.metric.sign * (reference - value)

    def fmt(self, value: float | None) -> str:
        return "–" if value is None else f"{value:.{self.digits}f}"


VIT = Study(
    model="vit", title="Sparse-attention ViT: DeepSeek's two-stage recipe, the keep-ratio curve, the combined claim",
    metric=Metric("val_acc", True), digits=2, tolerance=1.0, tolerance_words="a point",
    goal_top_k=32, tokens=65, recipe_warmup=1, metric_header="(%)",
    plot_title="ViT on CIFAR-10: dense, sparse from scratch, and DeepSeek's recipe",
    combined_heading="The combined claim (sundew 6% with sparse attention)",
    combined_note="Speedups here divide recorded training times of runs that shared the machine; the idle "
                  "benchmark in docs/sparse-attention.md (the report's combined claim, measured) is the one to quote.")
LONG_CONTEXT = Study(
    model="gpt", title="Long context (baby GPT at 2,048 tokens, tiny-shakespeare): DeepSeek's recipe, sparse "
                       "from scratch, the combined claim",
    metric=Metric("val_loss", False), digits=4, tolerance=0.03, tolerance_words="0.03 nats",
    goal_top_k=512, tokens=2048, recipe_warmup=1, metric_header="(val loss)",
    plot_title="GPT at context {tokens:,} on tiny-shakespeare: dense, sparse from scratch, and DeepSeek's recipe",
    combined_heading="The combined claim (sundew 25% with sparse attention)",
    combined_note="Speedups here divide recorded training times of runs that shared the machine two at a "
                  "time; the idle benchmark in docs/sparse-attention.md (the combined claim at {tokens:,} tokens, "
                  "measured) is the one to quote.")
STUDIES = {s.model: s for s in (VIT, LONG_CONTEXT)}


def context_of(runs: list[Run], default: int) -> int:
    """The study's sequence length: its runs' model.block_size override (the same in every run),
    else the study's own."""
    contexts = {int(r.overrides.get("model.block_size", default)) for r in runs}
    if len(contexts) > 1:
        raise SystemExit(f"the runs were trained at different contexts {sorted(contexts)}: one study, one context")
    return contexts.pop() if contexts else default


def top_k_of(run: Run) -> int | None:
    """Sparse attention's keys per query (None for dense): the override, else its option's (TOP_K)."""
    name = run.summary["attention"]
    if name == "dense":
        return None
    if "attention.top_k" in run.overrides:
        return int(run.overrides["attention.top_k"])
    if name not in TOP_K:
        raise SystemExit(f"{run.path}: attention={name} without an attention.top_k override: add the top_k "
                         "its runs trained with to TOP_K in scripts/studies/recipe.py")
    return TOP_K[name]


@dataclass
class RecipeRun:
    run: Run
    kind: str  # dense | recipe | restart | scratch | combined
    seed: int
    top_k: int | None  # sparse attention's keys per query; None for dense
    start_epoch: int = 0  # backbone epochs already trained when the run started (recipe: D)
    warmup: int = 0       # of its epochs, how many trained only the indexer
    extra: bool = False   # from an --extra record: another sitting, so its times are not compared
    study: Study = VIT

    @property
    def name(self) -> str:
        k = "" if self.top_k is None else f" k{self.top_k}"
        return f"{self.kind}{k} s{self.seed}" + (" (earlier study)" if self.extra else "")

    @property
    def final(self) -> float:
        return self.run.summary[self.study.metric.key]

    def backbone_epoch(self, epoch: int) -> int | None:
        """The backbone's epochs after this run's epoch `epoch` (None: a warm-up epoch)."""
        return None if epoch <= self.warmup else self.start_epoch + epoch - self.warmup

    @property
    def after_warmup(self) -> float | None:
        """The metric after the indexer warm-up (the backbone as it started)."""
        return next((e.get(self.study.metric.key) for e in self.run.epochs if e["epoch"] == self.warmup), None)

    def summed(self, key: str, upto_epoch: int) -> float:
        """A per-epoch figure (time, FLOPs) summed over this run's epochs 1..upto_epoch."""
        return sum(e[key] for e in self.run.epochs if e["epoch"] <= upto_epoch)

    def value_at(self, backbone_epochs: int) -> float | None:
        return next((r.get(self.study.metric.key) for r in self.run.epochs
                     if self.backbone_epoch(r["epoch"]) == backbone_epochs), None)


def classify(run: Run, study: Study) -> RecipeRun:
    s, o = run.summary, run.overrides
    top_k = top_k_of(run)
    if preset_of(o) == "vit_combined" or s.get("gate", "none") != "none":
        return RecipeRun(run, "combined", s["seed"], top_k, study=study)
    if o.get("init_from"):
        start = re.search(r"epoch_(\d+)\.pt", str(o["init_from"]))
        if start is None:
            raise SystemExit(f"{run.path}: init_from={o['init_from']} names no epoch_N.pt, so its "
                             "starting epoch is unknown")
        if top_k is None:
            return RecipeRun(run, "restart", s["seed"], None, int(start.group(1)), study=study)
        warmup = int(o.get("attention.warmup_epochs", study.recipe_warmup))
        return RecipeRun(run, "recipe", s["seed"], top_k, int(start.group(1)), warmup, study=study)
    if top_k is None:
        return RecipeRun(run, "dense", s["seed"], None, study=study)
    return RecipeRun(run, "scratch", s["seed"], top_k, study=study)


def study_of(runs: list[Run]) -> Study:
    """The study a record belongs to, by the model most of its finished runs trained."""
    models = [r.summary.get("model") for r in runs if r.complete and r.summary.get("model") in STUDIES]
    if not models:
        raise SystemExit(f"no finished run of a model with a recipe study ({', '.join(STUDIES)})")
    return STUDIES[max(set(models), key=models.count)]


def recipe_runs(runs: list[Run], study: Study, extra: bool = False) -> list[RecipeRun]:
    found = [classify(r, study) for r in runs if r.complete and r.summary.get("model") == study.model]
    for r in found:
        r.extra = extra
    return found


def of(runs: list[RecipeRun], kind: str, top_k: int | None = None) -> dict[int, RecipeRun]:
    """The runs of one kind (and top_k), by seed; of two for one seed the first listed wins
    (the study's own record comes before --extra ones)."""
    found: dict[int, RecipeRun] = {}
    for r in runs:
        if r.kind == kind and (top_k is None or r.top_k == top_k):
            found.setdefault(r.seed, r)
    return found


def study_in(runs: list[RecipeRun]) -> Study:
    return runs[0].study if runs else VIT


def at_goal(runs: list[RecipeRun], kind: str) -> dict[int, RecipeRun]:
    """The runs of one kind the goal compares: sparse ones at the goal's top_k, dense ones all."""
    return of(runs, kind, study_in(runs).goal_top_k if kind in ("recipe", "scratch") else None)


# --------------------------------------------------------------------------- tables

def goal_section(runs: list[RecipeRun], context_learnt: bool | None = None) -> str:
    """The recipe against dense at equal backbone epochs, per seed, and the goal's verdict: met or
    missed on two seeds or more, and undecided where fewer, or where dense training has not learnt
    to use its context (`context_learnt` False: a language model not clear of the bigram count),
    since sparse attention then has nothing to lose."""
    study = study_in(runs)
    k, fmt = study.goal_top_k, study.fmt
    dense, recipe, restart = of(runs, "dense"), of(runs, "recipe", k), of(runs, "restart")
    seeds = sorted(set(dense) & set(recipe))
    if not seeds:
        return "No recipe run with its dense run yet."
    end = {s: recipe[s].start_epoch + recipe[s].run.summary["epochs"] - recipe[s].warmup for s in seeds}
    lines = ["| seed | dense after D epochs | recipe after the warm-up | recipe after D + S | dense after D + S "
             "| recipe - dense | dense restarted at D (fresh Adam), after D + S | recipe - restarted |",
             "|---|---|---|---|---|---|---|---|"]
    diffs, worse, controls = [], [], []
    signed = lambda x: "–" if x is None else f"{x:+.{study.digits}f}"  # noqa: E731
    for s in seeds:
        r, d = recipe[s], dense[s]
        line = d.value_at(end[s])
        diff = None if line is None else r.final - line
        diffs.append(diff)
        worse.append(None if line is None else study.worse_by(r.final, line))
        again = restart[s].value_at(end[s]) if s in restart and restart[s].start_epoch == r.start_epoch else None
        control = None if again is None else r.final - again
        controls.append(control)
        lines.append(f"| {s} | {fmt(d.value_at(r.start_epoch))} (D = {r.start_epoch}) | {fmt(r.after_warmup)} | "
                     f"{fmt(r.final)} (D + S = {end[s]}) | {fmt(line)} | {signed(diff)} | "
                     f"{fmt(again)} | {signed(control)} |")
    known = [d for d in diffs if d is not None]
    if not known:
        return "\n".join(lines)
    against_restart = [c for c in controls if c is not None]
    control_line = ([f"Recipe minus dense restarted from the same weights with a fresh Adam (what sparse "
                     f"attention and the warm-up cost by themselves): {pm(interval(against_restart), study.digits)} "
                     f"{study.metric.unit} over {len(against_restart)} seed(s)."] if against_restart else [])
    within = sum(w <= study.tolerance for w in worse if w is not None)
    verdict = ("undecided (dense training has not learnt to use its context: see below)" if context_learnt is False
               else "met" if within == len(known) and len(known) >= 2 else
               "missed" if within < len(known) else "undecided (fewer than two seeds)")
    spread = interval(known)
    loose = (f" Met seed by seed only: the interval on the mean difference (± {spread.half:.{study.digits}f}) is "
             f"wider than the {study.tolerance_words} tolerance, so these seeds cannot bound the mean gap that "
             f"closely." if verdict == "met" and spread.half is not None and spread.half > study.tolerance else "")
    return "\n".join([*lines, "",
                      f"Recipe minus dense at equal backbone epochs, top_k {k}: "
                      f"{pm(spread, study.digits)} {study.metric.unit} over {len(known)} seed(s); within "
                      f"{study.tolerance_words} of dense on {within} of {len(known)}: goal **{verdict}**.{loose}",
                      *([""] + control_line if control_line else [])])


def epochs_table(runs: list[RecipeRun]) -> str:
    """The metric after each backbone epoch: dense, restart, scratch and recipe at the goal's top_k."""
    columns = [(r.name, r) for kind in ("dense", "restart", "scratch", "recipe")
               for _, r in sorted(at_goal(runs, kind).items())]
    if not columns:
        return "No runs yet."
    fmt = study_in(runs).fmt
    last = max(r.backbone_epoch(r.run.epochs[-1]["epoch"]) or 0 for _, r in columns)
    lines = ["| backbone epochs | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for epoch in range(1, last + 1):
        lines.append(f"| {epoch} | " + " | ".join(fmt(r.value_at(epoch)) for _, r in columns) + " |")
        warm = [r for _, r in columns if r.warmup and r.start_epoch == epoch]
        if warm:
            lines.append(f"| {epoch} + indexer warm-up | " + " | ".join(
                fmt(r.after_warmup) if r in warm else "" for _, r in columns) + " |")
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


def backbone_epochs(runs: list[RecipeRun]) -> int:
    """The epochs of the study's dense runs: the total every way to train is compared at."""
    dense = of(runs, "dense")
    return max((d.run.summary["epochs"] for d in dense.values()), default=0)


def cost_table(runs: list[RecipeRun]) -> str:
    """Training time and FLOPs of each way to D + S backbone epochs, as a share of dense's
    (this study's own runs only: times from another sitting do not compare)."""
    runs = [r for r in runs if not r.extra]
    dense = of(runs, "dense")
    if not dense:
        return "No dense run yet."
    k = study_in(runs).goal_top_k
    rows = [("dense", [(d.run.summary["train_time_s"], d.run.summary["flops_executed"]) for d in dense.values()])]
    recipe = [r for r in of(runs, "recipe", k).values() if r.seed in dense]
    if recipe:  # the dense epochs it started from count too
        rows.append(("recipe (dense epochs 1..D + warm-up + sparse)", [
            (dense[r.seed].summed("epoch_time_s", r.start_epoch) + r.run.summary["train_time_s"],
             dense[r.seed].summed("flops_executed", r.start_epoch) + r.run.summary["flops_executed"])
            for r in recipe]))
    scratch = list(of(runs, "scratch", k).values())
    if scratch:
        rows.append(("sparse from scratch", [(r.run.summary["train_time_s"], r.run.summary["flops_executed"])
                                             for r in scratch]))
    base_time = statistics.fmean(t for t, _ in rows[0][1])
    base_flops = statistics.fmean(f for _, f in rows[0][1])
    lines = [f"| way to {backbone_epochs(runs)} backbone epochs (top_k {k}) | runs | training time (s) | "
             "share of dense's | TFLOP | share of dense's |", "|---|---|---|---|---|---|"]
    for name, figures in rows:
        time, flops = statistics.fmean(t for t, _ in figures), statistics.fmean(f for _, f in figures)
        lines.append(f"| {name} | {len(figures)} | {time:.0f} | {time / base_time:.2f} | {flops / 1e12:.0f} | "
                     f"{flops / base_flops:.3f} |")
    full_square = sum(r.run.summary.get("flops_counted_as") != "executed" for r in runs)
    if full_square and study_in(runs).model == "gpt":  # causal attention: the counts differ  # the FLOP meter counts causal attention as executed since summary.json says so
        lines += ["", f"FLOPs as each run recorded them: {full_square} of these {len(runs)} runs count causal "
                      "attention as the full square, as torch's flop counter does, where the CPU kernel runs "
                      "five eighths of it at 2,048 tokens; sparse attention's kept blocks count the same either "
                      "way, so the shares of dense's FLOPs above flatter the sparse ways (counted as executed, "
                      "dense's FLOPs would be smaller and those shares larger)."]
    return "\n".join(lines)


def keep_ratio_table(runs: list[RecipeRun]) -> str:
    top_ks = sorted({r.top_k for r in runs if r.kind in ("recipe", "scratch")})
    dense = of(runs, "dense")
    if not top_ks:
        return "No sparse runs yet."
    study = study_in(runs)
    line = {s: d.final for s, d in dense.items()}
    header = study.metric_header
    lines = [f"| top_k of {study.tokens} | recipe final {header} | seeds | scratch final {header} | seeds | "
             f"dense {header}, same seeds as the recipe |", "|---|---|---|---|---|---|"]
    for k in top_ks:
        recipe, scratch = of(runs, "recipe", k), of(runs, "scratch", k)
        cells = []
        for arm in (recipe, scratch):
            finals = [r.final for r in arm.values()]
            cells += [pm(interval(finals), study.digits) if finals else "–", ",".join(map(str, sorted(arm))) or "–"]
        ref = [line[s] for s in recipe if s in line]
        lines.append(f"| {k} | {' | '.join(cells)} | {pm(interval(ref), study.digits) if ref else '–'} |")
    return "\n".join(lines)


def combined_table(runs: list[RecipeRun]) -> str:
    """Gated runs (and sparse attention alone, the fourth corner) against dense gate=none at the same epochs."""
    combined = [r for r in runs if r.kind == "combined" and not r.extra]
    dense = of(runs, "dense")
    if not combined:
        return "Not run yet."
    study = study_in(runs)
    gated_seeds = {r.seed for r in combined}
    top_ks = sorted({r.top_k for r in combined if r.top_k is not None}) or [study.goal_top_k]
    alone = [r for k in top_ks for s, r in sorted(of([r for r in runs if not r.extra], "scratch", k).items())
             if s in gated_seeds]  # sparse attention alone, at the top_k the gated sparse runs use
    lines = [f"| attention | gate | seed | final {study.metric_header} | dense gate=none {study.metric_header} | "
             "activation rate | training time (s) | speedup vs dense gate=none, same epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in combined + alone:
        s = r.run.summary
        d = dense.get(r.seed)
        epochs = s["epochs"]
        base = None if d is None else d.summed("epoch_time_s", epochs)
        attention = s["attention"] + ("" if r.top_k is None else f" (top_k {r.top_k})")
        speedup = "–" if base is None else f"{base / s['train_time_s']:.2f}x"
        lines.append(f"| {attention} | {s['gate']} | {r.seed} | {study.fmt(r.final)} | "
                     f"{study.fmt(None if d is None else d.value_at(epochs))} | {s['activation_rate']:.3f} | "
                     f"{s['train_time_s']:.0f} | {speedup} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def metric_label(study: Study) -> str:
    return "validation accuracy (%)" if study.metric.key == "val_acc" else "validation loss (nats per character)"


def plot_epochs(runs: list[RecipeRun], path: Path) -> None:
    study = study_in(runs)
    fig, ax = analysis.pyplot().subplots(figsize=(7, 4.5))
    styles = {"dense": ("black", "-"), "restart": ("grey", ":"), "scratch": ("C1", "--"), "recipe": ("C0", "-")}
    for kind, (colour, style) in styles.items():
        for seed, r in sorted(at_goal(runs, kind).items()):
            points = [(r.backbone_epoch(e["epoch"]), e.get(study.metric.key)) for e in r.run.epochs]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if kind in ("recipe", "restart"):  # joined to the dense epoch it started from
                start = of(runs, "dense").get(seed)
                points = ([(r.start_epoch, start.value_at(r.start_epoch))] if start else []) + points
            ax.plot(*zip(*points), color=colour, linestyle=style, marker="o", markersize=3,
                    label=r.name)
    ax.set(xlabel="backbone training epochs", ylabel=metric_label(study))
    ax.set_title(study.plot_title.format(tokens=study.tokens), fontsize=9)
    analysis.finish(fig, ax, path)


def plot_keep_ratio(runs: list[RecipeRun], path: Path) -> None:
    study = study_in(runs)
    fig, ax = analysis.pyplot().subplots(figsize=(6, 4))
    for kind, colour in (("recipe", "C0"), ("scratch", "C1")):
        ks = sorted({r.top_k for r in runs if r.kind == kind})
        finals = [interval([r.final for r in of(runs, kind, k).values()]) for k in ks]
        if ks:
            ax.errorbar(ks, [f.mean for f in finals], yerr=[f.half or 0 for f in finals], color=colour, marker="o",
                        capsize=3, label=kind)
    dense = [d.final for d in of(runs, "dense").values()]
    if dense:
        ax.axhline(statistics.fmean(dense), color="black", linewidth=1, label="dense (mean)")
    ax.set(xlabel=f"attention.top_k (keys per query, of {study.tokens})", ylabel="final " + metric_label(study))
    analysis.finish(fig, ax, path)


# --------------------------------------------------------------------------- page

LEARNT_MARGIN = 0.3  # nats below the bigram count that show a language model uses its context


def ngram_baselines(out_dir: Path) -> dict | None:
    """The counting models' losses beside the record (scripts/char_baselines.py), if measured."""
    path = out_dir / "ngram_baselines.json"
    return json.loads(path.read_text()) if path.exists() else None


def context_learnt(figures: dict | None, runs: list[RecipeRun]) -> bool | None:
    """Whether dense training ends at least LEARNT_MARGIN below the bigram count (None: no baseline
    or no dense run, as for images)."""
    dense = [r.final for r in of(runs, "dense").values()]
    if figures is None or not dense:
        return None
    return statistics.fmean(dense) <= figures["bigram_nats"] - LEARNT_MARGIN


def baselines_note(figures: dict | None, runs: list[RecipeRun]) -> list[str]:
    """The counting models' losses, and whether dense training got clear of the bigram count."""
    if figures is None:
        return []
    lines = [f"What the losses mean: on the same split a unigram count scores {figures['unigram_nats']:.3f} "
             f"nats and a bigram count (from the current character alone) {figures['bigram_nats']:.3f} "
             f"(`{figures['command']}`): a model at the bigram figure uses no context, so attention, dense or "
             "sparse, has nothing to show there."]
    dense = [r.final for r in of(runs, "dense").values()]
    learnt = context_learnt(figures, runs)
    if learnt is not None:
        gap = f"Dense training ends {statistics.fmean(dense) - figures['bigram_nats']:+.3f} nats from the bigram count"
        lines.append(f"{gap}, at least {LEARNT_MARGIN} nats below it: the model uses its context, so what sparse "
                     "attention gives up there is measurable." if learnt else
                     f"{gap}, not {LEARNT_MARGIN} nats below it: at this budget the model has not learnt to use "
                     "its context, so these runs cannot say what sparse attention costs in quality.")
    return [" ".join(lines), ""]


def context_use_section(out_dir: Path) -> list[str]:
    """How far back each run reads (scripts/studies/context_use.py's record beside the page): the
    loss on the same characters at each context, and per run a verdict on the full window's gain
    over the shortest context, from its 95% interval over windows."""
    path = out_dir / "context_use.json"
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    contexts = sorted({int(c) for run in record["runs"] for c in run["loss"]})
    shortest = str(contexts[0])
    head = ["run", *(f"loss at {c:,}" for c in contexts), f"full window's gain over {contexts[0]}", "reads beyond it"]
    lines = ["## How far back each model reads", "",
             f"Each validation window's last {record['scored']} characters predicted from less and less of the "
             f"window before them (`{record['command']}`; {record['hardware']}): a model that uses context beyond "
             f"{contexts[0]} characters does better with the whole window. The gain is paired window by window, "
             "± its 95% interval over windows.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in record["runs"]:
        gain = run["gain_of_full_window_over"].get(shortest)
        if gain is None:
            continue
        low, high = gain["mean"] - gain["interval"], gain["mean"] + gain["interval"]
        verdict = "yes" if low > 0 else "no: worse with more" if high < 0 else "no gain measured"
        cells = [run["name"], *(f"{run['loss'][str(c)]:.4f}" if str(c) in run["loss"] else "–" for c in contexts),
                 f"{gain['mean']:+.4f} ± {gain['interval']:.4f}", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", "![loss against the context given](context_use.png)", ""]


def write_page(sources: list[Path], out_dir: Path, queue_file: Path | None, title: str | None = None,
               goal_top_k: int | None = None) -> Path:
    own = analysis.collect_runs(sources[0])
    study = study_of(own)
    if goal_top_k is not None:  # the top_k the goal is judged at: the one that pays, once measured
        study = replace(study, goal_top_k=goal_top_k)
    study = replace(study, tokens=context_of(own, study.tokens))
    runs = recipe_runs(own, study) + [r for source in sources[1:]
                                      for r in recipe_runs(analysis.collect_runs(source), study, extra=True)]
    out_dir.mkdir(parents=True, exist_ok=True)
    baselines = ngram_baselines(out_dir)
    what = "accuracy" if study.metric.key == "val_acc" else "loss"
    plot_epochs(runs, out_dir / f"{what}_by_epoch.png")
    plot_keep_ratio(runs, out_dir / "keep_ratio.png")
    facts = next((r.run.summary for r in runs if r.kind == "dense"), runs[0].run.summary if runs else {})
    missing = analysis.missing_runs(own, queue_file)
    command = "python -m scripts.studies.recipe " + " ".join(
        [str(sources[0]), *(f"--extra {s}" for s in sources[1:]),
         *([f"--goal-top-k {goal_top_k}"] if goal_top_k is not None else []), *([f'--title "{title}"'] if title else [])])
    epochs = backbone_epochs(runs)
    text = "\n".join([
        f"# {title or study.title}", "",
        f"Made by `{command}` from {len(runs)} runs. Dataset {facts.get('dataset', '?')} "
        f"({facts.get('data_source', '?')}), precision {facts.get('precision', '?')}, {facts.get('hardware', '?')}. "
        f"{analysis.INTERVAL_NOTE}",
        "", f"## The goal: recipe-trained sparse within {study.tolerance_words} of dense at equal epochs "
            f"(top_k {study.goal_top_k} of {study.tokens})", "",
        goal_section(runs, context_learnt(baselines, runs)), "",
        *baselines_note(baselines, runs),
        f"## {metric_label(study).split(' (')[0].capitalize()} after each backbone epoch", "", epochs_table(runs), "",
        f"![{what} by backbone epoch]({what}_by_epoch.png)", "",
        f"## What each way to {epochs} backbone epochs cost", "", cost_table(runs), "",
        "Times as each run recorded them (evaluation excluded; runs shared the machine two at a time, "
        "so read shares, not seconds). The recipe's total includes the dense epochs it started from.", "",
        "## The keep-ratio curve", "", keep_ratio_table(runs), "",
        f"![final {what} against top_k](keep_ratio.png)", "",
        *context_use_section(out_dir),
        f"## {study.combined_heading}", "", combined_table(runs), "",
        study.combined_note.format(tokens=study.tokens), "",
        *analysis.not_yet_run_section(missing, queue_file),
        ""])
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the study's sweep directory or its runs.jsonl")
    parser.add_argument("--extra", type=Path, action="append", default=[],
                        help="another record whose runs of the same model join the page (e.g. earlier from-scratch runs)")
    parser.add_argument("--out", type=Path, help="where README.md and the plots go (default: beside the record)")
    parser.add_argument("--queue", type=Path, help="the study's queue file (default: queue.txt beside the record)")
    parser.add_argument("--title", default=None, help="the page's heading (default: the study's)")
    parser.add_argument("--goal-top-k", type=int, default=None,
                        help="the top_k the goal judges (default: the study's; the one where sparse attention pays)")
    args = parser.parse_args(argv)
    out, queue_file = analysis.page_locations(args.source, args.out, args.queue)
    print(write_page([args.source, *args.extra], out, queue_file, args.title, args.goal_top_k).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
