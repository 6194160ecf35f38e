"""What one optimizer step touches (``TrainParts``), built from the config with timm's recipe pieces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitcli.distributed import Rank
from vitcli.finetune.config import FinetuneConfig
from vitcli.finetune.model import classifier_heads


@dataclass
class TrainParts:
    """Everything one optimizer step touches."""

    model: nn.Module  # what runs forward: the DDP wrapper under torchrun, else the model itself
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    scheduler: Any = None  # a timm Scheduler, stepped per optimizer update
    scaler: Any = None  # timm.utils.NativeScaler (a torch GradScaler), fp16 only
    ema: Any = None  # timm.utils.ModelEmaV3
    mixup: Any = None  # timm.data.Mixup
    accum_steps: int = 1
    clip_grad: float | None = None
    freeze: bool = False
    num_classes: int = 0
    label_smoothing: float = 0.0
    dist: Rank = Rank()

    @property
    def raw_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def saved_model(self) -> nn.Module:
        """What is evaluated and saved: the EMA weights when --ema."""
        return self.ema.module if self.ema is not None else self.raw_model


# ------------------------------------------------------------------------------------ the recipe


def build_parts(config: FinetuneConfig, model: nn.Module, counts: list[int], steps_per_epoch: int,
                device: torch.device, precision: str, dist: Rank) -> TrainParts:
    """Optimizer, schedule, loss, mixup, EMA, loss scaling and (under torchrun) the DDP wrapper, all from timm."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    if config.freeze:
        head_params = {id(p) for head in classifier_heads(model) for p in head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
    layer_decay = config.layer_decay if config.layer_decay not in (None, 1.0) and not config.freeze else None
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay,
                                    layer_decay=layer_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 1e-2, min_lr=config.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    num_classes = len(counts)
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=num_classes)
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    else:
        weight = None
        if config.balance == "loss":  # inverse frequency, mean 1 over the classes
            weight = torch.tensor([sum(counts) / (num_classes * max(c, 1)) for c in counts], device=device)
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema else None
    forward_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        forward_model = DistributedDataParallel(model, device_ids=ids)
    scaler = NativeScaler(device=device.type) if precision == "fp16" else None
    return TrainParts(model=forward_model, optimizer=optimizer, loss_fn=loss_fn, device=device,
                      precision=precision, scheduler=scheduler, scaler=scaler, ema=ema, mixup=mixup,
                      accum_steps=config.accum_steps, clip_grad=config.clip_grad, freeze=config.freeze,
                      num_classes=num_classes, label_smoothing=config.label_smoothing, dist=dist)
