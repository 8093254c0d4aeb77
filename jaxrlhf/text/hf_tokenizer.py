"""`HFTokenizer`: any Hugging Face `tokenizer.json` (Llama 3, Qwen, Mistral, ...) with the ids and the chat
template of its tokenizer_config.json and generation_config.json.

It adds what a chat model needs to the shared `text.tokenizer.Tokenizer` API: `stop_ids` (Llama 3
Instruct ends a turn with `<|eot_id|>` and a text with `<|end_of_text|>`; the sampler stops at either),
`special_ids`, and `apply_chat_template`, which renders messages exactly as transformers does
(`text.chat`). `text.load_tokenizer` returns one for any directory with a tokenizer.json.
It reads and writes files only; it never touches the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import tokenizers as hf_tokenizers

from jaxrlhf.models.hf.files import read_json
from jaxrlhf.text import chat
from jaxrlhf.text.tokenizer import HF_TOKENIZER_FILE, HFBackedTokenizer, TokenizerFileError, pad_batch

HF_CONFIG_FILE = "tokenizer_config.json"
HF_GENERATION_FILE = "generation_config.json"
HF_TEMPLATE_FILE = "chat_template.jinja"


class HFTokenizer(HFBackedTokenizer):
    """Any Hugging Face `tokenizers` tokenizer (tokenizer.json), with its tokenizer_config.json and
    generation_config.json: the special tokens, the chat template and the ids that end a response.

    `HFTokenizer.from_dir(path)` reads a model directory as transformers' `AutoTokenizer` does; the
    constructor takes the same content as objects. Special tokens are recognised inside text (a literal
    `<|eot_id|>` in a string encodes as that token, as transformers does by default).

    Attributes:
      config: tokenizer_config.json as read (chat_template.jinja, when present, as its chat_template).
      generation_config: generation_config.json as read ({} when absent).
      special_tokens: the named special tokens the config sets ({"bos_token": "<|begin_of_text|>", ...}),
        what the chat template sees as `bos_token`, `eos_token`, ...
    """

    def __init__(
        self,
        tokenizer: hf_tokenizers.Tokenizer,
        config: Mapping | None = None,
        generation_config: Mapping | None = None,
        *,
        source: str = "the tokenizer",
    ):
        """Check the three parts against each other.

        Args:
          tokenizer: the `tokenizers.Tokenizer` (what tokenizer.json holds).
          config: tokenizer_config.json's content: `bos_token` / `eos_token` / `pad_token` / ... as strings or
            AddedToken dicts ({"content": ...}), `chat_template` (a string, or a list of {"name",
            "template"} of which "default" is used), `added_tokens_decoder` ({id: {"content", "special"}}).
          generation_config: generation_config.json's content: `eos_token_id` (an int or a list),
            `bos_token_id`, `pad_token_id`.
          source: where the parts come from (a directory), for error messages.

        Raises:
          TokenizerFileError: a special token the vocabulary lacks, an added token at another id than
            tokenizer.json gives it, an id outside the vocabulary, no end-of-text token at all, or a
            malformed field; one line naming the file and field.
        """
        self._tok = tokenizer
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self._source = source
        cfg_file = f"{HF_CONFIG_FILE} in {source}"
        gen_file = f"{HF_GENERATION_FILE} in {source}"

        flagged = self._add_config_tokens(cfg_file)
        tokenizer = self._tok  # a copy, if the config added tokens
        self.special_tokens = {}  # name -> content, the named special tokens the template sees
        for name in chat.SPECIAL_TOKEN_NAMES:
            value = self.config.get(name)
            if value is None:
                continue
            content = value.get("content") if isinstance(value, Mapping) else value
            if not isinstance(content, str):
                raise TokenizerFileError(
                    f'{cfg_file}: {name} is {value!r}; write it as a string or {{"content": "..."}}'
                )
            if tokenizer.token_to_id(content) is None:
                raise TokenizerFileError(
                    f"{cfg_file}: {name} {content!r} is not in the vocabulary of {HF_TOKENIZER_FILE}; set "
                    f"{name} to one of its tokens, or use the {HF_TOKENIZER_FILE} this config belongs with"
                )
            self.special_tokens[name] = content
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # An embedding needs max id + 1 rows; the count of tokens is that unless ids have gaps.
        self._vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

        gen = {}
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = self.generation_config.get(name)
            values = value if isinstance(value, list) else [] if value is None else [value]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
                raise TokenizerFileError(
                    f"{gen_file}: {name} is {value!r}; it must be an int or a list of ints"
                )
            bad = [i for i in values if not 0 <= i < self._vocab_size]
            if bad:
                raise TokenizerFileError(
                    f"{gen_file}: {name} {bad[0]} is outside the vocabulary [0, {self._vocab_size}) of "
                    f"{HF_TOKENIZER_FILE}; the files come from different models"
                )
            gen[name] = values

        def token_id(name: str) -> int | None:
            content = self.special_tokens.get(name)
            return None if content is None else tokenizer.token_to_id(content)

        self._bos_id = token_id("bos_token")
        self._eos_id = token_id("eos_token")
        if self._eos_id is None:
            if not gen["eos_token_id"]:
                raise TokenizerFileError(
                    f"no end-of-text token in {source}: {HF_CONFIG_FILE} has no eos_token and "
                    f"{HF_GENERATION_FILE} no eos_token_id; add eos_token to {HF_CONFIG_FILE}"
                )
            self._eos_id = gen["eos_token_id"][0]
        pad = token_id("pad_token")
        self._pad_id = pad if pad is not None else (gen["pad_token_id"] or [self._eos_id])[0]
        self._stop_ids = tuple(sorted({*gen["eos_token_id"], self._eos_id}))
        named = {tokenizer.token_to_id(c) for c in self.special_tokens.values()}
        added = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(added | named | flagged)
        self._chat_template = self._default_template(cfg_file)

    def _add_config_tokens(self, cfg_file: str) -> set[int]:
        """Check tokenizer_config.json's added_tokens_decoder against tokenizer.json; add the tokens it
        lacks (as transformers does) at the ids the config gives. Returns the ids marked special."""
        decoder = self.config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise TokenizerFileError(f"{cfg_file}: added_tokens_decoder must map ids to token dicts")
        if not all(str(k).isdigit() for k in decoder):
            raise TokenizerFileError(
                f"{cfg_file}: added_tokens_decoder keys must be token ids, not {list(decoder)[:3]}"
            )
        special = set()
        copied = False
        for key, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            want = int(key)
            spec = spec if isinstance(spec, Mapping) else {"content": spec}
            content = spec.get("content")
            if not isinstance(content, str):
                raise TokenizerFileError(f"{cfg_file}: added_tokens_decoder[{key}] has no string content")
            have = self._tok.token_to_id(content)
            if have is None:
                if not copied:  # never change the caller's tokenizer
                    self._tok, copied = hf_tokenizers.Tokenizer.from_str(self._tok.to_str()), True
                token = hf_tokenizers.AddedToken(
                    content,
                    special=bool(spec.get("special", False)),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    single_word=bool(spec.get("single_word", False)),
                    normalized=bool(spec.get("normalized", not spec.get("special", False))),
                )
                self._tok.add_tokens([token])
                have = self._tok.token_to_id(content)
            if have != want:
                raise TokenizerFileError(
                    f"{cfg_file}: added_tokens_decoder gives {content!r} id {want} but {HF_TOKENIZER_FILE} "
                    f"gives it {have}; the two files come from different tokenizers"
                )
            if spec.get("special", False):
                special.add(want)
        return special

    def _default_template(self, cfg_file: str) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if "default" not in named:
                raise TokenizerFileError(
                    f"{cfg_file}: chat_template lists {sorted(map(str, named))} but no 'default'; name one "
                    "of them 'default'"
                )
            template = named["default"]
        if template is not None and not isinstance(template, str):
            raise TokenizerFileError(
                f"{cfg_file}: chat_template must be a string or a list of named templates"
            )
        return template

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """Read tokenizer.json, and tokenizer_config.json, chat_template.jinja (which takes priority over
        the config's chat_template, as in transformers) and generation_config.json where present.

        Raises:
          FileNotFoundError: `path` has no tokenizer.json.
          TokenizerFileError: a file that is truncated or corrupt, or files that disagree (see __init__).
        """
        path = os.fspath(path)
        tok_file = os.path.join(path, HF_TOKENIZER_FILE)
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no {HF_TOKENIZER_FILE} in {path}: a Hugging Face tokenizer needs one")
        try:
            tokenizer = hf_tokenizers.Tokenizer.from_file(tok_file)
        except Exception as err:  # the Rust side raises a bare Exception
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TokenizerFileError(
                f"{tok_file}: the tokenizers library cannot read it ({why}): the file is truncated or "
                "corrupt; copy it again"
            ) from None
        config = _read_json(os.path.join(path, HF_CONFIG_FILE))
        template_file = os.path.join(path, HF_TEMPLATE_FILE)
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        generation = _read_json(os.path.join(path, HF_GENERATION_FILE))
        return cls(tokenizer, config, generation, source=path)

    @property
    def eos_id(self) -> int:
        """The end of a text: tokenizer_config.json's eos_token, else generation_config's first eos id."""
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        """tokenizer_config.json's bos_token (None when it has none, as Qwen's)."""
        return self._bos_id

    @property
    def pad_id(self) -> int:
        """pad_token, else generation_config's pad_token_id, else eos_id."""
        return self._pad_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id of generation_config's eos_token_id and eos_id, sorted: what ends a response."""
        return self._stop_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """The special tokens: added tokens marked special and the named ones (bos, eos, pad, ...)."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        """The (default) Jinja chat template, or None."""
        return self._chat_template

    @property
    def vocab_size(self) -> int:
        """Max id + 1, added tokens included: the rows a model's embedding needs at least."""
        return self._vocab_size

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self._source}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"stop_ids={self.stop_ids}, chat_template={self.chat_template is not None})"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write path/tokenizer.json, path/tokenizer_config.json and (when not empty)
        path/generation_config.json; `load_tokenizer(path)` and transformers both read them back."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, HF_TOKENIZER_FILE))
        for name, content in ((HF_CONFIG_FILE, self.config), (HF_GENERATION_FILE, self.generation_config)):
            if content or name == HF_CONFIG_FILE:
                with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                    json.dump(content, f, ensure_ascii=False, indent=2)
        stale = os.path.join(path, HF_TEMPLATE_FILE)  # would override the config's template on load
        if os.path.isfile(stale):
            os.remove(stale)

    # ------------------------------------------------------------------------------------------ chat

    def _template(self) -> str:
        if self.chat_template is None:
            raise chat.ChatTemplateError(
                f"{self._source} has no chat template: {HF_CONFIG_FILE} has no chat_template (and there is "
                f"no {HF_TEMPLATE_FILE}); use an instruct model's tokenizer files or add one"
            )
        return self.chat_template

    def render_chat(
        self, messages: Sequence[Mapping], *, add_generation_prompt: bool = False, **template_vars
    ) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(..., tokenize=False)`.

        Args:
          messages: dicts with str `role` and `content`.
          add_generation_prompt: end with the header that opens the assistant's turn.
          **template_vars: template variables, e.g. `date_string="26 Jul 2024"` (Llama 3.2 prints today's
            date otherwise) or `enable_thinking=False` (Qwen3).

        Raises:
          ChatTemplateError: no chat template, or a conversation it refuses (see `jaxrlhf.chat.render`).
        """
        return chat.render(
            self._template(),
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **template_vars,
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping], *, add_generation_prompt: bool = False, **template_vars
    ) -> chat.ChatEncoding:
        """`render_chat`, tokenized as transformers does (no special tokens added: the template writes
        its own BOS), with the mask of special tokens.

        Returns:
          ChatEncoding(text, ids, special_mask).

        Raises:
          ChatTemplateError: as `render_chat`.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **template_vars)
        ids = self.encode(text)
        return chat.ChatEncoding(text, ids, [i in self.special_ids for i in ids])

    def encode_chat_batch(
        self,
        conversations: Sequence[Sequence[Mapping]],
        length: int | None = None,
        *,
        add_generation_prompt: bool = True,
        truncate: Literal["left", "right"] | None = None,
        **template_vars,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Render and tokenize B conversations as prompts, left-padded with `pad_id` (see `pad_batch`).

        Args:
          conversations: B lists of messages.
          length: T; None means the longest.
          add_generation_prompt: end each with the assistant header, ready for `sampling.sample`.
          truncate: None raises on a prompt longer than T; "left" keeps its end, "right" its start.
          **template_vars: passed to the template (see `render_chat`).

        Returns:
          (ids [B, T] int32, mask [B, T] bool).
        """
        seqs = [
            self.apply_chat_template(c, add_generation_prompt=add_generation_prompt, **template_vars).ids
            for c in conversations
        ]
        return pad_batch(seqs, length, pad_id=self.pad_id, side="left", truncate=truncate)


def _read_json(path: str) -> dict:
    """An optional JSON object file of the tokenizer, {} when absent; a bad one is a one-line
    TokenizerFileError naming it (`models.hf.files.read_json`)."""
    if not os.path.isfile(path):
        return {}
    try:
        return read_json(path)
    except ValueError as err:
        raise TokenizerFileError(str(err)) from None
