"""A Hugging Face chat model as it is (ChatML template in chat_template.jinja, tied
embeddings, its own EOS in generation_config.json): imported, it answers text prompts as
transformers does with the model's own template and stops at the template's end token;
SFT trains exactly the template's assistant tokens; exported, it comes back as it came
in."""

import json

import pytest
import torch

from megarlhf.models.checkpoint import read_meta
from tests.conftest import VOCAB, convert, make_hf_llama, megarlhf
from tests.data.test_chat_jinja import CHATML, make_tokenizer
from tests.tools.test_convert import all_tensors, export

QUESTIONS = ("What is 2+2?", "And 3+3?", "The answer is 4", "You are")


def cli(*args):
    return megarlhf(*args, threads="1", timeout=600)


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory):
    from transformers import LlamaForCausalLM

    d = make_hf_llama(tmp_path_factory.mktemp("hf") / "chat", tied=True, llama3_rope=False)
    tok = make_tokenizer(d, "chatml", vocab=VOCAB)
    (d / "chat_template.jinja").write_text(CHATML)
    end = tok.token_to_id("<|im_end|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": end, "bos_token_id": 0}))
    # A random model rarely ends an answer: make <|im_end|> the likeliest token wherever
    # another one (340) would be, so that some answers stop on it.
    m = LlamaForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        emb = m.get_input_embeddings().weight
        emb[end] = 1.5 * emb[340]
    m.save_pretrained(d)
    return d


def transformers_answers(hf_dir, max_new):
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    gen = GenerationConfig.from_pretrained(hf_dir)
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            # an explicit mask: generate would infer one from the pad id, which is <|im_start|>'s here
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=gen.eos_token_id, pad_token_id=0)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def mg_chat(hf_chat, tmp_path_factory):
    """The chat model converted once (the tests only read it)."""
    return convert(hf_chat, tmp_path_factory.mktemp("mg_chat") / "mg")


def test_text_prompts_get_the_models_own_template_and_answers(hf_chat, mg_chat, tmp_path):
    ckpt = mg_chat
    meta = read_meta(str(ckpt))
    assert meta.chat_template == "jinja" and meta.extra["chat_template_config"]["jinja"] == CHATML
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    res = cli("generate", "--ckpt", ckpt, "--prompts", prompts, "--out", tmp_path / "o.jsonl", "--greedy",
              "--max-new-tokens", 16)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    theirs = transformers_answers(hf_chat, 16)
    assert [r["response_ids"] for r in ours] == theirs
    end = make_tokenizer(tmp_path / "t", "chatml").token_to_id("<|im_end|>")
    stopped = [r for r in ours if r["finish_reason"] == "eos"]
    assert stopped and all(r["response_ids"][-1] == end for r in stopped)
    assert any(r["finish_reason"] == "length" for r in ours)
    # another template, named: said once, and used
    res = cli("generate", "--ckpt", ckpt, "--prompts", prompts, "--out", tmp_path / "t.jsonl", "--greedy",
              "--max-new-tokens", 2, "--chat-template", "tulu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "chat template: tulu (chat_template.name), not the model's own (jinja)" in res.stdout


def test_without_a_template_text_is_refused_and_token_ids_still_work(hf_chat, tmp_path):
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(hf_chat, bare)
    (bare / "chat_template.jinja").unlink()
    ckpt = convert(bare, tmp_path / "mg")
    assert read_meta(str(ckpt)).chat_template is None
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n")
    res = cli("generate", "--ckpt", ckpt, "--prompts", text, "--out", tmp_path / "o.jsonl", "--max-new-tokens", 2)
    assert res.returncode != 0
    assert "a text prompt needs a chat template, and the checkpoint records none" in res.stderr
    assert "--chat-template" in res.stderr
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"prompt_ids": [0, 5, 6, 7]}) + "\n")
    res = cli("generate", "--ckpt", ckpt, "--prompts", ids, "--out", tmp_path / "o.jsonl", "--max-new-tokens", 2)
    assert res.returncode == 0, res.stderr[-3000:]


def test_sft_trains_the_templates_answers_and_the_export_comes_back_as_it_came_in(hf_chat, mg_chat, tmp_path):
    from transformers import AutoTokenizer

    ckpt = mg_chat
    data = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {i}"}]
             for i, q in enumerate(QUESTIONS)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "sft"
    res = cli("sft", f"train.init_from={ckpt}", f"data.sources=[{{path: {data}}}]", "data.eval_size=0",
              "data.max_length=64", "data.max_prompt_length=48", "train.seq_length=64", "train.max_steps=1",
              "train.global_batch_size=4", "train.micro_batch_size=4", "model.params_dtype=float32",
              f"train.out_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exact match" not in res.stdout  # only what the config names is evaluated
    # the trained tokens are exactly the answers and the template's end token
    from megarlhf.data.dataset import tokenize_example
    from megarlhf.recipes.pairs_common import tokenizer_of

    tok, template = tokenizer_of(read_meta(str(ckpt)), str(ckpt))
    ex = tokenize_example({"messages": convs[0], "source": "chat"}, "sft", template)
    trained = tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
    assert trained == "The answer is 0<|im_end|>"
    trained_meta = read_meta(str(out / "checkpoint"))
    assert trained_meta.chat_template == "jinja" and trained_meta.extra["chat_template_config"]["jinja"] == CHATML

    # import -> export: the same tensors (tied stays tied), template, special tokens, settings
    hf_out = export(ckpt, tmp_path / "hf")
    a, b = all_tensors(hf_chat), all_tensors(hf_out)
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    assert all(torch.equal(a[k], b[k]) for k in a)
    src, dst = (json.loads((d / "config.json").read_text()) for d in (hf_chat, hf_out))
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta",
                "rope_parameters", "rope_scaling"):
        assert src.get(key) == dst.get(key), key
    assert json.loads((hf_out / "generation_config.json").read_text()) == \
        json.loads((hf_chat / "generation_config.json").read_text())
    t_src, t_dst = AutoTokenizer.from_pretrained(hf_chat), AutoTokenizer.from_pretrained(hf_out)
    assert t_dst.chat_template == t_src.chat_template == CHATML
    assert (t_dst.bos_token, t_dst.eos_token) == (t_src.bos_token, t_src.eos_token)
    assert transformers_answers(hf_out, 8) == transformers_answers(hf_chat, 8)
    # a model trained by megarlhf carries the template it was trained with
    trained_hf = export(out / "checkpoint", tmp_path / "hf_trained")
    assert AutoTokenizer.from_pretrained(trained_hf).chat_template == CHATML
