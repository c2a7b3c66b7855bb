"""The GPU check's records (scripts/gpu_check.py's --out, fetched here) as docs/bench/gpu/*.json and
docs/measuring.md's GPU section, made from those records so that the page cannot drift from them.

    python -m scripts.gpu_records --from DIR   # copy a check's records into docs/bench/gpu/, rewrite the section
    python -m scripts.gpu_records              # rewrite the section from docs/bench/gpu/
    python -m scripts.gpu_records --check      # exit 1 if the section is not what docs/bench/gpu/ gives

The records are one sitting: one check on one machine, whose GPU, torch, driver and clocks the
section names, with each stage's status and time; a copy replaces every record of the last one.
The section lies between the marker lines START and END.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench" / "gpu"
PAGE = ROOT / "docs" / "measuring.md"
RECORDS = ("check", "fastnet", "report_config", "baby_gpt", "attention")
START = "<!-- gpu: made by `python -m scripts.gpu_records` from docs/bench/gpu/; do not edit by hand -->"
END = "<!-- /gpu -->"
AIRBENCH94_S = 3.29  # airbench94's published 9.9 epochs: an A100, the canonical CIFAR-10 files, compiled fp16
SHARE_GOAL = 0.55  # issue 40: packed sundew at 0.5 takes at most this share of full training's time
REPORT_CPU_EPOCH_S = (158, 168)  # the report's own CPU epochs of its configuration
GATED = {"sundew_memory_packed_0.5": "sundew (memory scoring, packed) at 0.5",
         "random_packed_0.5": "random (packed) at 0.5"}


def load(folder: Path) -> dict[str, dict | None]:
    """Each record of one check by name (None where its stage wrote none)."""
    return {name: json.loads((folder / f"{name}.json").read_text()) if (folder / f"{name}.json").exists() else None
            for name in RECORDS}


def copy_records(source: Path, bench: Path) -> list[str]:
    """A check's records into `bench`, replacing the last sitting's (none of it stays beside them)."""
    if not (source / "check.json").exists():
        raise SystemExit(f"{source} holds no check.json: not a GPU check's records")
    bench.mkdir(parents=True, exist_ok=True)
    for name, record in load(source).items():
        target = bench / f"{name}.json"
        target.unlink(missing_ok=True)
        if record is not None:
            target.write_text(json.dumps(record, indent=1) + "\n")
    return sorted(p.name for p in bench.glob("*.json"))


# --------------------------------------------------------------------------- the section

def section(records: dict[str, dict | None]) -> list[str]:
    if records["check"] is None:
        return ["(no GPU check's records in docs/bench/gpu/ yet: scripts/gpu_check.py)"]
    return [*heading(records), "", *goals(records), "", *runs(records), "", *attention(records["attention"]), "",
            *stages(records["check"])]


def environment(records: dict[str, dict | None]) -> dict:
    """The software facts the measuring stages recorded (each records the same)."""
    return next((r["environment"] for r in records.values() if r and "environment" in r), {})


def heading(records: dict[str, dict | None]) -> list[str]:
    check, env = records["check"], environment(records)
    smi = check.get("machine") or {}
    gpu = smi.get("name") or env.get("gpu") or "none (a dry run on the CPU)"
    after = ((records["fastnet"] or {}).get("runs", {}).get("full") or {}).get("gpu_after") or {}
    clocks = (f"; clocks read after FastNet's full run: SM {after.get('clocks.sm')} of {after.get('clocks.max.sm')}, "
              f"memory {after.get('clocks.mem')} of {after.get('clocks.max.mem')}" if after else "")
    dry = "A dry run on the CPU (tiny settings, made-up data): no figure here is a GPU's. " if check["dry_run"] else ""
    intro = (f"{dry}`python3 -m scripts.gpu_check`, one sitting on one machine ({check['started']}): {gpu}, "
             f"driver {smi.get('driver_version', '-')}, torch {env.get('torch', '-')} "
             f"(CUDA {env.get('cuda', '-')}){clocks}. "
             "CIFAR-10 is the packed JPEG copy (`data/cifar10.pack`: the bytes of `../shared/data/cifar10`), so its "
             "accuracies sit below the canonical files' ([data.md](data.md)). Records: [bench/gpu/](bench/gpu/).")
    return [f"### On a GPU: {gpu}", "", intro]


def stage_of(check: dict, name: str) -> dict:
    return next((s for s in check["stages"] if s["name"] == name), {"status": "absent"})


def not_measured(check: dict, stage: str) -> str:
    found = stage_of(check, stage)
    return f"not measured (stage {stage}: {found['status']}{', ' + found['why'] if 'why' in found else ''})"


def goals(records: dict[str, dict | None]) -> list[str]:
    """Issue 40's goals, each met or missed with its figure."""
    check, fastnet = records["check"], (records["fastnet"] or {}).get("runs", {})
    rows = ["| goal (issue 40) | figure | |", "|---|---|---|", tests_goal(check)]
    full, sundew = fastnet.get("full"), fastnet.get("sundew_memory_packed_0.5")
    if full:
        ratio = full["train_time_s"] / AIRBENCH94_S
        rows.append(f"| FastNet's 9.9 epochs within 2x airbench94's published {AIRBENCH94_S} s | "
                    f"{full['train_time_s']:.2f} s, {ratio:.2f}x | {verdict(ratio <= 2)} |")
    else:
        rows.append(f"| FastNet's 9.9 epochs within 2x airbench94's published {AIRBENCH94_S} s | "
                    f"{not_measured(check, 'fastnet')} | missed |")
    share = sundew and sundew.get("time_share_of_full")
    figure = f"{share:.3f}" if share else not_measured(check, "fastnet")
    rows.append(f"| packed sundew at 0.5 takes at most {SHARE_GOAL} of full training's time | {figure} | "
                f"{verdict(bool(share) and share <= SHARE_GOAL)} |")
    return rows


def tests_goal(check: dict) -> str:
    parts, green = [], True
    for name, what in (("cuda_tests", "tests/gpu"), ("flex_tests", "test_flex's CUDA test")):
        stage = stage_of(check, name)
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(stage.get("tests", {}).items()))
        parts.append(f"{what}: {counts or stage['status']}")
        green &= stage["status"] == "ok" and not stage.get("failing") and "passed" in stage.get("tests", {})
    return f"| every CUDA test green | {'; '.join(parts)} | {verdict(green)} |"


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def runs(records: dict[str, dict | None]) -> list[str]:
    """Every measured run: training time, epochs, its figure and where the time went."""
    fastnet = (records["fastnet"] or {}).get("runs", {})
    report = (records["report_config"] or {}).get("runs", {}).get("defaults")
    baby_gpt = (records["baby_gpt"] or {}).get("runs", {}).get("baby_gpt")
    named = [("FastNet, airbench94's recipe in full, bf16, data on the GPU", fastnet.get("full"), ""),
             *((f"FastNet, {label}", fastnet.get(key), "") for key, label in GATED.items()),
             ("`python train.py`'s defaults (the report's: SimpleCNN, sundew at 6%, batch 64), 3 epochs", report,
              report and against_the_report(report["epoch_times_s"])),
             ("baby GPT (`+experiment=shakespeare_char_baby`)", baby_gpt, "; nanoGPT's baby GPT: about 1.88")]
    rows = ["| run | training time | epochs (s) | result | data / scoring / select / step / rest (s) |",
            "|---|---:|---|---|---|"]
    for label, run, note in named:
        rows.append(run_row(label, run, note) if run else f"| {label} | - | - | not measured | - |")
    return rows


def run_row(label: str, run: dict, note: str) -> str:
    share = f" ({run['time_share_of_full']:.3f} of full's)" if "time_share_of_full" in run else ""
    phases = [run["phases_s"][k] for k in ("data_time_s", "scoring_time_s", "select_time_s", "train_step_time_s")]
    rest = run["train_time_s"] - sum(phases)  # the schedule, lookahead, packing: outside the phases
    phases = " / ".join(f"{t:.2f}" for t in [*phases, rest])
    return (f"| {label} | {run['train_time_s']:.2f} s{share} | {epochs_text(run['epoch_times_s'])} | "
            f"{result(run)}{note} | {phases} |")


def epochs_text(times: list[float]) -> str:
    """The first epoch (cuDNN's tuning, first launches) apart from the mean of the rest."""
    if len(times) == 1:
        return f"{times[0]:.2f}"
    return f"first {times[0]:.2f}, then {statistics.mean(times[1:]):.2f} each"


def result(run: dict) -> str:
    if run.get("val_bpc") is not None:  # a language model
        return f"val loss {run['val_loss']:.3f}"
    tta = f" with its TTA ({run['val_acc_tta0']:.2f}% without)" if run.get("val_acc_tta2") is not None else ""
    return f"{run['val_acc']:.2f}%{tta}"


def against_the_report(epoch_times_s: list[float]) -> str:
    mean = statistics.mean(epoch_times_s)
    low, high = REPORT_CPU_EPOCH_S
    return f"; epochs {low / mean:.0f}-{high / mean:.0f}x faster than the report's on a CPU ({low}-{high} s)"


def attention(record: dict | None) -> list[str]:
    """scripts/bench_flex.py's record: its kernel checks, then forward+backward ms per context."""
    if not record or "timing" not in record:
        return ["Sparse against dense attention (scripts/bench_flex.py): "
                + (record.get("skipped", "not measured") if record else "not measured") + "."]
    s = record["settings"]
    checks = record.get("check", [])
    intro = (f"Sparse (FlexAttention over {s['top_k'] // s['block_size']} kept blocks of {s['block_size']}) against "
             f"dense (SDPA's flash kernel) causal attention, bf16, {s['heads']} heads of {s['head_dim']}, "
             f"{s['batch_tokens']} tokens a batch, median of {s['reps']}; flex against gather: "
             f"{sum(c['ok'] for c in checks)} of {len(checks)} checks within tolerance (scripts/bench_flex.py):")
    lines = [intro, "", "| context | flash fwd+bwd ms | flex fwd+bwd ms | flash / flex |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['context']:,} | {r['flash_step_ms']:.2f} | {r['flex_step_ms']:.2f} | "
              f"{r['flash_over_flex_step']:.2f}x |" for r in record["timing"]]
    return lines


def stages(check: dict) -> list[str]:
    rows = [f"The check's stages (budget {check['budget_s']:.0f} s):", "",
            "| stage | status | seconds | estimate | note |", "|---|---|---:|---:|---|"]
    for s in check["stages"]:
        note = s.get("why") or s.get("pytest") or ""
        rows.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '-')} | {s['estimate_s']} | {note} |")
    return rows


# --------------------------------------------------------------------------- the page

def replace_block(text: str, lines: list[str]) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"the page has no GPU section (the lines {START!r} ... {END!r})")
    head, rest = text.split(START, 1)
    return head + "\n".join([START, *lines, END]) + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, help="a check's --out folder: copy its records in first")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the section is stale")
    parser.add_argument("--bench", type=Path, default=BENCH)
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    if args.source:
        print(f"copied {', '.join(copy_records(args.source, args.bench))} into {args.bench}")
    text = args.page.read_text()
    updated = replace_block(text, section(load(args.bench)))
    if args.check:
        if updated != text:
            print(f"{args.page}'s GPU section differs from {args.bench}: run python -m scripts.gpu_records")
            return 1
        return 0
    args.page.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
