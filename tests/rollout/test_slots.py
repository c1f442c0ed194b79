"""The continuously batched engine in-process on a tiny random Llama (one rank): prefill
logits equal a full forward; samples do not depend on the slot count, the prompts beside
them, the slot a prompt lands in or how often the host looks; finished sequences stop
costing compute; a logits processor sees global prompt indices and response positions."""

import pytest
import torch

from megarlhf.config import ModelConfig
from megarlhf.rollout.engine import MegatronEngine, SamplingParams
from tests.conftest import one_rank

VOCAB = 300
EOS = 2


@pytest.fixture(scope="module")
def model():
    from megarlhf.models.llama import build_model

    with one_rank(seed=7) as mp:
        cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=128)
        chunks = build_model(cfg, mp)
        chunks[0].eval()
        yield chunks, mp


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(2, 24, (11,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


def engine(model, slots, **kw):
    chunks, mp = model
    return MegatronEngine(chunks, mp, VOCAB, max_batch=slots, **kw)


def ends_early(rate=0.15, seed=5, new=12):
    """A logits processor ending responses with EOS at random (prompt, position) cells."""
    table = torch.rand(1000, new, generator=torch.Generator().manual_seed(seed)) < rate

    def proc(logits, index, step):
        out = logits.clone()
        out[:, EOS] = torch.where(table[index, step], 1e4, -1e4)
        return out
    return proc


SAMPLE = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=3, stop_ids=[EOS], eos_id=EOS,
                        logits_processor=ends_early())


def full_forward_logits(model, seq):
    chunks, _ = model
    with torch.no_grad():
        out = chunks[0](torch.tensor([seq]), torch.arange(len(seq))[None], attention_mask=None)
    return out.float().reshape(len(seq), -1)[:, :VOCAB]  # [s, V] (one sequence, the real vocabulary)


def test_prefill_and_mixed_passes_equal_a_full_forward(model, prompts):
    """Prompts packed in one pass; then a pass of decode rows (each at its own position)
    with another prompt's prefill riding along: every logit as a full forward's."""
    from megarlhf.rollout.decoder import StepPlan

    d = engine(model, 4).decoder
    group = prompts[:4]
    lens = [len(p) for p in group]
    d.start(6, max(map(len, prompts[:5])) + 4, torch.device("cpu"))
    rows = [5, 0, 3, 1]  # any cache rows
    plan = StepPlan.build(0, 0, torch.zeros(0, dtype=torch.long), lens, rows, torch.device("cpu"))
    got = d.step(torch.tensor([t for p in group for t in p]), plan)
    for i, p in enumerate(group):
        assert (got[i, :VOCAB] - full_forward_logits(model, p)[-1]).abs().max().item() < 1e-5
    # the rows moved to the front (overlapping), then one mixed pass: a token for each of
    # the four at its own position, and prompt 4 prefilled into cache row 5
    d.move(torch.tensor(rows), torch.arange(4))
    nxt, pos = [7, 8, 9, 10], torch.tensor(lens)
    plan = StepPlan.build(4, int(pos.max()) + 1, pos, [len(prompts[4])], [5], torch.device("cpu"))
    got = d.step(torch.tensor(nxt + prompts[4]), plan)
    for i, p in enumerate(group):
        assert (got[i, :VOCAB] - full_forward_logits(model, p + [nxt[i]])[-1]).abs().max().item() < 1e-5
    assert (got[4, :VOCAB] - full_forward_logits(model, prompts[4])[-1]).abs().max().item() < 1e-5
    d.finish()


def test_logprobs_equal_the_forward_and_responses_end_early(model, prompts):
    out = engine(model, 4).generate(prompts, SAMPLE)
    lens = [len(r) for r in out.response_ids]
    assert min(lens) < 12 and max(lens) == 12 and "eos" in out.finish_reason and "length" in out.finish_reason
    for p, r, lp, why in zip(prompts, out.response_ids, out.policy_logprobs, out.finish_reason):
        assert (why == "eos") == (r[-1] == EOS) and EOS not in r[:-1]
        logits = full_forward_logits(model, p + r)[len(p) - 1:len(p) - 1 + len(r)]
        ref = torch.log_softmax(logits, -1)[torch.arange(len(r)), torch.tensor(r)]
        assert (ref - torch.tensor(lp)).abs().max().item() < 1e-5


@pytest.mark.parametrize("slots", [1, 2, 5, 64])
def test_samples_do_not_depend_on_the_slot_count(model, prompts, slots):
    ref = engine(model, 3).generate(prompts, SAMPLE)
    got = engine(model, slots).generate(prompts, SAMPLE)
    assert got.response_ids == ref.response_ids and got.finish_reason == ref.finish_reason
    flat = lambda rows: [x for r in rows for x in r]  # noqa: E731
    assert flat(got.sample_logprobs) == pytest.approx(flat(ref.sample_logprobs), abs=1e-5)


def test_samples_do_not_depend_on_the_prompts_beside_them(model, prompts):
    whole = engine(model, 4).generate(prompts, SAMPLE)
    part = engine(model, 2).generate(prompts[5:9], SAMPLE, first_index=5)
    assert part.response_ids == whole.response_ids[5:9]
    # other prompts in the batch (with their own indices) change nothing for these
    other = [p[::-1] for p in prompts[:3]]
    mixed = engine(model, 4).generate(other + prompts[5:9], SAMPLE, first_index=2)
    assert mixed.response_ids[3:] == whole.response_ids[5:9]


def test_a_prompt_in_a_refilled_slot_gets_what_it_gets_first(model, prompts):
    """Two slots for six prompts: prompt 5 enters a slot that others used; alone (same
    index) it runs first in a fresh engine."""
    e = engine(model, 2)
    queued = e.generate(prompts[:6], SAMPLE)
    assert e.last_stats["prefills"] > 1 and e.last_stats["prefill_tokens"] == sum(map(len, prompts[:6]))
    alone = engine(model, 2).generate(prompts[5:6], SAMPLE, first_index=5)
    assert alone.response_ids[0] == queued.response_ids[5]
    assert alone.policy_logprobs[0] == pytest.approx(queued.policy_logprobs[5], abs=1e-5)


def test_greedy_and_host_look_interval(model, prompts):
    greedy = SamplingParams(max_new_tokens=9, greedy=True)
    a = engine(model, 3).generate(prompts, greedy)
    b = engine(model, 3, sync_every=4).generate(prompts, SAMPLE)
    c = engine(model, 3, sync_every=1).generate(prompts, SAMPLE)
    assert b.response_ids == c.response_ids and b.finish_reason == c.finish_reason
    for p, r in zip(prompts, a.response_ids):  # greedy: each token the argmax of the forward
        logits = full_forward_logits(model, p + r)[len(p) - 1:len(p) - 1 + len(r)]
        assert logits.argmax(-1).tolist() == r


def test_finished_sequences_stop_costing_compute(model, prompts):
    e = engine(model, 4, sync_every=1)
    out = e.generate(prompts, SAMPLE)
    st = e.last_stats
    # every busy slot-step makes a response token (the first of each comes from its prefill),
    # but where a response ended at its first token, which holds its slot for one step
    tokens = sum(map(len, out.response_ids)) - len(prompts)
    assert tokens <= st["busy_slot_steps"] <= tokens + sum(len(r) == 1 for r in out.response_ids)
    # the busy slots are moved to the front once no prompt waits: few idle rows computed
    assert st["slot_steps"] - st["busy_slot_steps"] <= 2 * 4
    assert st["decode_steps"] < 12 * len(prompts) / 4 + 12


def test_length_limit_and_bad_input(model, prompts):
    out = engine(model, 4).generate(prompts[:3], SamplingParams(max_new_tokens=1, seed=1))
    assert [len(r) for r in out.response_ids] == [1, 1, 1] and out.finish_reason == ["length"] * 3
    assert engine(model, 4).generate([], SAMPLE).response_ids == []
    with pytest.raises(ValueError, match="empty prompt"):
        engine(model, 4).generate([[5], []], SAMPLE)
    with pytest.raises(ValueError, match="slots"):
        engine(model, 0)


def test_graphed_steps_equal_eager_ones(model, prompts):
    """The CUDA-graph path's logic on CPU (graphs.Replay stands in for capture/replay):
    fixed-shape steps over bucketed rows and the whole cache length, the warm-up undone."""
    from megarlhf.rollout.graphs import Replay

    eager = engine(model, 5).generate(prompts, SAMPLE)
    e = engine(model, 5, graph_backend=Replay())
    graphed = e.generate(prompts, SAMPLE)
    assert graphed.response_ids == eager.response_ids and graphed.finish_reason == eager.finish_reason
    flat = lambda rows: [x for r in rows for x in r]  # noqa: E731
    assert flat(graphed.policy_logprobs) == pytest.approx(flat(eager.policy_logprobs), abs=1e-5)
    assert 1 <= e.last_stats["graphs"] <= 4  # buckets 1, 2, 4, 5


def test_a_graphed_step_is_warmed_up_once_and_its_state_put_back():
    from megarlhf.rollout.graphs import GraphedStep, Replay, bucket_for, buckets

    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64] and buckets(5) == [1, 2, 4, 5] and buckets(1) == [1]
    assert [bucket_for(r, buckets(5)) for r in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
    counter, seen = torch.zeros(5, dtype=torch.long), []

    def step(b):
        seen.append(b)
        counter[:b] += 1

    class Counting(Replay):
        captured = 0

        def capture(self, fn):
            Counting.captured += 1
            return fn

    g = GraphedStep(step, lambda: [counter], 5, Counting())
    assert g(3) == 4 and g(4) == 4 and g(5) == 5 and g(1) == 1
    # each bucket warmed up once (undone) then replayed: the state moved once per call
    assert counter.tolist() == [4, 3, 3, 3, 1] and Counting.captured == g.captures == 3
    assert seen == [4, 4, 4, 5, 5, 1, 1]


def test_finished_prompts_are_reported_as_they_finish(model, prompts):
    """What the partitioned placement streams to the reward model: every prompt once, with
    its response, over several looks of the host (not all at the end)."""
    from megarlhf.rollout.stream import message_rows

    heard = []
    out = engine(model, 4).generate(prompts, SAMPLE, on_finished=lambda idx, resp: heard.append(list(zip(idx, resp))))
    flat = [x for batch in heard for x in batch]
    assert sorted(i for i, _ in flat) == list(range(len(prompts))) and len(heard) > 1
    assert all(out.response_ids[i] == r for i, r in flat)
    assert message_rows(10, 4) == [4, 4, 2] and message_rows(8, 4) == [4, 4] and message_rows(3, 5) == [3]


@pytest.mark.parametrize("rows", [1, 16, 64, 65, 200])
def test_few_row_products_equal_the_usual_form(rows):
    """The decoder's ``linear``: ``(W @ x^T)^T`` for few rows, ``x @ W^T`` for many; both
    are ``x @ W^T`` (to fp32 rounding), and a strided result feeds the next product."""
    from megarlhf.rollout.decoder import linear

    g = torch.Generator().manual_seed(rows)
    x, w, w2 = torch.randn(rows, 96, generator=g), torch.randn(320, 96, generator=g), torch.randn(40, 320, generator=g)
    y = linear(x, w)
    assert y.shape == (rows, 320) and torch.allclose(y, x @ w.t(), atol=1e-4, rtol=1e-5)
    assert torch.allclose(linear(y, w2), (x @ w.t()) @ w2.t(), atol=1e-3, rtol=1e-4)
