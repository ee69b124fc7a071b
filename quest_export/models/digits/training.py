"""`quest-export train-demo`: reproduce the shipped digits UNet and classifier from scratch.

Seeded end to end; about 25 minutes on 2 CPU cores with the defaults. The UNet learns epsilon
prediction with label dropout (for classifier-free guidance) and keeps an EMA of its weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from quest_export.models.digits.classifier import DigitClassifier
from quest_export.models.digits.data import DigitsSplit, digits_splits
from quest_export.models.digits.label_encoder import LabelEncoder
from quest_export.models.digits.unet import build_digits_unet, build_sampling_scheduler, build_training_scheduler


@dataclass
class DemoTrainConfig:
    """Every knob of the demo training; the defaults produced the shipped files."""

    seed: int = 0
    unet_steps: int = 3000
    batch_size: int = 128
    lr: float = 8e-4
    warmup_steps: int = 100
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    classifier_epochs: int = 40
    classifier_lr: float = 2e-3
    threads: int = 2


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _log_plain(progress: Progress, every: int, done: int, total: int, message: str) -> None:
    """Progress bars do not render into a log file: print a plain line every ``every`` units there."""
    if not progress.console.is_terminal and (done % every == 0 or done == total):
        progress.console.print(f"{message} ({done}/{total})")


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (classifier augmentation)."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + size, dx : dx + size]


def train_classifier(
    train: DigitsSplit, held_out: DigitsSplit, config: DemoTrainConfig, progress: Progress
) -> tuple[DigitClassifier, float]:
    """Train the metric classifier; returns it (eval mode) and its held-out accuracy."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    torch.manual_seed(config.seed + 1)
    model = DigitClassifier(image_size=train.images.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.classifier_lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train.labels) / 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.classifier_lr, total_steps=config.classifier_epochs * steps_per_epoch
    )
    task = progress.add_task("classifier", total=config.classifier_epochs, info="")
    for epoch in range(config.classifier_epochs):
        model.train()
        order = torch.randperm(len(train.labels), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            images = _shift(train.images[idx], generator)
            loss = F.cross_entropy(model(images), train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(held_out.images).argmax(1) == held_out.labels).float().mean().item()
        progress.update(task, advance=1, info=f"held-out acc {accuracy:.3f}")
        _log_plain(progress, 10, epoch + 1, config.classifier_epochs, f"classifier held-out acc {accuracy:.3f}")
    return model, accuracy


def train_unet(
    train: DigitsSplit, config: DemoTrainConfig, progress: Progress
) -> tuple[torch.nn.Module, LabelEncoder, float]:
    """Train the UNet and label encoder jointly; returns EMA weights and the final loss."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    unet = build_digits_unet()
    encoder = LabelEncoder(num_labels=10, num_tokens=4, embed_dim=unet.config.cross_attention_dim)
    noise_scheduler = build_training_scheduler()
    params = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.unet_steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    ema = EMAModel(params, decay=config.ema_decay)
    num = len(train.labels)
    task = progress.add_task("unet", total=config.unet_steps, info="")
    running = None
    for step in range(config.unet_steps):
        idx = torch.randint(0, num, (config.batch_size,), generator=generator)
        clean = train.images[idx]
        labels = train.labels[idx].clone()
        drop = torch.rand(config.batch_size, generator=generator) < config.label_dropout
        labels[drop] = encoder.null_label
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=encoder(labels)).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.update(task, advance=1, info=f"loss {running:.4f}")
        _log_plain(progress, 250, step + 1, config.unet_steps, f"unet loss {running:.4f}")
    ema.copy_to(params)
    unet.eval()
    encoder.eval()
    return unet, encoder, float(running or 0.0)


def train_demo(out_dir: Path, config: DemoTrainConfig, force: bool = False) -> dict[str, Any]:
    """Train both demo models and write ``out_dir/digits`` and ``out_dir/digit_classifier`` atomically."""
    from quest_export.artifacts import atomic_directory, write_json_atomic
    from quest_export.pipelines.digits import DigitsPipeline

    torch.set_num_threads(config.threads)
    train, held_out = digits_splits()
    started = time.time()
    with _progress() as progress:
        classifier, accuracy = train_classifier(train, held_out, config, progress)
        classifier_seconds = time.time() - started
        unet, encoder, loss = train_unet(train, config, progress)
    elapsed = time.time() - started
    out_dir = Path(out_dir)
    pipe = DigitsPipeline(unet=unet, scheduler=build_sampling_scheduler(), label_encoder=encoder)
    with atomic_directory(out_dir / "digits", force=force) as tmp:
        pipe.save_pretrained(tmp)
    with atomic_directory(out_dir / "digit_classifier", force=force) as tmp:
        classifier.save_pretrained(tmp)
    report = {
        "config": asdict(config),
        "classifier_held_out_accuracy": accuracy,
        "classifier_seconds": round(classifier_seconds, 1),
        "unet_final_loss": loss,
        "total_seconds": round(elapsed, 1),
        "torch": torch.__version__,
    }
    write_json_atomic(out_dir / "train_report.json", report)
    return report
