"""The GPU check's dry run (`python -m scripts.gpu_check --dry-run`): every stage of the one command a
lent GPU machine gets, walked on the CPU with tiny settings and made-up data, so that it cannot rot;
its records then make the page's GPU section (scripts/gpu_records.py)."""
import json
import subprocess
import sys

from conftest import ROOT

from scripts import gpu_records
from scripts.gpu_check import GATED, STAGES


def test_the_dry_run_walks_every_stage_and_its_records_make_the_page(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "scripts.gpu_check", "--dry-run", "--out", str(out),
               "--work", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + log[-3000:]
    check = json.loads((out / "check.json").read_text())
    status = {stage["name"]: stage for stage in check["stages"]}
    assert list(status) == [stage.name for stage in STAGES] and check["dry_run"]
    assert status["install"]["status"] in ("ok", "skipped")  # skipped where no wheels/ was made (CI)
    assert all(status[name]["status"] == "ok" for name in status if name != "install")
    for name in ("cuda_tests", "flex_tests"):  # collected, and skipped for want of CUDA
        assert set(status[name]["tests"]) == {"skipped"} and status[name]["failing"] == []

    fastnet = json.loads((out / "fastnet.json").read_text())["runs"]
    assert list(fastnet) == ["warmup", "full", *GATED]
    assert all(run["data_source"].startswith("pack:") and run["train_time_s"] > 0 for run in fastnet.values())
    assert all(0 < fastnet[name]["time_share_of_full"] for name in GATED)
    assert json.loads((out / "report_config.json").read_text())["runs"]["defaults"]["gate"] == "sundew"
    assert json.loads((out / "baby_gpt.json").read_text())["runs"]["baby_gpt"]["val_bpc"] > 0
    contexts = json.loads((out / "attention.json").read_text())["settings"]["contexts"]
    assert contexts == "[2048, 4096, 8192, 16384, 32768]"

    page = tmp_path / "measuring.md"
    page.write_text(f"{gpu_records.START}\n{gpu_records.END}\n")
    assert gpu_records.main(["--from", str(out), "--bench", str(tmp_path / "bench"), "--page", str(page)]) == 0
    assert "### On a GPU: none (a dry run on the CPU)" in page.read_text()
