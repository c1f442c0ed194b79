"""train.packing is checked before any process starts: megatron's unfused local attention,
which takes no packed sequences, is refused by key; ``auto`` attention resolves to SDPA;
Transformer Engine layers take them as they are."""

import dataclasses

import pytest

from megarlhf.config import ConfigError
from megarlhf.config.load import load_config
from megarlhf.recipes.dpo import DPOConfig
from megarlhf.recipes.ppo import PPOConfig
from megarlhf.recipes.reward_model import RMConfig


@pytest.mark.parametrize("recipe", [RMConfig, DPOConfig])
def test_pairwise_packing_refuses_unfused_local_attention_by_key(recipe):
    cfg = load_config(recipe, None, ["train.packing=true", "model.attention_backend=unfused",
                                     "data.sources=[{path: x.jsonl}]"])
    with pytest.raises(ConfigError, match=r"train.packing=true needs model.attention_backend=sdpa"):
        cfg.validate()
    for ok in ([], ["model.transformer_impl=transformer_engine"], ["model.attention_backend=sdpa"]):
        load_config(recipe, None, ["train.packing=true", "data.sources=[{path: x.jsonl}]", *ok]).validate()


def test_ppo_packing_names_the_role(sft_like, mg_reward, tmp_path):
    from tests.recipes.test_ppo import ppo_args

    args = ppo_args(sft_like, mg_reward, tmp_path, "train.packing=true", "critic.model.attention_backend=unfused")
    with pytest.raises(ConfigError, match=r"critic.model.attention_backend=sdpa"):
        load_config(PPOConfig, None, args[1:]).validate()
    cfg = load_config(PPOConfig, None, ppo_args(sft_like, mg_reward, tmp_path, "train.packing=true")[1:])
    cfg.validate()
    assert {m.attention_backend for m in cfg.resolved_models().values()} == {"sdpa"}
    from megarlhf.models.llama import packed_model

    te = dataclasses.replace(next(iter(cfg.resolved_models().values())), transformer_impl="transformer_engine",
                             attention_backend="fused")
    assert packed_model(te, True) == te
