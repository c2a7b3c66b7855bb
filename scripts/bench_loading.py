"""Where selection happens, measured: full training, a gate selecting before loading (the
selecting sampler), and the same gate selecting after loading, on two pipelines, one sitting.

    python scripts/bench_loading.py --data ../shared/data/cifar10 --json docs/bench/selection_point.json

- imagefolder: examples/imagefolder_sundew.py, torchvision ImageFolder over JPEG files, per-sample
  PIL transforms (crop, flip, ToTensor, Normalize), DataLoader(num_workers=--workers).
- tensor: train.py, the images held as uint8 tensors, augmentation on whole batches.

Each arm is a subprocess run of --epochs epochs; the figure compared is the last epoch's
training wall-clock (loading included, evaluation excluded), as a share of full training's in
the same pipeline. Nothing else should run on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from adaptive_sparse.training.tracking import code_version, hardware_description

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "imagefolder_sundew.py"
# (gate, selection point, arguments): full training is an ordinary shuffled loader
IMAGEFOLDER_ARMS = [("none", "-", ["--gate", "none", "--select", "after"]),
                    ("sundew-memory", "before loading", ["--gate", "sundew", "--select", "before"]),
                    ("sundew-memory", "after loading", ["--gate", "sundew", "--select", "after"])]
TENSOR_ARMS = [("none", "-", ["gate=none"]),
               ("sundew-memory", "before loading", ["gate=sundew_memory", "gate.pack=true",
                                                     "gate.select_before_loading=auto"]),
               ("sundew-memory", "after loading", ["gate=sundew_memory", "gate.pack=true",
                                                    "gate.select_before_loading=false"])]


def run_imagefolder(args: argparse.Namespace, extra: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, str(EXAMPLE), "--data", args.data, "--epochs", str(args.epochs), "--workers",
           str(args.workers), "--target-rate", str(args.target_rate), "--json", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return [{"epoch_time_s": r["epoch_time_s"], "activation_rate": r["activation_rate"]}
            for r in json.loads(out.read_text())]


def run_tensor(args: argparse.Namespace, extra: list[str], run_dir: Path) -> list[dict]:
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"dataset.root={args.data}",
           f"training.epochs={args.epochs}", f"gate.target_rate={args.target_rate}", "dataset.augment=true",
           "wandb.mode=disabled", "progress=false", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch_time_s": r["epoch_time_s"], "activation_rate": r["activation_rate"],
             "data_time_s": r["data_time_s"]} for r in records]


def rows_of(pipeline: str, arms: list[tuple[str, str, list[dict]]]) -> list[dict]:
    full = arms[0][2][-1]["epoch_time_s"]
    return [{"pipeline": pipeline, "gate": gate, "selection_point": point,
             "epoch_s": epochs[-1]["epoch_time_s"], "share_of_full": epochs[-1]["epoch_time_s"] / full,
             "activation_rate": epochs[-1]["activation_rate"], "epochs": epochs}
            for gate, point, epochs in arms]


def table(rows: list[dict]) -> str:
    lines = ["| pipeline | gate | selection point | epoch s | share of full | activation rate |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['pipeline']} | {r['gate']} | {r['selection_point']} | {r['epoch_s']:.1f} | "
              f"{r['share_of_full']:.3f} | {r['activation_rate']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 as train/ and test/ image folders")
    parser.add_argument("--epochs", type=int, default=2, help="per arm; the last one is compared")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target-rate", type=float, default=0.5)
    parser.add_argument("--pipelines", default="imagefolder,tensor")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "imagefolder" in args.pipelines:
            arms = [(g, p, run_imagefolder(args, extra, Path(tmp) / f"if{i}.json"))
                    for i, (g, p, extra) in enumerate(IMAGEFOLDER_ARMS)]
            rows += rows_of("imagefolder + 2 workers" if args.workers == 2 else f"imagefolder + {args.workers} workers",
                            arms)
        if "tensor" in args.pipelines:
            arms = [(g, p, run_tensor(args, extra, Path(tmp) / f"t{i}")) for i, (g, p, extra) in enumerate(TENSOR_ARMS)]
            rows += rows_of("tensor (train.py)", arms)
    print(table(rows))
    if args.json:
        import torch

        record = {"command": "python scripts/bench_loading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "hardware": hardware_description(torch.device("cpu")), "torch": torch.__version__,
                  "target_rate": args.target_rate, "epochs": args.epochs, "workers": args.workers,
                  "data": args.data, **code_version(), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
