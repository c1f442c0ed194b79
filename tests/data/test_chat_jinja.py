"""A model's own chat template (Hugging Face's Jinja format): rendered as transformers'
``apply_chat_template`` renders it, trained spans over exactly the assistant answers and
their end token, the end token as stop id, and clear refusals."""

import json

import pytest

from megarlhf.data.chat import (ChatTemplate, ChatTemplateConfig, ChatTemplateError, read_hf_chat_template,
                                resolve_chat_template)
from megarlhf.data.tokenizer import load_tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen-style: a system prompt when the conversation brings none
SYSTEM_DEFAULT = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant."
                  "<|im_end|>\n' }}{% endif %}" + CHATML)
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TULU = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
        "'\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
SPECIAL = {"chatml": ("<|im_start|>", "<|im_end|>"), "system_default": ("<|im_start|>", "<|im_end|>"),
           "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "tulu": ("<s>", "</s>")}
SOURCES = {"chatml": CHATML, "system_default": SYSTEM_DEFAULT, "llama3": LLAMA3, "tulu": TULU}

CONV = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": " 6 "}]
# written out by hand: the text each template makes of CONV, and the trained parts
EXPECTED = {
    "chatml": ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
               "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n 6 <|im_end|>\n",
               ["4<|im_end|>", " 6 <|im_end|>"]),
    "system_default": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
                       "<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                       "<|im_start|>assistant\n 6 <|im_end|>\n",
                       ["4<|im_end|>", " 6 <|im_end|>"]),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nAnd 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>",
               ["4<|eot_id|>", "6<|eot_id|>"]),  # the template trims the answer
    "tulu": ("<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s>\n<|user|>\nAnd 3+3?\n<|assistant|>\n 6 </s>\n",
             ["4</s>", " 6 </s>"]),
}


def make_tokenizer(folder, kind: str, template: str = None, vocab: int = None):
    """A small byte-level BPE tokenizer.json with the templates' special tokens, its
    tokenizer_config.json (BOS/EOS of ``kind``, the chat template) beside it; ``vocab``:
    filled up to that size with plain added tokens (to match a model's vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 2+2? And 3+3? The answer is 4 or 6. user assistant system "
                             "You are a helpful assistant.", "<|user|>", "<|assistant|>"] * 20, trainer)
    if vocab is not None:
        tok.add_tokens([AddedToken(f"<unused_{i}>", special=False) for i in range(vocab - tok.get_vocab_size())])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos = SPECIAL[kind]
    cfg = {"bos_token": bos, "eos_token": eos}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_trained_tokens_are_exactly_the_answers_and_their_end(tmp_path, kind):
    tok = make_tokenizer(tmp_path, kind)
    t = ChatTemplate(ChatTemplateConfig(name="jinja", jinja=SOURCES[kind]), tok)
    text, spans = t.render(CONV)
    want_text, want_parts = EXPECTED[kind]
    assert text == want_text
    assert [text[a:b] for a, b in spans] == want_parts
    ids, mask = t.encode(CONV)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(want_parts)
    end = SPECIAL[kind][1]
    assert t.stop_ids() == [tok.token_to_id(end)]
    # a sampled answer ends at the end token; the prompt asks for the answer
    assert t.render(CONV, end_at_stop=True)[0] == want_text[:want_text.rindex(end) + len(end)]
    prompt = t.encode_prompt(CONV[:3])
    assert tok.decode(prompt) == t.render(CONV[:3], add_generation_prompt=True)[0]


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_rendering_equals_transformers_apply_chat_template(tmp_path, kind):
    from transformers import PreTrainedTokenizerFast

    tok = make_tokenizer(tmp_path, kind, SOURCES[kind])
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    t = ChatTemplate(ChatTemplateConfig(name="jinja", jinja=read_hf_chat_template(str(tmp_path))), tok)
    assert t.render(CONV)[0] == hf.apply_chat_template(CONV, tokenize=False)
    for k in (1, 3):
        ours = t.encode_prompt(CONV[:k])
        theirs = hf.apply_chat_template(CONV[:k], tokenize=True, add_generation_prompt=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert ours == list(theirs)


def test_templates_megarlhf_cannot_train_with_are_refused_by_name(tmp_path):
    tok = make_tokenizer(tmp_path, "chatml")
    last_differs = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] + ': ' + m['content'] }}"
                    "<|im_end|>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatTemplateError, match="renders a conversation's start differently"):
        ChatTemplate(ChatTemplateConfig(name="jinja", jinja=last_differs), tok).render(CONV)
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="writes no special token after an answer"):
        ChatTemplate(ChatTemplateConfig(name="jinja", jinja=no_end), tok)
    with pytest.raises(ChatTemplateError, match="not a valid Jinja chat template"):
        ChatTemplate(ChatTemplateConfig(name="jinja", jinja="{% for %}"), tok)
    refusing = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported"):
        ChatTemplate(ChatTemplateConfig(name="jinja", jinja=refusing), tok)
    with pytest.raises(ChatTemplateError, match="needs chat_template.jinja"):
        ChatTemplate(ChatTemplateConfig(name="jinja"), tok)


def test_which_template_a_job_uses(tmp_path):
    own = {"name": "jinja", "jinja": CHATML}
    assert resolve_chat_template(ChatTemplateConfig(), own, "ckpt").jinja == CHATML  # auto: the model's
    assert resolve_chat_template(ChatTemplateConfig(name="tulu"), own, "ckpt").name == "tulu"
    assert resolve_chat_template(ChatTemplateConfig(), None, "ckpt") is None  # text will be refused
    assert resolve_chat_template(ChatTemplateConfig(), None, "ckpt", fallback="tulu").name == "tulu"
    with pytest.raises(ChatTemplateError, match="chat_template.name='chatml'"):
        resolve_chat_template(ChatTemplateConfig(name="chatml"), own, "ckpt")
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert read_hf_chat_template(str(tmp_path)) == LLAMA3  # the .jinja file wins, as in transformers
    (tmp_path / "chat_template.jinja").unlink()
    assert read_hf_chat_template(str(tmp_path)) == CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TULU}]}))
    assert read_hf_chat_template(str(tmp_path)) == TULU
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert read_hf_chat_template(str(tmp_path)) is None


@pytest.mark.parametrize("name, kind", [("tulu", "tulu"), ("llama3", "llama3")])
def test_built_in_templates_written_as_jinja_render_the_same(tmp_path, name, kind):
    """What an export writes for a model trained with a built-in template: transformers'
    apply_chat_template on it gives megarlhf's text, and it trains the same spans."""
    from transformers import PreTrainedTokenizerFast

    tok = make_tokenizer(tmp_path / "tok", kind)
    built_in = ChatTemplate(ChatTemplateConfig(name=name), tok)
    source = built_in.jinja_source()
    as_jinja = ChatTemplate(ChatTemplateConfig(name="jinja", jinja=source), tok)
    system = [{"role": "system", "content": "Be brief."}]
    for conv in (CONV, system + CONV, CONV[:1]):
        assert as_jinja.render(conv) == built_in.render(conv)
        assert as_jinja.encode_prompt(conv) == built_in.encode_prompt(conv)
        assert as_jinja.render(conv, end_at_stop=True) == built_in.render(conv, end_at_stop=True)
    assert as_jinja.stop_ids() == built_in.stop_ids()
    (tmp_path / "tok" / "chat_template.jinja").write_text(source)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert hf.apply_chat_template(system + CONV, tokenize=False) == built_in.render(system + CONV)[0]
