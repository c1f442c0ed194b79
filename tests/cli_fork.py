"""``megarlhf ARGS`` (and ``python -m megarlhf.launch``, tools, the converters) for tests,
in a process forked from a server that has imported the commands once
(:mod:`megarlhf.forked`): the suite runs about 150 commands, each of which would spend
3-4 s importing torch, megatron-core and datasets in a fresh interpreter. Tests that
signal or kill a command, or that test the console script itself, start real
``python -m megarlhf.cli`` processes instead."""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Dict, List

from megarlhf import forked


def run_cli(argv: List[str], env: Dict[str, str], cwd: str, timeout: float = 600,
            entry: str = "-m megarlhf.cli") -> subprocess.CompletedProcess:
    """``python ENTRY *argv`` (by default ``megarlhf *argv``) with ``env`` in ``cwd``: a
    CompletedProcess (returncode, stdout, stderr); raises ``subprocess.TimeoutExpired`` after
    ``timeout`` seconds (the command's process group is killed first)."""
    command = (["-m", entry[3:]] if entry.startswith("-m ") else [entry]) + [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="megarlhf-cli-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        code = forked.run(command, env, cwd, out_path, err_path, timeout)
        with open(out_path) as f_out, open(err_path) as f_err:
            return subprocess.CompletedProcess(command, code, f_out.read(), f_err.read())
