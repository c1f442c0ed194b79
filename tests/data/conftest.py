"""A small SentencePiece chat template shared by the data tests."""

import pytest


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    from megarlhf.data.chat import ChatTemplate, ChatTemplateConfig
    from megarlhf.data.tokenizer import train_sentencepiece

    texts = [f"question {i} answer {i * 7} and some more words" for i in range(400)]
    tok = train_sentencepiece(texts, 300, str(tmp_path_factory.mktemp("t") / "t.model"),
                              user_symbols=["<|user|>", "<|assistant|>", "<|system|>"])
    return ChatTemplate(ChatTemplateConfig(name="tulu"), tok)
