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
