"""Chat formatting as NVlabs/VILA does it, checked against a reference written here from VILA's
rules (not our code path): the tokenizer's own ``apply_chat_template`` (or VILA's legacy
``llama_3`` conversation string), the whole string tokenised with ``<image>`` as a special
token, and labels found VILA's way: render again with every answer replaced by a sentinel
token, drop each sentinel and the token after it, match greedily; unmatched tokens are labels.

Tokenizers are real BPE tokenizers trained here with the ``tokenizers`` library (merges, so
whole-string and piecewise tokenisation differ), with Qwen2 / Llama-3 style specials and chat
templates; nothing is downloaded."""

import copy

import pytest
import torch

from megatron_longvila.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from megatron_longvila.data import build_tokenizer
from megatron_longvila.data.packing import expand_sample
from megatron_longvila.data.task_encoder import EncodedSample, SampleError, TaskEncoder
from megatron_longvila.data.tokenizer import stop_token_ids, vila_prompt_ids

QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CORPUS = ["What is moving in the video? A red square moves left across the frame.",
          "Describe the image in detail. There is a blue disc on a grey background.",
          "Which colour is the shape? The shape is red. Answer the questions.",
          "You are a helpful assistant. You are a helpful language and vision assistant.",
          "system user assistant\n\n the frame count is four; the square turns around."] * 20


# The pre-tokenizer split of Llama-3's / Qwen2's tokenizer.json (newline runs stay together).
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(path, specials, bos=None, eos=None, jinja=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, tr)
    if bos is not None:  # Llama-3 style: the tokenizer itself puts BOS in front
        t.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, t.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=t, bos_token=bos, eos_token=eos)
    if jinja:
        hf.chat_template = jinja
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    qwen = train_tokenizer(root / "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                           eos="<|im_end|>", jinja=QWEN2_JINJA)
    llama = train_tokenizer(root / "llama3", ["<|begin_of_text|>", "<|end_of_text|>",
                                              "<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"],
                            bos="<|begin_of_text|>", eos="<|eot_id|>", jinja=LLAMA3_JINJA)
    return {"qwen2-auto": (qwen, None), "llama3-auto": (llama, None),
            "llama3-vila-llama_3": (llama, "llama_3")}


# ------------------------------------------------------------------ the reference (VILA's rules)

VILA_LLAMA3_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a "
                      "helpful language and vision assistant. You are able to understand the "
                      "visual content that the user provides, and assist the user with a variety "
                      "of tasks using natural language.")


def ref_media(conv, n):
    """VILA's datasets: video -> markers removed, '<image>\\n' * n before the question; images
    -> each marker followed by one newline, pieces stripped; then every message stripped."""
    conv = copy.deepcopy(conv)
    n_img = sum(t["value"].count("<image>") for t in conv)
    first_user = next(t for t in conv if t["from"] == "human")
    if n and ("<video>" in first_user["value"] or n_img != n):
        q = first_user["value"]
        for m in ("<image>", "<video>"):
            q = q.replace(m + "\n", "").replace("\n" + m, "").replace(m, "")
        first_user["value"] = "<image>\n" * n + q.rstrip()
    elif n:
        for t in conv:
            if "<image>" in t["value"]:
                parts = [p.strip() for p in t["value"].split("<image>")]
                out = parts[0]
                for p in parts[1:]:  # every piece before a marker gets a space, then "<image>\n"
                    out += " <image>\n" + p
                t["value"] = out.strip()
    for t in conv:
        t["value"] = t["value"].strip()
    return conv


def ref_render(hf, conv, mode, sentinel=None, gen=False):
    msgs = [{"role": {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]],
             "content": sentinel if (sentinel and t["from"] == "gpt") else t["value"]}
            for t in conv]
    if mode is None:
        return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert mode == "llama_3"
    roles = {"user": "<|start_header_id|>user<|end_header_id|>\n\n",
             "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
    if gen:  # VILA appends an empty assistant message: only its role is written
        msgs.append({"role": "assistant", "content": None})
    text = VILA_LLAMA3_SYSTEM + "<|eot_id|>"
    for k, m in enumerate(msgs):
        text += roles[m["role"]]
        if m["content"]:
            text += m["content"] + ("<|eot_id|>" if k < len(msgs) - 1 else "<|end_of_text|>")
    return text


def reference(tok_dir, mode, conv, n):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    hf.add_tokens(["<image>", "<vila/sentinel>"], special_tokens=True)
    img, sen = hf.convert_tokens_to_ids("<image>"), hf.convert_tokens_to_ids("<vila/sentinel>")
    conv = ref_media(conv, n)
    inputs = hf(ref_render(hf, conv, mode)).input_ids
    template = hf(ref_render(hf, conv, mode, sentinel="<vila/sentinel>")).input_ids
    keep = [True] * len(template)
    for k in range(len(template) - 1):
        if template[k] == sen:
            keep[k] = keep[k + 1] = False
    template = [x for x, m in zip(template, keep) if m]
    labels, p = [IGNORE_INDEX] * len(inputs), 0
    for k, x in enumerate(inputs):
        if p < len(template) and x == template[p]:
            p += 1
        else:
            labels[k] = x
    assert p == len(template), "reference: template not matched"
    ids = [IMAGE_TOKEN_INDEX if x == img else x for x in inputs]
    return ids, [lab != IGNORE_INDEX for lab in labels]


CONVS = {
    "video": ([{"from": "human", "value": "<video>\nWhat is moving in the video?"},
               {"from": "gpt", "value": "A red square moves left across the frame."}], 3),
    "video-marker-last": ([{"from": "human", "value": "Describe the video. <video>"},
                           {"from": "gpt", "value": "The square turns around."}], 2),
    "image": ([{"from": "human", "value": "Which colour is the shape?\n<image>"},
               {"from": "gpt", "value": "The shape is red."}], 1),
    "two-images": ([{"from": "human", "value": "<image>\nDescribe the image. <image> in detail"},
                    {"from": "gpt", "value": "There is a blue disc on a grey background."}], 2),
    "image-no-marker": ([{"from": "human", "value": "Describe the image in detail."},
                         {"from": "gpt", "value": " There is a blue disc. "}], 1),
    "multi-turn": ([{"from": "human", "value": "<video>\nWhat is moving in the video?"},
                    {"from": "gpt", "value": "A red square."},
                    {"from": "human", "value": "Which colour is the shape?"},
                    {"from": "gpt", "value": "The shape is red."}], 4),
    "text-only": ([{"from": "human", "value": "Answer the questions. What is four?"},
                   {"from": "gpt", "value": "the frame count"},
                   {"from": "human", "value": "and the square?"},
                   {"from": "gpt", "value": "It turns around."}], 0),
    "system-turn": ([{"from": "system", "value": "Answer the questions."},
                     {"from": "human", "value": "<video>\nWhat is moving?"},
                     {"from": "gpt", "value": "A red square."}], 2),
}


@pytest.mark.parametrize("fmt", ["qwen2-auto", "llama3-auto", "llama3-vila-llama_3"])
def test_ids_and_labels_equal_vila_reference(toks, fmt):
    tok_dir, mode = toks[fmt]
    tok = build_tokenizer(tok_dir, template=mode)
    assert tok.chat_format == (mode or "auto")
    enc = TaskEncoder(tok)
    for name, (conv, n) in CONVS.items():
        if mode == "llama_3" and name == "system-turn":
            continue  # VILA's legacy conversations have no system turn in the data
        ids, tgt = enc.encode_conversation(copy.deepcopy(conv), n)
        rids, rtgt = reference(tok_dir, mode, conv, n)
        assert ids == rids, (fmt, name)
        assert tgt == rtgt, (fmt, name)
        assert ids.count(IMAGE_TOKEN_INDEX) == n
        # trained on: the answers and the end-of-turn token after each (VILA's label rule)
        answers = [t["value"].strip() for t in conv if t["from"] == "gpt"]
        trained = tok.hf.decode([i for i, t in zip(ids, tgt) if t])
        end = {"qwen2-auto": "<|im_end|>", "llama3-auto": "<|eot_id|>"}.get(fmt)
        if end:
            assert trained == "".join(a + end for a in answers), (fmt, name, trained)
        else:  # VILA's llama_3: the last answer ends with <|end_of_text|>
            assert trained == "".join(a + "<|eot_id|>" for a in answers[:-1]) + answers[-1] + "<|end_of_text|>"
        # packed with 3 tokens per frame: labels are the next token where it is a target
        s = EncodedSample("k", ids, tgt, [b""] * n, conv)
        t3, l3 = expand_sample(s, 3)
        want = [i for i in rids for _ in range(3 if i == IMAGE_TOKEN_INDEX else 1)]
        wt = [g for i, g in zip(rids, rtgt) for _ in range(3 if i == IMAGE_TOKEN_INDEX else 1)]
        assert t3.tolist() == want
        assert l3.tolist() == [want[k + 1] if wt[k + 1] else IGNORE_INDEX
                               for k in range(len(want) - 1)] + [IGNORE_INDEX]


def test_whole_string_differs_from_piecewise(toks):
    """The BPE here merges across what were template piece boundaries: the VILA format is not
    the built-in piecewise encoding under another name (so the test above can fail)."""
    tok_dir, _ = toks["qwen2-auto"]
    vila = TaskEncoder(build_tokenizer(tok_dir))
    piece = TaskEncoder(build_tokenizer(tok_dir, template="qwen2"))
    diffs = [name for name, (conv, n) in CONVS.items()
             if vila.encode_conversation(copy.deepcopy(conv), n)
             != piece.encode_conversation(copy.deepcopy(conv), n)]
    assert diffs


@pytest.mark.parametrize("fmt", ["qwen2-auto", "llama3-auto", "llama3-vila-llama_3"])
def test_generation_prompt_and_stop_tokens(toks, fmt):
    from transformers import AutoTokenizer
    tok_dir, mode = toks[fmt]
    tok = build_tokenizer(tok_dir, template=mode)
    hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    hf.add_tokens(["<image>"], special_tokens=True)
    img = hf.convert_tokens_to_ids("<image>")
    # VILA's generate_content: "<image>" * F in front of the text, no newline
    conv = [{"from": "human", "value": "<image>" * 3 + "What is moving?"}]
    want = [IMAGE_TOKEN_INDEX if x == img else x
            for x in hf(ref_render(hf, conv, mode, gen=True)).input_ids]
    assert vila_prompt_ids(tok, "<video>\nWhat is moving?", 3) == want
    assert vila_prompt_ids(tok, "What is moving?", 3) == want
    # training layout for the same question: "<image>\n" per frame
    conv = ref_media([{"from": "human", "value": "What is moving?"}], 3)
    want = [IMAGE_TOKEN_INDEX if x == img else x
            for x in hf(ref_render(hf, conv, mode, gen=True)).input_ids]
    assert vila_prompt_ids(tok, "What is moving?", 3, media_layout="train") == want
    stops = {hf.convert_ids_to_tokens(i) for i in stop_token_ids(tok)}
    assert stops == {"qwen2-auto": {"<|im_end|>"}, "llama3-auto": {"<|eot_id|>"},
                     "llama3-vila-llama_3": {"<|eot_id|>", "<|end_of_text|>"}}[fmt]


def test_tokenizer_dir_without_template_and_bad_input(toks, tmp_path):
    tok = build_tokenizer(toks["qwen2-auto"][0])
    with pytest.raises(SampleError, match="2 media markers .* without frames"):
        TaskEncoder(tok).encode_conversation([{"from": "human", "value": "<image> <image>"},
                                              {"from": "gpt", "value": "x"}], 0)
    with pytest.raises(SampleError, match="unknown speaker 'bot'"):
        TaskEncoder(tok).encode_conversation([{"from": "bot", "value": "x"}], 0)
    with pytest.raises(ValueError, match="needs a transformers tokenizer with a chat template"):
        TaskEncoder(build_tokenizer("tiny", template="auto").__class__(
            "x", tok.template, tok._encode, tok._token_id, 10, 0, 0, hf=None,
            chat_format="auto")).encode_conversation([{"from": "human", "value": "x"}], 0)
    # the tiny tokenizer carries Qwen2's ChatML template: auto == the built-in qwen2 there
    conv, n = CONVS["multi-turn"]
    a = TaskEncoder(build_tokenizer("tiny", template="auto")).encode_conversation(copy.deepcopy(conv), n)
    b = TaskEncoder(build_tokenizer("tiny")).encode_conversation(copy.deepcopy(conv), n)
    assert a == b
    assert torch.tensor(a[0]).min() == IMAGE_TOKEN_INDEX
