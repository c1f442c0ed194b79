"""Chat templates: messages -> text -> token ids with a loss mask over assistant tokens.

Every template is the same structure: a beginning (BOS), and for each role a prefix and
a suffix; assistant turns also have an *end* (EOS for Tulu, ``<|eot_id|>`` for Llama 3)
that is trained (the model must learn to stop) and is the stop token when sampling.

Tulu (the paper's format)::

    <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}</s>\\n

Llama 3::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

A model's own template (Hugging Face's Jinja format: ``chat_template.jinja``, or
``chat_template`` in ``tokenizer_config.json``) is rendered as transformers'
``apply_chat_template`` renders it. Its trained spans come from the rendering itself: the
conversation up to an assistant message with the generation prompt, and up to the end of
that message, must be prefixes of the whole text (every common template is); the trained
span runs from the first's end through the template's end token (the special token it
writes after an answer: ``<|im_end|>``, ``<|eot_id|>``, ``</s>``...).

Loss masks cover each assistant message's content and its end token, nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megarlhf.data.tokenizer import Tokenizer

__all__ = ["ChatTemplateConfig", "ChatTemplate", "Message", "ROLES", "validate_messages",
           "ChatTemplateError", "read_hf_chat_template", "resolve_chat_template", "template_flag",
           "BUILTIN_NAMES"]

Message = Dict[str, str]
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A chat template that cannot be used as configured, with the fix named."""


@dataclass(frozen=True)
class ChatTemplateConfig:
    """A chat format. ``auto`` (default): the model's own, as its checkpoint records it (the
    Hugging Face model's template, imported with it, or the one megarlhf trained it with).
    Or a built-in (``tulu``, the paper's; ``llama3``); ``custom`` uses the prefix/suffix
    fields below, in which ``{bos}`` and ``{eos}`` stand for the tokenizer's tokens;
    ``jinja`` a Hugging Face Jinja template given in ``jinja`` (its text, or a file)."""

    name: str = "auto"
    """``auto``, ``tulu``, ``llama3``, ``custom`` or ``jinja``."""
    jinja: Optional[str] = None
    """With ``name: jinja``: the template's text, or the path of a ``.jinja`` file."""
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
    "tulu": ChatTemplateConfig(name="tulu"),
    "llama3": ChatTemplateConfig(
        name="llama3", begin="{bos}",
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n", system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n", user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>", assistant_suffix=""),
}
BUILTIN_NAMES = tuple(_BUILTIN)
NAMES = ("auto", *BUILTIN_NAMES, "custom", "jinja")


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


def read_hf_chat_template(folder: str) -> Optional[str]:
    """A Hugging Face model folder's chat template: ``chat_template.jinja``, else
    ``chat_template`` in ``tokenizer_config.json`` (a string, or the entry named
    ``default`` of a list of named templates), else None."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{path}: unreadable: {e}") from e
    value = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def template_flag(value: Optional[str]) -> Optional[ChatTemplateConfig]:
    """A command's ``--chat-template NAME|FILE``: a built-in's name or a Jinja file (None:
    the checkpoint's own)."""
    if value is None:
        return None
    return ChatTemplateConfig(name=value) if value in BUILTIN_NAMES else ChatTemplateConfig(name="jinja", jinja=value)


def resolve_chat_template(chosen: ChatTemplateConfig, recorded: Optional[Dict[str, Any]],
                          where: str, fallback: Optional[str] = None) -> Optional[ChatTemplateConfig]:
    """The template a job formats conversations with: ``chosen`` when the config names
    one, else the one ``recorded`` with the checkpoint (``auto``), else ``fallback`` (a
    built-in's name), else None: token ids only (text is refused where it is used)."""
    if chosen.name not in NAMES:
        raise ChatTemplateError(f"chat_template.name={chosen.name!r}: expected one of {', '.join(NAMES)}")
    if chosen.name != "auto":
        return chosen
    if recorded:
        return ChatTemplateConfig(**recorded)
    return ChatTemplateConfig(name=fallback) if fallback else None


def _jinja_renderer(source: str, where: str) -> Callable[..., str]:
    """``render(messages=..., add_generation_prompt=..., **special_tokens) -> str`` for a
    Hugging Face chat template, in the environment transformers' ``apply_chat_template``
    uses (transformers/utils/chat_template_utils.py: a sandbox, ``trim_blocks`` and
    ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson``
    filter that keeps non-ASCII characters)."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{where}: not a valid Jinja chat template: {e}") from e

    def render(**kwargs) -> str:
        try:
            return template.render(**kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{where}: the chat template refused the conversation: {e}") from e

    return render


_PROBE = "\u2063megarlhf-answer\u2063"  # text no template changes: marks where an answer's content is


class ChatTemplate:
    """A template bound to a tokenizer: a built-in or ``custom`` prefix/suffix structure,
    or a Hugging Face Jinja template (``name: jinja``)."""

    def __init__(self, cfg: ChatTemplateConfig, tokenizer: Tokenizer, extra_stop_ids: Sequence[int] = ()):
        if cfg.name in ("auto", None):
            raise ChatTemplateError("chat_template.name=auto: resolve it first (resolve_chat_template)")
        if cfg.name not in NAMES:
            raise ChatTemplateError(f"chat_template.name={cfg.name!r}: expected one of {', '.join(NAMES)}")
        if cfg.name in _BUILTIN:
            cfg = _BUILTIN[cfg.name]
        self.cfg = cfg
        self.tok = tokenizer
        self._extra_stop = [int(i) for i in extra_stop_ids]
        if cfg.name == "jinja":
            self._init_jinja(cfg)
            return
        subst = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token}
        self.parts = {f.name: getattr(cfg, f.name).format(**subst)
                      for f in dataclasses.fields(cfg) if f.name not in ("name", "jinja")}
        self.end_text = self.parts["assistant_end"]
        end_ids = tokenizer.encode(self.end_text)
        if len(end_ids) != 1:
            raise ChatTemplateError(f"chat_template.assistant_end={cfg.assistant_end!r} is {len(end_ids)} "
                                    "tokens with this tokenizer; it must be exactly one (the stop token)")
        self.end_id = end_ids[0]

    # -- Jinja ---------------------------------------------------------------------------
    def _init_jinja(self, cfg: ChatTemplateConfig) -> None:
        source = cfg.jinja
        if not source:
            raise ChatTemplateError("chat_template.name=jinja needs chat_template.jinja (the template's "
                                    "text or a .jinja file)")
        where = "chat_template.jinja"
        if "{" not in source and os.path.isfile(source):
            where = source
            with open(source, encoding="utf-8") as f:
                source = f.read()
        self.source = source
        self._render_jinja = _jinja_renderer(source, where)
        self._where = where
        # The end token: the special token the template writes right after an answer.
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        text = self._render_raw(probe, False)
        at = text.find(_PROBE)
        if at < 0:
            raise ChatTemplateError(f"{where}: the template does not render an assistant message's content")
        after = text[at + len(_PROBE):]
        ids, offsets = self.tok.encode_with_offsets(after) if after else ([], [])
        end = next(((i, o) for i, o in zip(ids, offsets) if self._is_special(i)), None)
        if end is None:
            raise ChatTemplateError(f"{where}: the template writes no special token after an answer "
                                    f"({after[:40]!r}): nothing tells the model to stop; give the "
                                    "end token by another template (chat_template.name)")
        self.end_id = end[0]
        self.end_text = after[end[1][0]:end[1][1]]

    def _is_special(self, token_id: int) -> bool:
        specials = getattr(self.tok, "special_ids", None)
        if specials is not None:
            return token_id in specials
        return token_id in (self.tok.eos_id, self.tok.bos_id)

    def _render_raw(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self._render_jinja(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                  **self.tok.special_tokens())

    def _render_jinja_spans(self, messages: Sequence[Message], add_generation_prompt: bool,
                            end_at_stop: bool) -> Tuple[str, List[Tuple[int, int]]]:
        text = self._render_raw(messages, add_generation_prompt)
        spans: List[Tuple[int, int]] = []
        last_end = None
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render_raw(messages[:k], True)
            upto = self._render_raw(messages[:k + 1], False)
            if not upto.startswith(before) or not text.startswith(upto):
                raise ChatTemplateError(
                    f"{self._where}: the template renders a conversation's start differently once later "
                    f"messages follow (message {k}), so the trained tokens cannot be told from the "
                    "rendering; choose another template (chat_template.name)")
            stop = upto.find(self.end_text, len(before))
            if stop < 0:
                raise ChatTemplateError(f"{self._where}: assistant message {k} is not closed by the end "
                                        f"token {self.end_text!r}")
            spans.append((len(before), stop + len(self.end_text)))
            last_end = spans[-1][1]
        if end_at_stop and messages and messages[-1]["role"] == "assistant" and last_end is not None:
            text = text[:last_end]
        return text, spans

    # -- both kinds ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.cfg.name

    def jinja_source(self) -> str:
        """The template in Hugging Face's Jinja format (what an export writes as
        ``chat_template.jinja``): a Jinja template's own text, or a built-in or custom
        structure written out as Jinja, which renders the same text."""
        if self.cfg.name == "jinja":
            return self.source
        p = {k: json.dumps(v) for k, v in self.parts.items()}  # JSON strings are Jinja literals
        turn = "{{{{ {} + message['content'] + {} }}}}"
        return ("{{ " + p["begin"] + " }}{% for message in messages %}"
                "{% if message['role'] == 'system' %}" + turn.format(p["system_prefix"], p["system_suffix"])
                + "{% elif message['role'] == 'user' %}" + turn.format(p["user_prefix"], p["user_suffix"])
                + "{% else %}" + turn.format(p["assistant_prefix"], p["assistant_end"] + " + " + p["assistant_suffix"])
                + "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ " + p["assistant_prefix"] + " }}{% endif %}")

    def stop_ids(self) -> List[int]:
        """Token ids that end an answer when sampling: the template's end token, the
        tokenizer's EOS, and the model's own generation settings' (recorded at import)."""
        return sorted({self.end_id, self.tok.eos_id, *self._extra_stop})

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               end_at_stop: bool = False) -> Tuple[str, List[Tuple[int, int]]]:
        """The conversation as text, and the character spans that are trained.

        ``end_at_stop`` ends a conversation whose last message is the assistant's at its end
        token (no suffix): what a sampled response looks like, which is how reward models
        and DPO see their sequences."""
        if self.cfg.name == "jinja":
            return self._render_jinja_spans(messages, add_generation_prompt, end_at_stop)
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
