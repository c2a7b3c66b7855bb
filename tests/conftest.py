"""Shared helpers: compose configs in-process, run train.py (in this process) on tiny data."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

import train as train_script
from adaptive_sparse.training.runtime import HydraRun

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
CIFAR_FOLDER = ROOT.parent / "shared" / "data" / "cifar10"

# A run that takes seconds on 2 CPU cores: 512 synthetic images, one epoch, no W&B.
TINY = ["dataset=synthetic", "dataset.num_train=512", "dataset.num_test=256",
        "training.epochs=1", "training.eval_batch_size=256", "wandb.mode=disabled"]


def compose_config(overrides: list[str] | tuple[str, ...] = (), with_hydra: bool = False) -> DictConfig:
    """The composed config for these overrides, without running; `with_hydra`: with Hydra's own
    node too (`cfg.hydra`: group choices, overrides), as `train(cfg, run_dir, HydraRun.of(cfg.hydra))` takes."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)


def run_train(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> SimpleNamespace:
    """`python train.py hydra.run.dir=RUN_DIR OVERRIDES...` inside this process, through the same
    command line and Hydra entry point (its config, its one-line user errors, exit codes), without
    the seconds a new interpreter spends importing torch and Hydra: returncode, stdout (the log
    lines) and stderr. Runs that need a process of their own (a kill, a signal from outside) start
    `train.py` with subprocess themselves; `train_directly` calls train() with no command line. The process-wide settings a run changes
    (threads, deterministic algorithms, environment, working directory) are put back."""
    import contextlib
    import io
    import warnings

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from adaptive_sparse.training.lifecycle import unlock_run_dir

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), dict(os.environ),
             os.getcwd(), sys.argv)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.environ.update(env or {})
        sys.argv = ["train.py", f"hydra.run.dir={run_dir}", *overrides]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # as a fresh interpreter shows them: once, on stderr
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                err.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                train_script.cli()  # as `python train.py` runs it
            except SystemExit as stop:  # sys.exit("message"): the interpreter prints it and exits 1
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    err.write(stop.code + "\n")
    finally:
        threads, deterministic, environ, cwd, sys.argv = saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        GlobalHydra.instance().clear()
        unlock_run_dir(run_dir)  # held "until the process exits" by train.py's lock_from_argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """(metrics.jsonl records, summary.json) of a finished run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads((run_dir / "summary.json").read_text())


LANGUAGE_MODELS = {"gpt"}  # models with positions: task=char_lm; the others classify images


def model_cases() -> list[tuple[str, str]]:
    """(model, attention) for every registered model (conf/model/*) with every attention it takes."""
    cases = []
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        takes_attention = "attention" in OmegaConf.load(path)
        attentions = sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml")) if takes_attention else ["dense"]
        cases += [(path.stem, attention) for attention in attentions]
    return cases


def cyclic_text(n: int) -> str:
    """n characters cycling through 13 letters in a fixed order: a corpus a tiny GPT learns in seconds."""
    return "".join(chr(97 + (i * 7) % 13) for i in range(n))


def tiny_char_lm(tmp_path: Path, characters: int = 6000) -> list[str]:
    """Overrides for a one-layer, 16-wide GPT at context 32 on a cyclic corpus of `characters`
    (written under tmp_path, its cache beside it), W&B off; callers add batch, epochs and gate."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(cyclic_text(characters))
    return ["task=char_lm", "dataset=shakespeare_char", "model=gpt", f"dataset.root={corpus}",
            f"dataset.cache_dir={tmp_path / 'cache'}", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
            "model.block_size=32", "wandb.mode=disabled"]


def two_ranks_spawn(worker, out: Path) -> list[dict]:
    """Run worker(rank, port, out) in 2 processes (a gloo group on a free local port); returns
    what each rank saved as OUT/rank{r}.pt."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


# Tiers (pyproject.toml registers the `slow` marker):
#     python -m pytest -q -m "not slow"    # the edit-test loop, under a minute: library, training, studies
#     python -m pytest -q                  # everything (CI)
# A test that starts processes or trains through train.py's command line is `slow`: everything
# under tests/e2e/ by its folder, elsewhere by an explicit @pytest.mark.slow; tests/gpu/ runs only
# where CUDA is.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)


def train_directly(run_dir: Path, *overrides: str) -> dict:
    """train(cfg, run_dir, HydraRun) called as a notebook would: the config composed in-process,
    no command line, no Hydra job; returns the run's summary."""
    cfg = compose_config(overrides, with_hydra=True)
    hydra = HydraRun(dict(cfg.hydra.runtime.choices), list(cfg.hydra.overrides.task))
    with open_dict(cfg):
        del cfg["hydra"]  # a job's config, as @hydra.main hands it over
    return train_script.train(cfg, run_dir, hydra)
