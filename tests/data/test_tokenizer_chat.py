"""Tokenizers (SentencePiece trained here, tokenizer.json built here) and chat templates."""

import json

import pytest

from megarlhf.data.chat import ChatTemplate, ChatTemplateConfig, validate_messages
from megarlhf.data.tokenizer import TokenizerConfig, TokenizerError, load_tokenizer, train_sentencepiece

TEXTS = [f"User {i} asks: what is {i} plus {i + 3}? The answer is {2 * i + 3}." for i in range(300)]
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "8."}]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_sentencepiece(TEXTS, 320, str(path), user_symbols=["<|user|>", "<|assistant|>",
                                                                    "<|system|>"])


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    """A Llama-3-like tokenizer.json (BPE) with special tokens, built with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("hftok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return folder


def test_sentencepiece_interface(sp):
    assert sp.vocab_size == 320 and (sp.bos_id, sp.eos_id) == (1, 2) and sp.pad_id == sp.eos_id
    ids = sp.encode("<s>what is 12?</s>")
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id
    assert sp.decode(ids) == "what is 12?"
    assert sp.token_to_id("<|user|>") is not None and sp.token_to_id("zzz-not-a-piece") is None


def test_sentencepiece_offsets_cover_the_text(sp):
    text = "<s>what is 12 plus 3?</s>\nok é"
    ids, offsets = sp.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert "".join(text[a:b] for a, b in offsets) == text
    assert sp.encode("what is 1") == sp.encode_with_offsets("what is 1")[0]


def test_sentencepiece_training_is_deterministic(tmp_path):
    a = train_sentencepiece(TEXTS, 310, str(tmp_path / "a.model"))
    b = train_sentencepiece(TEXTS, 310, str(tmp_path / "b.model"))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode("what is 7") == b.encode("what is 7")


def test_hf_json_tokenizer(hf_json):
    tok = load_tokenizer(str(hf_json))  # a folder works
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    ids, offsets = tok.encode_with_offsets("<|begin_of_text|>what is 3<|eot_id|>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<|begin_of_text|>what is 3<|eot_id|>"
    over = load_tokenizer(str(hf_json / "tokenizer.json"), TokenizerConfig(eos_token="<|end_of_text|>"))
    assert over.eos_token == "<|end_of_text|>"


def test_tokenizer_errors(tmp_path, hf_json):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(str(hf_json), TokenizerConfig(bos_token="<nope>"))


def test_tulu_format_is_exact(sp):
    ct = ChatTemplate(ChatTemplateConfig(name="tulu"), sp)
    text, spans = ct.render(MSGS[:3])
    assert text == ("<s><|system|>\nBe brief.\n<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n"
                    "It is 5.</s>\n")
    assert [text[a:b] for a, b in spans] == ["It is 5.</s>"]
    prompt, _ = ct.render(MSGS[:2], add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n") and prompt.startswith("<s>")


def test_loss_mask_covers_assistant_tokens_only(sp):
    ct = ChatTemplate(ChatTemplateConfig(name="tulu"), sp)
    ids, mask = ct.encode(MSGS)
    assert ids[0] == sp.bos_id and not mask[0]
    trained = [i for i, m in zip(ids, mask) if m]
    assert sp.decode(trained).replace(" ", "") == "Itis5.8."
    assert trained.count(sp.eos_id) == 2  # each assistant turn's closing </s> is trained
    assert sum(mask) < len(ids) / 2
    assert ct.stop_ids() == [sp.eos_id]


def test_llama3_format(hf_json):
    tok = load_tokenizer(str(hf_json))
    ct = ChatTemplate(ChatTemplateConfig(name="llama3"), tok)
    text, spans = ct.render(MSGS[1:3])
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is 5.<|eot_id|>")
    ids, mask = ct.encode(MSGS[1:3])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 5.<|eot_id|>"
    assert tok.token_to_id("<|eot_id|>") in ct.stop_ids()


def test_custom_template(sp):
    cfg = ChatTemplateConfig(name="custom", begin="{bos}", user_prefix="Q: ", user_suffix="\n",
                             assistant_prefix="A: ", assistant_end="{eos}", assistant_suffix="\n")
    ct = ChatTemplate(cfg, sp)
    assert ct.render(MSGS[1:3])[0] == "<s>Q: What is 2 plus 3?\nA: It is 5.</s>\n"
    with pytest.raises(ValueError, match="must be exactly one"):
        ChatTemplate(ChatTemplateConfig(name="custom", assistant_end="END OF TURN"), sp)
    with pytest.raises(ValueError, match="expected one of"):
        ChatTemplate(ChatTemplateConfig(name="chatml"), sp)


@pytest.mark.parametrize("msgs,needle", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content: expected a string"),
    ([{"role": "user", "content": "  "}], "empty text"),
])
def test_message_validation(msgs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate_messages(msgs)


def test_preference_sequences_end_at_the_stop_token(sp):
    ct = ChatTemplate(ChatTemplateConfig(name="tulu"), sp)
    text, _ = ct.render(MSGS[1:3], end_at_stop=True)
    assert text.endswith("It is 5.</s>")
    ids, mask = ct.encode(MSGS[1:3], end_at_stop=True)
    assert ids[-1] == sp.eos_id and mask[-1]
