"""The README's answer table, made from the committed study records (so it cannot drift from them).

    python -m scripts.studies.readme_answer            # rewrite the block in README.md
    python -m scripts.studies.readme_answer --check    # exit 1 if README.md's block is not what the records give

For each budget study and budget: sundew (memory scoring, packed) and the random control, each
against full training cut to the gate's equal idle-measured time (paired by seed, 95% Student-t
interval), and the study's goal at budget 0.5, judged as its page judges it
(scripts.studies.convergence); and the report's combined claim (gate x sparse attention) as
epoch-time speedups from the idle benchmark records. Each block lies between its marker lines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from scripts.studies import analysis, convergence, recipe
from scripts.studies.analysis import Estimate

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- answer: made by `python -m scripts.studies.readme_answer` from the study records; do not edit by hand -->"
END = "<!-- /answer -->"
CLAIM_START = "<!-- claims: made by `python -m scripts.studies.readme_answer` from the benchmark records; do not edit by hand -->"
CLAIM_END = "<!-- /claims -->"
# the report's combined claim, measured idle: (setting, dense-attention record, sparse-attention record,
# the quality study's record and its sparse arm's top_k, or None where quality was not trained), each
# record a scripts/bench_gates.py run of gate=none and sundew (memory, packed) in one sitting
COMBINED = [("ViT, CIFAR-10, 65 tokens, sundew 6%", "docs/bench/bench_vit_combined_dense.json",
             "docs/bench/bench_vit_combined_sparse.json", None),
            ("GPT with rotary positions, tiny-shakespeare, 2,048 tokens, top_k 256, sundew 25%",
             "docs/bench/bench_long_rope_combined_dense_2048.json", "docs/bench/bench_long_rope_combined_sparse_2048.json",
             ("docs/results/long-context-rope/runs.jsonl", 256)),
            ("GPT with rotary positions, tiny-shakespeare, 4,096 tokens, top_k 512, sundew 25%",
             "docs/bench/bench_long_rope_combined_dense_4096.json", "docs/bench/bench_long_rope_combined_sparse_4096.json",
             ("docs/results/long-context-rope-4096/runs.jsonl", 512))]
# (the learned-position GPT's row at 2,048 tokens, bench_long_combined_*.json, left with its model,
# which never left the bigram plateau: docs/sparse-attention.md keeps its figures)
# (setting, study folder, idle benchmarks beside the record unless named)
# (the first FastNet study, two seeds on the recipe without its last five parts, whose +1.25 points
# five seeds on the full recipe did not repeat, is left to its page: docs/results/fastnet)
STUDIES = [("SimpleCNN, CIFAR-10, 40 epochs", "convergence", None),
           ("FastNet, airbench94's recipe in full, 9.9 epochs", "fastnet-recipe",
            ["docs/bench/bench_gates_fastnet_recipe_0.5.json", "docs/bench/bench_gates_fastnet_recipe_0.25.json"]),
           ("baby GPT, tiny-shakespeare, 10 epochs", "shakespeare-char", None)]


def answer_rows() -> list[str]:
    rows = ["| setting | budget | seeds | sundew vs full training at equal time | random vs the same | goal | page |",
            "|---|---|---|---|---|---|---|"]
    for setting, folder, benches in STUDIES:
        record = ROOT / "docs" / "results" / folder / "runs.jsonl"
        bench_files = ([ROOT / b for b in benches] if benches else convergence.default_idle_benches(record))
        study = convergence.build_study(analysis.collect_runs(record), bench_files)
        unit, digits = study.metric.unit, study.metric.digits
        for budget in study.budgets():
            gated = {k.gate: a for k, a in study.arms.items() if k.rate == budget and k.packed
                     and k.gate in ("sundew_memory", "random") and k.selection is None and not k.variant}
            if "sundew_memory" not in gated:
                continue
            sundew = convergence.judge(study, gated["sundew_memory"])
            epochs = convergence.epochs_text(sundew.epochs)
            against = f"{signed(sundew.result, digits)} {unit} ({epochs} epochs)" if sundew.result else "–"
            random = gated.get("random") and convergence.judge(study, gated["random"]).result
            control = f"{signed(random, digits)} {unit}" if random else "–"
            goal = sundew.verdict if budget == 0.5 else "–"
            rows.append(f"| {setting} | {budget:g} | {len(gated['sundew_memory'].runs)} | {against} | {control} | "
                        f"{goal} | [{folder}](docs/results/{folder}/README.md) |")
    return rows


def signed(figure: Estimate, digits: int) -> str:
    """'+0.54 ± 0.65' (a single seed: '+0.54')."""
    text = f"{figure.mean:+.{digits}f}"
    return text if figure.half is None else f"{text} ± {figure.half:.{digits}f}"


def combined_rows() -> list[str]:
    """Epoch-time speedups against dense attention with gate=none, from each pair of idle records,
    and each arm's validation-loss cost against dense full training from the quality study."""
    rows = ["| setting (idle, one sitting) | sundew with sparse attention | sundew alone | sparse attention alone "
            "| loss cost: both, sundew, sparse (nats) | records |",
            "|---|---|---|---|---|---|"]
    for setting, dense_file, sparse_file, quality in COMBINED:
        if not (ROOT / dense_file).exists() or not (ROOT / sparse_file).exists():
            continue
        dense_record, sparse_record = (json.loads((ROOT / f).read_text()) for f in (dense_file, sparse_file))
        dense, sparse = ({r["config"]: r for r in record["rows"]} for record in (dense_record, sparse_record))
        base = dense["none"]["epoch_time_s"]
        speed = lambda row: f"{base / row['epoch_time_s']:.2f}x"  # noqa: E731
        records = f"[dense]({dense_file}), [sparse]({sparse_file})"
        if quality and (ROOT / quality[0]).exists():
            records += f", [quality]({quality[0]})"
        rows.append(f"| {setting} ({dense_record['hardware']}) | {speed(sparse['sundew-memory-packed'])} | "
                    f"{speed(dense['sundew-memory-packed'])} | {speed(sparse['none'])} | "
                    f"{loss_costs(quality)} | {records} |")
    return rows


def loss_costs(quality: tuple[str, int] | None) -> str:
    """'+0.42, +0.47, -0.03 (seed 0)': the final validation loss of sundew 25% with sparse
    attention, sundew alone and sparse attention alone (from scratch), each minus dense full
    training's on the same seed, averaged over the seeds both have; '–' where quality was not
    trained. The runs are told apart as the study's page tells them (scripts.studies.recipe)."""
    if quality is None or not (ROOT / quality[0]).exists():
        return "–"
    path, top_k = quality
    runs = recipe.recipe_runs(analysis.collect_runs(ROOT / path), recipe.LONG_CONTEXT)
    gated = [r for r in runs if r.kind == "combined"
             and (r.run.summary["gate"], r.run.summary["target_rate"]) == ("sundew_memory", 0.25)]
    dense = {seed: r.final for seed, r in recipe.of(runs, "dense").items()}
    arms = [{r.seed: r.final for r in gated if r.top_k == top_k},
            {r.seed: r.final for r in gated if r.top_k is None},
            {seed: r.final for seed, r in recipe.of(runs, "scratch", top_k).items()}]
    cells = []
    for final in arms:
        common = sorted(set(final) & set(dense))
        cells.append((f"{statistics.fmean(final[s] - dense[s] for s in common):+.2f}" if common else "–", common))
    if len({tuple(seeds) for _, seeds in cells if seeds}) > 1:  # the arms have different seeds: say each's
        return ", ".join(cost + (f" ({seeds_text(seeds)})" if seeds else "") for cost, seeds in cells)
    seeds = next((seeds for _, seeds in cells if seeds), [])
    return ", ".join(cost for cost, _ in cells) + (f" ({seeds_text(seeds)})" if seeds else "")


def seeds_text(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def block() -> str:
    return "\n".join([START, *answer_rows(), END])


def claims_block() -> str:
    return "\n".join([CLAIM_START, *combined_rows(), CLAIM_END])


def replace_block(text: str, new_block: str, start: str = START, end: str = END) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no generated block (the lines {start!r} ... {end!r})")
    head, rest = text.split(start, 1)
    return head + new_block + rest.split(end, 1)[1]


def regenerated(text: str) -> str:
    """README.md's text with both generated blocks made afresh from the records."""
    return replace_block(replace_block(text, block()), claims_block(), CLAIM_START, CLAIM_END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the block is stale")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    updated = regenerated(text)
    if args.check:
        if updated != text:
            print("README.md's answer block differs from the records: run python -m scripts.studies.readme_answer")
            return 1
        return 0
    args.readme.write_text(updated)
    print(block() + "\n\n" + claims_block())
    return 0


if __name__ == "__main__":
    sys.exit(main())
