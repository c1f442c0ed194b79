"""`ppo_step` called in-process on tiny models (one process, gloo): the first minibatch's
ratio is exactly 1, masked positions change nothing, the training log-probs are the
sampler's (a model whose embedding is larger than its tokenizer), and every registered
algorithm runs a step with the roles it needs. Placements and resume, which need
several processes, are tested through the CLI in test_ppo.py."""

import dataclasses

import pytest
import torch

from megarlhf.config.load import load_config
from megarlhf.recipes.ppo import (PPOConfig, _actor_step, microbatches, old_outputs, ppo_step,
                                  prepare, score, targets, generate)
from megarlhf.rollout.batch import PER_TOKEN
from megarlhf.train.metrics import LogConfig, MetricsLog
from tests.conftest import one_rank
from tests.recipes.test_ppo import ppo_args


@pytest.fixture(scope="module")
def world1():
    with one_rank(seed=1234):
        yield


def job_of(sft_like, mg_reward, tmp_path, *extra):
    args = ppo_args(sft_like, mg_reward, tmp_path, *extra)[1:]
    cfg = load_config(PPOConfig, None, args)
    cfg.validate()
    return prepare(cfg, MetricsLog(None, LogConfig(progress_bar=False)))


def first_batch(job):
    return job.batch(next(job.sampler.batches(0)))


def test_first_minibatch_ratio_is_exactly_one_and_the_policy_moves(world1, sft_like, mg_reward, tmp_path):
    job = job_of(sft_like, mg_reward, tmp_path)
    metrics = [ppo_step(first_batch(job), job.roles, job.ctx, job.state) for _ in range(2)]
    assert job.state.step == 2 and job.state.consumed == 16
    for m in metrics:
        assert m.first_minibatch_ratio_dev == 0.0
        assert m.value_loss is not None and m.explained_variance is not None
    assert abs(metrics[1].ratio_mean - 1.0) > 1e-6  # later minibatches see updated weights


def test_training_logprobs_are_the_samplers(world1, sft_like, mg_reward, tmp_path):
    """The tokenizer (340 pieces) is smaller than the model's vocabulary: the sampler never
    picks the extra ids, and the training forward normalises over the same ids, so the
    recomputed log-probs equal the engine's up to float error."""
    job = job_of(sft_like, mg_reward, tmp_path)
    assert job.ctx.vocab_limit < job.roles.actor.model.vocab_size
    m = ppo_step(first_batch(job), job.roles, job.ctx, job.state)
    assert m.rollout_logprob_diff_max < 1e-4, m
    assert m.rollout_ratio_outside == 0.0


def test_masked_positions_change_nothing(world1, sft_like, mg_reward, tmp_path):
    """Garbage off the response mask in every per-token input of the policy loss leaves
    the loss, its count and its statistics unchanged."""
    job = job_of(sft_like, mg_reward, tmp_path)
    roles, ctx = job.roles, job.ctx
    batch = first_batch(job)
    ro = generate(batch, roles.actor, ctx, 0)
    old = old_outputs(ro, roles, ctx)
    tg = targets(ro, score(ro, batch, roles.reward, ctx), old, ctx, 0.05)
    clean = {"old_logprobs": old.old_logprobs, "ref_logprobs": old.ref_logprobs, "advantages": tg.advantages,
             "loss_weights": tg.loss_weights, "loss_counts": tg.loss_counts}
    g = torch.Generator().manual_seed(0)
    off = 1 - ro.mask
    dirty = {k: (v + 100 * torch.randn(v.shape, generator=g) * off if v.dim() == 2 else v) for k, v in clean.items()}
    assert set(dirty) - {"loss_counts"} <= set(PER_TOKEN)
    ctx = dataclasses.replace(ctx, algo=dataclasses.replace(ctx.algo, kl_coef=0.1))
    outs = []
    for extra in (clean, dirty):
        step = _actor_step(roles.actor, job.ctx.algo, job.ctx.cfg.ppo, 0.1, 0.7, ctx.vocab_limit, ctx.device)
        mb = microbatches(ro, range(0, 2), 2, extra)
        output, loss_fn = step(iter(mb), roles.actor.chunks[0])
        loss, count, st = loss_fn(output)
        outs.append((float(loss.detach()), int(count), st["stats"]))
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    assert torch.equal(outs[0][2], outs[1][2])


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_each_algorithm_runs_a_step_without_a_critic(world1, sft_like, mg_reward, tmp_path, algo):
    job = job_of(sft_like, mg_reward, tmp_path, f"algo={algo}", "rollout.prompts_per_step=4",
                 "rollout.samples_per_prompt=2", "critic.init_from=''")
    assert job.roles.critic is None and [r.name for r in job.roles.trained()] == ["actor"]
    m = ppo_step(first_batch(job), job.roles, job.ctx, job.state)
    assert m.first_minibatch_ratio_dev == 0.0
    assert m.value_loss is None and m.explained_variance is None
    assert (m.kl_loss is not None) == (algo in ("grpo", "dr_grpo"))
    assert m.policy_loss == m.policy_loss  # finite, not NaN


def test_packed_rows_give_the_padded_outputs_losses_and_gradients(world1, sft_like, mg_reward, tmp_path):
    """train.packing: every role's per-token outputs over the rollout rows (reference and
    old log-probs, values, reward scores) and the policy's loss, statistics and gradients
    are those of the padded rows."""
    from megarlhf.recipes.ppo import _logprob_step, _value_step

    job = job_of(sft_like, mg_reward, tmp_path, "train.packing=true")
    roles, ctx = job.roles, job.ctx
    assert all(r.packing for r in roles.all()) and roles.actor.model.attention_backend == "sdpa"
    batch = first_batch(job)
    ro = generate(batch, roles.actor, ctx, 0)
    real = torch.arange(ro.seq)[None] <= ro.last_index[:, None]
    assert (~real).any()  # some rows are padded
    for role, step in ((roles.reference, _logprob_step(roles.reference, 0.7, ctx.vocab_limit, ctx.device)),
                       (roles.critic, _value_step(ctx.device)), (roles.reward, _value_step(ctx.device))):
        got = {}
        for packing in (False, True):
            role.packing = packing
            got[packing] = role.per_token(step, ro, [role.rows(ro.n)], 4, ctx.device)
        assert torch.allclose(got[False][real], got[True][real], atol=2e-5), role.name
        assert not got[True][~real].any()
    old = old_outputs(ro, roles, ctx)
    tg = targets(ro, score(ro, batch, roles.reward, ctx), old, ctx, 0.05)
    extra = {"old_logprobs": old.old_logprobs, "ref_logprobs": old.ref_logprobs, "advantages": tg.advantages,
             "loss_weights": tg.loss_weights, "loss_counts": tg.loss_counts}
    actor, res = roles.actor, {}
    # megatron fell back to torch's Adam here (no TE/apex): its fused kernel is on
    from megarlhf.train.optim import fuse_torch_adam

    opt = actor.trainer.optimizer
    groups = [g for o in getattr(opt, "chained_optimizers", [opt]) for g in o.optimizer.param_groups]
    assert groups and all(g["fused"] for g in groups) and fuse_torch_adam(opt) == 0
    for packing in (False, True):
        actor.packing = packing
        micro, _, size = actor.microbatches(ro, [range(0, 4)], 2, extra)
        assert size == (1 if packing else 2) and len(micro) == 2
        for c in actor.trainer.ddp:
            c.zero_grad_buffer()
        stats = []
        for mb in micro:
            step = _actor_step(actor, ctx.algo, ctx.cfg.ppo, 0.1, 0.7, ctx.vocab_limit, ctx.device)
            output, loss_fn = step(iter([mb]), actor.trainer.ddp[0])
            loss, count, st = loss_fn(output)
            loss.backward()
            stats.append(st["stats"])
        grad = torch.cat([p.main_grad.flatten().clone() for p in actor.trainer.ddp[0].parameters()])
        res[packing] = (torch.stack(stats), grad)
    assert torch.allclose(res[False][0], res[True][0], rtol=1e-5, atol=1e-5)
    assert res[False][1].abs().max() > 0
    assert (res[False][1] - res[True][1]).abs().max() < 1e-5 * max(1.0, res[False][1].abs().max().item())
