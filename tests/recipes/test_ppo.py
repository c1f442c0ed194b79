"""`megarlhf ppo`: placements with roles on different layouts give the same numbers, the
first minibatch's ratio is exactly 1, a resumed run continues identically, and the
result exports to Hugging Face and generates."""

import json
import os

import pytest
import torch

from tests.conftest import run_tool
from tests.recipes.test_pairwise import cli
from tests.test_cli import cli as cli_result


def ppo_args(sft_like, mg_reward, out, *extra):
    ckpt, files = sft_like
    return ["ppo", f"actor.init_from={ckpt}", f"critic.init_from={mg_reward}",
            f"reward.init_from={mg_reward}", f"data.sources=[{{path: {files['prompts']}}}]",
            "data.max_prompt_length=96", "data.max_length=96",
            "rollout.prompts_per_step=8", "rollout.max_new_tokens=8", "rollout.temperature=0.7",
            "ppo.minibatch_size=4", "ppo.ppo_epochs=2", "train.micro_batch_size=2",
            "train.actor_lr=1e-3", "train.critic_lr=1e-3", "train.schedule.warmup_steps=1",
            f"train.out_dir={out}", "train.max_steps=3", "train.resume=auto",
            "eval.prompts=null", "log.progress_bar=false", *extra]


def step_metrics(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r for r in rows if "score_mean" in r]


COMPARED = ["score_mean", "kl", "policy_loss", "value_loss", "entropy", "approx_kl",
            "explained_variance", "response_length", "eos_rate", "ratio_mean"]

# Actor, reference and critic at TP=2 on two ranks in both runs; the reward model at TP=1:
# with the others (DP=2) when colocated, alone on a third rank when partitioned.
POLICY_TP2 = ["actor.parallel.tensor_model_parallel_size=2",
              "reference.parallel.tensor_model_parallel_size=2",
              "critic.parallel.tensor_model_parallel_size=2"]


@pytest.fixture(scope="module")
def colocated(sft_like, mg_reward, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_colocated")
    cli(*ppo_args(sft_like, mg_reward, out, "world=2", *POLICY_TP2))
    return out


def test_partitioned_matches_colocated(colocated, sft_like, mg_reward, tmp_path):
    cli(*ppo_args(sft_like, mg_reward, tmp_path, "world=3", "placement=partitioned",
                  "reward_ranks=1", *POLICY_TP2))
    a, b = step_metrics(colocated), step_metrics(tmp_path)
    assert len(a) == len(b) == 3
    assert len({round(r["policy_loss"], 8) for r in a}) > 1  # the policy really moves
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert abs(ra[k] - rb[k]) < 1e-5, (k, ra[k], rb[k])
    # the reward model scored while the actor generated (rollout.score_chunks=4 by default)
    assert all(0 < r["reward_busy_fraction"] < 1 for r in b) and "reward_busy_fraction" not in a[0]


def test_first_minibatch_ratio_is_exactly_one(colocated):
    for r in step_metrics(colocated):
        assert r["first_minibatch_ratio_dev"] == 0.0
        # later minibatches and the second PPO epoch do move the ratio
    assert any(abs(r["ratio_mean"] - 1.0) > 1e-6 for r in step_metrics(colocated))


def test_resume_continues_identically(sft_like, mg_reward, tmp_path):
    """DP=2 for every role: the actor's and critic's optimizers are distributed (sharded)
    and both go into one checkpoint."""
    full, part = tmp_path / "full", tmp_path / "part"
    cli(*ppo_args(sft_like, mg_reward, full, "train.max_steps=4", "world=2"))
    cli(*ppo_args(sft_like, mg_reward, part, "train.max_steps=2", "world=2"))
    out = cli(*ppo_args(sft_like, mg_reward, part, "train.max_steps=4", "world=2"))
    assert "resumed from" in out and "at step 2" in out
    a, b = step_metrics(full), step_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in COMPARED + ["kl_coef"]:
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    wa, wb = final_weights(full / "final", tmp_path / "a.pt"), final_weights(part / "final", tmp_path / "b.pt")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        if torch.is_tensor(wa[k]):
            assert torch.equal(wa[k], wb[k]), k


def test_exact_match_score_needs_no_reward_model(sft_like, mg_reward, tmp_path):
    """score=exact_match: the task's checker scores (1 right, 0 wrong), no reward model is
    built, and the score is the step's sampled accuracy."""
    args = [a for a in ppo_args(sft_like, mg_reward, tmp_path, "score=exact_match", "train.max_steps=2")
            if not a.startswith("reward.init_from=")]
    out = cli(*args)
    assert "reward:" not in out  # the role's "reward: <model> on ranks ..." line
    rows = step_metrics(tmp_path)
    assert len(rows) == 2
    for r in rows:
        assert r["score_mean"] == pytest.approx(r["train_accuracy"], abs=1e-6)


def test_exact_match_score_refuses_prompts_without_references(sft_like, mg_reward, tmp_path):
    rows = tmp_path / "no_refs.jsonl"
    rows.write_text("".join(f'{{"prompt": "Ava has {n} pens. How many pens does Ava have now?"}}\n'
                            for n in range(8)))
    args = [a if not a.startswith("data.sources=") else f"data.sources=[{{path: {rows}}}]"
            for a in ppo_args(sft_like, mg_reward, tmp_path / "out", "score=exact_match")]
    res = cli_result(*args, timeout=600)
    assert res.returncode == 1
    assert "8 of 8 prompt rows" in res.stderr and "no_refs.jsonl" in res.stderr and "reference" in res.stderr


def final_weights(ckpt_dir, tmp_file):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir), str(tmp_file))
    return torch.load(tmp_file, weights_only=False)


def test_export_to_transformers_generates(colocated, tmp_path):
    pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    res = run_tool("tools/convert_megatron_to_hf.py", "--ckpt", colocated / "final", "--out", hf)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf)
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("overrides,message", [
    (["placement=partitioned", "world=2"], "reward_ranks"),
    (["placement=partitioned", "world=3", "reward_ranks=1", "reward.parallel.tensor_model_parallel_size=2"],
     "reward.parallel"),
    (["world=2", "actor.parallel.tensor_model_parallel_size=2", "rollout.prompts_per_step=10",
      "ppo.minibatch_size=5"], "data-parallel replicas"),
    (["ppo.kl_estimator=k2"], "ppo.kl_estimator"),
    (["ppo.old_logprobs=cached"], "ppo.old_logprobs"),
    (["ppo.old_logprobs=rollout", "rollout.top_p=0.9"], "old_logprobs=recompute"),
    (["ppo.score_baseline=mean"], "ppo.score_baseline"),
    (["ppo.score_baseline=loo"], "samples_per_prompt >= 2"),
    (["score=judge"], "score='judge'"),
    (["score=exact_match", "placement=partitioned", "world=3", "reward_ranks=1"], "placement=colocated"),
    (["rollout.prompts_per_step=12", "ppo.minibatch_size=8"], "must divide"),
    (["critic.model.recompute_granularity=always"], "critic.model.recompute_granularity"),
    (["reward.model.fp8=hybrid", "reward.model.transformer_impl=local"], "reward.model.fp8"),
    (["algo=ppo2"], "algo='ppo2'"),
    (["ppo.advantage=gea"], "ppo.advantage='gea'"),
    (["ppo.policy_loss=clip"], "ppo.policy_loss='clip'"),
    (["ppo.loss_aggregation=mean"], "ppo.loss_aggregation='mean'"),
    (["algo=grpo"], "samples_per_prompt >= 2"),
    (["algo=rloo", "rollout.samples_per_prompt=2", "ppo.critic_warmup_steps=3"], "has no critic"),
    (["ppo.policy_loss=dual_clip", "ppo.dual_clip=0.5"], "ppo.dual_clip=0.5 must be > 1"),
])
def test_config_errors_name_the_fields(overrides, message):
    from megarlhf.config import ConfigError, load_config
    from megarlhf.recipes.ppo import PPOConfig

    cfg = load_config(PPOConfig, None, ["data.sources=[{path: p.jsonl}]", *overrides])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg.validate()


def test_spans_of_the_placements():
    from megarlhf.recipes.ppo import PPOConfig

    assert PPOConfig(world=4).spans() == {r: (0, 4) for r in ("actor", "reference", "critic", "reward")}
    spans = PPOConfig(world=4, placement="partitioned", reward_ranks=1).spans()
    assert spans["reward"] == (3, 1) and spans["actor"] == spans["critic"] == spans["reference"] == (0, 3)


def test_packed_rows_match_padded_at_tp2_and_pp2(colocated, sft_like, mg_reward, tmp_path):
    """train.packing with the actor and critic in two pipeline stages and the reference at
    TP=2 (SDPA attention on packed rows) against the padded colocated run: the same steps."""
    cli(*ppo_args(sft_like, mg_reward, tmp_path, "world=2", "train.packing=true",
                  "actor.parallel.pipeline_model_parallel_size=2", "critic.parallel.pipeline_model_parallel_size=2",
                  "reference.parallel.tensor_model_parallel_size=2"))
    a, b = step_metrics(colocated), step_metrics(tmp_path)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert abs(ra[k] - rb[k]) < 1e-4, (k, ra[k], rb[k])
        # under pipeline stages a packed pass keeps the length of its longest microbatch
        assert rb["padding/update"] < ra["padding/update"], (ra["padding/update"], rb["padding/update"])
