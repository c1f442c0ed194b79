"""Tokenizers behind one small interface: SentencePiece models (Llama 2 / Tulu 2) and
Hugging Face ``tokenizer.json`` files (Llama 3).

    tok = load_tokenizer("tokenizer.model")      # or ".../tokenizer.json"
    ids, offsets = tok.encode_with_offsets("<s>Hello</s>")

``encode`` never adds BOS/EOS by itself: chat templates place them explicitly, writing
the tokenizer's BOS/EOS strings in the text (``<s>``, ``</s>`` for SentencePiece;
``<|begin_of_text|>`` ... for Llama 3), and every tokenizer maps those strings to their
ids. Character offsets let templates mark exactly which tokens belong to an assistant
turn, without re-tokenizing prefixes.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["TokenizerConfig", "Tokenizer", "SentencePieceTokenizer", "HFJsonTokenizer",
           "load_tokenizer", "train_sentencepiece", "TokenizerError"]

Offsets = List[Tuple[int, int]]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, named."""


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer, and its special tokens when the file does not say."""

    path: Optional[str] = None
    """A SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``; none means the
    recipe's built-in tokenizer (trained locally for the built-in task)."""
    bos_token: Optional[str] = None
    """Override of the beginning-of-sequence token string."""
    eos_token: Optional[str] = None
    """Override of the end-of-sequence token string (what ends an assistant turn)."""
    pad_token: Optional[str] = None
    """Override of the padding token string (default: the file's pad, else EOS)."""


class Tokenizer:
    """The interface every tokenizer implements."""

    path: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    bos_token: str
    eos_token: str

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        """Token ids and each token's ``(start, end)`` character span in ``text``."""
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return self.encode_with_offsets(text)[0]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset:
        """Ids of the special (control) tokens: never plain text."""
        raise NotImplementedError

    def special_tokens(self) -> Dict[str, str]:
        """The special-token strings a chat template may use (``bos_token``, ``eos_token``,
        ``pad_token``...), as transformers passes them to ``apply_chat_template``."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}

    def describe(self) -> str:
        return (f"{type(self).__name__}({os.path.basename(self.path)}, vocab {self.vocab_size}, "
                f"bos {self.bos_token!r}={self.bos_id}, eos {self.eos_token!r}={self.eos_id}, "
                f"pad {self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; ``<s>``/``</s>`` (its BOS/EOS pieces) in text become ids."""

    def __init__(self, path: str, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on bad files
            raise TokenizerError(f"{path}: not a readable SentencePiece model: {e}") from e
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self._special(bos_token, self.sp.bos_id(), "bos")
        self.eos_id = self._special(eos_token, self.sp.eos_id(), "eos")
        pad = self._special(pad_token, self.sp.pad_id(), "pad") if (pad_token or self.sp.pad_id() >= 0) \
            else self.eos_id
        self.pad_id = pad
        self.bos_token = self.sp.id_to_piece(self.bos_id)
        self.eos_token = self.sp.id_to_piece(self.eos_id)
        specials = sorted({self.bos_token, self.eos_token}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def _special(self, token: Optional[str], default: int, what: str) -> int:
        if token is None:
            if default < 0:
                raise TokenizerError(f"{self.path}: the model defines no {what} token; set "
                                     f"tokenizer.{what}_token")
            return default
        idx = self.sp.piece_to_id(token)
        if idx == self.sp.unk_id() and token != self.sp.id_to_piece(self.sp.unk_id()):
            raise TokenizerError(f"{self.path}: {what}_token {token!r} is not in the vocabulary")
        return idx

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        ids: List[int] = []
        offsets: Offsets = []
        pos = 0
        for part in self._split.split(text):
            if not part:
                continue
            if part == self.bos_token or part == self.eos_token:
                ids.append(self.bos_id if part == self.bos_token else self.eos_id)
                offsets.append((pos, pos + len(part)))
            else:
                raw = part.encode("utf-8")
                # byte offset -> character offset within this part
                char_of = [0] * (len(raw) + 1)
                c = 0
                for i, ch in enumerate(part):
                    n = len(ch.encode("utf-8"))
                    for k in range(n):
                        char_of[c + k] = i
                    c += n
                char_of[len(raw)] = len(part)
                proto = self.sp.encode(part, return_type="proto")
                for piece in proto.pieces:
                    ids.append(piece.id)
                    offsets.append((pos + char_of[piece.begin], pos + char_of[piece.end]))
            pos += len(part)
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        idx = self.sp.piece_to_id(token)
        return None if idx == self.sp.unk_id() and token != self.sp.id_to_piece(idx) else idx

    @property
    def special_ids(self) -> frozenset:
        return frozenset(i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i))


class HFJsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (fast tokenizer), e.g. Llama 3. Special tokens
    come from ``tokenizer_config.json`` beside it, the config, or common Llama names."""

    _BOS = ("<|begin_of_text|>", "<s>", "<|startoftext|>")
    _EOS = ("<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>")

    def __init__(self, path: str, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        from tokenizers import Tokenizer as _HFTok

        self.path = path
        try:
            self.tok = _HFTok.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: not a readable tokenizer.json: {e}") from e
        side = _read_side_config(os.path.dirname(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = self._pick(bos_token or side.get("bos_token"), self._BOS, "bos")
        self.eos_token = self._pick(eos_token or side.get("eos_token"), self._EOS, "eos")
        self.bos_id = self.tok.token_to_id(self.bos_token)
        self.eos_id = self.tok.token_to_id(self.eos_token)
        pad = pad_token or side.get("pad_token")
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None \
            else self.eos_id
        self._side = side

    def _pick(self, given: Optional[str], candidates: Tuple[str, ...], what: str) -> str:
        if given is not None:
            if self.tok.token_to_id(given) is None:
                raise TokenizerError(f"{self.path}: {what}_token {given!r} is not in the vocabulary")
            return given
        for c in candidates:
            if self.tok.token_to_id(c) is not None:
                return c
        raise TokenizerError(f"{self.path}: cannot tell the {what} token; set tokenizer.{what}_token")

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    @property
    def special_ids(self) -> frozenset:
        return frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def special_tokens(self) -> Dict[str, str]:
        return {**self._side, "bos_token": self.bos_token, "eos_token": self.eos_token}


def _read_side_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable: {e}") from e
    out = {}
    for key in [k for k in cfg if k.endswith("_token")]:  # bos, eos, pad, unk...
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def load_tokenizer(path: str, cfg: Optional[TokenizerConfig] = None) -> Tokenizer:
    """A tokenizer from a ``.model`` (SentencePiece) or ``.json`` (Hugging Face) file, or a
    folder holding ``tokenizer.json`` / ``tokenizer.model``."""
    cfg = cfg or TokenizerConfig()
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), cfg)
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    kw = dict(bos_token=cfg.bos_token, eos_token=cfg.eos_token, pad_token=cfg.pad_token)
    if path.endswith(".json"):
        return HFJsonTokenizer(path, **kw)
    return SentencePieceTokenizer(path, **kw)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str,
                        user_symbols: Sequence[str] = ()) -> SentencePieceTokenizer:
    """Train a small Llama-style SentencePiece BPE model on ``texts`` (deterministic:
    one thread, no sampling): unk 0, BOS 1, EOS 2, digits split, byte fallback."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=list(user_symbols),
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return SentencePieceTokenizer(out_path)
