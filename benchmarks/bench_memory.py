"""Peak memory of one SmolLM2-135M training step (batch 8 x 256 tokens): PEFT LoRA (matched parameters)
against the comoe preset, with and without gradient checkpointing, float32 against a bfloat16 base.

    python benchmarks/bench_memory.py [--json benchmarks/results/memory.json] [--device cpu|cuda]

Each configuration runs in its own process, so that one's allocator cache does not hide another's peak.
The figure is the peak above the memory held once the model is built and before the first step: on CUDA,
torch.cuda.max_memory_allocated; on the CPU, the resident set size sampled every millisecond by a thread
(the CPU allocator has no peak counter). Two steps are run (the first creates AdamW's state) and the
larger peak is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = [
    (method, dtype, checkpointing)
    for dtype in ("float32", "bfloat16")
    for checkpointing in (False, True)
    for method in ("lora", "comoe")
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class PeakSampler:
    """The largest resident set size seen while active (sampled every millisecond)."""

    def __enter__(self) -> PeakSampler:
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(method: str, dtype: str, checkpointing: bool, device: str, batch: int, seq: int) -> dict:
    """One configuration, in this process."""
    import torch

    from comoe.training.factory import build_model
    from comoe.training.loss import response_loss
    from comoe.training.settings import TrainArgs

    args = TrainArgs(preset=method, dtype=dtype, gradient_checkpointing=checkpointing)
    model, _ = build_model(args)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(10, 40000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    peaks, seconds = [], []
    for _ in range(2):
        start = time.perf_counter()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            task, aux = response_loss(model, data)
            (task + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        else:
            before = rss_bytes()
            with PeakSampler() as sampler:
                task, aux = response_loss(model, data)
                (task + aux).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            peaks.append(sampler.peak - before)
        seconds.append(time.perf_counter() - start)
    return {
        "method": method,
        "dtype": dtype,
        "gradient_checkpointing": checkpointing,
        "peak_mib": round(max(peaks) / 2**20, 1),
        "step_s": round(min(seconds), 2),
        "trainable": sum(p.numel() for p in params),
    }


def table(rows: list[dict]) -> str:
    lines = ["| base dtype | checkpointing | LoRA MiB | comoe MiB | comoe / LoRA |", "|---|---|---|---|---|"]
    for dtype in ("float32", "bfloat16"):
        for checkpointing in (False, True):
            pick = {
                r["method"]: r
                for r in rows
                if r["dtype"] == dtype and r["gradient_checkpointing"] == checkpointing
            }
            if set(pick) == {"lora", "comoe"}:
                lora, comoe = pick["lora"]["peak_mib"], pick["comoe"]["peak_mib"]
                lines.append(
                    f"| {dtype} | {'on' if checkpointing else 'off'} | {lora:.0f} | {comoe:.0f} | "
                    f"{comoe / lora:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=str(HERE / "results" / "memory.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--one", help="internal: method,dtype,checkpointing to measure in this process")
    options = parser.parse_args()
    if options.one:
        method, dtype, checkpointing = options.one.split(",")
        row = measure(method, dtype, checkpointing == "1", options.device, options.batch, options.seq)
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for method, dtype, checkpointing in CONFIGS:
        one = f"{method},{dtype},{int(checkpointing)}"
        argv = [sys.executable, __file__, "--one", one, "--device", options.device]
        argv += ["--batch", str(options.batch), "--seq", str(options.seq)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        print(row, flush=True)
        rows.append(row)
    report = {"device": options.device, "batch": options.batch, "seq": options.seq, "rows": rows}
    Path(options.json).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
