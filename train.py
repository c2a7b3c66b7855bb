"""Adaptive Sparse Training: one script, read top to bottom.

    python train.py                                       # the report's run: cnn, sundew, 6%, 3 epochs
    python train.py model=vit gate=random budget=0.25
    python train.py -m gate=none,random,sundew seed=0,1,2  # a sweep

Each batch: a gate decides which samples are worth training on (scoring them first with
one inference-mode forward if it needs scores), then forward and backward run on those
samples only. A sample is what the task says (`task=classification`: an image;
`task=char_lm`: a window of text). FLOPs are counted, training wall-clock is timed apart from
evaluation, and every epoch goes to metrics.jsonl, the console table and W&B in the run directory.
In-process (tests, notebooks): `train(cfg, run_dir, HydraRun(choices, overrides))` on a composed
config (tests/conftest.py's `train_directly` shows how).
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from adaptive_sparse.attention import AttentionWarmup
from adaptive_sparse.gating.packing import SelectionPacker, TrainBatch
from adaptive_sparse.gating.sampler import plan_epoch
from adaptive_sparse.training.checkpoint import Checkpointer, ResumePoint, load_initial_weights
from adaptive_sparse.training.data import load_dataset
from adaptive_sparse.training.distributed import agree_on_run_dir
from adaptive_sparse.training.gating import Scoring, build_gate, gate_switches, proxy_flop_meter, scoring_for
from adaptive_sparse.training.lifecycle import (
    RunDirError,
    StopRequest,
    configured_run_dir,
    inject_nan_at_step,
    lock_from_argv,
    run_dir_lock,
    signal_at_step,
    user_errors_reported,
)
from adaptive_sparse.training.metering import EpochState, FlopMeter, count_parameters
from adaptive_sparse.training.optim import Optimisation
from adaptive_sparse.training.runtime import HydraRun, Run, setup_run
from adaptive_sparse.training.schema import register as register_schema
from adaptive_sparse.training.step import evaluation_sums, train_on_subset
from adaptive_sparse.training.tracking import RunLog, run_summary, table_header, table_row

CONF_DIR = Path(__file__).parent / "conf"
log = logging.getLogger("train")
register_schema()  # conf/config.yaml's first default: the types of the run's keys
# The schedule steps once per loader batch (training.scheduler_interval=batch), so that a gated run
# follows full training's schedule; a packed gate's first optimiser step comes a few batches in,
# which torch would warn of in every such run. Meant, so silenced, for this script only.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """The Hydra entry point: a user's mistake ends in one logged line (exit 1), a bug in a
    traceback. Returns the run's metric (what a Hydra sweeper optimises)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    with user_errors_reported(log, multirun=hydra_cfg.mode == RunMode.MULTIRUN,
                              checkpoint=run_dir / "checkpoints" / "last.pt"), run_dir_lock(run_dir):
        summary = train(cfg, run_dir, HydraRun.of(hydra_cfg))
    return summary[summary["metric"]]


def build_model(cfg: DictConfig, task, data, run: Run) -> torch.nn.Module:
    """The model for this data, prepared by the task (channels_last, FastNet's whitening), with
    `init_from`'s weights (a resume restores its own) and the test-only fault hooks (null by default)."""
    model = task.prepare_model(instantiate(cfg.model, **task.model_kwargs(data)).to(run.device), data, cfg, run.device)
    if cfg.init_from and not run.resuming:
        load_initial_weights(model, cfg.init_from, log, data.train.fingerprint)
    inject_nan_at_step(model, cfg.debug.inject_nan_at_step)
    signal_at_step(model, cfg.debug.signal_at_step)
    return model


def evaluate(task, model: torch.nn.Module, val_loader, train_sample_loader, run: Run, cfg: DictConfig,
             last: bool) -> dict:
    """The validation figures; with a training sample, its eval-mode loss too (unaugmented, no
    test-time augmentation): `train_eval_loss`, a training loss every gate shares."""
    validation = task.evaluate(model, val_loader, run.precision, cfg, run.dist, last=last)
    if train_sample_loader is not None:
        validation["train_eval_loss"] = run.dist.evaluate(evaluation_sums(model, train_sample_loader, run.precision))[0]
    return validation


def final_line(summary: dict, metric) -> str:
    return (f"final {metric.key} {metric.value_text(summary[metric.key])}, activation rate "
            f"{summary['activation_rate']:.4f} (target {summary['target_rate']}), compute savings "
            f"{100 * summary['compute_savings']:.1f}%, sample savings {100 * summary['sample_savings']:.1f}%, "
            f"training time {summary['train_time_s']:.1f}s")


def train_selected(batch: TrainBatch, model: torch.nn.Module, optim: Optimisation, gate, scoring: Scoring,
                   state: EpochState, run: Run, cfg: DictConfig, epoch: int, step: int) -> None:
    """One optimiser step on exactly these samples; then the gate learns their losses and a proxy
    scorer learns them too."""
    if not (len(batch) or run.dist.active):  # torchrun: every rank joins every all-reduce
        return
    with state.timer.phase("train_step"):
        trained = train_on_subset(model, optim.optimizer, batch.inputs, batch.targets, run.precision,
                                  weights=batch.weight, epoch=epoch, step=step + 1,
                                  indexer_losses=state.indexer_losses, ranks=run.dist, scaler=optim.scaler,
                                  label_smoothing=cfg.training.label_smoothing, grad_clip=cfg.training.grad_clip,
                                  # sum: a selected subset's summed loss at the full batch's scale (airbench's)
                                  summed_over=cfg.training.batch_size if cfg.training.loss_reduction == "sum" else None)
        gate.observe(batch.idx, trained)
    with state.timer.phase("scoring"):
        scoring.scorer.learn(batch.inputs, batch.targets, run.precision)
    state.tally.add_step(trained.loss, scoring_flops=len(batch) * scoring.learn_flops)


def stop_here(stop: StopRequest, checkpoints: Checkpointer, run: Run, run_log: RunLog, history: list[dict],
              after_epoch: int, step: int, state: EpochState, packer: SelectionPacker, inside: bool) -> None:
    """SIGTERM or Ctrl-C: save everything done so far, say how to go on (naming the run directory:
    a default or torchrun one is not the same command's next time), exit 128 + signal. Under torchrun
    the line is said again on stderr once the process group is torn down: the last line any rank
    prints, just above the traceback torchrun prints for ranks that exit non-zero."""
    checkpoints.save(after_epoch, step, history, run_log.wandb_run_id,
                     progress=state.state_dict(packer) if inside else None)
    where = f"in epoch {after_epoch + 1} after step {step}" if inside else f"after epoch {after_epoch}"
    line = (f"{stop.name}: stopped {where}; saved {run.checkpoint_path}: run the same command with "
            f"hydra.run.dir={run.checkpoint_path.parents[1]} resume=true to continue exactly")
    log.info("%s", line)
    if run.dist.active:
        run.dist.close()  # every rank stops after the same batch, so all arrive here
        if run.dist.is_main:
            print(line, file=sys.stderr, flush=True)
    raise SystemExit(stop.exit_code)


def model_epoch_parts(model: torch.nn.Module) -> list:
    """The model's per-epoch parts: its sparse attention's dense warm-up (the indexer trains alone),
    and the model itself where it has a schedule of its own (FastNet's whitening bias)."""
    return [AttentionWarmup(model), *([model] if hasattr(model, "start_epoch") else [])]


def start_epoch(epoch: int, parts: list) -> None:
    """Every component with per-epoch behaviour, told the epoch (1-based) before it starts."""
    for part in parts:
        part.start_epoch(epoch)


def train(cfg: DictConfig, run_dir: Path, hydra: HydraRun) -> dict:
    """One run in `run_dir`; returns the summary also written to summary.json."""
    run = setup_run(cfg, run_dir, hydra, CONF_DIR)
    device, dist, t = run.device, run.dist, cfg.training

    # ------------------------------------------------------------------ task, data, model
    task = instantiate(cfg.task)  # what a sample, a batch and the metric are (conf/task/)
    data = load_dataset(cfg.dataset)
    task.check_data(data, hydra.choices["dataset"])
    train_loader = task.train_loader(data, cfg, device, shard=dist.train_shard)  # torchrun: this rank's slice
    val_loader = task.eval_loader(data, cfg, device, indices=dist.shard(task.eval_size(data)))
    train_sample_loader = task.train_sample_loader_for(data, cfg, device, dist)  # a training loss every gate shares
    log.info("data: %s (%s); precision %s", data.source, task.describe(data), run.precision)
    model = build_model(cfg, task, data, run)
    optim = Optimisation(t, model, len(train_loader), run.precision, device)
    flop_meter = FlopMeter(model, task.example(data))
    log.info("model: %s, %.2fM parameters, %.1f MFLOP/sample forward, %.1f MFLOP/sample train step",
             hydra.choices["model"], count_parameters(model) / 1e6, flop_meter.forward_per_sample / 1e6,
             flop_meter.train_per_sample / 1e6)

    # ------------------------------------------------------------------ gate
    gate = build_gate(cfg.gate, cfg.budget, dict(num_samples=train_loader.num_samples, num_outputs=task.num_outputs(data),
                      epochs=t.epochs, seed=cfg.seed + dist.rank, device=device), task.model_kwargs(data))
    switches = gate_switches(cfg.gate, gate)  # packed: full training batches; selected before loading
    proxy_meter = proxy_flop_meter(gate, task.example(data))  # a proxy scorer's FLOPs, if the gate has one
    packer = SelectionPacker(t.batch_size, enabled=switches.pack, carry=t.pack_remainder == "carry")
    dist.attach(gate, packer)  # torchrun: global activation rate; ranks step together
    log.info("gate: %s, target rate %s%s%s", hydra.choices["gate"], gate.target_rate, ", packed" * switches.pack,
             ", selected before loading" * switches.select_before_loading)
    energy_meter = instantiate(cfg.energy)  # conf/energy/: none, or codecarbon's tracker
    checkpoints = Checkpointer(run.checkpoint_path, dist, model=model, optimisation=optim, gate=gate,
                               train_loader=train_loader, every_epochs=cfg.checkpoint.every_epochs,
                               keep_epochs=cfg.checkpoint.keep_epochs, config=cfg,
                               packer=packer if packer.carry else None)
    start = checkpoints.restore(log, energy_meter) if run.resuming else ResumePoint()

    # ------------------------------------------------------------------ loop
    history, step = start.history, start.step
    with RunLog(run_dir, cfg, hydra.config, enabled=dist.is_main, wandb_run_id=start.wandb_run_id,
                resume_records=history if run.resuming else None) as run_log, StopRequest() as stop:
        log.info(table_header(task.metric))
        for epoch in range(start.epoch + 1, t.epochs + 1):
            progress = start.progress if epoch == start.epoch + 1 else None  # stopped inside this epoch
            model.train()
            if epoch == t.epochs:  # before its order is drawn
                train_loader.limit_batches = min(len(train_loader), optim.last_epoch_batches)
            if progress is None:  # else the gate's and loader's checkpointed state already is this epoch's
                start_epoch(epoch, [gate, train_loader])
            start_epoch(epoch, model_epoch_parts(model))  # sparse attention's warm-up, FastNet's whitening bias
            flop_meter = flop_meter.recount_if_changed(model)  # ...and are counted at what they run
            scoring = scoring_for(gate, model, flop_meter, proxy_meter)
            state = EpochState(device, dist.snapshot_gate_memory(gate))  # torchrun: merged at epoch end
            if progress is not None:
                state.load_state_dict(progress, packer)
            batches = tqdm(state.timer.timed(train_loader, "data"), total=len(train_loader),
                           desc=f"epoch {epoch}/{t.epochs}", leave=False, disable=None if cfg.progress else True)
            with state.timer.phase("epoch"), energy_meter.measure():  # training only: eval is timed apart
                if progress is None and switches.select_before_loading:  # the whole epoch's selections, before
                    with state.timer.phase("data"):                     # any sample loads (exact: gating/sampler.py)
                        train_loader.serve_selected(plan_epoch(gate, train_loader.index_batches()))
                for batch in batches:
                    # 1. score: one forward over the whole batch, no autograd (only if the gate asks)
                    with state.timer.phase("scoring"):
                        scores = (scoring.scorer.score(batch.inputs, batch.targets, run.precision)
                                  if gate.needs_scores else None)
                    # 2. select: the positions to train (selected before loading: the loader's batch
                    #    holds just those, and says so)
                    with state.timer.phase("select"):
                        selection = batch.selection or gate.select(batch.idx, scores)
                        packer.add(batch.inputs, batch.targets, batch.idx, selection)
                    scored = len(batch.idx) if scores is not None else 0
                    state.tally.add_batch(selection.seen(len(batch.idx)), scored, scored * scoring.forward_flops)
                    # 3. train: forward and backward on the selected samples only (packed: once a
                    #    full batch of them waits), then the proxy scorer, if any, learns from them
                    for ready in packer.ready():
                        train_selected(ready, model, optim, gate, scoring, state, run, cfg, epoch, step)
                    step += 1
                    optim.after_batch(step)  # the schedule and lookahead follow loader batches
                    if step % cfg.wandb.log_every_steps == 0:
                        run_log.log_step(step, gate, selection, len(batch.idx), state.tally)
                    if train_loader.remaining and stop.requested(dist):  # all ranks agree, after the same batch
                        stop_here(stop, checkpoints, run, run_log, history, epoch - 1, step, state, packer, True)
                for ready in packer.end_of_epoch(last=epoch == t.epochs):  # packed: the remainder
                    train_selected(ready, model, optim, gate, scoring, state, run, cfg, epoch, step)
                optim.after_epoch(last=epoch == t.epochs)
            dist.merge_epoch(state.tally, gate, state.memory_at_start)  # torchrun: global counts, one memory

            # -------------------------------------------------------------- evaluate, record, checkpoint, log
            validation = dict.fromkeys([*task.metric_keys, "train_eval_loss"])  # null in epochs without evaluation
            if epoch % t.eval_every_epochs == 0 or epoch == t.epochs:
                with state.timer.phase("eval"):  # torchrun: each rank a slice of the validation set, sums reduced
                    validation = evaluate(task, model, val_loader, train_sample_loader, run, cfg, last=epoch == t.epochs)
            record = state.record(epoch, flop_meter, validation, gate, energy_meter.kwh, optim.lr)
            history.append(record)
            if checkpoints.due(epoch, t.epochs):  # before the metrics line (docs/distributed.md: Checkpoints)
                checkpoints.save(epoch, step, history, run_log.wandb_run_id)
            run_log.log_epoch(record, step=step)
            log.info(table_row(record, t.epochs, task.metric))
            if epoch < t.epochs and stop.requested(dist):  # a signal during the last batch or evaluation
                stop_here(stop, checkpoints, run, run_log, history, epoch, step, state, packer, False)
        energy_meter.close()

        test = task.test_figures(model, data, cfg, device, dist, run.precision)  # held-out validation: the test split
        summary = run_summary(cfg, hydra.choices, history, gate, switches, flop_meter, task, data, test, run,
                              energy_meter, count_parameters(model))
        run_log.write_summary(summary)
    dist.close()
    log.info(final_line(summary, task.metric))
    return summary


def cli() -> None:
    """`python train.py ...`: the command line, then Hydra's entry point. The run directory is
    locked before Hydra writes to it; without `hydra.run.dir`, a fresh one is made from the
    config's default (lifecycle.lock_from_argv)."""
    sys.argv = agree_on_run_dir(sys.argv)  # torchrun: one run directory for all ranks
    try:
        sys.argv = lock_from_argv(sys.argv, configured_run_dir(CONF_DIR / "config.yaml"))
    except RunDirError as refused:  # busy, or not writable
        sys.exit(f"error: {refused}")
    main()


if __name__ == "__main__":
    cli()
