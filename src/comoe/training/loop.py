"""Fine-tuning: the LLM-Adapters recipe (instruction data, loss on the response) for comoe presets and the
PEFT LoRA baseline, with auxiliary losses logged per step, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comoe.adapter.method import save_adapter
from comoe.adapter.model import task_vocabulary
from comoe.adapter.serialization import full_tensor
from comoe.analysis.metrics import SpecialisationAccumulator, token_tasks
from comoe.data.collate import IGNORE_INDEX, Tokenized, encode_examples
from comoe.data.example import Example, task_index, vocabulary_ids
from comoe.data.record import write_data_record
from comoe.errors import Interrupted, NonFiniteLoss
from comoe.evaluation.loglik import within_context
from comoe.models.head import unwrap_model
from comoe.models.quantization import quantization_of_model
from comoe.moe.record import LayerRecord
from comoe.moe.routing import warn_unseen_tasks
from comoe.training.batches import micro_batches
from comoe.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from comoe.training.data import training_data
from comoe.training.distributed import SINGLE, World
from comoe.training.factory import build_model
from comoe.training.loss import adapter_method, aux_components, response_loss, share, shown_components
from comoe.training.rundir import RunDirectory, truncate_log
from comoe.training.runlog import RunLog
from comoe.training.settings import TrainArgs
from comoe.training.validation import validation_loss

logger = logging.getLogger(__name__)

BEST_ADAPTER = "best-adapter"  # in the run directory, with --save-best
BEST_RECORD = "validation.json"  # in best-adapter/: the step and validation loss it was saved at


def train(args: TrainArgs, dataset: Any = None) -> Path:
    """Train, checkpoint and save the adapter into args.output; returns the run directory.

    The data is `dataset` when given (a datasets.Dataset or DatasetDict, or a list of records, in any
    format --data reads), else what args name (--data files, LLM-Adapters tasks or the built-in tasks).
    Under torchrun / accelerate launch, each process trains on its slice of every global micro-batch with
    DistributedDataParallel; only the main process writes logs, checkpoints and the adapter.
    """
    world = World.from_env()
    with RunDirectory(args, world) as run_dir:
        return _train(args, world, run_dir, dataset)


def trainable_items(
    items: list[Tokenized], cutoff: int, context: int | None = None, what: str = "examples"
) -> list[int]:
    """Indices of the examples that keep at least one response token within the cutoff (or the model's
    `context`, when that is shorter); a clear error when none does (nothing to learn), rather than a loss of
    0/0 reported as divergence."""
    kept = [i for i, item in enumerate(items) if any(label != IGNORE_INDEX for label in item.labels[1:])]
    if not kept:
        if context is not None and context < cutoff:
            raise ValueError(
                f"the model's context of {context} tokens (below --cutoff {cutoff}) leaves no response token "
                f"in any of the {len(items)} {what}: their prompts fill it; shorten the prompts or use a "
                "model with a longer context"
            )
        longest = max(len(item.input_ids) for item in items)
        raise ValueError(
            f"cutoff={cutoff} leaves no response token in any of the {len(items)} {what} (prompts and "
            f"responses run to {longest} tokens here): raise --cutoff"
        )
    return kept


def _train(args: TrainArgs, world: World, run_dir: RunDirectory, dataset: Any) -> Path:
    run = run_dir.path
    examples, validation = training_data(args, dataset)  # data errors before the model is loaded
    model, tokenizer = build_model(args, tasks=task_index(examples)[0])
    method = adapter_method(model)
    initial_routers = router_weights(model)  # the seeded initialisation, also when resuming
    cutoff = within_context(model, args.cutoff)  # never past the model's position embeddings
    items, truncated = encode_examples(tokenizer, examples, cutoff)
    kept = trainable_items(items, args.cutoff, cutoff)
    empty = len(items) - len(kept)
    items, examples = [items[i] for i in kept], [examples[i] for i in kept]
    val_items, val_cut = encode_examples(tokenizer, validation, cutoff)
    val_kept = trainable_items(val_items, args.cutoff, cutoff, "validation examples") if validation else []
    val_items, validation = [val_items[i] for i in val_kept], [validation[i] for i in val_kept]
    val_names, val_ids = task_index(validation)
    vocabulary = task_vocabulary(model)  # None unless the adapter reads task ids
    val_model_ids = vocabulary_ids(validation, vocabulary) if vocabulary is not None else None
    if world.is_main:  # validated as comoe eval scores them: an unseen task by the mean gate, warned of
        warn_unseen_tasks(getattr(model, "comoe_config", None), val_names, "validation examples")
    steps_per_epoch = math.ceil(len(items) / (args.batch_size * world.size * args.grad_accum))
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    forward_model = world.wrap(model.train(), fsdp=args.fsdp)  # before the optimizer: FSDP swaps parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=0.0)
    warmup = min(args.warmup_steps, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * min(1.0, (total - s) / max(1, total - warmup)),
    )
    step = load_checkpoint(run, model, optimizer, scheduler) if args.resume else 0
    run_dir.record_settings()
    if world.is_main:
        truncate_log(run / "log.jsonl", step)
        context_note = f", the model's context; --cutoff {args.cutoff}" if cutoff < args.cutoff else ""
        skipped_note = f"; {empty} skipped: no response token within {cutoff} tokens" if empty else ""
        val_note = f", validating on {len(val_items)} ({val_cut} cut)" if val_items else ""
        logger.info(
            f"training {args.preset} on {len(items)} examples ({truncated} cut at {cutoff} tokens"
            f"{context_note}{skipped_note}){val_note}, {total} steps, {world.size} process(es); "
            f"run directory {run}"
        )
    task_names, task_ids = task_index(examples)
    if vocabulary is not None:  # the batches' task ids are the adapter's: ids into its task vocabulary
        task_names, task_ids = vocabulary, vocabulary_ids(examples, vocabulary)
        outside = sorted({e.task for e, i in zip(examples, task_ids, strict=True) if i < 0})
        if outside:
            raise ValueError(
                f"tasks: {vocabulary} (the adapter's task vocabulary) lacks the training tasks {outside}"
            )
    pad_id = tokenizer.pad_token_id
    batches = micro_batches(items, task_ids, args, pad_id, step * args.grad_accum, world)
    checkpoints = args.save_steps if not (args.fsdp and world.size > 1) else 0
    log = RunLog(run, total, step, world.is_main)
    skipped, tokens, start, warned_clipping = 0, 0, time.perf_counter(), False
    components: list[str] = []  # the loss components' names: they follow the config, so read once
    best = best_validation(run) if args.resume else math.inf
    try:
        while step < total:
            every = args.stats_steps and (step + 1) % args.stats_steps == 0
            watch = bool(every) and method.has_routing
            step_start = time.perf_counter()
            with method.record_routing(model) if watch else contextlib.nullcontext() as records:
                parts, batch_tokens, last_batch = optimizer_step(
                    forward_model,
                    batches,
                    args,
                    optimizer,
                    params,
                    run,
                    step + 1,
                    world,
                    component_norms=watch,
                )
            tokens += batch_tokens
            if parts is None:
                skipped += 1
                if skipped > max(100, total):
                    raise NonFiniteLoss(f"{skipped} batches skipped for non-finite losses: the run diverges")
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step was taken with, logged below
            scheduler.step()
            step += 1
            components = components or shown_components(model)
            if watch:
                parts.update(routing_snapshot(model, records, last_batch, task_names))
                parts["router_change"] = router_change(model, initial_routers)
            if (
                not warned_clipping
                and args.max_grad_norm > 0
                and parts["grad_norm"] > 10 * args.max_grad_norm
            ):
                warned_clipping = True
                if world.is_main:
                    scale = parts["grad_norm"] / args.max_grad_norm
                    logger.warning(
                        f"warning: step {step}: the gradient norm {parts['grad_norm']:.3g} was clipped to "
                        f"{args.max_grad_norm:g}, a {scale:.0f}x smaller step (said once; grad_norm per step "
                        "and grad_norm_<component> every --stats-steps are in log.jsonl)"
                    )
            if val_items and (step == total or (args.eval_steps and step % args.eval_steps == 0)):
                parts.update(
                    validation_loss(
                        model, val_items, val_ids, val_names, args.batch_size, pad_id, val_model_ids
                    )
                )
                if args.save_best and parts["val_loss"] < best:
                    best = parts["val_loss"]
                    save_best(model, run, step, best, examples, world)
            elapsed = time.perf_counter() - start
            log.write(
                {
                    "step": step,
                    **parts,
                    "lr": lr,
                    "tokens_per_s": tokens / elapsed,
                    "step_s": time.perf_counter() - step_start,
                    "batch_tokens": batch_tokens,
                    "skipped": skipped,
                },
                components=components,
            )
            if checkpoints and step % checkpoints == 0 and step < total:
                if world.is_main:
                    save_checkpoint(run, step, model, optimizer, scheduler)
                world.barrier()
    except KeyboardInterrupt:
        log.close()
        checkpoint = latest_checkpoint(run)
        raise Interrupted(
            f"interrupted at step {step} of {total}; "
            + (f"the last checkpoint is {checkpoint.name}" if checkpoint else "no checkpoint was written yet")
            + f"; continue with the same command and --resume (--output {run})"
        ) from None
    log.close()
    save_adapter(model, run / "adapter", is_main_process=world.is_main)
    if world.is_main:
        write_data_record(run / "adapter", examples, quantization_of_model(model))
    world.barrier()
    # The DistributedDataParallel wrapper's reducer must go before its process group: destroyed after it
    # (at this function's return), gloo's destructor can deadlock on a lock the group already took down.
    del forward_model, batches
    gc.collect()
    world.close()
    return run


def save_best(
    model: nn.Module, run: Path, step: int, loss: float, examples: list[Example], world: World
) -> None:
    """Replace best-adapter/ with the current adapter (written beside it, then swapped in, so a crash
    leaves the previous best whole), recording the step and validation loss it was saved at."""
    fresh, old, best = run / f".{BEST_ADAPTER}.new", run / f".{BEST_ADAPTER}.old", run / BEST_ADAPTER
    if world.is_main:
        shutil.rmtree(fresh, ignore_errors=True)
    save_adapter(model, fresh, is_main_process=world.is_main)  # every process: FSDP gathers experts
    if world.is_main:
        write_data_record(fresh, examples, quantization_of_model(model))
        (fresh / BEST_RECORD).write_text(json.dumps({"step": step, "val_loss": loss}) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            best.rename(old)
        fresh.rename(best)
        shutil.rmtree(old, ignore_errors=True)
    world.barrier()


def best_validation(run: Path) -> float:
    """The validation loss of the run's best adapter so far (inf if none was saved)."""
    record = run / BEST_ADAPTER / BEST_RECORD
    if not record.is_file():
        return math.inf
    return float(json.loads(record.read_text(encoding="utf-8"))["val_loss"])


def optimizer_step(
    model,
    batches,
    args: TrainArgs,
    optimizer,
    params,
    run: Path,
    step: int,
    world: World = SINGLE,
    component_norms: bool = False,
) -> tuple[dict | None, int, dict]:
    """One optimizer step over grad_accum micro-batches: (loss components averaged over the global batch
    and the gradient norm before clipping, tokens, last micro-batch), or None for the components when a
    non-finite loss was skipped (with --skip-nonfinite; otherwise training stops). All processes see the
    same components, so they decide alike. With component_norms (one process), the gradient norm of each
    loss component on the first micro-batch is added: grad_norm_task, grad_norm_balance, ..."""
    parts: torch.Tensor | None = None
    names: list[str] = []
    tokens = 0
    extra: dict[str, float] = {}
    device = params[0].device
    for micro in range(args.grad_accum):
        batch = {key: value.to(device) for key, value in next(batches).items()}
        tokens += int(world.sum(batch["attention_mask"].sum()))
        task, aux = response_loss(model, batch, world)
        weight = share(int(batch["attention_mask"].sum()), world)
        aux_parts = aux_components(model)  # the same names on every process: they follow the config
        names = ["task", *aux_parts]
        local = [float(task.detach()), *(weight * value for value in aux_parts.values())]
        components = world.sum(torch.tensor(local, dtype=torch.float64)) / world.size
        named = dict(zip(names, components.tolist(), strict=True))
        bad = [name for name, value in named.items() if not math.isfinite(value)]
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if args.skip_nonfinite:
                return None, tokens, batch
            values = ", ".join(f"{k}={v}" for k, v in named.items())
            checkpoint = latest_checkpoint(run)
            kept = (
                f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
            )
            raise NonFiniteLoss(
                f"step {step}: non-finite {', '.join(bad)} loss ({values}); {kept} "
                "(--skip-nonfinite skips such batches instead)"
            )
        if component_norms and micro == 0 and world.size == 1:
            extra = component_grad_norms(model, task, params)
        ((task + aux) / args.grad_accum).backward()
        parts = components / args.grad_accum + (0 if parts is None else parts)
    limit = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")  # inf: measure, do not clip
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, limit)))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    named = dict(zip(names, parts.tolist(), strict=True))  # type: ignore[union-attr]
    return {**named, "grad_norm": grad_norm, **extra}, tokens, batch


def component_grad_norms(
    model: nn.Module, task: torch.Tensor, params: list[torch.Tensor]
) -> dict[str, float]:
    """Gradient norm of the task loss and of each weighted auxiliary loss, separately (one micro-batch):
    the figure that shows whether one objective swamps the others before clipping mixes them."""
    inner = unwrap_model(model)
    parts = {"task": task, **getattr(inner, "weighted_aux_parts", {})}
    norms = {}
    for name, loss in parts.items():
        if not loss.requires_grad:
            norms[f"grad_norm_{name}"] = 0.0
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[f"grad_norm_{name}"] = float(
            torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
        )
    return norms


def routing_snapshot(
    model: nn.Module, records: dict[str, LayerRecord], batch: dict[str, torch.Tensor], task_names: list[str]
) -> dict[str, float]:
    """Specialisation of the last micro-batch, averaged over layers: I(task; expert), load entropy and CV."""
    layers = adapter_method(model).routed_layers(unwrap_model(model))
    accumulator = SpecialisationAccumulator(layers, task_names, similarity=False)
    accumulator.update(records, token_tasks(batch["task_ids"], batch["attention_mask"]))
    summary = accumulator.summary()
    layers = summary["layers"].values()
    return {
        "mi_task_expert_bits": summary["mean_mi_task_expert_bits"],
        "load_entropy_bits": sum(v["load_entropy_bits"] for v in layers) / max(1, len(layers)),
        "load_cv": summary["mean_load_cv"],
    }


def router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every router's weight (empty for a method without routing)."""
    layers = adapter_method(model).routed_layers(unwrap_model(model))
    return {name: full_tensor(layer.router.weight).detach().clone() for name, layer in layers.items()}


def router_change(model: nn.Module, initial: dict[str, torch.Tensor]) -> float:
    """Mean over layers of |W_g - W_g(init)| / |W_g(init)|: how far the routers have moved in training."""
    current = router_weights(model)
    changes = [float((current[n] - w0).norm() / w0.norm().clamp_min(1e-12)) for n, w0 in initial.items()]
    return sum(changes) / max(1, len(changes))


def param_groups(model: nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    """One AdamW group, or with router_lr_ratio != 1 two: experts at lr, routers at lr * router_lr_ratio."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = adapter_method(model).routed_layers(unwrap_model(model))
    if args.router_lr_ratio == 1.0 or not layers:
        return [{"params": trainable}]
    routers = {id(layer.router.weight) for layer in layers.values()}
    return [
        {"params": [p for p in trainable if id(p) not in routers]},
        {"params": [p for p in trainable if id(p) in routers], "lr": args.lr * args.router_lr_ratio},
    ]
