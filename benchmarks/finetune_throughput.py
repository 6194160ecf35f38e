"""Training throughput of `vitcli finetune`'s step against a bare timm training step.

Both train the same model (deit_tiny_patch16_224, new 2-class head) on the same in-memory batches
(no decoding, no DataLoader) at the same precision. The vitcli side is the real
``vitcli.finetune.loop.train_one_epoch`` with the default recipe (AdamW with layer-wise LR decay, per-step
cosine schedule, label smoothing, gradient clipping, the NaN check and the progress callback); the
bare side is forward, cross-entropy, backward, AdamW step. Rounds alternate between the two and the
best round of each is reported, to be fair on a machine shared with other work.

    python benchmarks/finetune_throughput.py                  # fp32 and bf16 on the CPU
    python benchmarks/finetune_throughput.py --precision bf16 --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from vitcli.devices import autocast, resolve_device
from vitcli.distributed import Rank
from vitcli.finetune.config import FinetuneConfig
from vitcli.finetune.loop import train_one_epoch
from vitcli.finetune.parts import build_parts

MODEL = "deit_tiny_patch16_224"
NUM_CLASSES = 2


def make_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, num_classes=NUM_CLASSES, drop_path_rate=0.1).to(device)


def bare_round(model, optimizer, batches, device, precision) -> float:
    """img/s of a plain loop: forward, loss, backward, optimizer step."""
    model.train()
    start = time.perf_counter()
    for images, targets in batches:
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def vitcli_round(parts, batches, step: int) -> tuple[float, int]:
    """img/s of vitcli.finetune.loop.train_one_epoch over the same batches."""
    seen = []
    start = time.perf_counter()
    stats = train_one_epoch(parts, batches, num_batches=len(batches), global_step=step,
                            on_step=seen.append)
    elapsed = time.perf_counter() - start
    return stats["images"] / elapsed, stats["global_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (best is kept)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device),
                torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device))
               for _ in range(args.steps)]
    print(f"{MODEL}, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"{'precision':<10}{'bare img/s':>12}{'vitcli img/s':>14}{'ratio':>8}")
    for precision in args.precision:
        bare_model = make_model(device)
        bare_opt = create_optimizer_v2(bare_model, opt="adamw", lr=1e-4, weight_decay=0.05)
        config = FinetuneConfig(precision=precision, epochs=100)
        parts = build_parts(config, make_model(device), [1] * NUM_CLASSES, steps_per_epoch=args.steps,
                            device=device, precision=precision, dist=Rank())
        bare_round(bare_model, bare_opt, batches[:2], device, precision)  # warm-up (kernel selection)
        _, step = vitcli_round(parts, batches[:2], 0)
        bare, ours = [], []
        for _ in range(args.rounds):
            bare.append(bare_round(bare_model, bare_opt, batches, device, precision))
            speed, step = vitcli_round(parts, batches, step)
            ours.append(speed)
        print(f"{precision:<10}{max(bare):>12.1f}{max(ours):>14.1f}{max(ours) / max(bare):>8.3f}", flush=True)


if __name__ == "__main__":
    main()
