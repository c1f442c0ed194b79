"""megarlhf.import_hook: on a machine without a GPU, megatron-core's import skips
TorchDynamo/Inductor and wandb; with a GPU nothing changes. Each case runs in a fresh
interpreter (the hook acts on the first megatron import of a process)."""

import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import sys
{prelude}
import megarlhf
import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.jit as jit
import torch
print(sorted(k for k, v in megarlhf.import_hook.trimmed().items() if v))
print("dynamo" if "torch._dynamo" in sys.modules else "no-dynamo")
print("fuser=" + jit.jit_fuser.__name__)
print("wandb-loaded" if "wandb" in sys.modules else "no-wandb")
import wandb  # importable again for metrics logging
print(wandb.__name__)
"""


def _probe(prelude: str = "") -> list:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE.format(prelude=prelude)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("\n")[:5]


def test_cpu_import_skips_compiler_and_wandb_but_wandb_still_imports():
    assert _probe() == ["['jit_fuser', 'wandb']", "no-dynamo", "fuser=noop_decorator",
                        "no-wandb", "wandb"]


def test_gpu_import_is_untouched():
    gpu = "import megarlhf.platform as p\np.has_gpu = lambda: True"
    trims, dynamo, fuser, _, wandb = _probe(gpu)
    assert (trims, dynamo, fuser, wandb) == ("[]", "dynamo", "fuser=compile", "wandb")


def test_light_package_import_loads_no_torch():
    code = "import sys, megarlhf; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
