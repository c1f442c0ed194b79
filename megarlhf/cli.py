"""``megarlhf <command> [--config FILE] [key=value ...]``

Every command reads a YAML config (optional; built-in defaults otherwise) plus dotted
overrides into a typed config, validates it, and runs. Run outside torchrun/srun, a
command that needs several processes starts them itself on this machine
(:mod:`megarlhf.launch`); under torchrun or ``srun`` it runs as the rank it is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["main", "COMMANDS"]


def _demo() -> Tuple[type, Callable]:
    from megarlhf.demo import DemoConfig, run

    return DemoConfig, run


def _compare() -> Tuple[type, Callable]:
    from megarlhf.compare import CompareConfig, run

    return CompareConfig, run


def _smoke() -> Tuple[type, Callable]:
    from megarlhf.smoke import SmokeConfig, run

    return SmokeConfig, run


def _rm() -> Tuple[type, Callable]:
    from megarlhf.recipes.reward_model import RMConfig, run

    return RMConfig, run


def _dpo() -> Tuple[type, Callable]:
    from megarlhf.recipes.dpo import DPOConfig, run

    return DPOConfig, run


def _ppo() -> Tuple[type, Callable]:
    from megarlhf.recipes.ppo import PPOConfig, run

    return PPOConfig, run


def _sft() -> Tuple[type, Callable]:
    from megarlhf.recipes.sft import SFTConfig, run

    return SFTConfig, run


# name -> (loader of (schema, entry), one-line help)
COMMANDS: Dict[str, Tuple[Callable[[], Tuple[type, Callable]], str]] = {
    "demo": (_demo, "the whole tiny pipeline on the built-in task: SFT -> RM -> DPO and PPO"),
    "compare": (_compare, "the paper's comparison on the built-in task: SFT vs DPO vs PPO with a "
                          "small and a larger reward model, over seeds; table and plot"),
    "smoke": (_smoke, "train the tiny Llama a few steps at any TP x PP and check its checkpoint"),
    "sft": (_sft, "supervised fine-tuning on chat data (default: the built-in task)"),
    "rm": (_rm, "train a Bradley-Terry reward model from an SFT checkpoint"),
    "dpo": (_dpo, "direct preference optimisation of an SFT policy"),
    "ppo": (_ppo, "PPO of an SFT policy against a reward model (actor, reference, critic, RM)"),
}


def _in_distributed_env() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _relaunch(world_size: int, argv: List[str], load: Callable[[], object]) -> int:
    """Run this command as ``world_size`` ranks on this machine: forked from this process
    once ``load`` has imported what they need (:mod:`megarlhf.launch`), or under torchrun
    where forking is not safe (a GPU machine)."""
    from megarlhf import launch

    print(f"megarlhf: starting {world_size} processes on this machine: megarlhf {' '.join(argv)}",
          flush=True)
    if not launch.forking_is_safe():
        return launch.torchrun(world_size, ["-m", "megarlhf.cli", *argv])
    load()
    return launch.run(world_size, lambda: main(argv))


# Commands that take flags rather than a config (they act on a checkpoint).
FLAG_COMMANDS = {
    "generate": ("megarlhf.rollout.commands", "generate_main",
                 "sample responses from a checkpoint (JSONL in, JSONL out)"),
    "pairs": ("megarlhf.rollout.commands", "pairs_main",
              "preference pairs from a policy's own samples on verifiable prompts"),
    "rm-eval": ("megarlhf.recipes.reward_model", "eval_main",
                "pair accuracy of a reward model, per subset (RewardBench-style files)"),
    "eval": ("megarlhf.eval.run", "main",
             "exact match (GSM8k, built-in task), IFEval rule checks, best-of-N with a reward "
             "model, RM pair accuracy; JSON + markdown"),
    "prepare-data": ("megarlhf.data.prepare", "main",
                     "download a recipe config's hub datasets into the prepared-data cache (on a "
                     "login node, before sbatch: `megarlhf prepare-data ppo --config FILE`)"),
}

# Flag commands that check their own arguments and size their job (several models, each
# with its own TP x PP) before any process starts: name -> function(argv) -> processes.
FLAG_PROCESSES = {"eval": "processes"}


def _flag_command(name: str, argv: List[str]) -> int:
    import importlib

    from megarlhf.config import ConfigError
    from megarlhf.data.load import DataError
    from megarlhf.models.checkpoint import CheckpointError

    module, func, _ = FLAG_COMMANDS[name]
    try:
        if not _in_distributed_env() and "-h" not in argv and "--help" not in argv:
            if name in FLAG_PROCESSES:
                world = getattr(importlib.import_module(module), FLAG_PROCESSES[name])(argv)
            else:
                tp, pp = _flag_value(argv, "--tp"), _flag_value(argv, "--pp")
                _check_checkpoint_layout(argv, tp, pp)  # before any process starts
                world = tp * pp
            if world > 1:
                return _relaunch(world, [name, *argv], lambda: importlib.import_module(module))
        return getattr(importlib.import_module(module), func)(argv)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"megarlhf {name}: {e}", file=sys.stderr)
        return 2


def _check_checkpoint_layout(argv: List[str], tp: int, pp: int) -> None:
    from megarlhf.config import ParallelConfig, check_layout
    from megarlhf.models.checkpoint import read_meta

    ckpt = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--ckpt"), None)
    if ckpt is not None:
        check_layout(read_meta(ckpt).model, ParallelConfig(tensor_model_parallel_size=tp,
                                                           pipeline_model_parallel_size=pp),
                     tp * pp, prefix="--tp/--pp")


def _check_platform(command: str, cfg) -> int:
    """Whether every model the job builds can run here (Transformer Engine, FP8, compiled
    kernels: :func:`megarlhf.platform.job_problems`), before any process starts: 0, or the
    exit code after naming each problem's key."""
    if not hasattr(cfg, "resolved_models"):
        return 0
    from megarlhf import platform
    from megarlhf.config import ConfigError
    from megarlhf.models.checkpoint import CheckpointError

    try:
        problems = platform.job_problems(cfg)
    except CheckpointError as e:  # a starting checkpoint that is not there
        print(f"megarlhf {command}: {e}", file=sys.stderr)
        return 1
    if problems:
        print(f"megarlhf {command}: {ConfigError(problems)}", file=sys.stderr)
        return 2
    return 0


def _flag_value(argv: List[str], flag: str) -> int:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith(flag + "="):
            return int(a.split("=", 1)[1])
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FLAG_COMMANDS:
        return _flag_command(argv[0], argv[1:])
    ap = argparse.ArgumentParser(prog="megarlhf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in FLAG_COMMANDS.items():
        sub.add_parser(name, help=help_text + " (see `megarlhf %s --help`)" % name)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML config file")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)

    from megarlhf.config import ConfigError, ConfigLoadError, load_config, to_yaml

    schema, entry = COMMANDS[args.command][0]()
    try:
        cfg = load_config(schema, args.config, args.overrides)
        if hasattr(cfg, "validate"):
            cfg.validate()  # before any process or process group exists
    except (ConfigLoadError, ConfigError) as e:
        print(f"megarlhf {args.command}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    code = _check_platform(args.command, cfg)  # the kernels each model asks for, on this machine
    if code:
        return code
    world = cfg.world_size() if hasattr(cfg, "world_size") else 1
    if world > 1 and not _in_distributed_env():
        return _relaunch(world, argv, COMMANDS[args.command][0])
    from megarlhf.data.chat import ChatTemplateError
    from megarlhf.data.load import DataError
    from megarlhf.data.tokenizer import TokenizerError
    from megarlhf.models.checkpoint import CheckpointError
    from megarlhf.train.guard import TrainingHalted

    try:
        entry(cfg)
    except (ConfigLoadError, ConfigError, ChatTemplateError, TokenizerError) as e:
        print(f"megarlhf {args.command}: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, TrainingHalted) as e:  # a message, not a traceback
        print(f"megarlhf {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
