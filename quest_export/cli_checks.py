"""Input checks the commands run before any long work (one UserError line each)."""

from __future__ import annotations

from quest_export.errors import UserError


def check_finite(flag: str, value: float | None) -> None:
    import math

    if value is not None and not math.isfinite(value):
        raise UserError(f"{flag} {value} is not a finite number; pass e.g. {flag} 2.0")


def check_prompts(prompts: list[str] | None) -> None:
    for index, text in enumerate(prompts or [], start=1):
        if not text.strip():
            raise UserError(f"--prompt number {index} is empty; pass a non-empty text for every --prompt")


def check_choice(flag: str, value: str | None, choices_name: str) -> None:
    """Refuse a value of a string option that is not one of ``quest.recipe.<choices_name>``."""
    from quest import recipe as recipe_module

    choices = getattr(recipe_module, choices_name)
    if value is not None and value not in choices:
        raise UserError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")


def check_conditioning(class_conditional: bool, model: str, prompts: list[str] | None, label: int | None) -> None:
    """``--label`` for label-conditioned models (digits), ``--prompt`` for text-conditioned ones."""
    if class_conditional and prompts:
        raise UserError(f"the {model} model is label-conditioned; use --label N (0-9) instead of --prompt")
    if not class_conditional and label is not None:
        raise UserError(f"--label applies only to the digits model; use --prompt TEXT with {model}")
