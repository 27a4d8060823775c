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

VILA's formats (what NVlabs/VILA does for its Qwen2 and Llama-3 models; see ``encode_chat``):
  auto       the tokenizer's own ``apply_chat_template`` (its jinja template, its default
             system prompt), the whole string tokenised at once with ``<image>`` as a special
             token (VILA's default conversation mode; its Qwen2 / NVILA / LongVILA-Qwen2 models).
             The default for a tokenizer directory that carries a chat template.
  llama_3    VILA's ``llama_3`` conversation (VILA1.5-8B, Llama-3 LongVILA): its own system
             prompt, ``<|eot_id|>`` after each turn but ``<|end_of_text|>`` after the last.
  hermes-2   VILA's ``hermes-2`` (ChatML with "Answer the questions." and no newline after
             ``<|im_end|>``; VILA1.5-40B).
  Targets follow VILA's label rule: every token of an assistant answer plus the one token after
  it (the end-of-turn token).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, IMAGE_TOKEN_INDEX

VILA_FORMATS = ("auto", "llama_3", "hermes-2")
TEMPLATE_CHOICES = ("qwen2", "llama3") + VILA_FORMATS
_DEFAULT = object()  # "the format's own default system prompt"
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
                 eos_id: int, hf=None, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
                 chat_format: Optional[str] = None):
        self.name, self.template, self._encode, self._token_id = name, template, encode, token_id
        self.vocab_size, self.pad_id, self.eos_id, self.hf = vocab_size, pad_id, eos_id, hf
        self.system_prompt = system_prompt
        # "qwen2" / "llama3" (built-in, piece by piece) or one of VILA_FORMATS
        self.chat_format = chat_format or template.name
        self._media_hf = None  # hf with <image> as a special token (VILA formats)
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
        return (f"ChatTokenizer({self.name!r}, format={self.chat_format}, "
                f"vocab={self.vocab_size})")


# --------------------------------------------------------------------------- VILA formats


@dataclass(frozen=True)
class VilaConversation:
    """One of VILA's ``llava/conversation.py`` conversation modes (the strings are its
    templates; the rendering rules of its separator styles are re-stated in ``_render_legacy``)."""
    name: str
    system_header: str  # put in front of a system prompt
    default_system: str
    roles: Tuple[str, str]  # (user, assistant) prefixes
    style: str  # "llama_3" | "mpt"
    sep: str
    sep2: Optional[str] = None


VILA_CONVERSATIONS: Dict[str, VilaConversation] = {
    "llama_3": VilaConversation(
        "llama_3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
        "You are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using "
        "natural language.",
        ("<|start_header_id|>user<|end_header_id|>\n\n",
         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "llama_3", "<|eot_id|>", "<|end_of_text|>"),
    "hermes-2": VilaConversation(
        "hermes-2", "<|im_start|>system\n", "Answer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>"),
}

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
MEDIA_LAYOUTS = ("train", "generate")


def _turns(conversation) -> List[List[str]]:
    """[{"from"|"role": ..., "value"|"content": ...}] -> [[role, text]] with roles
    user/assistant/system (VILA's "human"/"gpt" and the chat-template spellings)."""
    out = []
    for k, t in enumerate(conversation):
        who = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        if who not in _ROLE:
            raise ValueError(f"turn {k}: unknown speaker {who!r} (expected human/gpt/system or "
                             f"user/assistant/system)")
        if not isinstance(text, str):
            raise ValueError(f"turn {k}: text is {type(text).__name__}, not a string")
        out.append([_ROLE[who], text])
    return out


def _strip_markers(text: str) -> str:
    for m in (DEFAULT_VIDEO_TOKEN, DEFAULT_IMAGE_TOKEN):
        text = text.replace(m + "\n", "").replace("\n" + m, "").replace(m, "")
    return text


def _normalise_image_turn(text: str) -> str:
    """VILA's multimodal normalisation of a turn with ``<image>`` markers (its
    ``preprocess_multimodal``): the pieces around the markers are stripped; a piece not
    ending in a newline gets a space; each marker is followed by exactly one newline."""
    pieces = [p.strip() for p in text.split(DEFAULT_IMAGE_TOKEN)]
    pieces = [p if p.endswith("\n") else p + " " for p in pieces[:-1]] + [pieces[-1]]
    text = (DEFAULT_IMAGE_TOKEN + "\n").join(pieces).strip()
    text = text.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN + "\n")
    return text.replace(DEFAULT_IMAGE_TOKEN + "\n\n", DEFAULT_IMAGE_TOKEN + "\n")


def place_media(conversation, num_frames: int, media_layout: str = "train") -> List[List[str]]:
    """The turns with the media markers VILA puts in for ``num_frames`` frames (one ``<image>``
    per frame), as [[role, text]].

    train (VILA's datasets): ``<image>`` markers matching the frame count are images, each
    normalised as VILA does (a sample with frames and no marker gets one in front of its first
    turn); otherwise the frames are a video: every ``<video>``/``<image>`` marker is removed and
    ``"<image>\\n" * F`` goes in front of the first user turn.
    generate (VILA's ``generate_content``): ``"<image>" * F`` (no newlines) where the first
    marker was, else in front of the first user turn.
    Every turn is then stripped (VILA strips each message before templating)."""
    if media_layout not in MEDIA_LAYOUTS:
        raise ValueError(f"media_layout {media_layout!r} is not one of {MEDIA_LAYOUTS}")
    turns = _turns(conversation)
    n_img = sum(t.count(DEFAULT_IMAGE_TOKEN) for _, t in turns)
    n_vid = sum(t.count(DEFAULT_VIDEO_TOKEN) for _, t in turns)
    if num_frames <= 0:
        if n_img or n_vid:
            raise ValueError(f"{n_img + n_vid} media markers ({DEFAULT_IMAGE_TOKEN}/"
                             f"{DEFAULT_VIDEO_TOKEN}) in a sample without frames")
        return [[r, t.strip()] for r, t in turns]
    users = [i for i, (r, _) in enumerate(turns) if r == "user"]
    if not users:
        raise ValueError("a sample with frames has no user turn to put them in")
    if media_layout == "train":
        if n_vid == 0 and n_img == num_frames:
            for t in turns:
                if DEFAULT_IMAGE_TOKEN in t[1]:
                    t[1] = _normalise_image_turn(t[1])
        elif n_vid == 0 and n_img == 0 and num_frames == 1:
            first = turns[0]
            first[1] = _normalise_image_turn(DEFAULT_IMAGE_TOKEN + "\n" + first[1])
        else:
            for t in turns:
                t[1] = _strip_markers(t[1])
            u = turns[users[0]]
            u[1] = (DEFAULT_IMAGE_TOKEN + "\n") * num_frames + u[1].rstrip()
    else:
        media = DEFAULT_IMAGE_TOKEN * num_frames
        where = next((i for i, (_, t) in enumerate(turns)
                      if DEFAULT_IMAGE_TOKEN in t or DEFAULT_VIDEO_TOKEN in t), None)
        if where is None:
            turns[users[0]][1] = media + turns[users[0]][1].strip()
        else:
            t = turns[where][1]
            pos = min(p for p in (t.find(DEFAULT_IMAGE_TOKEN), t.find(DEFAULT_VIDEO_TOKEN)) if p >= 0)
            for k in range(len(turns)):
                if k == where:
                    turns[k][1] = _strip_markers(t[:pos]).strip() + media + _strip_markers(t[pos:]).strip()
                else:
                    turns[k][1] = _strip_markers(turns[k][1])
    return [[r, t.strip()] for r, t in turns]


def _system_of(tok: "ChatTokenizer", turns):
    """(system text or None or _DEFAULT, turns without a leading system turn)."""
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    else:
        system = tok.system_prompt
    if any(r == "system" for r, _ in turns):
        raise ValueError("a system turn after the first turn")
    return system, turns


def _render_legacy(conv: VilaConversation, system, turns, add_generation_prompt: bool):
    """VILA's legacy conversation rendering -> (text, [(answer start, answer end)])."""
    if system is _DEFAULT:
        system = conv.system_header + conv.default_system
    elif system is None:
        system = ""  # VILA's no_system_prompt: the template's system string is emptied
    else:
        system = conv.system_header + system
    if turns and turns[0][0] != "user":
        turns = turns[1:]  # VILA skips a first turn that is not the user's
    for k, (r, _) in enumerate(turns):
        if r != ("user", "assistant")[k % 2]:
            raise ValueError(f"{conv.name}: turns must alternate user/assistant (turn {k} is {r})")
    msgs = [[r, t] for r, t in turns]
    if add_generation_prompt:
        msgs.append(["assistant", None])
    text, spans = system + conv.sep, []
    for k, (r, t) in enumerate(msgs):
        role = conv.roles[0 if r == "user" else 1]
        if not t:
            text += role
            continue
        sep = conv.sep if (conv.style != "llama_3" or k < len(msgs) - 1) else conv.sep2
        text += role
        if r == "assistant":
            spans.append((len(text), len(text) + len(t)))
        text += t + sep
    return text, spans


def _render_auto(tok: "ChatTokenizer", system, turns, add_generation_prompt: bool):
    """The tokenizer's own chat template -> (text, [(answer start, answer end)]). Answers are
    rendered as unique markers first, so their places in the text are known exactly."""
    hf = tok.hf
    if hf is None or not getattr(hf, "chat_template", None):
        raise ValueError(f"chat format 'auto' needs a transformers tokenizer with a chat "
                         f"template; {tok.name!r} has none (use --chat-template qwen2/llama3/"
                         f"llama_3/hermes-2)")
    msgs, answers = [], []
    if system is None:
        msgs.append({"role": "system", "content": ""})  # VILA's no_system_prompt
    elif system is not _DEFAULT:
        msgs.append({"role": "system", "content": system})
    for r, t in turns:
        if r == "assistant":
            msgs.append({"role": r, "content": f"\ue000{len(answers)}\ue001"})
            answers.append(t)
        else:
            msgs.append({"role": r, "content": t})
    marked = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    text, spans, pos = "", [], 0
    for k, ans in enumerate(answers):
        m = f"\ue000{k}\ue001"
        at = marked.find(m, pos)
        if at < 0 or marked.count(m) != 1:
            raise ValueError(f"the chat template of {tok.name!r} does not render assistant "
                             f"answer {k} once and verbatim; its labels cannot be placed")
        text += marked[pos:at]
        spans.append((len(text), len(text) + len(ans)))
        text += ans
        pos = at + len(m)
    return text + marked[pos:], spans


def _media_tokenizer(tok: "ChatTokenizer"):
    """The transformers tokenizer with ``<image>`` as a special token (VILA adds its media
    tokens to the tokenizer); a private copy when the tokenizer lacks it."""
    if tok._media_hf is None:
        hf = tok.hf
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"VILA chat formats need a fast transformers tokenizer (offsets); "
                             f"{tok.name!r} is not one")
        if DEFAULT_IMAGE_TOKEN not in hf.get_vocab():
            hf = copy.deepcopy(hf)
            hf.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
        tok._media_hf = hf
    return tok._media_hf


def _tokenize_spans(tok: "ChatTokenizer", text: str, spans):
    """Whole-string tokenisation (the tokenizer's own special tokens added, as VILA calls it);
    ``<image>`` -> IMAGE_TOKEN_INDEX; targets: every token overlapping an answer and the one
    token after each answer (-> ids, targets, positions of those end-of-answer tokens)."""
    hf = _media_tokenizer(tok)
    enc = hf(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    img = hf.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    tgt, stops = [False] * len(ids), []
    for a, b in spans:
        last = None
        for j, (s, e) in enumerate(offs):
            if e > s and s < b and e > a:
                tgt[j], last = True, j
        nxt = next((j for j, (s, e) in enumerate(offs)
                    if e > s and s >= b and (last is None or j > last)), None)
        if nxt is not None:
            tgt[nxt] = True
            stops.append(nxt)
    ids = [IMAGE_TOKEN_INDEX if i == img else int(i) for i in ids]
    return ids, tgt, stops


def _encode_vila(tok, conversation, num_frames, add_generation_prompt, media_layout):
    turns = place_media(conversation, num_frames, media_layout)
    system, turns = _system_of(tok, turns)
    if tok.chat_format == "auto":
        text, spans = _render_auto(tok, system, turns, add_generation_prompt)
    else:
        text, spans = _render_legacy(VILA_CONVERSATIONS[tok.chat_format], system, turns,
                                     add_generation_prompt)
    ids, tgt, stops = _tokenize_spans(tok, text, spans)
    n = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    if n != num_frames:
        raise ValueError(f"{n} image markers for {num_frames} frames")
    return ids, tgt, stops


def encode_chat(tok: "ChatTokenizer", conversation, num_frames: int = 0, *,
                add_generation_prompt: bool = False, media_layout: str = "train"
                ) -> Tuple[List[int], List[bool]]:
    """A conversation -> (token ids with one IMAGE_TOKEN_INDEX per frame, targets), formatted
    the way ``tok.chat_format`` says (the module docstring lists them).

    ``conversation``: [{"from": "human"|"gpt"|"system", "value": str}] (VILA / LLaVA) or
    [{"role": ..., "content": str}]. ``num_frames``: the frames (or images) of the sample;
    ``media_layout`` where their markers go ("train": as VILA's datasets, "generate": as VILA's
    ``generate_content``; see ``place_media``). ``add_generation_prompt``: end with the
    assistant header (inference). Targets (not shifted) are the tokens trained on.
    VILA formats: VILA's rendering, whole-string tokenisation and label rule. Built-in formats
    (qwen2/llama3): the piecewise templates of the module docstring."""
    if tok.chat_format not in VILA_FORMATS:
        return _encode_builtin(tok, conversation, num_frames, add_generation_prompt)
    ids, tgt, _ = _encode_vila(tok, conversation, num_frames, add_generation_prompt, media_layout)
    return ids, tgt


def vila_prompt_ids(tok: "ChatTokenizer", question: str, num_frames: int = 0,
                    history: Optional[Sequence[dict]] = None,
                    media_layout: str = "generate") -> List[int]:
    """Inference prompt as VILA builds it: ``history`` turns, then a user turn with
    ``num_frames`` frames and ``question``, then the generation prompt (assistant header)."""
    conv = list(history or []) + [{"from": "human", "value": question}]
    return encode_chat(tok, conv, num_frames, add_generation_prompt=True,
                       media_layout=media_layout)[0]


def stop_token_ids(tok: "ChatTokenizer") -> List[int]:
    """The eos id and the token that closes an answer in this format (VILA infers its stop
    tokens the same way: the token after a dummy answer)."""
    out = {int(tok.eos_id)}
    dummy = [{"from": "human", "value": "question"}, {"from": "gpt", "value": "answer"}] * 2
    if tok.chat_format in VILA_FORMATS:
        ids, _, stops = _encode_vila(tok, dummy, 0, False, "train")
        out.update(int(ids[j]) for j in stops)
    else:
        end = tok.encode_template(tok.template.assistant_end)
        if len(end) == 1:
            out.add(int(end[0]))
    return sorted(out)


def _encode_builtin(tok: "ChatTokenizer", conversations, num_frames: int,
                    add_generation_prompt: bool = False) -> Tuple[List[int], List[bool]]:
    """The built-in piecewise templates (qwen2 / llama3): ``<video>`` -> ``"<image>\\n"`` per
    frame in place; a sample with frames but no marker gets them in front of its first user
    turn; each ``<image>`` -> one IMAGE_TOKEN_INDEX."""
    tpl = tok.template
    convs = [{"from": "human" if r == "user" else ("gpt" if r == "assistant" else r), "value": t}
             for r, t in _turns(conversations)]
    if add_generation_prompt:
        convs.append({"from": "gpt", "value": ""})
    n_markers = sum(t["value"].count(DEFAULT_VIDEO_TOKEN) + t["value"].count(DEFAULT_IMAGE_TOKEN)
                    for t in convs)
    if num_frames and n_markers == 0:
        first_user = next((t for t in convs if t["from"] == "human"), None)
        if first_user is None:
            raise ValueError("sample has frames but no user turn to put them in")
        first_user["value"] = DEFAULT_VIDEO_TOKEN + "\n" + first_user["value"]
    frame_text = (DEFAULT_IMAGE_TOKEN + "\n") * num_frames
    n_images = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in convs)
    for t in convs:
        v = t["value"]
        if DEFAULT_VIDEO_TOKEN in v:
            # "<video>\n" -> "<image>\n" * F (do not leave a doubled newline).
            v = v.replace(DEFAULT_VIDEO_TOKEN + "\n", frame_text).replace(DEFAULT_VIDEO_TOKEN, frame_text)
        elif DEFAULT_IMAGE_TOKEN in v and num_frames != 1 and n_images != num_frames:
            v = v.replace(DEFAULT_IMAGE_TOKEN + "\n", frame_text).replace(DEFAULT_IMAGE_TOKEN, frame_text)
        t["value"] = v
    ids: List[int] = []
    tgt: List[bool] = []

    def add(piece_ids, target):
        ids.extend(piece_ids)
        tgt.extend([target] * len(piece_ids))

    def add_content(text):
        for i, part in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
            if i:
                add([IMAGE_TOKEN_INDEX], False)
            add(tok.encode_text(part), False)

    add(tok.encode_template(tpl.prefix), False)
    start = 0
    if convs and convs[0]["from"] == "system":
        system, start = convs[0]["value"], 1
    else:
        system = tok.system_prompt
    if system is _DEFAULT:
        system = DEFAULT_SYSTEM_PROMPT
    if system is not None:
        pre, post = tpl.system.split("{content}")
        add(tok.encode_template(pre), False)
        add(tok.encode_text(system), False)
        add(tok.encode_template(post), False)
    upre, upost = tpl.user.split("{content}")
    for t in convs[start:]:
        if t["from"] == "system":
            raise ValueError("a system turn after the first turn")
        if t["from"] == "human":
            add(tok.encode_template(upre), False)
            add_content(t["value"])
            add(tok.encode_template(upost), False)
        else:
            add(tok.encode_template(tpl.assistant_header), False)
            add(tok.encode_text(t["value"]), True)
            add(tok.encode_template(tpl.assistant_end), True)
            add(tok.encode_template(tpl.after_assistant), False)
    if add_generation_prompt:  # cut where the empty answer's end-of-turn token starts
        k = max(i for i, t in enumerate(tgt) if t and (i == 0 or not tgt[i - 1]))
        ids, tgt = ids[:k], tgt[:k]
    n_img = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    if n_img != num_frames:
        raise ValueError(f"{n_img} image markers for {num_frames} frames")
    return ids, tgt


# --------------------------------------------------------------------------- construction


def _hf_wrap(tok, name: str, template: Optional[str]) -> ChatTokenizer:
    vocab = tok.get_vocab()
    if template is None:
        if getattr(tok, "chat_template", None):
            template = "auto"
        elif "<|im_start|>" in vocab:
            template = "qwen2"
        elif "<|start_header_id|>" in vocab:
            template = "llama3"
        else:
            raise ValueError(f"cannot tell the chat template of tokenizer {name!r} (no chat "
                             f"template, no <|im_start|> or <|start_header_id|> token); pass "
                             f"template= one of {TEMPLATE_CHOICES}")
    if template not in TEMPLATE_CHOICES:
        raise ValueError(f"unknown chat template {template!r}; known: {TEMPLATE_CHOICES}")
    if template in TEMPLATES:
        tpl = TEMPLATES[template]
    else:  # VILA formats: the template record only names the end-of-answer token
        tpl = ChatTemplate(template, "", "{content}", "{content}", "", "", "", ())

    def token_id(s):
        return vocab.get(s)

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    eos = tok.eos_token_id
    if eos is None:
        eos = vocab.get(tpl.assistant_end, 0) if tpl.assistant_end else 0
    pad = tok.pad_token_id
    if pad is None:
        for cand in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<|end_of_text|>"):
            if cand in vocab:
                pad = vocab[cand]
                break
        else:
            pad = eos
    t = ChatTokenizer(name, tpl, encode, token_id, len(tok), pad, eos, hf=tok,
                      chat_format=template)
    if template in VILA_FORMATS:
        t.system_prompt = _DEFAULT
        stops = [i for i in stop_token_ids(t) if i != eos]
        end = tok.convert_ids_to_tokens(stops[0]) if stops else (tok.eos_token or "")
        t.template = ChatTemplate(template, "", "{content}", "{content}", "", end, "",
                                  (end,) if end in vocab else ())
        t._special_re = re.compile("(" + re.escape(end) + ")") if end else t._special_re
        t._cache.clear()
    return t


# ChatML as Qwen2's tokenizer template writes it (default system prompt when none is given).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_hf_tokenizer():
    """The "tiny" tokenizer as a transformers PreTrainedTokenizerFast (no files, no download);
    it carries Qwen2's ChatML chat template (used by the 'auto' format)."""
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
    hf.chat_template = QWEN2_CHAT_TEMPLATE
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
                    system_prompt=_DEFAULT) -> ChatTokenizer:
    """See the module docstring. ``system_prompt``: left out, the format's own default (built-in
    formats: "You are a helpful assistant."; VILA formats: the template's / conversation's);
    ``None`` leaves the system prompt out (unless the sample has its own system turn; VILA's
    no_system_prompt for its formats); a string replaces it."""
    if name_or_path == "tiny":
        t = _hf_wrap(make_tiny_hf_tokenizer(), "tiny", template or "qwen2")
        if max(t.hf.get_vocab().values()) >= 512:
            raise AssertionError("tiny tokenizer ids must stay below 512")
    elif os.path.isfile(name_or_path) and name_or_path.endswith(".model"):
        if template in VILA_FORMATS:
            raise ValueError(f"chat template {template!r} needs a transformers tokenizer, not the "
                             f"sentencepiece model {name_or_path}")
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
    if system_prompt is _DEFAULT:
        system_prompt = _DEFAULT if t.chat_format in VILA_FORMATS else DEFAULT_SYSTEM_PROMPT
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
