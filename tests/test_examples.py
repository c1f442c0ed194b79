"""Every config under examples/ loads into its command's schema and validates, so the
files the README points to stay in step with the config dataclasses."""

from pathlib import Path

import pytest

from megarlhf.cli import COMMANDS
from megarlhf.config import load_config
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def command_of(path: Path) -> str:
    """The command a file is for: its name's first word (``ppo_long.yaml`` -> ppo)."""
    return path.stem.split("_")[0]


def test_examples_are_found():
    assert {p.name for p in EXAMPLES} >= {"ppo.yaml", "ppo_long.yaml", "sft.yaml", "ppo_13b_70b_rm.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_config_loads_and_validates(path):
    assert command_of(path) in COMMANDS, f"{path.name}: no command {command_of(path)!r}"
    schema, _ = COMMANDS[command_of(path)][0]()
    cfg = load_config(schema, str(path))
    cfg.validate()
