"""Chat templates: messages -> text -> token ids with a loss mask over assistant tokens.

Every template is the same structure: a beginning (BOS), and for each role a prefix and
a suffix; assistant turns also have an *end* (EOS for Tulu, ``<|eot_id|>`` for Llama 3)
that is trained (the model must learn to stop) and is the stop token when sampling.

Tulu (the paper's format)::

    <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}</s>\\n

Llama 3::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

Loss masks cover each assistant message's content and its end token, nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from megarlhf.data.tokenizer import Tokenizer

__all__ = ["ChatTemplateConfig", "ChatTemplate", "Message", "ROLES", "validate_messages"]

Message = Dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplateConfig:
    """A chat format. ``name`` picks a built-in (``tulu``, ``llama3``); ``custom`` uses
    the fields below, in which ``{bos}`` and ``{eos}`` stand for the tokenizer's tokens."""

    name: str = "tulu"
    """``tulu`` (default, the paper's), ``llama3`` or ``custom``."""
    begin: str = "{bos}"
    """Text at the very start of a conversation."""
    system_prefix: str = "<|system|>\n"
    system_suffix: str = "\n"
    user_prefix: str = "<|user|>\n"
    user_suffix: str = "\n"
    assistant_prefix: str = "<|assistant|>\n"
    """Also the generation prompt that asks the model to answer."""
    assistant_end: str = "{eos}"
    """Closes an assistant message; trained, and the stop token when sampling."""
    assistant_suffix: str = "\n"
    """Text after the end token (not trained)."""


_BUILTIN = {
    "tulu": ChatTemplateConfig(),
    "llama3": ChatTemplateConfig(
        name="llama3", begin="{bos}",
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n", system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n", user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>", assistant_suffix=""),
}


def validate_messages(messages, where: str = "messages") -> List[Message]:
    """Check a message list; raises ``ValueError`` naming the offending message field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            shown = repr(role) if len(repr(role)) <= 60 else repr(role)[:60] + "..."
            raise ValueError(f"{where}[{i}].role: {shown} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"{where}[{i}].content: empty text")
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """A template bound to a tokenizer."""

    def __init__(self, cfg: ChatTemplateConfig, tokenizer: Tokenizer):
        if cfg.name != "custom":
            if cfg.name not in _BUILTIN:
                raise ValueError(f"chat_template.name={cfg.name!r}: expected one of "
                                 f"{sorted(_BUILTIN) + ['custom']}")
            cfg = _BUILTIN[cfg.name]
        self.cfg = cfg
        self.tok = tokenizer
        subst = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token}
        self.parts = {f.name: getattr(cfg, f.name).format(**subst)
                      for f in dataclasses.fields(cfg) if f.name != "name"}
        end_ids = tokenizer.encode(self.parts["assistant_end"])
        if len(end_ids) != 1:
            raise ValueError(f"chat_template.assistant_end={cfg.assistant_end!r} is {len(end_ids)} "
                             "tokens with this tokenizer; it must be exactly one (the stop token)")
        self.end_id = end_ids[0]

    @property
    def name(self) -> str:
        return self.cfg.name

    def stop_ids(self) -> List[int]:
        """Token ids that end an answer when sampling."""
        return sorted({self.end_id, self.tok.eos_id})

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               end_at_stop: bool = False) -> Tuple[str, List[Tuple[int, int]]]:
        """The conversation as text, and the character spans that are trained.

        ``end_at_stop`` ends a conversation whose last message is the assistant's at its end
        token (no suffix): what a sampled response looks like, which is how reward models
        and DPO see their sequences."""
        p = self.parts
        text = p["begin"]
        spans: List[Tuple[int, int]] = []
        for k, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "assistant":
                text += p["assistant_prefix"]
                start = len(text)
                text += content + p["assistant_end"]
                spans.append((start, len(text)))
                if not (end_at_stop and k == len(messages) - 1):
                    text += p["assistant_suffix"]
            else:
                text += p[f"{role}_prefix"] + content + p[f"{role}_suffix"]
        if add_generation_prompt:
            text += p["assistant_prefix"]
        return text, spans

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               end_at_stop: bool = False) -> Tuple[List[int], List[bool]]:
        """Token ids and a loss mask (True on assistant content and end tokens)."""
        text, spans = self.render(messages, add_generation_prompt, end_at_stop)
        ids, offsets = self.tok.encode_with_offsets(text)
        mask = [any(s <= a < e for s, e in spans) for a, _ in offsets]
        return ids, mask

    def encode_prompt(self, messages: Sequence[Message]) -> List[int]:
        """The prompt for sampling an answer to ``messages`` (ending with the assistant prefix)."""
        return self.encode(messages, add_generation_prompt=True)[0]
