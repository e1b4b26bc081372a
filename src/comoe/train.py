"""Fine-tuning: the LLM-Adapters recipe (instruction data, loss on the response) for comoe presets and the
PEFT LoRA baseline, with auxiliary losses logged per step, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from comoe.analysis import SpecialisationAccumulator, token_tasks
from comoe.config import PRESETS, ComoeConfig, matched_lora_config
from comoe.data import load_examples
from comoe.distributed import World
from comoe.io import atomic_save_safetensors, atomic_write_text
from comoe.model import ComoeModel, get_comoe_model
from comoe.models import load_base
from comoe.prompts import Tokenized, format_prompt, pad_batch, response_logits, tokenize_example

METHODS = [*PRESETS, "lora"]
SINGLE = World()


@dataclass
class TrainArgs:
    """Settings of `comoe train`; the same keys are accepted in a YAML file given with --config."""

    model: str = field(default="smollm2-135m", metadata={"help": "base model: alias, local folder or hub id"})
    preset: str = field(default="comoe", metadata={"help": f"method: {', '.join(METHODS)}"})
    adapter: dict[str, Any] = field(default_factory=dict, metadata={"help": "ComoeConfig overrides"})
    data_dir: str | None = field(default=None, metadata={"help": "LLM-Adapters checkout (default: built-in)"})
    tasks: list[str] | None = field(default=None, metadata={"help": "training tasks (comma list on the CLI)"})
    train_limit: int | None = field(default=None, metadata={"help": "examples per task (seeded sample)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training mixture"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps, then linear decay to 0"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    cutoff: int = field(default=256, metadata={"help": "maximum tokens per example (longer ones are cut)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    seed: int = field(default=0, metadata={"help": "seed for the adapter init, data order and dropout"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    stats_steps: int = field(
        default=10,
        metadata={"help": "log routing statistics (load, I(task; expert)) every N steps (0: never)"},
    )
    output: str = field(default="runs/train", metadata={"help": "run directory"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the run directory's last checkpoint"}
    )
    skip_nonfinite: bool = field(default=False, metadata={"help": "skip batches with a non-finite loss"})
    fsdp: bool = field(
        default=False,
        metadata={"help": "with several processes, shard the base model with FSDP2 (comoe presets)"},
    )

    def __post_init__(self) -> None:
        if self.preset not in METHODS:
            raise ValueError(f"preset={self.preset!r} is invalid: expected one of {', '.join(METHODS)}")
        for name in ("batch_size", "grad_accum", "cutoff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected an integer >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps!r} is invalid: expected an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: expected a number > 0")
        if self.fsdp and (self.resume or self.preset == "lora"):
            raise ValueError(
                "fsdp=True is invalid with resume or preset 'lora': FSDP runs save the final comoe adapter "
                "only (no resumable checkpoints yet); use DDP (the default) for those"
            )

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainArgs:
        """Defaults, then the YAML file, then explicit overrides (command-line flags)."""
        values: dict[str, Any] = {}
        if config_file:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of settings")
            values.update({key.replace("-", "_"): value for key, value in loaded.items()})
        values.update({key: value for key, value in overrides.items() if value is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; valid: {sorted(known)}")
        return cls(**values)


def build_model(args: TrainArgs) -> tuple[nn.Module, Any]:
    """Base model plus the method's adapter: a comoe preset, or PEFT LoRA matched to the comoe preset."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)
    base, tokenizer = load_base(args.model)
    if args.preset == "lora":
        reference = ComoeConfig.preset("comoe", **args.adapter)
        model = get_peft_model(base, matched_lora_config(reference, base))
    else:
        model = get_comoe_model(base, ComoeConfig.preset(args.preset, **args.adapter))
    return model, tokenizer


def response_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], world: World = SINGLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy on response tokens, weighted auxiliary loss), both normalised over the global batch.

    Each process divides its sum by the number of tokens in all processes' micro-batches and multiplies by
    the world size, which DDP's gradient averaging divides back out: the gradients are those of one process
    holding the whole batch (per-token means of the task loss and of the per-token auxiliary losses).
    """
    logits, targets = response_logits(model, batch)
    inner = getattr(model, "module", model)
    aux = inner.last_aux_loss if isinstance(inner, ComoeModel) else torch.zeros(())
    if world.size == 1:
        return F.cross_entropy(logits, targets), aux
    task = (
        F.cross_entropy(logits, targets, reduction="sum") * _share(targets.numel(), world) / targets.numel()
    )
    return task, aux * _share(int(batch["attention_mask"].sum()), world)


def _share(count: int, world: World) -> float:
    """count * world.size / (count summed over processes): the factor that turns a per-process mean into
    this process's part of the global mean, once DDP averages over processes."""
    return count * world.size / float(world.sum(torch.tensor(float(count)))) if world.size > 1 else 1.0


class NonFiniteLoss(RuntimeError):
    pass


def _tokenize_all(examples, tokenizer, cutoff: int) -> tuple[list[Tokenized], int]:
    items = [
        tokenize_example(tokenizer, format_prompt(e.instruction, e.input), e.output, cutoff) for e in examples
    ]
    return items, sum(item.truncated for item in items)


def _batches(
    items: list[Tokenized], task_ids: list[int], args: TrainArgs, pad_id: int, start_micro: int, world: World
):
    """Micro-batches in a seeded order per epoch, from micro-batch `start_micro` on (for resume).

    The order depends on the seed and the epoch only; each global micro-batch of batch_size * world.size
    examples is split into contiguous per-process slices, so N processes see what one process would.
    """
    global_size = args.batch_size * world.size
    per_epoch = math.ceil(len(items) / global_size)
    micro = start_micro
    while True:
        epoch, offset = divmod(micro, per_epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        chunk = order[offset * global_size : (offset + 1) * global_size].tolist()
        mine = chunk[world.rank * args.batch_size : (world.rank + 1) * args.batch_size] or chunk[-1:]
        batch = pad_batch([items[i] for i in mine], pad_id)
        batch["task_ids"] = torch.tensor([task_ids[i] for i in mine])
        yield batch
        micro += 1


class RunLog:
    """log.jsonl, TensorBoard and the progress bar, written by the main process only."""

    def __init__(self, run: Path, total: int, step: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.file = open(run / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.writer = SummaryWriter(str(run / "tensorboard"))
        self.progress = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, record["step"])
        self.progress.update(1)
        self.progress.set_postfix(task=f"{record['task']:.3f}", con=f"{record['contrastive']:.3f}")

    def close(self) -> None:
        if self.enabled:
            self.progress.close()
            self.writer.close()
            self.file.close()


def _prepare_run(args: TrainArgs, world: World) -> Path:
    run = Path(args.output)
    if world.is_main:
        if run.exists() and any(run.iterdir()) and not args.resume:
            raise FileExistsError(
                f"--output {run} is not empty: pass --resume to continue it, or pick a new folder"
            )
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
    world.barrier()
    return run


def train(args: TrainArgs) -> Path:
    """Train, checkpoint and save the adapter into args.output; returns the run directory.

    Under torchrun / accelerate launch, each process trains on its slice of every global micro-batch with
    DistributedDataParallel; only the main process writes logs, checkpoints and the adapter.
    """
    world = World.from_env()
    run = _prepare_run(args, world)
    model, tokenizer = build_model(args)
    examples = load_examples(args.data_dir, args.tasks, "train", args.train_limit, args.seed)
    items, truncated = _tokenize_all(examples, tokenizer, args.cutoff)
    steps_per_epoch = math.ceil(len(items) / (args.batch_size * world.size * args.grad_accum))
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    forward_model = world.wrap(model.train(), fsdp=args.fsdp)  # before the optimizer: FSDP swaps parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = min(args.warmup_steps, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * min(1.0, (total - s) / max(1, total - warmup)),
    )
    step = load_checkpoint(run, model, optimizer, scheduler) if args.resume else 0
    if world.is_main:
        _truncate_log(run / "log.jsonl", step)
        print(
            f"training {args.preset} on {len(items)} examples ({truncated} cut at {args.cutoff} tokens), "
            f"{total} steps, {world.size} process(es); run directory {run}"
        )
    task_names = list(dict.fromkeys(e.task for e in examples))
    task_ids = [task_names.index(e.task) for e in examples]
    batches = _batches(items, task_ids, args, tokenizer.pad_token_id, step * args.grad_accum, world)
    checkpoints = args.save_steps if not (args.fsdp and world.size > 1) else 0
    log = RunLog(run, total, step, world.is_main)
    skipped, tokens, start = 0, 0, time.perf_counter()
    while step < total:
        watch = isinstance(model, ComoeModel) and args.stats_steps and (step + 1) % args.stats_steps == 0
        with model.record_routing() if watch else contextlib.nullcontext() as steps:
            parts, batch_tokens, last_batch = optimizer_step(
                forward_model, batches, args, optimizer, params, run, step + 1, world
            )
        tokens += batch_tokens
        if parts is None:
            skipped += 1
            if skipped > max(100, total):
                raise NonFiniteLoss(f"{skipped} batches skipped for non-finite losses: the run diverges")
            continue
        scheduler.step()
        step += 1
        if watch:
            parts.update(routing_snapshot(model, steps, last_batch, task_names))
        elapsed = time.perf_counter() - start
        log.write(
            {
                "step": step,
                **parts,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / elapsed,
                "skipped": skipped,
            }
        )
        if checkpoints and step % checkpoints == 0 and step < total:
            if world.is_main:
                save_checkpoint(run, step, model, optimizer, scheduler)
            world.barrier()
    log.close()
    model.save_pretrained(run / "adapter", is_main_process=world.is_main)
    world.barrier()
    world.close()
    return run


def optimizer_step(
    model, batches, args: TrainArgs, optimizer, params, run: Path, step: int, world: World = SINGLE
) -> tuple[dict | None, int, dict]:
    """One optimizer step over grad_accum micro-batches: (loss components averaged over the global batch,
    tokens, last micro-batch), or None for the components when a non-finite loss was skipped (with
    --skip-nonfinite; otherwise training stops). All processes see the same components, so they decide
    alike."""
    parts = torch.zeros(3, dtype=torch.float64)
    tokens = 0
    for _ in range(args.grad_accum):
        batch = next(batches)
        tokens += int(world.sum(batch["attention_mask"].sum()))
        task, aux = response_loss(model, batch, world)
        share = _share(int(batch["attention_mask"].sum()), world)
        local = [float(task.detach()), *(share * value for value in _aux_components(model))]
        components = world.sum(torch.tensor(local, dtype=torch.float64)) / world.size
        named = dict(zip(("task", "balance", "contrastive"), components.tolist(), strict=True))
        bad = [name for name, value in named.items() if not math.isfinite(value)]
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if args.skip_nonfinite:
                return None, tokens, batch
            values = ", ".join(f"{k}={v}" for k, v in named.items())
            raise NonFiniteLoss(
                f"step {step}: non-finite {', '.join(bad)} loss ({values}); the last good checkpoint "
                f"is kept in {run / 'checkpoints'} (--skip-nonfinite skips such batches instead)"
            )
        ((task + aux) / args.grad_accum).backward()
        parts += components / args.grad_accum
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(("task", "balance", "contrastive"), parts.tolist(), strict=True)), tokens, batch


def routing_snapshot(model: ComoeModel, steps, batch: dict[str, torch.Tensor], task_names: list[str]) -> dict:
    """Specialisation of the last micro-batch, averaged over layers: I(task; expert), load entropy and CV."""
    accumulator = SpecialisationAccumulator(model.comoe_layers(), task_names, similarity=False)
    accumulator.update(steps, token_tasks(batch["task_ids"], batch["attention_mask"]))
    summary = accumulator.summary()
    layers = summary["layers"].values()
    return {
        "mi_task_expert_bits": summary["mean_mi_task_expert_bits"],
        "load_entropy_bits": sum(v["load_entropy_bits"] for v in layers) / max(1, len(layers)),
        "load_cv": summary["mean_load_cv"],
    }


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after the checkpoint a run resumes from, so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _aux_components(model: nn.Module) -> list[float]:
    """Balance and contrastive losses of the last forward (zeros for a PEFT model)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, ComoeModel):
        return [0.0, 0.0]
    losses = inner.last_aux_losses()
    return [losses["balance"], losses["contrastive"]]


# ---- checkpoints: safetensors and JSON only, written atomically ------------------------------------------


def save_checkpoint(run: Path, step: int, model: nn.Module, optimizer, scheduler) -> None:
    """checkpoints/step-N/: adapter, optimizer moments, scheduler and RNG state; renamed into place whole."""
    root = run / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "adapter")
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value for index, slots in state["state"].items() for key, value in slots.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_safetensors(tmp / "optimizer.safetensors", tensors)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    meta = {"step": step, "param_groups": groups, "scheduler": _json_safe(scheduler.state_dict())}
    atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _json_safe(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, int | float | str | list | bool | type(None))}


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(run: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore the last checkpoint of `run` into model, optimizer, scheduler and RNG; returns its step."""
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        print(f"--resume: no checkpoint in {run / 'checkpoints'} yet, starting at step 0")
        return 0
    meta = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    _load_adapter_weights(model, checkpoint / "adapter")
    tensors = load_file(checkpoint / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["param_groups"], strict=True):
        group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    print(f"resumed from {checkpoint} (step {meta['step']})")
    return int(meta["step"])


def _load_adapter_weights(model: nn.Module, directory: Path) -> None:
    if isinstance(model, ComoeModel):
        model.load_adapter_weights(directory / "adapter_model.safetensors")
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
