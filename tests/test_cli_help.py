"""`quest-export --help` and every subcommand's help are complete."""

from __future__ import annotations

import pytest

COMMANDS = {
    "generate": ["--model", "--label", "--prompt", "--steps", "--guidance", "--seed", "--out", "--num-images"],
    "eval": ["--model", "--checkpoint", "--num-samples", "--steps", "--seed", "--json", "--guidance"],
    "train-demo": ["--out", "--seed", "--unet-steps", "--classifier-epochs", "--force"],
    "calibrate": ["--out", "--model", "--trajectories", "--steps", "--guidance", "--seed", "--force"],
    "finetune": ["--out", "--model", "--bits", "--method", "--recipe", "--target", "--calibration", "--force"],
}


def test_top_level_help_lists_every_command(run_cli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "--debug" in result.stdout and "--version" in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_names_every_option(run_cli, command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    for option in COMMANDS[command]:
        assert option in result.stdout, f"{command} --help lacks {option}"


def test_version(run_cli) -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("quest-export ")
