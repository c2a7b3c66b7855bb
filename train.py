"""Adaptive Sparse Training: one script, read top to bottom.

    python train.py                                       # the report's run: cnn, sundew, 6%, 3 epochs
    python train.py model=vit gate=random gate.target_rate=0.25
    python train.py -m gate=none,random,sundew seed=0,1,2  # a sweep

Each batch: a gate decides which samples are worth training on (scoring them first with
one inference-mode forward if it needs scores), then forward and backward run on those
samples only. A sample is what the task says (`task=classification`: an image;
`task=char_lm`: a window of text). FLOPs are counted, training wall-clock is timed apart from evaluation, and
every epoch goes to metrics.jsonl, the console table and W&B in the Hydra run directory.
"""
from __future__ import annotations

import logging
import math
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

from adaptive_sparse.attention import set_attention_epoch
from adaptive_sparse.checkpointing import (Checkpointer, ResumePoint, capture_progress, load_initial_weights,
                                           locate_checkpoint, restore_progress)
from adaptive_sparse.config import (refuse_unread_additions, resolve_device, resolve_precision, seed_everything,
                                    threads_per_job, validate_config)
from adaptive_sparse.data import load_dataset
from adaptive_sparse.distributed import agree_on_run_dir, setup_distributed
from adaptive_sparse.energy import make_energy_meter
from adaptive_sparse.errors import user_errors_reported
from adaptive_sparse.metering import FlopMeter, PhaseTimer, Tally, summarise_run
from adaptive_sparse.models import count_parameters
from adaptive_sparse.optim import build_scheduler
from adaptive_sparse.packing import SelectionPacker, TrainBatch
from adaptive_sparse.preemption import StopRequest
from adaptive_sparse.records import Metric
from adaptive_sparse.rundir import RunDirLocked, lock_from_argv, remove_stale_temp_files, run_dir_lock
from adaptive_sparse.sampler import SelectingBatchSampler
from adaptive_sparse.scorers import ModelScorer
from adaptive_sparse.step import evaluation_sums, inject_nan_at_step, signal_at_step, train_on_subset
from adaptive_sparse.tracking import RunLog, environment_facts, table_header, table_row

log = logging.getLogger("train")
# The schedule steps once per loader batch (training.scheduler_interval=batch), so that a gated run
# follows full training's schedule; a packed gate's first optimiser step comes a few batches in,
# which torch would warn of in every such run. Meant, so silenced, for this script only.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """The Hydra entry point: a user's mistake ends in one logged line (exit 1), a bug in a
    traceback. Returns the run's metric (what a Hydra sweeper optimises)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors_reported(log, multirun=HydraConfig.get().mode == RunMode.MULTIRUN,
                              checkpoint=run_dir / "checkpoints" / "last.pt"), run_dir_lock(run_dir):
        summary = train(cfg, run_dir)
    return summary[summary["metric"]]


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One run in `run_dir`, from a composed config whose Hydra part is set (HydraConfig: its
    group choices and command-line overrides); returns the summary also written to summary.json.
    In-process use (tests, notebooks): compose with return_hydra_config=True, then
    HydraConfig().set_config(cfg), then train(cfg, run_dir)."""
    # ------------------------------------------------------------------ config
    validate_config(cfg)
    refuse_unread_additions(HydraConfig.get().overrides.task, cfg, Path(__file__).parent / "conf")
    remove_stale_temp_files(run_dir)  # of a save a kill interrupted; the directory's lock is ours
    choices = HydraConfig.get().runtime.choices
    # refuses a missing checkpoint (resume=true) or overwriting one (false); auto: whichever applies
    checkpoint_path, resuming = locate_checkpoint(run_dir, cfg.resume)
    dist = setup_distributed(cfg.distributed.backend, cfg.device)  # inactive without torchrun
    device = dist.device or resolve_device(cfg.device)
    # parallel sweep jobs share the cores: training.num_threads, else the launcher's share
    num_threads = cfg.training.num_threads or threads_per_job(HydraConfig.get().launcher)
    if num_threads:
        torch.set_num_threads(num_threads)
    seed_everything(cfg.seed, cfg.deterministic)
    torch.set_flush_denormal(cfg.training.flush_denormal)  # no-op where unsupported
    train_cfg = cfg.training
    precision = resolve_precision(train_cfg.precision, device)  # auto: bf16 where the hardware has it
    if precision == "fp16" and device.type == "cpu":
        log.warning("training.precision=fp16 on a CPU runs emulated fp16 arithmetic: it trains (with a "
                    "gradient scaler) but far slower than fp32 or bf16 (20 batches: 62 s against ~1 s here)")

    # ------------------------------------------------------------------ task and data
    task = instantiate(cfg.task)  # what a sample, a batch and the metric are (conf/task/)
    data = load_dataset(cfg.dataset)
    task.check_data(data, choices.dataset)
    train_loader = task.train_loader(data, cfg, device, shard=dist.train_shard)  # torchrun: this rank's slice
    val_loader = task.eval_loader(data, cfg, device, indices=dist.shard(task.eval_size(data)))
    # a fixed sample of training data, evaluated beside validation: a training loss every gate shares
    train_sample = task.train_sample_indices(data, train_cfg.get("train_eval_samples", 0))
    shard = dist.shard(len(train_sample))
    train_sample_loader = (task.train_sample_loader(data, cfg, device, train_sample if shard is None else
                                                    train_sample[shard]) if len(train_sample) else None)
    log.info("data: %s (%s); precision %s", data.source, task.describe(data), precision)

    # ------------------------------------------------------------------ model
    model = instantiate(cfg.model, **task.model_kwargs(data)).to(device)
    model = task.prepare_model(model, data, cfg, device)  # e.g. channels_last, FastNet's whitening
    optimizer = instantiate(train_cfg.optimizer)(model.parameters())
    # fp16's narrow range needs its loss scaled (and overflowing steps skipped); bf16 does not
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    per_batch = train_cfg.scheduler_interval == "batch"  # else the schedule steps once an epoch
    # the last epoch may stop early (airbench94's 9.9 epochs: 48 x 9 + 44 batches of 1,024)
    last_epoch_batches = math.ceil(train_cfg.get("last_epoch_fraction", 1.0) * len(train_loader))
    run_batches = (train_cfg.epochs - 1) * len(train_loader) + last_epoch_batches
    lead_in = train_cfg.get("schedule_lead_in_epochs", 0)  # a stage continuing a longer schedule (init_from)
    scheduler = build_scheduler(train_cfg.scheduler, optimizer, total_steps=run_batches if per_batch else None,
                                lead_in_steps=lead_in * len(train_loader) if per_batch else lead_in)
    # sum: a selected subset's summed loss at the full batch's scale (airbench's), else its mean
    summed_over = train_cfg.batch_size if train_cfg.get("loss_reduction", "mean") == "sum" else None
    lookahead = instantiate(train_cfg.lookahead)(model, total_steps=run_batches) if train_cfg.get("lookahead") else None
    flop_meter = FlopMeter(model, task.example(data))
    log.info("model: %s, %.2fM parameters, %.1f MFLOP/sample forward, %.1f MFLOP/sample train step",
             choices.model, count_parameters(model) / 1e6, flop_meter.forward_per_sample / 1e6,
             flop_meter.train_per_sample / 1e6)
    if cfg.init_from and not resuming:  # weights only; a resume restores its own
        missing = load_initial_weights(model, cfg.init_from)
        log.info("init_from %s%s", cfg.init_from, f"; {len(missing)} indexer tensors not in it, left as "
                 f"initialised ({missing[0]}, ...)" if missing else "")
    inject_nan_at_step(model, cfg.debug.inject_nan_at_step)  # test-only faults; null by default
    signal_at_step(model, cfg.debug.get("signal_at_step"))

    # ------------------------------------------------------------------ gate
    gate = instantiate(cfg.gate, num_samples=train_loader.num_samples, num_classes=task.num_outputs(data),
                       model_kwargs=task.model_kwargs(data), seed=cfg.seed + dist.rank,
                       total_epochs=train_cfg.epochs, device=device)
    packer = SelectionPacker(train_cfg.batch_size, enabled=gate.pack,  # gate.pack: full training batches
                             carry=train_cfg.get("pack_remainder", "train") == "carry")
    dist.attach(gate, packer)  # torchrun: global activation rate; ranks step together
    if gate.select_before_loading:  # gates deciding from memory: the loader serves only what they select
        SelectingBatchSampler.serving(train_loader, gate, dist)
    select = train_loader.served_selection if gate.select_before_loading else gate.select
    log.info("gate: %s, target rate %s%s%s", choices.gate, gate.target_rate, ", packed" if gate.pack else "",
             ", selected before loading" if gate.select_before_loading else "")
    energy_meter = make_energy_meter(cfg.energy.kind, device, cfg.energy.get("country_iso_code", "USA"))

    # ------------------------------------------------------------------ checkpoint / resume
    checkpoints = Checkpointer(checkpoint_path, dist, model=model, optimizer=optimizer, scheduler=scheduler,
                               gate=gate, train_loader=train_loader, every_epochs=cfg.checkpoint.every_epochs,
                               keep_epochs=cfg.checkpoint.keep_epochs, scaler=scaler, config=cfg, lookahead=lookahead,
                               packer=packer if packer.carry else None)
    start = checkpoints.restore() if resuming else ResumePoint()
    if resuming:
        log.info("resumed from %s after epoch %d%s (step %d)", checkpoint_path, start.epoch,
                 f" and part of epoch {start.epoch + 1}" if start.progress else "", start.step)
        energy_meter.resume_from(start.history[-1].get("energy_kwh") if start.history else None)

    # ------------------------------------------------------------------ loop
    history, step = start.history, start.step
    with RunLog(run_dir, cfg, enabled=dist.is_main, wandb_run_id=start.wandb_run_id,
                resume_records=history if resuming else None) as run_log, StopRequest() as stop:
        log.info(table_header(task.column))
        for epoch in range(start.epoch + 1, train_cfg.epochs + 1):
            progress = start.progress if epoch == start.epoch + 1 else None  # stopped inside this epoch
            model.train()
            if progress is None:  # else the gate's checkpointed state already is this epoch's
                gate.start_epoch(epoch)
            set_attention_epoch(model, epoch)  # sparse attention: dense warm-up epochs train only the indexer
            if hasattr(model, "start_epoch"):  # e.g. FastNet's whitening bias, trained for its first epochs
                model.start_epoch(epoch)
            if epoch == train_cfg.epochs:
                train_loader.limit_batches = min(len(train_loader), last_epoch_batches)
            flop_meter = flop_meter.recount_if_changed(model)  # ...and are counted at what they run
            scorer = gate.scorer or ModelScorer(model, flop_meter.forward_per_sample)  # proxy scoring: a small model
            timer, tally, indexer_losses = PhaseTimer(device), Tally(), []
            memory_at_start = dist.snapshot_gate_memory(gate)  # torchrun: merged across ranks at epoch end
            if progress is not None:
                memory_at_start = restore_progress(progress, timer, tally, indexer_losses, packer, device)

            def stop_here(after_epoch: int) -> None:
                """SIGTERM or Ctrl-C: save everything done so far, say how to go on, exit 128 + signal."""
                inside = train_loader.remaining is not None  # the loader has batches of this epoch left
                checkpoints.save(after_epoch, step, history, run_log.wandb_run_id,
                                 progress=capture_progress(timer, tally, indexer_losses, packer, memory_at_start)
                                 if inside else None)
                log.info("%s: stopped %s; saved %s: run the same command with resume=true to continue exactly",
                         stop.name, f"in epoch {epoch} after step {step}" if inside else f"after epoch {epoch}",
                         checkpoint_path)
                raise SystemExit(stop.exit_code)

            def train_selected(batch: TrainBatch) -> None:
                """One optimiser step on exactly these samples; then the proxy scorer learns them."""
                if not (len(batch) or dist.active):  # torchrun: every rank joins every all-reduce
                    return
                with timer.phase("train_step"):
                    trained = train_on_subset(model, optimizer, batch.inputs, batch.targets, precision,
                                              weights=batch.weight, epoch=epoch, step=step + 1,
                                              indexer_losses=indexer_losses, ranks=dist, scaler=scaler,
                                              label_smoothing=train_cfg.label_smoothing,
                                              grad_clip=train_cfg.grad_clip, summed_over=summed_over)
                    gate.observe(batch.idx, trained)
                with timer.phase("scoring"):
                    scorer.learn(batch.inputs, batch.targets, precision)
                tally.add_step(trained.loss, scoring_flops=len(batch) * scorer.learn_flops)

            batches = tqdm(timer.timed(train_loader, "data"), total=len(train_loader),
                           desc=f"epoch {epoch}/{train_cfg.epochs}", leave=False,
                           disable=None if cfg.progress else True)
            with timer.phase("epoch"), energy_meter.measure():  # training only: eval is timed apart
                for inputs, targets, idx in batches:
                    # 1. score: one forward over the whole batch, no autograd (only if the gate asks)
                    with timer.phase("scoring"):
                        scores = scorer.score(inputs, targets, precision) if gate.needs_scores else None
                    # 2. select: the gate picks the batch positions to train on (selected before
                    #    loading, it already has: the batch holds just those, and `select` says so)
                    with timer.phase("select"):
                        selection = select(idx, scores)
                        packer.add(inputs, targets, idx, selection)
                    scored = len(idx) if scores is not None else 0
                    tally.add_batch(selection.seen(len(idx)), scored, scored * scorer.forward_flops)
                    # 3. train: forward and backward on the selected samples only (packed: once a
                    #    full batch of them waits), then the proxy scorer, if any, learns from them
                    for batch in packer.ready():
                        train_selected(batch)
                    step += 1
                    if scheduler is not None and per_batch:
                        scheduler.step()
                    if lookahead is not None:  # every few batches, the weights back toward their slow copy
                        lookahead.step(step)
                    if step % cfg.wandb.log_every_steps == 0:
                        run_log.log_step(step, {"train/batch_rate": len(selection.index) / selection.seen(len(idx)),
                                                "gate/threshold": gate.threshold,
                                                "train/batch_loss": tally.last_batch_loss})
                    if train_loader.remaining and stop.requested(dist):  # all ranks agree, after the same batch
                        stop_here(epoch - 1)
                for batch in packer.end_of_epoch(last=epoch == train_cfg.epochs):  # packed: the remainder
                    train_selected(batch)
                if lookahead is not None and epoch == train_cfg.epochs:
                    lookahead.finish()  # training ends on the slow weights
            if scheduler is not None and not per_batch:
                scheduler.step()
            dist.merge_epoch(tally, gate, memory_at_start)  # torchrun: global counts, one sample memory

            # -------------------------------------------------------------- evaluation
            validation = dict.fromkeys([*task.metric_keys, "train_eval_loss"])  # null in epochs without evaluation
            if epoch % train_cfg.eval_every_epochs == 0 or epoch == train_cfg.epochs:
                with timer.phase("eval"):  # torchrun: each rank a slice of the validation set, sums reduced
                    validation = task.evaluate(model, val_loader, precision, cfg, dist,  # TTA: every level
                                               last=epoch == train_cfg.epochs)
                    if train_sample_loader is not None:  # eval mode, unaugmented, no test-time augmentation
                        validation["train_eval_loss"] = dist.evaluate(
                            evaluation_sums(model, train_sample_loader, precision))[0]

            # -------------------------------------------------------------- logging
            record = {
                "epoch": epoch,
                **tally.record(flop_meter),  # train_loss (the trained samples'), activation rate, FLOPs, counts
                **validation,  # val_loss, val_acc (char_lm: next-character accuracy), val_bpc; train_eval_loss
                "threshold": gate.threshold,
                **timer.record(),  # training time by phase; evaluation apart
                "samples_per_s": tally.seen / timer.seconds["epoch"],
                "energy_kwh": energy_meter.kwh,  # cumulative, training phases only
                "lr": optimizer.param_groups[0]["lr"],
                "indexer_loss": torch.stack(indexer_losses).mean().item() if indexer_losses else None,
                **gate.epoch_metrics(),
            }
            history.append(record)
            if checkpoints.due(epoch, train_cfg.epochs):  # before the metrics line (docs/distributed.md: Checkpoints)
                checkpoints.save(epoch, step, history, run_log.wandb_run_id)
            run_log.log_epoch(record, step=step)
            log.info(table_row(record, train_cfg.epochs, task.metric))
            if epoch < train_cfg.epochs and stop.requested(dist):  # a signal during the last batch or evaluation
                stop_here(epoch)
        energy_meter.close()

        test = {}  # validation held out of training (dataset.val_size): the final figures on the test split
        if task.has_test_split(data):
            test_loader = task.eval_loader(data, cfg, device, dist.shard(task.eval_size(data, "test")), split="test")
            figures = task.evaluate(model, test_loader, precision, cfg, dist)
            test = {key.replace("val_", "test_", 1): value for key, value in figures.items()}
        summary = summarise_run(history, gate.target_rate, flop_meter)
        summary.update(**task.summary(), **{k: v for k, v in history[-1].items() if k in task.metric_keys or k.startswith("val_acc_tta")},
                       **test,
                       gate=choices.gate, model=choices.model, attention=choices.attention,
                       dataset=choices.dataset, data_source=data.source, seed=cfg.seed,
                       scoring=cfg.gate.get("scoring"), selection=cfg.gate.get("selection"),
                       select_before_loading=gate.select_before_loading,
                       loss_reduction=cfg.training.get("loss_reduction", "mean"),
                       precision=precision, energy_kwh=energy_meter.kwh, energy_source=energy_meter.source,
                       params=count_parameters(model), **environment_facts(device))
        run_log.write_summary(summary)
    dist.close()
    log.info("final %s %s, activation rate %.4f (target %s), compute savings %.1f%%, "
             "sample savings %.1f%%, training time %.1fs", task.metric,
             Metric(task.metric, task.higher_is_better).value_text(summary[task.metric]),
             summary["activation_rate"],
             summary["target_rate"], 100 * summary["compute_savings"], 100 * summary["sample_savings"],
             summary["train_time_s"])
    return summary



if __name__ == "__main__":
    sys.argv = agree_on_run_dir(sys.argv)  # torchrun: one run directory for all ranks
    try:
        lock_from_argv(sys.argv)  # hydra.run.dir given: refuse a busy directory before Hydra writes to it
    except RunDirLocked as busy:
        sys.exit(f"error: {busy}")
    main()
