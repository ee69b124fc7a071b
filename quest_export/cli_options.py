"""The option types that several ``quest-export`` commands share (Typer annotations), kept out of
cli.py so the commands stay short."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from quest_export.devices import DEVICE_CHOICES, TEACHER_DTYPES

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="digits (shipped demo), sd15-shaped (SD1.5's UNet config, random weights), sd14 / sd15 / sdxl, a local diffusers directory, or a Hugging Face id.",
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Sampler steps (DDIM for digits, the model's scheduler otherwise).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed for the initial noise; sample i always gets the same noise.")]
GuidanceOpt = Annotated[
    Optional[float],
    typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale [default: 2.0 for digits, 7.5 otherwise]."),
]

BitsOpt = Annotated[str, typer.Option("--bits", "-b", help="Weight and activation bits as wXaY (2-8 each), e.g. w4a8.")]

CalibrationStepsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--calibration-steps",
        help="uniform (the FP trajectory's x_t at every sampler step) or selected (ADP-DM: every row re-noised from the structural-risk-selected timestep's generated samples) [default: uniform / the recipe].",
    ),
]

DeviceOpt = Annotated[
    str,
    typer.Option("--device", help=f"Where PyTorch runs: {DEVICE_CHOICES} (auto: CUDA when PyTorch sees a GPU, else the CPU)."),
]
TeacherDtypeOpt = Annotated[
    Optional[str],
    typer.Option("--teacher-dtype", help=f"quest only: dtype of the frozen FP teacher ({', '.join(TEACHER_DTYPES)}); the quantized student stays float32 [default: float32]."),
]
