"""Training checkpoints: model, optimizer, LR schedule, RNG states, data position and step,
in one megatron distributed checkpoint.

Layout under ``out_dir/checkpoints/``::

    step_0000100/      a complete checkpoint (megatron torch_dist files + megarlhf.json)
    step_0000200/
    latest             the name of the newest complete checkpoint (updated last)

A checkpoint is written to ``step_N.tmp`` and renamed when every rank has finished, then
``latest`` is replaced, then checkpoints beyond the last ``keep`` are deleted; a job killed
at any moment leaves either the previous or the new checkpoint complete, never a torn one.

Resharding: model weights load at any TP x PP. Optimizer state: the plain optimizer
(DP=1 or no distributed optimizer) and the distributed optimizer resume exactly at the
layout they were saved with (the distributed optimizer uses megatron's ``dp_reshardable``
format: DP size must match); RNG states are restored when the world size matches.
Loading an optimizer at another layout is refused with a message; load the weights only
(``init_from``) to change the layout.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megarlhf import platform
from megarlhf.models.checkpoint import (EXTRA_STATE, CheckpointError, CheckpointMeta, is_checkpoint,
                                        load_sharded, model_sharded_state_dict,
                                        synchronous_writer_queue, write_meta)
from megarlhf.models.integrity import check_metadata, verify_checkpoint, write_manifest
from megarlhf.train import faults

__all__ = ["save_train_state", "load_train_state", "save_roles_state", "load_roles_state",
           "find_checkpoint", "checkpoint_root", "LATEST", "TrainState"]

LATEST = "latest"
_DIST_OPT = {"distrib_optim_sharding_type": "dp_reshardable"}

TrainState = Dict[str, Any]
Role = Tuple[Sequence[torch.nn.Module], Any, Any]  # model chunks, optimizer, LR scheduler


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _uses_dist_opt(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "device": platform.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    platform.set_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _inner_optimizers(optimizer) -> List[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _keeps_step_per_parameter(optimizer) -> bool:
    """Whether the optimizer doing the arithmetic under megatron's wrapper is torch's
    Adam/AdamW, which keeps Adam's ``step`` in every parameter's state. Transformer
    Engine's and NVIDIA apex's ``FusedAdam`` (what megatron-core builds whenever either
    imports) keep it in the param group, and their ``state_dict`` refuses any other
    per-parameter key."""
    return isinstance(optimizer.optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _role_state(chunks, optimizer, is_loading: bool, prefix: str) -> Dict[str, Any]:
    model = model_sharded_state_dict(chunks, prefix=prefix)
    md = _DIST_OPT if _uses_dist_opt(optimizer) else None
    with torch.no_grad():
        if md is not None or not is_loading:
            # The distributed optimizer builds its load state dict from existing Adam
            # states (and, with torch's Adam, asserts one common per-parameter step); and a
            # checkpoint saved before any update was applied (all skipped as non-finite)
            # must hold them too, or it cannot be loaded. Zero moments at step 0 are what
            # Adam starts from anyway.
            for inner in _inner_optimizers(optimizer):
                inner.init_state_fn(inner.optimizer, inner.config)
                if not _keeps_step_per_parameter(inner):
                    continue  # FusedAdam: the step is the param group's, set by its first update
                for group in inner.optimizer.param_groups:
                    for p in group["params"]:
                        inner.optimizer.state[p].setdefault("step", torch.tensor(0.0))
        opt = optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=md)
    return {**model, "optimizer": opt}


def _prefix_optimizer_keys(opt_state: Any, prefix: str) -> None:
    """Prefix the keys of an optimizer's checkpoint entries with the role's name: the
    distributed optimizer names its shards ``optimizer.distributed...`` whatever the model,
    so two trainable models in one checkpoint would collide."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def rename(x):
        if isinstance(x, ShardedBase) and not x.key.startswith(prefix):
            x.key = prefix + x.key
        return x

    dict_list_map_inplace(rename, opt_state)


def _state(roles: Dict[str, Role], rng: Any, is_loading: bool) -> Dict[str, Any]:
    """One sharded state dict for every trainable model: a single model keeps the plain
    layout (``model``, ``optimizer``); several are nested under their names, with their
    tensors' keys prefixed by the name."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    out: Dict[str, Any] = {}
    for name, (chunks, optimizer, _) in roles.items():
        if name:
            out[name] = _role_state(chunks, optimizer, is_loading, f"{name}.")
            _prefix_optimizer_keys(out[name]["optimizer"], f"{name}.")
        else:
            out.update(_role_state(chunks, optimizer, is_loading, ""))
    out["rng"] = ShardedObject("rng_state", rng, (world,), (_rank(),), replica_id=0)
    return out


def save_train_state(out_dir: str, step: int, chunks: Sequence[torch.nn.Module], optimizer,
                     scheduler, train: Dict[str, Any], meta: CheckpointMeta, keep: int = 2) -> str:
    """Collective. ``train`` holds the loop's position (e.g. consumed samples); returns the
    checkpoint folder."""
    return save_roles_state(out_dir, step, {"": (chunks, optimizer, scheduler)}, train, meta, keep)


def save_roles_state(out_dir: str, step: int, roles: Dict[str, Role], train: Dict[str, Any],
                     meta: CheckpointMeta, keep: int = 2) -> str:
    """:func:`save_train_state` for several trainable models (PPO's actor and critic), each
    with its optimizer and scheduler, in one checkpoint. Collective over the whole job."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(out_dir)
    name = f"step_{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = _state(roles, _rng_state(), is_loading=False)
    world = dist.get_world_size() if dist.is_initialized() else 1
    state["train"] = {"step": step, "world_size": world, "layout": _layout_key(roles), **train,
                      **_schedulers(roles)}
    synchronous_writer_queue()
    dist_checkpointing.save(state, tmp)
    _barrier()
    if _rank() == 0:
        write_meta(tmp, meta)
    _barrier()
    write_manifest(tmp)  # collective: every file's size and SHA-256, before the rename
    faults.at("save")
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(root, LATEST)
        with open(pointer + ".tmp", "w") as f:
            f.write(name + "\n")
        os.replace(pointer + ".tmp", pointer)
        for old in _complete(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def _schedulers(roles: Dict[str, Role]) -> Dict[str, Any]:
    return {("scheduler" if not name else f"{name}_scheduler"): sched.state_dict()
            for name, (_, _, sched) in roles.items() if sched is not None}


def _complete(root: str) -> List[str]:
    """Complete checkpoint folder names, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp")
             and is_checkpoint(os.path.join(root, n))]
    return sorted(names)


def find_checkpoint(out_dir: str, resume: Optional[str]) -> Optional[str]:
    """``resume``: ``auto`` (the newest complete checkpoint under ``out_dir``, or none),
    a checkpoint folder, or None/``never``."""
    if resume in (None, "", "never", "none"):
        return None
    if resume != "auto":
        if not is_checkpoint(resume):
            raise CheckpointError(f"resume={resume!r} is not a complete checkpoint folder")
        return resume
    root = checkpoint_root(out_dir)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if name and is_checkpoint(os.path.join(root, name)):
            return os.path.join(root, name)
    names = _complete(root)  # the pointer is missing or stale: newest complete one
    return os.path.join(root, names[-1]) if names else None


def load_train_state(ckpt_dir: str, chunks: Sequence[torch.nn.Module], optimizer, scheduler
                     ) -> Dict[str, Any]:
    """Restore everything :func:`save_train_state` wrote; returns the ``train`` dict."""
    return load_roles_state(ckpt_dir, {"": (chunks, optimizer, scheduler)})


def load_roles_state(ckpt_dir: str, roles: Dict[str, Role]) -> Dict[str, Any]:
    """Restore everything :func:`save_roles_state` wrote; returns the ``train`` dict."""
    from megatron.core import dist_checkpointing

    from megarlhf.models.checkpoint import _bare

    try:  # collective: every file against the manifest, each rank hashing its share
        verify_checkpoint(ckpt_dir, hashes=True, collective=True)
        check_metadata(ckpt_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. {_previous_hint(ckpt_dir)}") from None
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    if "train" not in common:
        raise CheckpointError(f"{ckpt_dir} holds model weights only (no training state); "
                              "use it as init_from instead of resume")
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = common["train"].get("world_size", world)
    layout_differs = roles and common["train"].get("layout") not in (None, _layout_key(roles))
    if saved_world != world or layout_differs:
        raise CheckpointError(
            f"{ckpt_dir} was saved by {saved_world} processes with layout "
            f"{common['train'].get('layout')}; this job has {world} with {_layout_key(roles)}. "
            "Optimizer state resumes only at the same layout: start a new run with "
            "init_from pointing at this checkpoint to keep the weights.")
    state = _state(roles, None, is_loading=True)
    with torch.no_grad():
        loaded = load_sharded(state, ckpt_dir)
    for name, (chunks, optimizer, scheduler) in roles.items():
        part = loaded[name] if name else loaded
        prefix = f"{name}." if name else ""
        with torch.no_grad():  # the distributed optimizer copies into views of leaf params
            for i, chunk in enumerate(chunks):
                key = "model" if len(chunks) == 1 else f"model{i}"
                weights = {k[len(prefix):]: v for k, v in part[key].items()}
                missing, _ = _bare(chunk).load_state_dict(weights, strict=False)
                missing = [k for k in missing if not k.endswith(EXTRA_STATE)]
                if missing:
                    raise CheckpointError(f"{ckpt_dir}: {name or 'model'} weights missing: {missing[:5]}")
            if not _uses_dist_opt(optimizer) and all(map(_keeps_step_per_parameter,
                                                            _inner_optimizers(optimizer))):
                _zero_step_if_missing(part["optimizer"])
            optimizer.load_state_dict(part["optimizer"])
        _restore_adam_step(optimizer, part["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(common["train"]["scheduler" if not name else f"{name}_scheduler"])
    _set_rng_state(loaded["rng"])
    return common["train"]


def _previous_hint(ckpt_dir: str) -> str:
    """Where to resume from instead of a damaged checkpoint."""
    root, name = os.path.split(os.path.normpath(ckpt_dir))
    older = [n for n in _complete(root) if n < name]
    if not older:
        return "No earlier complete checkpoint is kept beside it: start again with train.resume=never"
    return (f"The previous checkpoint {os.path.join(root, older[-1])} can be used: "
            f"train.resume={os.path.join(root, older[-1])} (or delete the damaged folder "
            "and resume=auto picks it)")


def _layout_key(roles: Dict[str, Role]) -> str:
    parts = []
    for name, (chunks, _, _) in roles.items():
        from megarlhf.models.checkpoint import _bare

        layout = getattr(_bare(chunks[0]), "megarlhf_layout", "?")
        parts.append(f"{name + ':' if name else ''}{layout}-vpp{len(chunks)}")
    return ",".join(parts)


def _zero_step_if_missing(saved: Any) -> None:
    """megatron stores Adam's step once per optimizer (``common_step``), but only when it is
    non-zero: a checkpoint saved before any update was applied loads back without one, and
    torch's Adam refuses moments without a step. Put the zero back (torch's Adam only:
    FusedAdam's ``load_state_dict`` refuses a per-parameter ``step``)."""
    if isinstance(saved, list):
        for x in saved:
            _zero_step_if_missing(x)
        return
    if not isinstance(saved, dict):
        return
    state = saved.get("state")
    if isinstance(state, dict) and state and "common_step" not in state and all(
            isinstance(v, dict) and "step" not in v for v in state.values()):
        state["common_step"] = torch.tensor(0.0)
    for key in ("optimizer", "optimizer_state_dict"):
        _zero_step_if_missing(saved.get(key))


def _restore_adam_step(optimizer, saved) -> None:
    """The distributed optimizer's dp_reshardable load leaves torch Adam's per-parameter
    ``step`` at its initial value; restore it from the saved param groups."""
    if not _uses_dist_opt(optimizer):
        return
    inner = _inner_optimizers(optimizer)
    saved_list = saved if isinstance(saved, list) else [saved]
    for opt, sd in zip(inner, saved_list):
        groups = sd.get("optimizer", {}).get("param_groups") if isinstance(sd, dict) else None
        if not groups:
            continue
        for group, saved_group in zip(opt.optimizer.param_groups, groups):
            step = saved_group.get("step")
            if step is None:
                continue
            for p in group["params"]:
                st = opt.optimizer.state.get(p)
                if st is not None and "step" in st:
                    st["step"] = torch.as_tensor(step, dtype=st["step"].dtype) \
                        if torch.is_tensor(st["step"]) else step
