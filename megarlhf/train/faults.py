"""Fault injection for reliability drills: make a real run fail at a chosen point.

    MEGARLHF_FAULTS="kill@train_step=3:rank=1"      SIGKILL rank 1 in its 3rd optimizer step
    MEGARLHF_FAULTS="nan_grad@train_step=2-6"       NaN gradients in steps 2..6 (every rank)
    MEGARLHF_FAULTS="kill@save=2"                   SIGKILL during the 2nd checkpoint write

Entries are separated by commas: ``ACTION@POINT=N[-M][:rank=R]``. Points are counted per
process from 1:

* ``train_step`` -- an optimizer step of any model, after the backward pass and before
  the update (PPO counts every actor and critic minibatch);
* ``save`` -- a training checkpoint, after its files and manifest are written and before
  the folder is renamed into place and ``latest`` moves.

Actions: ``kill`` (SIGKILL this process: no handler, no cleanup), ``hang`` (SIGSTOP this
process: alive but silent, so its peers wait until the collective timeout), ``nan_grad`` and
``inf_grad`` (overwrite this rank's gradients; the non-finite guard must skip the step),
``nan_loss`` (the step's reported losses become NaN: the guard skips the step).
Unset, nothing happens and nothing is checked beyond one dictionary lookup.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import Dict, List, Optional

__all__ = ["ENV", "Fault", "parse", "at", "reset"]

ENV = "MEGARLHF_FAULTS"
_ACTIONS = {"train_step": ("kill", "hang", "nan_grad", "inf_grad", "nan_loss"), "save": ("kill",)}
_ENTRY = re.compile(r"^(\w+)@(\w+)=(\d+)(?:-(\d+))?(?::rank=(\d+))?$")


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    first: int
    last: int
    rank: Optional[int] = None


def parse(spec: str) -> List[Fault]:
    """``ACTION@POINT=N[-M][:rank=R],...`` -> faults; ValueError naming the bad entry."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(f"{ENV}: {entry!r} is not ACTION@POINT=N[-M][:rank=R]")
        action, point, first, last, rank = m.groups()
        if point not in _ACTIONS or action not in _ACTIONS[point]:
            known = "; ".join(f"{p}: {', '.join(a)}" for p, a in _ACTIONS.items())
            raise ValueError(f"{ENV}: {entry!r}: unknown action or point (known: {known})")
        out.append(Fault(action, point, int(first), int(last or first),
                         None if rank is None else int(rank)))
    return out


_faults: Optional[List[Fault]] = None
_counts: Dict[str, int] = {}


def reset() -> None:
    """Forget the parsed faults and the counts (tests)."""
    global _faults
    _faults = None
    _counts.clear()


def at(point: str) -> List[str]:
    """Count one passage through ``point``; carry out a ``kill`` due here and return the
    other actions due here (the caller applies them)."""
    global _faults
    if _faults is None:
        _faults = parse(os.environ.get(ENV, ""))
    if not _faults:
        return []
    n = _counts[point] = _counts.get(point, 0) + 1
    rank = int(os.environ.get("RANK", "0"))
    due = [f.action for f in _faults if f.point == point and f.first <= n <= f.last
           and f.rank in (None, rank)]
    if "kill" in due:
        print(f"megarlhf: injected fault: SIGKILL at {point} {n} on rank {rank}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if "hang" in due:
        print(f"megarlhf: injected fault: SIGSTOP at {point} {n} on rank {rank}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return [a for a in due if a not in ("kill", "hang")]
