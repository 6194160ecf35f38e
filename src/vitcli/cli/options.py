"""Option aliases shared by every command (``Annotated`` types, help on each)."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vitcli.embedded import DEFAULT_MODEL as DEFAULT_MODEL  # torch-free: the one definition, as vitcli.models.resolve


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"
    fp16 = "fp16"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    openvino = "openvino"
    onnxruntime = "onnxruntime"


ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="The shipped DeiT-Tiny by default (offline). A timm name[.tag] (weights from the Hugging Face Hub, "
         "cached; e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k for accuracy), hf-hub:org/name, a model "
         "folder (config.json + model.safetensors, e.g. runs/finetune/exp/best), a finetune run folder "
         "(its best/), or a name in the weights/ store.",
)]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", "-w",
    help="Weights file for the --model architecture: .safetensors, .pth/.pt/.bin state dict "
         "(loaded with weights_only=True) or the original ViT JAX .npz.",
)]
DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device_name(value: str) -> str:
    if not DEVICE_NAME.fullmatch(value):
        raise typer.BadParameter(f"'{value}': use auto, cpu, cuda, cuda:N (GPU N) or mps")
    return value


DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_device_name, metavar="auto|cpu|cuda|cuda:N|mps",
    help="Where to run: auto picks cuda, then mps, then cpu; cuda:N picks GPU N.",
)]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", help="auto: bf16 autocast on GPUs with native bf16 and on CPUs where it is faster "
                        "(AVX512-BF16, AMX), fp32 with TF32 matmuls on other GPUs, else fp32. fp32 is exact; "
                        "tf32 and fp16 need a GPU.",
)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", "-j", min=0,
    help="On CPU: streams that each decode a batch and run the model on their share of the cores "
         "(default: torch's thread count). On a GPU: DataLoader processes that decode ahead of it "
         "(default: usable CPUs shared by the ranks on this machine, at most 4). 0: decode inline.",
)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.")]
NoCalibrationOpt = Annotated[bool, typer.Option(
    "--no-calibration",
    help="Show the plain softmax even if the model has a stored temperature (vitcli finetune and "
         "vitcli calibrate store one; it changes the probabilities, never the top-1).")]
BackendOpt = Annotated[Backend | None, typer.Option(
    "--backend",
    help="The engine: auto runs the model through OpenVINO on CPUs when it converts and agrees with torch fp32 "
         "(built once into the user's cache), else torch; torch; openvino; onnxruntime (exported .onnx files). "
         "Default: $VITCLI_BACKEND, else auto.", show_default=False,
)]
