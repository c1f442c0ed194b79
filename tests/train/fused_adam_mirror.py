"""A CPU stand-in for Transformer Engine's ``FusedAdam``, for checkpoint tests.

Mirrors ``transformer_engine/pytorch/optimizers/fused_adam.py`` (``FusedAdam.step``,
``state_dict``, ``load_state_dict``, ``get_unscaled_state``, ``set_scaled_state``) in the
behaviour that matters to checkpoints:

* Adam's step counter lives in each param group (``group["step"]``, advanced before empty
  groups are skipped), never in a parameter's state;
* ``state_dict()`` maps every per-parameter state key through ``name_to_dtype_map``
  (``exp_avg``, ``exp_avg_sq``, ``master_param``): any other key, a torch-style ``step``
  say, raises ``KeyError``; ``load_state_dict()`` does the same for every key it loads.

The arithmetic is plain AdamW (decoupled weight decay with ``adam_w_mode``), as
``multi_tensor_adam`` computes it. :func:`install` makes megatron-core pick it as it picks
TE's optimizer when TE imports (``megatron/core/optimizer/__init__.py``: ``Adam`` and
``USING_PYTORCH_OPTIMIZER``; ``megatron/core/optimizer/distrib_optimizer.py``: ``Adam``,
``HAVE_APEX_OR_TE``, ``USING_TE_OPTIMIZER``).
"""

from copy import deepcopy
from itertools import chain

import torch


class FusedAdamMirror(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, **_unused):
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                                  "master_param": torch.float32}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group["step"] + 1 if "step" in group else 1
            if not group["params"]:
                continue
            beta1, beta2 = group["betas"]
            t = group["step"]
            c1 = 1 - beta1 ** t if group["bias_correction"] else 1.0
            c2 = 1 - beta2 ** t if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                g = p.grad
                if not self.adam_w_mode and group["weight_decay"]:
                    g = g + group["weight_decay"] * p
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (state["exp_avg"] / c1) / ((state["exp_avg_sq"] / c2).sqrt() + group["eps"])
                if self.adam_w_mode and group["weight_decay"]:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])

    def get_unscaled_state(self, param, state_name):
        dtype = self.name_to_dtype_map[state_name]  # KeyError for any other key, as upstream
        return self.state[param][state_name].to(dtype)

    def set_scaled_state(self, param, state_name, value):
        dtype = self.name_to_dtype_map[state_name]
        self.state[param][state_name] = value.detach().to(dtype).clone()

    def state_dict(self):
        state_dict = super().state_dict()
        saved = deepcopy(state_dict["param_groups"])
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for k, v in state_dict["state"].items():
            if k in id_map:
                state_dict["state"][k] = {name: self.get_unscaled_state(id_map[k], name) for name in v}
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = deepcopy(state_dict["param_groups"])
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                self.state[param] = {}
                for name, value in v.items():
                    if value is not None:
                        self.set_scaled_state(param, name, value.float())


def install() -> None:
    """Make megatron-core build :class:`FusedAdamMirror` where it would build TE's FusedAdam."""
    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import distrib_optimizer as dopt

    mopt.Adam = FusedAdamMirror
    mopt.USING_PYTORCH_OPTIMIZER = False
    dopt.Adam = FusedAdamMirror
    dopt.HAVE_APEX_OR_TE = True
    dopt.USING_TE_OPTIMIZER = True
    dopt.USING_APEX_OPTIMIZER = False
