"""What identifies a job inside a sweep: its overrides, its W&B group and tags, its name in a
study's queue.

Shared by train.py's W&B set-up (tracking.RunLog), the analysis library (adaptive_sparse.analysis)
and scripts/run_queue.py, so a sweep's W&B group, its report and its queue agree on names.
Light on purpose (no torch): the analysis library imports it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

WANDB_TAG_MAX_CHARS = 64  # W&B refuses longer tags


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """{'gate': 'none', 'seed': '0', 'experiment': 'seed_report', ...} from Hydra override lines.

    Keys are Hydra's `key_or_group` ('+experiment=x' -> 'experiment'), the same keys that
    hydra.job.config.override_dirname.exclude_keys names; values are the text after '='.
    """
    parsed = OverridesParser.create().parse_overrides(list(lines))
    return {o.key_or_group: o.input_line.split("=", 1)[1] if "=" in o.input_line else ""
            for o in parsed}


def job_tags(override_lines: Iterable[str], exclude_keys: Iterable[str]) -> list[str]:
    """W&B tags of one sweep job: its overrides as 'key=value', minus the excluded keys.

    Tags longer than W&B allows are shortened (and end in '~') rather than left out.
    """
    excluded = set(exclude_keys)
    tags = [f"{key}={value}" for key, value in parse_overrides(override_lines).items()
            if key not in excluded]
    return [t if len(t) <= WANDB_TAG_MAX_CHARS else t[:WANDB_TAG_MAX_CHARS - 1] + "~" for t in tags]


def sweep_group_name(sweep_dir: str | Path) -> str:
    """The W&B group of every job of one multirun: the sweep directory's last two parts.

    multirun/2026-11-24/10-30-00 -> '2026-11-24_10-30-00'; hydra.sweep.dir=multirun/gates
    -> 'multirun_gates'. The sweep report derives the same name from the directory it is given.
    """
    return "_".join(Path(sweep_dir).resolve().parts[-2:])


def wandb_identity(wandb_cfg: Mapping[str, Any], hydra_cfg: Any | None) -> dict[str, Any]:
    """group, tags and name for wandb.init: the config's, completed from the sweep in a multirun.

    In a multirun with wandb.group null, every job joins the group named after the sweep
    directory, is tagged with its overrides (gate=none, seed=1, ...) besides wandb.tags, and
    is named after its sweep sub-directory unless wandb.name is set.
    """
    group, tags, name = wandb_cfg.get("group"), list(wandb_cfg.get("tags") or []), wandb_cfg.get("name")
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        exclude = hydra_cfg.job.config.override_dirname.exclude_keys
        group = group or sweep_group_name(hydra_cfg.sweep.dir)
        tags += [t for t in job_tags(hydra_cfg.overrides.task, exclude) if t not in tags]
        name = name or Path(hydra_cfg.runtime.output_dir).name
    return {"group": group, "tags": tags, "name": name}


def read_queue(path: Path) -> list[list[str]]:
    """A study's queue file: one run (train.py overrides) per non-empty line, `#` comments aside."""
    runs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            runs.append(line.split())
    return runs


def run_name(overrides: list[str]) -> str:
    """A queued run's directory name: '+experiment=convergence gate=random gate.pack=true seed=0'
    -> 'convergence,gate.pack=true,gate=random,seed=0'."""
    parts = sorted(o.lstrip("+").replace("experiment=", "") for o in overrides)
    return re.sub(r"[^A-Za-z0-9=.,_-]", "_", ",".join(parts))
