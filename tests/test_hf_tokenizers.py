"""HFTokenizer (any tokenizer.json) and chat templates, against transformers on the same files.

The tokenizer is a tiny byte-level BPE trained here, with Llama 3's and Qwen's special tokens added after
the learned vocabulary (as in the released models); the chat templates are the real ones of Llama 3.1,
Llama 3.2, Qwen 2.5 and Qwen3 (tests/fixtures/chat_templates, sources in its README). transformers'
`AutoTokenizer` reads the same directory and is the reference for text, ids and decoding.
"""

import hashlib
import json
import pathlib

import numpy as np
import pytest
import tokenizers as hf_tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxrlhf.text import CharTokenizer, GPT2Tokenizer, HFTokenizer, TokenizerFileError, chat, load_tokenizer

TEMPLATES = pathlib.Path(__file__).parent / "fixtures" / "chat_templates"
SHA256 = {
    "llama3.1.jinja": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "llama3.2.jinja": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
    "qwen2.5.jinja": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "qwen3.jinja": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
}
LLAMA_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL = LLAMA_SPECIAL + QWEN_SPECIAL
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer in one sentence.",
    "Hello, how are you today? I am fine, thank you!",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "system user assistant tool",
]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
TURNS = [
    {"role": "user", "content": "  Hello, how are you?\n"},
    {"role": "assistant", "content": "Fine, thanks! Café au lait? 😀"},
    {"role": "user", "content": "Tell me about the fox\tand <think>the dog</think>."},
]
CONVERSATIONS = {"system": [SYSTEM, *TURNS], "no_system": TURNS, "one_turn": TURNS[:1]}
# Per family: the tokenizer_config.json / generation_config.json fields of the released models.
FAMILIES = {
    "llama": (
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        {"bos_token_id": "<|begin_of_text|>", "eos_token_id": ["<|end_of_text|>", "<|eot_id|>"]},
    ),
    "qwen": (
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        {
            "bos_token_id": "<|endoftext|>",
            "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
            "pad_token_id": "<|endoftext|>",
        },
    ),
}
TEMPLATE_FAMILY = {"llama3.1": "llama", "llama3.2": "llama", "qwen2.5": "qwen", "qwen3": "qwen"}


@pytest.fixture(scope="module")
def base_tokenizer() -> hf_tokenizers.Tokenizer:
    tok = hf_tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens([hf_tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    # Qwen3's <think> is an added token that is not special (it is text the model writes).
    tok.add_tokens(
        [
            hf_tokenizers.AddedToken("<think>", normalized=False),
            hf_tokenizers.AddedToken("</think>", normalized=False),
        ]
    )
    return tok


def write_dir(path, base_tokenizer, family="llama", template=None, **config_overrides) -> pathlib.Path:
    """A model directory: tokenizer.json, tokenizer_config.json (+ template), generation_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    base_tokenizer.save(str(path / "tokenizer.json"))
    config, generation = FAMILIES[family]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config, **config_overrides}
    if template is not None:
        config["chat_template"] = (TEMPLATES / f"{template}.jinja").read_text()
    ids = {
        k: [base_tokenizer.token_to_id(t) for t in v]
        if isinstance(v, list)
        else base_tokenizer.token_to_id(v)
        for k, v in generation.items()
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps(ids))
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, base_tokenizer) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_dir(root / name, base_tokenizer, fam, name) for name, fam in TEMPLATE_FAMILY.items()}


@pytest.fixture(scope="module")
def references(model_dirs) -> dict[str, transformers.PreTrainedTokenizerBase]:
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in model_dirs.items()}


def template_vars(name: str) -> dict:
    # Llama 3.2 prints today's date unless given one; fix it so both sides render the same day.
    return {"date_string": "26 Jul 2024"} if name.startswith("llama") else {}


# ------------------------------------------------------------------------------------- fixtures


def test_fixtures_are_the_published_templates():
    for name, digest in SHA256.items():
        assert hashlib.sha256((TEMPLATES / name).read_bytes()).hexdigest() == digest, name


# -------------------------------------------------------------------------------- encode / decode


def test_encode_decode_match_transformers(model_dirs, references):
    tok = HFTokenizer.from_dir(model_dirs["llama3.2"])
    ref = references["llama3.2"]
    texts = [
        *CORPUS,
        "",
        "unseen wörds 日本語 😀\n\n  spaces  ",
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "glued<|im_start|>x<|im_end|>y<think>z</think>",
        "<|eot_id <|eot_id|>>",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.encode_many(texts) == [ref.encode(t, add_special_tokens=False) for t in texts]
    # The embedding size: every id, added tokens included.
    assert tok.vocab_size == len(ref) == max(ref.get_vocab().values()) + 1


def test_special_ids_and_stop_ids_from_the_files(model_dirs, base_tokenizer):
    ids = {t: base_tokenizer.token_to_id(t) for t in [*SPECIAL, "<think>"]}
    llama = HFTokenizer.from_dir(model_dirs["llama3.2"])
    assert llama.eos_id == ids["<|eot_id|>"] and llama.bos_id == ids["<|begin_of_text|>"]
    assert llama.pad_id == llama.eos_id  # no pad token: pad with the EOS
    # generation_config lists both ends (turn and text); stop_ids is their sorted union with eos_id.
    assert llama.stop_ids == tuple(sorted((ids["<|end_of_text|>"], ids["<|eot_id|>"])))
    assert llama.special_ids == frozenset(ids[t] for t in SPECIAL)  # <think> is an added, non-special token
    qwen = HFTokenizer.from_dir(model_dirs["qwen2.5"])
    assert qwen.bos_id is None and qwen.eos_id == ids["<|im_end|>"] and qwen.pad_id == ids["<|endoftext|>"]
    assert qwen.stop_ids == tuple(sorted((ids["<|im_end|>"], ids["<|endoftext|>"])))
    # decode(stop_at_eos=True) stops at the first stop id, whichever it is.
    text_ids = qwen.encode("a b<|endoftext|>c<|im_end|>")
    assert qwen.decode(text_ids, stop_at_eos=True) == "a b"


def test_eos_falls_back_to_generation_config_and_config_forms(tmp_path, base_tokenizer):
    # No eos_token in tokenizer_config.json: generation_config's first eos id; an AddedToken dict works too.
    d = write_dir(
        tmp_path / "a", base_tokenizer, "llama", eos_token=None, bos_token={"content": "<|begin_of_text|>"}
    )
    tok = HFTokenizer.from_dir(d)
    assert tok.eos_id == base_tokenizer.token_to_id("<|end_of_text|>")
    assert tok.bos_id == base_tokenizer.token_to_id("<|begin_of_text|>")
    # A list of named templates: "default" is used; chat_template.jinja, when present, wins (as in
    # transformers).
    d = write_dir(
        tmp_path / "b",
        base_tokenizer,
        "qwen",
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    )
    assert HFTokenizer.from_dir(d).chat_template == "D"
    (d / "chat_template.jinja").write_text("J")
    assert HFTokenizer.from_dir(d).chat_template == "J"


def test_config_added_tokens_join_the_vocabulary_as_in_transformers(tmp_path, base_tokenizer):
    # A token that tokenizer_config.json's added_tokens_decoder lists but tokenizer.json lacks is added at
    # its id (transformers does the same), and counts as special when marked so.
    n = base_tokenizer.get_vocab_size(with_added_tokens=True)
    added = {
        str(n): {"content": "<|tool|>", "special": True},
        str(n + 1): {"content": "<note>", "special": False},
    }
    d = write_dir(tmp_path / "added", base_tokenizer, "llama", added_tokens_decoder=added)
    tok, ref = HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))
    text = "a<|tool|>b <note> c"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.encode("<|tool|><note>") == [n, n + 1]
    assert tok.vocab_size == len(ref) == n + 2
    assert n in tok.special_ids and n + 1 not in tok.special_ids
    assert base_tokenizer.token_to_id("<|tool|>") is None  # the caller's tokenizer is not changed


def test_batches_pad_with_pad_id_and_keep_masks(model_dirs):
    qwen = HFTokenizer.from_dir(model_dirs["qwen2.5"])
    texts = ["Hello", "The quick brown fox"]
    ids, mask = qwen.encode_batch(texts, side="left")
    assert (ids[~mask] == qwen.pad_id).all() and qwen.pad_id != qwen.eos_id
    assert qwen.decode_batch(ids, mask) == texts
    convs = [CONVERSATIONS["one_turn"], CONVERSATIONS["system"]]
    ids, mask = qwen.encode_chat_batch(convs)
    for row, conv in enumerate(convs):
        want = qwen.apply_chat_template(conv, add_generation_prompt=True).ids
        np.testing.assert_array_equal(ids[row][mask[row]], want)
        assert mask[row, -len(want) :].all() and not mask[row, : -len(want)].any()  # left-padded
        assert (ids[row][~mask[row]] == qwen.pad_id).all()


# ----------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", list(TEMPLATE_FAMILY))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(
    model_dirs, references, name, conversation, add_generation_prompt
):
    tok, ref = HFTokenizer.from_dir(model_dirs[name]), references[name]
    messages, kw = CONVERSATIONS[conversation], template_vars(name)
    enc = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)
    want_text = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )
    want_ids = ref.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kw
    )
    assert enc.text == want_text
    assert enc.ids == list(want_ids["input_ids"])
    assert tok.render_chat(messages, add_generation_prompt=add_generation_prompt, **kw) == want_text


def test_template_variables_reach_the_template(model_dirs, references):
    # Qwen3's enable_thinking=False writes an empty think block after the generation prompt.
    tok, ref = HFTokenizer.from_dir(model_dirs["qwen3"]), references["qwen3"]
    messages = CONVERSATIONS["no_system"]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert enc.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert enc.text == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    # Without date_string Llama 3.2 asks strftime_now for today's date, as under transformers.
    llama = HFTokenizer.from_dir(model_dirs["llama3.2"])
    text = llama.render_chat(messages)
    assert text == references["llama3.2"].apply_chat_template(messages, tokenize=False)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_temperature",
        "description": "Temperature at a place <in °C> & more",
        "parameters": {"type": "object", "properties": {"place": {"type": "string"}}, "required": ["place"]},
    },
}


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5"])
def test_tools_render_as_transformers(model_dirs, references, name):
    # tojson(indent=4) in Llama 3.1, tojson in Qwen 2.5: plain JSON, no HTML escaping, non-ASCII kept.
    tok, ref = HFTokenizer.from_dir(model_dirs[name]), references[name]
    kw = {**template_vars(name), "tools": [WEATHER_TOOL]}
    messages = CONVERSATIONS["system"]
    text = tok.render_chat(messages, add_generation_prompt=True, **kw)
    assert "<in °C> & more" in text
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


# trim_blocks, lstrip_blocks, loop controls, namespace, dict, the generation tag and the default variables;
# HuggingFaceH4/zephyr-7b-beta's template (via huggingface.js e2e.test.js) is the first, real, part.
ENVIRONMENT_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}
    {% set ns = namespace(n=0) %}
    {% for message in messages %}
        {% if message.role == 'system' %}{% continue %}{% endif %}
        {% set ns.n = ns.n + 1 %}
        {% if ns.n > 1 %}{% break %}{% endif %}
first={{ message.content | tojson }}
    {% endfor %}
{% generation %}gen {{ dict(a=1, b='é<') | tojson(indent=2) }}{% endgeneration %}
tools={{ tools is none }} documents={{ documents is none }} bos={{ bos_token }} pad={{ pad_token is defined }}
"""


def test_environment_matches_transformers(model_dirs, references):
    tok, ref = HFTokenizer.from_dir(model_dirs["qwen2.5"]), references["qwen2.5"]
    for messages in CONVERSATIONS.values():
        for add in (False, True):
            text = chat.render(
                ENVIRONMENT_TEMPLATE, messages, add_generation_prompt=add, special_tokens=tok.special_tokens
            )
            want = ref.apply_chat_template(
                messages, chat_template=ENVIRONMENT_TEMPLATE, tokenize=False, add_generation_prompt=add
            )
            assert text == want
    assert 'gen {\n  "a": 1,\n  "b": "é<"\n}' in text and "bos= pad=True" in text


def test_special_mask_marks_exactly_the_special_tokens(model_dirs):
    tok = HFTokenizer.from_dir(model_dirs["llama3.1"])
    enc = tok.apply_chat_template(
        CONVERSATIONS["system"], add_generation_prompt=True, **template_vars("llama")
    )
    vocab = {
        i: t
        for t, i in json.loads((model_dirs["llama3.1"] / "tokenizer.json").read_text())["model"][
            "vocab"
        ].items()
    }
    names = [vocab.get(i) or tok._tok.id_to_token(i) for i in enc.ids]
    assert enc.special_mask == [n in SPECIAL for n in names]
    # BOS, then per turn a header pair and an <|eot_id|>; the generation prompt adds one more header pair.
    counts = {t: names.count(t) for t in LLAMA_SPECIAL}
    assert counts == {
        "<|begin_of_text|>": 1,
        "<|end_of_text|>": 0,
        "<|start_header_id|>": 5,
        "<|end_header_id|>": 5,
        "<|eot_id|>": 4,
    }
    assert "<think>" in names and not enc.special_mask[names.index("<think>")]  # user text, not markup


# ---------------------------------------------------------------------------------------- errors


def test_unknown_role_dropped_by_the_template_is_refused(model_dirs, references):
    messages = [*TURNS[:1], {"role": "critic", "content": "Too long."}, *TURNS[1:]]
    # transformers renders Qwen 2.5 without the message, silently.
    assert "Too long." not in references["qwen2.5"].apply_chat_template(messages, tokenize=False)
    with pytest.raises(
        chat.ChatTemplateError,
        match=r"message 1 \(role 'critic'\).*roles it knows: assistant, system, tool, user",
    ) as err:
        HFTokenizer.from_dir(model_dirs["qwen2.5"]).apply_chat_template(messages)
    assert "\n" not in str(err.value)
    # Llama 3 writes any role into its header: same output as transformers, no error.
    llama = HFTokenizer.from_dir(model_dirs["llama3.1"])
    kw = template_vars("llama")
    assert llama.render_chat(messages, **kw) == references["llama3.1"].apply_chat_template(
        messages, tokenize=False, **kw
    )


def test_raise_exception_names_the_message(tmp_path, base_tokenizer):
    # Mixtral-8x7B-Instruct-v0.1's template (via huggingface.js packages/jinja/test/e2e.test.js).
    mixtral = (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
        "{% endif %}{% endfor %}"
    )
    tok = HFTokenizer.from_dir(write_dir(tmp_path / "m", base_tokenizer, "llama", chat_template=mixtral))
    first, second, third = (m["content"] for m in TURNS)
    want = f"<|begin_of_text|>[INST] {first} [/INST]{second}<|eot_id|>[INST] {third} [/INST]"
    assert tok.render_chat(TURNS) == want
    with pytest.raises(
        chat.ChatTemplateError,
        match=r"refuses message 2 \(role 'assistant'\): Conversation roles must alternate",
    ):
        tok.render_chat([TURNS[0], TURNS[1], TURNS[1]])
    with pytest.raises(
        chat.ChatTemplateError, match=r"refuses message 1 \(role 'tool'\): Only user and assistant"
    ):
        tok.render_chat([TURNS[0], {"role": "tool", "content": "42"}])


def test_bad_messages_are_one_line_errors(model_dirs):
    tok = HFTokenizer.from_dir(model_dirs["qwen2.5"])
    cases = [
        ("hello", r"messages is a str"),
        ([], r"empty"),
        (["hello"], r"message 0 is a str, not a dict"),
        ([{"role": "user"}], r"message 0: 'content' is missing"),
        (
            [TURNS[0], {"role": "user", "content": [{"type": "text", "text": "x"}]}],
            r"message 1: 'content' is a list",
        ),
        ([{"role": 3, "content": "x"}], r"message 0: 'role' is a int"),
    ]
    for messages, match in cases:
        with pytest.raises(chat.ChatTemplateError, match=match) as err:
            tok.apply_chat_template(messages)
        assert "\n" not in str(err.value)


def test_missing_template_names_tokenizer_config(tmp_path, base_tokenizer):
    tok = HFTokenizer.from_dir(write_dir(tmp_path / "base", base_tokenizer, "llama"))
    assert tok.chat_template is None
    with pytest.raises(
        chat.ChatTemplateError, match=r"no chat template: tokenizer_config.json has no chat_template"
    ):
        tok.apply_chat_template(TURNS)


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, base_tokenizer):
    d = write_dir(tmp_path / "eos", base_tokenizer, "llama", eos_token="<|eom_id|>")
    with pytest.raises(
        TokenizerFileError,
        match=r"tokenizer_config.json in .*eos_token '<\|eom_id\|>' is not in the vocabulary",
    ):
        HFTokenizer.from_dir(d)
    d = write_dir(tmp_path / "cut", base_tokenizer, "llama")
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(
        TokenizerFileError,
        match=r"cut/tokenizer.json: the tokenizers library cannot read it .*truncated or corrupt",
    ) as err:
        load_tokenizer(d)
    assert "\n" not in str(err.value)
    d = write_dir(tmp_path / "cfg", base_tokenizer, "llama")
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|eot_id|>", ')
    with pytest.raises(TokenizerFileError, match=r"cfg/tokenizer_config.json: not valid JSON"):
        HFTokenizer.from_dir(d)
    d = write_dir(tmp_path / "gen", base_tokenizer, "llama")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 10**6]}))
    with pytest.raises(
        TokenizerFileError, match=r"generation_config.json in .*eos_token_id 1000000 is outside"
    ):
        HFTokenizer.from_dir(d)
    d = write_dir(
        tmp_path / "clash",
        base_tokenizer,
        "llama",
        added_tokens_decoder={"3": {"content": "<|eot_id|>", "special": True}},
    )
    with pytest.raises(TokenizerFileError, match=r"gives '<\|eot_id\|>' id 3 but tokenizer.json gives it"):
        HFTokenizer.from_dir(d)


def test_load_tokenizer_reads_a_char_tokenizer_named_tokenizer_json(tmp_path):
    # HappyGPT writes its CharTokenizer to <out>/tokenizer.json, Hugging Face's file name.
    tok = CharTokenizer.from_corpus(["hello world", "happy"], eos="\n", unk="?")
    tok.save(tmp_path / "tokenizer.json")
    for where in (tmp_path / "tokenizer.json", tmp_path):
        got = load_tokenizer(where)
        assert isinstance(got, CharTokenizer) and got.encode("hello") == tok.encode("hello")
    (tmp_path / "tokenizer.json").write_text('{"kind": "char", "chars"')  # cut short: still named
    with pytest.raises(TokenizerFileError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_load_tokenizer_dispatch_and_missing_files(tmp_path, base_tokenizer):
    d = write_dir(tmp_path / "both", base_tokenizer, "llama")
    base_tokenizer.model.save(str(d))  # vocab.json + merges.txt beside tokenizer.json
    assert {"vocab.json", "merges.txt"} <= {p.name for p in d.iterdir()}
    assert isinstance(load_tokenizer(d), HFTokenizer)
    assert load_tokenizer(d / "tokenizer.json").encode_many(CORPUS) == load_tokenizer(d).encode_many(CORPUS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"looked for tokenizer.json \(Hugging Face\), vocab.json \+ merges.txt"
    ):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in"):
        HFTokenizer.from_dir(empty)
    (empty / "vocab.json").write_text("{}")  # a GPT-2 directory is still read as one
    with pytest.raises(TokenizerFileError, match="merges.txt"):
        GPT2Tokenizer.from_dir(empty)


def test_save_load_round_trip(tmp_path, model_dirs):
    tok = HFTokenizer.from_dir(model_dirs["qwen3"])
    tok.save(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, HFTokenizer)
    for attr in ("eos_id", "bos_id", "pad_id", "stop_ids", "special_ids", "chat_template", "vocab_size"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert loaded.encode_many(CORPUS) == tok.encode_many(CORPUS)
    messages = CONVERSATIONS["system"]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
        messages, add_generation_prompt=True
    )
    # transformers reads what save wrote, with the same template.
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert ref.apply_chat_template(messages, tokenize=False) == tok.render_chat(messages)
