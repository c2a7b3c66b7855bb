"""scripts/run_queue.py: a study's runs in order, claimed once, finished ones skipped, dead claims taken over."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from scripts import run_queue as queue


def test_run_names_are_short_sorted_and_safe():
    name = queue.run_name(["+study=convergence", "seed=0", "gate=random", "gate.pack=true"])
    assert name == "convergence,gate.pack=true,gate=random,seed=0"
    # the preset's group is dropped: a queue line from before conf/study names the same run
    assert queue.run_name(["+experiment=convergence", "seed=0", "gate=random", "gate.pack=true"]) == name
    assert queue.run_name(["+experiment=fastnet", "seed=1"]) == "fastnet,seed=1"


def test_a_study_line_is_not_run_again_where_the_record_has_it_from_before_conf_study(tmp_path):
    """The record names runs by run_name of the lines they ran from (`+experiment=NAME` then);
    the queue's `+study=NAME` line is the same run."""
    file = tmp_path / "queue.txt"
    file.write_text("+study=convergence gate=none seed=0\n+study=convergence gate=none seed=1\n")
    old = queue.run_name(["+experiment=convergence", "gate=none", "seed=0"])
    (tmp_path / "runs.jsonl").write_text(json.dumps({"run": old, "overrides": {}, "summary": {}, "epochs": []}) + "\n")
    (tmp_path / "out").mkdir()
    runs = queue.read_queue(file)
    assert queue.next_run(runs, tmp_path / "out", queue.recorded_runs(file)) == (
        runs[1], tmp_path / "out" / "convergence,gate=none,seed=1")


@pytest.mark.slow
def test_workers_take_runs_in_order_skip_finished_and_take_over_dead_claims(tmp_path):
    file = tmp_path / "queue.txt"
    file.write_text("# comment\nseed=0\n\nseed=1  # trailing comment\nseed=2\n")
    runs = queue.read_queue(file)
    assert runs == [["seed=0"], ["seed=1"], ["seed=2"]]
    out = tmp_path / "out"
    (out / "seed=0").mkdir(parents=True)
    (out / "seed=0" / "summary.json").write_text("{}")  # finished: skipped
    first = queue.next_run(runs, out)
    assert first == (["seed=1"], out / "seed=1")
    assert (out / "seed=1.claim").read_text() == str(os.getpid())
    assert queue.next_run(runs, out) == (["seed=2"], out / "seed=2")  # seed=1 is claimed by a live process
    assert queue.next_run(runs, out) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "seed=2.claim").write_text(dead.stdout.strip())  # its worker is gone
    assert queue.next_run(runs, out) == (["seed=2"], out / "seed=2")


@pytest.mark.slow
def test_a_queue_runs_through_train_py_and_a_second_pass_skips_it(tmp_path):
    from conftest import TINY

    file = tmp_path / "queue.txt"
    file.write_text("gate=random gate.target_rate=0.5 gate.pack=true\n")
    command = [sys.executable, "scripts/run_queue.py", str(file), "--out", str(tmp_path / "runs"), "--", *TINY]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "gate.pack=true,gate.target_rate=0.5,gate=random"
    assert (run_dir / "summary.json").exists() and not list((tmp_path / "runs").glob("*.claim"))
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "$ " not in again.stdout and "queue done" in again.stdout  # nothing left to run


def test_runs_in_the_committed_record_are_not_run_again(tmp_path):
    file = tmp_path / "queue.txt"
    file.write_text("seed=0\nseed=1\n")
    (tmp_path / "runs.jsonl").write_text('{"run": "seed=0", "overrides": {}, "summary": {}, "epochs": []}\n')
    recorded = queue.recorded_runs(file)
    assert recorded == {"seed=0"}
    (tmp_path / "out").mkdir()
    assert queue.next_run(queue.read_queue(file), tmp_path / "out", recorded) == (["seed=1"], tmp_path / "out" / "seed=1")


def test_a_line_added_while_a_worker_runs_is_taken_up_next(tmp_path, monkeypatch):
    file = tmp_path / "queue.txt"
    file.write_text("seed=0\n")
    ran = []

    def fake_train(command, cwd):  # the first run appends a line to the queue as it "runs"
        ran.append(next(a for a in command if a.startswith("seed=")))
        run_dir = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1].strip("'"))
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")
        if len(ran) == 1:
            file.write_text("seed=0\nseed=5\n")
        return 0

    monkeypatch.setattr(queue.subprocess, "call", fake_train)
    assert queue.main([str(file), "--out", str(tmp_path / "out")]) == 0
    assert ran == ["seed=0", "seed=5"]


def test_a_run_is_not_claimed_before_the_checkpoint_it_starts_from_exists(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = tmp_path / "dense" / "epoch_4.pt"
    runs = [[f"init_from='{checkpoint}'", "seed=0"], ["seed=1"]]
    assert queue.next_run(runs, out) == (["seed=1"], out / "seed=1")  # the recipe run waits
    assert queue.blocked_runs(runs, out, set()) == [runs[0]]
    checkpoint.parent.mkdir()
    checkpoint.write_text("")
    assert queue.next_run(runs, out)[0] == runs[0]
    assert queue.blocked_runs(runs, out, set()) == []


def test_a_worker_waits_for_a_checkpoint_only_while_a_run_is_in_progress(tmp_path, monkeypatch):
    file, out = tmp_path / "queue.txt", tmp_path / "out"
    checkpoint = tmp_path / "never" / "epoch_4.pt"
    file.write_text(f"init_from='{checkpoint}' seed=0\n")
    out.mkdir()
    (out / "other.claim").write_text(str(os.getpid()))  # a live run elsewhere: worth waiting for
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        (out / "other.claim").unlink()  # ... which then ends without writing the checkpoint

    monkeypatch.setattr(queue.time, "sleep", fake_sleep)
    monkeypatch.setattr(queue.subprocess, "call", lambda *a, **k: pytest.fail("a blocked run was started"))
    assert queue.main([str(file), "--out", str(out), "--poll-s", "5"]) == 0
    assert sleeps == [5]


def test_a_study_in_bf16_leaves_its_auto_runs_to_a_machine_with_native_bf16(tmp_path):
    """On a machine whose auto is fp32, `--precision bf16` skips the runs that leave precision to
    the machine and takes a line that names its own; on a bf16 machine it takes them all."""
    runs = [["seed=4"], ["training.precision=fp32", "seed=0"], ["+training.precision=bf16", "seed=5"]]
    on_fp32 = lambda overrides: queue.for_another_machine(overrides, "bf16", "fp32")
    assert [on_fp32(r) for r in runs] == [True, False, False]
    assert not any(queue.for_another_machine(r, "bf16", "bf16") for r in runs)
    assert not any(queue.for_another_machine(r, None, "fp32") for r in runs)  # no --precision: any machine
    out = tmp_path / "out"
    out.mkdir()
    assert queue.next_run(runs, out, skip=on_fp32) == (runs[1], out / "seed=0,training.precision=fp32")
    assert queue.next_run(runs, out, skip=on_fp32) == (runs[2], out / "seed=5,training.precision=bf16")
    assert queue.next_run(runs, out, skip=on_fp32) is None  # seed=4 waits for a bf16 machine


def test_auto_precision_is_read_on_the_device_a_run_names(monkeypatch):
    """`device=` in a queue line or after `--` decides which device's auto the run trains in."""
    import torch
    # the script is loaded as a namespace: patch the name where its function looks it up
    monkeypatch.setitem(queue.auto_precision.__globals__, "resolve_precision",
                        lambda name, device: f"{name} on {device.type}")
    assert queue.auto_precision(["seed=0", "device=cpu"]) == "auto on cpu"
    assert queue.auto_precision(["device=cuda:1"]) == "auto on cuda"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert queue.auto_precision(["seed=0"]) == f"auto on {expected}"


def test_a_failed_line_is_marked_skipped_by_every_worker_and_the_queue_goes_on(tmp_path, monkeypatch, capsys):
    file, out = tmp_path / "queue.txt", tmp_path / "out"
    file.write_text("seed=0\nseed=1\nseed=2\n")
    ran = []

    def fake_train(command, cwd):  # seed=1 fails after Hydra started (its train.log exists)
        seed = next(a for a in command if a.startswith("seed="))
        run_dir = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1].strip("'"))
        run_dir.mkdir(parents=True)
        ran.append(seed)
        if seed == "seed=1":
            (run_dir / "train.log").write_text("gate.target_rate=2 is not allowed\n")
            return 1
        (run_dir / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(queue.subprocess, "call", fake_train)
    assert queue.main([str(file), "--out", str(out)]) == 1  # some failed
    assert ran == ["seed=0", "seed=1", "seed=2"] and not list(out.glob("*.claim"))
    assert (out / "seed=1.failed").read_text() == f"exit code 1, log {out / 'seed=1' / 'train.log'}\n"
    assert "queue done but for 1 failed run(s)" in capsys.readouterr().out
    assert queue.next_run(queue.read_queue(file), out) is None  # another worker skips it too
    assert queue.main([str(file), "--out", str(out), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "done     seed=0", f"failed   seed=1  (exit code 1, log {out / 'seed=1' / 'train.log'})", "done     seed=2"]


def test_a_run_stopped_by_a_signal_is_not_failed_and_stops_its_worker(tmp_path, monkeypatch):
    file, out = tmp_path / "queue.txt", tmp_path / "out"
    file.write_text("seed=0\nseed=1\n")
    monkeypatch.setattr(queue.subprocess, "call", lambda command, cwd: 143)  # SIGTERM: saved, resumes later
    assert queue.main([str(file), "--out", str(out)]) == 143
    assert not list(out.glob("*.failed")) and not list(out.glob("*.claim"))


@pytest.mark.slow
def test_two_workers_run_every_line_around_a_failing_one(tmp_path):
    from conftest import TINY

    file, out = tmp_path / "queue.txt", tmp_path / "runs"
    file.write_text("seed=0\nseed=1 gate.target_rate=2\nseed=2\n")  # the middle line: a value out of range
    command = [sys.executable, "scripts/run_queue.py", str(file), "--out", str(out), "--", *TINY,
               "training.num_threads=1"]
    workers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    for worker in workers:
        worker.communicate(timeout=300)
        assert worker.returncode == 1  # some line failed
    listing = subprocess.run([*command[:5], "--list"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    failed_log = out / "gate.target_rate=2,seed=1" / "train.log"
    assert listing == ["done     seed=0", f"failed   seed=1 gate.target_rate=2  (exit code 1, log {failed_log})",
                       "done     seed=2"]
    assert "gate.target_rate=2 is not allowed" in failed_log.read_text()
