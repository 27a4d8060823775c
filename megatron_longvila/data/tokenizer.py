"""Tokenizers and chat templates for the task encoder.

``build_tokenizer(name_or_path, template=None) -> ChatTokenizer``
  "tiny"                 a byte-level tokenizer made in-process (``tokenizers`` library, wrapped as a
                         transformers PreTrainedTokenizerFast): ids 0..255 are the bytes, then the
                         specials below; every id < 512. Template qwen2 (ChatML).
  a directory            ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``; the template
                         is ``template`` or guessed from the vocabulary (qwen2 if it has
                         ``<|im_start|>``, llama3 if it has ``<|start_header_id|>``).
  a ``*.model`` file     a sentencepiece model; template ``template`` or qwen2.

Templates (what the task encoder builds; T = target, i.e. trained on):
  qwen2:  <|im_start|>system\\n{sys}<|im_end|>\\n
          <|im_start|>user\\n{user}<|im_end|>\\n
          <|im_start|>assistant\\n [T: {answer}<|im_end|>] \\n
  llama3: <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>
          <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
          <|start_header_id|>assistant<|end_header_id|>\\n\\n [T: {answer}<|eot_id|>]
Each piece is tokenised on its own (special tokens by id, text without added specials), so the
ids do not depend on how BPE would merge across piece boundaries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                 "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    prefix: str  # once, at the start of the sample
    system: str  # "{content}" inside
    user: str
    assistant_header: str  # not trained on
    assistant_end: str  # trained on (closes the answer)
    after_assistant: str  # not trained on
    specials: tuple  # special-token strings of this template


TEMPLATES: Dict[str, ChatTemplate] = {
    "qwen2": ChatTemplate(
        "qwen2", "", "<|im_start|>system\n{content}<|im_end|>\n",
        "<|im_start|>user\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>", "\n",
        ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate(
        "llama3", "<|begin_of_text|>",
        "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


class ChatTokenizer:
    """A tokenizer with the template the task encoder uses: ``encode_text`` (no specials added),
    ``encode_template`` (template strings: specials by id), ``pad_id``, ``eos_id``,
    ``vocab_size``, ``template``, and ``hf`` (the transformers tokenizer, when there is one)."""

    def __init__(self, name: str, template: ChatTemplate, encode: Callable[[str], List[int]],
                 token_id: Callable[[str], Optional[int]], vocab_size: int, pad_id: int,
                 eos_id: int, hf=None, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT):
        self.name, self.template, self._encode, self._token_id = name, template, encode, token_id
        self.vocab_size, self.pad_id, self.eos_id, self.hf = vocab_size, pad_id, eos_id, hf
        self.system_prompt = system_prompt
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in template.specials) + ")")
        self._cache: Dict[str, List[int]] = {}

    def encode_text(self, text: str) -> List[int]:
        return list(self._encode(text)) if text else []

    def encode_template(self, text: str) -> List[int]:
        """Template text: its special tokens become their ids, the rest is plain text."""
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        ids: List[int] = []
        for part in self._special_re.split(text):
            if not part:
                continue
            if part in self.template.specials:
                tid = self._token_id(part)
                ids.extend([tid] if tid is not None else self.encode_text(part))
            else:
                ids.extend(self.encode_text(part))
        self._cache[text] = ids
        return ids

    def __repr__(self):
        return f"ChatTokenizer({self.name!r}, template={self.template.name}, vocab={self.vocab_size})"


def _hf_wrap(tok, name: str, template: Optional[str]) -> ChatTokenizer:
    vocab = tok.get_vocab()
    if template is None:
        if "<|im_start|>" in vocab:
            template = "qwen2"
        elif "<|start_header_id|>" in vocab:
            template = "llama3"
        else:
            raise ValueError(f"cannot tell the chat template of tokenizer {name!r} (no <|im_start|> "
                             f"or <|start_header_id|> token); pass template='qwen2' or 'llama3'")
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    tpl = TEMPLATES[template]

    def token_id(s):
        return vocab.get(s)

    eos = tok.eos_token_id
    if eos is None:
        eos = vocab.get(tpl.assistant_end, 0)
    pad = tok.pad_token_id
    if pad is None:
        for cand in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<|end_of_text|>"):
            if cand in vocab:
                pad = vocab[cand]
                break
        else:
            pad = eos

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    return ChatTokenizer(name, tpl, encode, token_id, len(tok), pad, eos, hf=tok)


def make_tiny_hf_tokenizer():
    """The "tiny" tokenizer as a transformers PreTrainedTokenizerFast (no files, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Byte value b -> id b (the ByteLevel pre-tokenizer maps bytes to these unicode chars).
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")
    return hf


def _bytes_to_unicode():
    """GPT-2's byte -> printable unicode char table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer(name_or_path: str, template: Optional[str] = None,
                    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> ChatTokenizer:
    """See the module docstring. ``system_prompt=None`` leaves the system turn out (unless the
    sample has its own system turn)."""
    if name_or_path == "tiny":
        t = _hf_wrap(make_tiny_hf_tokenizer(), "tiny", template or "qwen2")
        if max(t.hf.get_vocab().values()) >= 512:
            raise AssertionError("tiny tokenizer ids must stay below 512")
    elif os.path.isfile(name_or_path) and name_or_path.endswith(".model"):
        t = _spm(name_or_path, template or "qwen2")
    elif os.path.isdir(name_or_path):
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot load a tokenizer from {name_or_path}: {e}") from e
        t = _hf_wrap(hf, name_or_path, template)
    else:
        raise ValueError(f"tokenizer {name_or_path!r}: not 'tiny', a tokenizer directory or a "
                         f"sentencepiece .model file")
    t.system_prompt = system_prompt
    return t


def _spm(path: str, template: str) -> ChatTokenizer:
    import sentencepiece as spm
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    sp = spm.SentencePieceProcessor(model_file=path)
    unk = sp.unk_id()

    def token_id(s):
        i = sp.piece_to_id(s)
        return None if i == unk else i

    eos = sp.eos_id() if sp.eos_id() >= 0 else 0
    pad = sp.pad_id() if sp.pad_id() >= 0 else eos
    return ChatTokenizer(path, TEMPLATES[template], lambda s: sp.encode(s), token_id,
                         sp.get_piece_size(), pad, eos)
