"""The sbatch scripts and their example configs, without a cluster: every config loads and
validates, asks for as many processes as its script's nodes x tasks, and each role's
TP x PP divides the model it names; the scripts carry the preemption settings."""

import re
import subprocess

import pytest

from megarlhf.cli import COMMANDS
from megarlhf.config import check_layout, load_config, preset
from tests.conftest import REPO

# The models the flagship configs start from (their shapes come from the checkpoints).
TULU2_13B, LLAMA2_70B = preset("tulu2-13b"), preset("llama2-70b")
SCRIPTS = ["ppo_70b_rm.sh", "rm_70b.sh", "dpo_13b.sh", "sft.sh"]


def sbatch_options(text):
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))


def launch_line(text):
    m = re.search(r'^exec "\$\{MEGARLHF_HOME:-\$SLURM_SUBMIT_DIR\}/slurm/launch.sh" (\w+) (\S+) "\$@"$',
                  text, flags=re.M)
    assert m, "the script must end by exec-ing slurm/launch.sh RECIPE CONFIG \"$@\""
    return m.group(1), m.group(2)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_config_and_layout_agree(name):
    text = (REPO / "slurm" / name).read_text()
    opts = sbatch_options(text)
    recipe, config = launch_line(text)
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "8"  # one task per GPU
    assert re.fullmatch(r"USR1@\d+", opts["signal"]) and "#SBATCH --requeue" in text
    assert opts["open-mode"] == "append"  # a requeued job appends to its log
    schema, _ = COMMANDS[recipe][0]()
    cfg = load_config(schema, str(REPO / config))
    cfg.validate()
    world = int(opts["nodes"]) * int(opts["ntasks-per-node"])
    assert cfg.world == world, f"{config}: world={cfg.world}, {name} asks for {world} tasks"
    if recipe == "ppo":
        spans = cfg.spans()
        models = {"actor": TULU2_13B, "reference": TULU2_13B, "critic": TULU2_13B, "reward": LLAMA2_70B}
        for role, model in models.items():
            check_layout(model, getattr(cfg, role).parallel, spans[role][1], prefix=f"{role}.parallel")
        assert spans["reward"] == (16, 8)  # the 70B reward model alone on the last node
    else:
        model = cfg.model if recipe == "sft" else {"rm": LLAMA2_70B, "dpo": TULU2_13B}[recipe]
        check_layout(model, cfg.parallel, cfg.world)


@pytest.mark.parametrize("path", ["slurm/launch.sh", "tools/local_slurm.sh",
                                  *(f"slurm/{s}" for s in SCRIPTS)])
def test_shell_syntax(path):
    res = subprocess.run(["bash", "-n", str(REPO / path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_last_config_on_the_command_line_wins(tmp_path, capsys):
    """launch.sh passes the script's default config first: a --config after the script
    replaces it."""
    from megarlhf.cli import main

    other = tmp_path / "other.yaml"
    other.write_text("world: 1\ntrain: {init_from: other_ckpt}\n")
    rc = main(["rm", "--config", str(REPO / "examples/rm_70b.yaml"), "--config", str(other),
               "data.sources=[{path: x.jsonl}]", "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0 and "init_from: other_ckpt" in out and "tulu2-70b" not in out
