"""scripts.gpu_records on a fabricated GPU check: the records copied in (the last sitting's gone), the
section between its markers naming the GPU, judging issue 40's goals from the figures, and saying
what was not measured; --check catches a stale section. (tests/e2e/test_gpu_check.py feeds it the
dry run's real records.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import gpu_records

SMI = {"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04", "clocks.sm": "1980 MHz",
       "clocks.max.sm": "1980 MHz", "clocks.mem": "2619 MHz", "clocks.max.mem": "2619 MHz"}
ENVIRONMENT = {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0", "gpu": SMI["name"]}


def fake_run(train_s: float, epochs: list[float], **figures) -> dict:
    phases = {"data_time_s": 0.1, "scoring_time_s": 0.0, "select_time_s": 0.2, "train_step_time_s": train_s - 0.5}
    return {"train_time_s": train_s, "epoch_times_s": epochs, "phases_s": phases, "gpu_after": SMI, **figures}


def stage(name: str, status: str = "ok", **facts) -> dict:
    return {"name": name, "estimate_s": 60, "cap_s": 150, "status": status, "seconds": 42.0, **facts}


def fabricate(folder: Path, fastnet_status: str = "ok") -> Path:
    """A check's --out as scripts/gpu_check.py writes it on a GPU."""
    folder.mkdir(parents=True)
    tests = {"tests": {"passed": 21}, "failing": [], "pytest": "21 passed in 80.0s"}
    check = {"check": "scripts/gpu_check.py", "dry_run": False, "budget_s": 470.0, "started": "2026-12-08 10:00:00 UTC",
             "machine": SMI, "stages": [stage("install"), stage("cuda_tests", **tests),
                                        stage("fastnet", fastnet_status),
                                        stage("flex_tests", **{**tests, "tests": {"passed": 12}})]}
    records = {"check": check,
               "report_config": {"environment": ENVIRONMENT,
                                 "runs": {"defaults": fake_run(12.0, [4.0] * 3, val_acc=62.5)}},
               "baby_gpt": {"environment": ENVIRONMENT, "runs": {"baby_gpt": fake_run(14.0, [7.0] * 2, val_loss=1.9,
                                                                                      val_bpc=2.74)}},
               "attention": {"settings": {"top_k": 512, "block_size": 64, "heads": 4, "head_dim": 32,
                                          "batch_tokens": 65536, "reps": 10},
                             "check": [{"ok": True}] * 5,
                             "timing": [{"context": 2048, "flash_step_ms": 1.0, "flex_step_ms": 2.0,
                                         "flash_over_flex_step": 0.5}]}}
    if fastnet_status == "ok":
        tta = {"val_acc": 92.0, "val_acc_tta0": 91.0, "val_acc_tta2": 92.0}
        records["fastnet"] = {"environment": ENVIRONMENT, "runs": {
            "full": fake_run(5.0, [1.4] + [0.4] * 9, **tta),
            "sundew_memory_packed_0.5": fake_run(2.6, [0.8] + [0.2] * 9, time_share_of_full=0.52, **tta),
            "random_packed_0.5": fake_run(3.0, [0.9] + [0.23] * 9, time_share_of_full=0.6, **tta)}}
    for name, record in records.items():
        (folder / f"{name}.json").write_text(json.dumps(record))
    return folder


def page(path: Path) -> Path:
    path.write_text(f"# Measuring\n\nbefore\n\n{gpu_records.START}\nstale\n{gpu_records.END}\n\nafter\n")
    return path


def test_the_section_names_the_gpu_and_judges_the_goals_from_the_figures(tmp_path):
    bench, doc = tmp_path / "bench", page(tmp_path / "measuring.md")
    (bench).mkdir()
    (bench / "fastnet.json").write_text("{}")  # the last sitting's: must not stay beside this one's
    assert gpu_records.main(["--from", str(fabricate(tmp_path / "out")), "--bench", str(bench),
                             "--page", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"# Measuring\n\nbefore\n\n{gpu_records.START}\n")
    assert text.endswith(f"\n{gpu_records.END}\n\nafter\n")
    assert "stale" not in text and "### On a GPU: NVIDIA H100 80GB HBM3" in text
    assert "driver 580.159.04, torch 2.11.0+cu130 (CUDA 13.0); clocks read after FastNet's full run: SM 1980" in text
    assert "| every CUDA test green | tests/gpu: 21 passed; test_flex's CUDA test: 12 passed | met |" in text
    assert "| 5.00 s, 1.52x | met |" in text  # 5.00 / 3.29
    assert "| 0.520 | met |" in text
    assert "| 2.60 s (0.520 of full's) | first 0.80, then 0.20 each | 92.00% with its TTA (91.00% without) |" in text
    assert "epochs 40-42x faster than the report's on a CPU (158-168 s)" in text
    assert "val loss 1.900; nanoGPT's baby GPT: about 1.88" in text
    assert "5 of 5 checks within tolerance" in text and "| 2,048 | 1.00 | 2.00 | 0.50x |" in text
    assert sorted(p.name for p in bench.iterdir()) == ["attention.json", "baby_gpt.json", "check.json", "fastnet.json",
                                                       "report_config.json"]
    assert gpu_records.main(["--check", "--bench", str(bench), "--page", str(doc)]) == 0
    doc.write_text(text.replace("1.52x", "1.00x"))
    assert gpu_records.main(["--check", "--bench", str(bench), "--page", str(doc)]) == 1


def test_a_stage_that_timed_out_is_said_and_its_goals_missed(tmp_path):
    bench, doc = tmp_path / "bench", page(tmp_path / "measuring.md")
    records = fabricate(tmp_path / "out", "timed out")
    gpu_records.main(["--from", str(records), "--bench", str(bench), "--page", str(doc)])
    text = doc.read_text()
    assert "not measured (stage fastnet: timed out) | missed |" in text
    assert "| FastNet, airbench94's recipe in full, bf16, data on the GPU | - | - | not measured | - |" in text
    assert not (bench / "fastnet.json").exists()


def test_a_page_without_markers_or_a_folder_without_a_check_is_refused(tmp_path):
    doc = tmp_path / "measuring.md"
    doc.write_text("# Measuring\n")
    with pytest.raises(SystemExit, match="no GPU section"):
        gpu_records.main(["--from", str(fabricate(tmp_path / "out")), "--bench", str(tmp_path / "b"),
                          "--page", str(doc)])
    with pytest.raises(SystemExit, match="no check.json"):
        gpu_records.main(["--from", str(tmp_path), "--bench", str(tmp_path / "b"), "--page", str(doc)])


def test_the_pages_gpu_section_is_what_the_committed_records_give():
    text = gpu_records.PAGE.read_text()
    if gpu_records.START not in text:
        pytest.skip("docs/measuring.md has no GPU section yet (its two marker lines)")
    assert gpu_records.replace_block(text, gpu_records.section(gpu_records.load(gpu_records.BENCH))) == text
