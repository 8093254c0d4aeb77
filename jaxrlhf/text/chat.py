"""Chat templates: render a conversation with a model's Jinja template, the way Hugging Face does.

A chat model's tokenizer files carry a Jinja template (tokenizer_config.json's `chat_template`, or
chat_template.jinja) that turns a list of messages into the exact text the model was tuned on: Llama 3
writes `<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>`, Qwen writes ChatML
`<|im_start|>user\\n...<|im_end|>\\n`. `render` reproduces transformers' `apply_chat_template(...,
tokenize=False)` (transformers 5.x, `utils/chat_template_utils.py`): a sandboxed, immutable Jinja
environment with trim_blocks and lstrip_blocks, the loop-controls extension and the `{% generation %}`
tag, the globals `raise_exception`, `strftime_now`, `namespace` and `dict`, a `tojson` filter that does
not escape HTML, and the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the special
tokens (`bos_token`, `eos_token`, ...) and whatever the caller adds (`date_string`, `enable_thinking`).

It adds checks transformers leaves out, each a one-line error: messages must be dicts with a string role
and content; a template's `raise_exception(...)` names the message that triggered it; and a message the
template silently drops (Qwen 2.5 skips a role it does not know) is refused, naming the roles it knows.

Templates come from model repositories and are untrusted code: the sandbox is what makes running them
safe, which is why jinja2 >= 3.1.6 (earlier releases have sandbox escapes) is required.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

# The named special tokens transformers passes to every template (PreTrainedTokenizerBase's
# SPECIAL_TOKENS_ATTRIBUTES), when the tokenizer has them.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Older names for a message's reasoning; transformers copies the first one set into `reasoning_content`
# (what templates read) and `thinking` (what gpt-oss templates read).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_ROLE_LITERAL = re.compile(r"""\brole\b['"]?\]?\s*[!=]=\s*['"]([\w-]+)['"]""")


class ChatTemplateError(ValueError):
    """A conversation the chat template refuses or cannot render; one line naming the message."""


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
    """A rendered and tokenized conversation.

    Attributes:
      text: the rendered string (transformers' `apply_chat_template(..., tokenize=False)`).
      ids: the text tokenized without adding special tokens (transformers' `tokenize=True` ids).
      special_mask: one bool per id, True where it is one of the tokenizer's special tokens: the template's
        own markup (`<|start_header_id|>`, `<|im_start|>`, ...), so lengths can be counted without it.
    """

    text: str
    ids: list[int]
    special_mask: list[bool]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged (transformers uses the tag to
    find assistant text; templates that contain it must still parse)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (a step towards CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` without the dict type itself (no attribute tricks)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates need the plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a tokenizer renders the same template many times).

    Raises:
      ChatTemplateError: the template is not valid Jinja.
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja (line {err.lineno}: {err.message}); fix chat_template"
        ) from None


@functools.lru_cache(maxsize=16)
def template_roles(template: str) -> tuple[str, ...]:
    """The roles a template compares messages against (`role == 'user'`, `['role'] != "system"`), sorted."""
    return tuple(sorted(set(_ROLE_LITERAL.findall(template))))


def _plain(value):
    """JSON-like data rebuilt from plain types, so the template sees (and may change) only a copy."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):  # np.bool_(False) must not become a (truthy) placeholder string
        return _plain(value.item())
    for kind in (str, int, float):  # subclasses (enums, ...) carry methods the sandbox does not vet
        if isinstance(value, kind):
            return kind(value) if kind is not str else str.__str__(value)
    return f"<{type(value).__name__}>"  # never hand the sandbox an object with methods of its own


def check_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Validated copies of the messages, normalised as transformers does before rendering.

    Keys whose value is None are dropped (templates handle a missing key, not a None one), and a
    reasoning given as `thinking` or `reasoning` is copied to `reasoning_content` (and `thinking`).

    Raises:
      ChatTemplateError: not a list, empty, or a message that is not a dict with a str role and content.
    """
    if isinstance(messages, str | Mapping) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages is a {type(messages).__name__}; pass a list of {{'role': ..., 'content': ...}} dicts"
        )
    if not messages:
        raise ChatTemplateError("the conversation is empty; pass at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"message {i} is a {type(message).__name__}, not a dict; write it as "
                "{'role': 'user', 'content': '...'}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else f"a {type(message[key]).__name__}"
                raise ChatTemplateError(f"message {i}: '{key}' is {got}; it must be a string")
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    **template_vars,
) -> str:
    """Render a conversation as transformers' `apply_chat_template(messages, tokenize=False)` does.

    Args:
      template: the Jinja chat template.
      messages: dicts with str `role` and `content` (other keys, e.g. `tool_calls`, reach the template).
      add_generation_prompt: end with the header that opens the assistant's turn (for sampling).
      special_tokens: the tokenizer's named special tokens (`bos_token`, `eos_token`, ...), as strings.
      **template_vars: further template variables (`date_string`, `enable_thinking`, `tools`, ...); they
        override `special_tokens` of the same name, as in transformers.

    Returns:
      The rendered text.

    Raises:
      ChatTemplateError: a malformed message; the template's `raise_exception(...)` (its message, with the
        index of the message that triggers it); a Jinja error while rendering; or a message the template
        drops although it does not know its role.
    """
    messages = check_messages(messages)
    compiled = compile_template(template)
    variables = {
        "tools": None,
        "documents": None,
        **_plain(dict(special_tokens or {})),
        **_plain(template_vars),
        "add_generation_prompt": bool(add_generation_prompt),
    }
    try:
        text = compiled.render(messages=messages, **variables)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(_explain(compiled, messages, variables, err)) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        raise ChatTemplateError(
            f"the chat template failed on this conversation ({type(err).__name__}: {err}); check the "
            "messages against what the template expects"
        ) from None
    _check_rendered(template, messages, text)
    return text


def _explain(compiled, messages, variables, err) -> str:
    """One line for a template error: which message first triggers it (the shortest failing prefix)."""
    what = str(err).splitlines()[0] if str(err) else type(err).__name__
    if type(err) is jinja2.exceptions.TemplateError:  # raise_exception(...)
        for n in range(1, len(messages) + 1):
            try:
                compiled.render(messages=messages[:n], **variables)
            except jinja2.exceptions.TemplateError as prefix_err:
                if str(prefix_err) == str(err):
                    role = messages[n - 1]["role"]
                    return f"the chat template refuses message {n - 1} (role {role!r}): {what}"
        return f"the chat template refuses this conversation: {what}"
    return f"the chat template failed to render ({type(err).__name__}: {what}); check the messages"


def _check_rendered(template: str, messages: list[dict], text: str) -> None:
    """Refuse a message whose content is missing from the output although the template does not name its
    role: the template skipped it (Qwen 2.5 drops unknown roles without a word). A known role's message
    may be rewritten on purpose (Qwen3 strips old reasoning), so only unknown roles are refused."""
    known = template_roles(template)
    position = 0
    for i, message in enumerate(messages):
        content = message["content"].strip()  # Llama 3 templates trim each message
        if not content:
            continue
        found = text.find(content, position)
        if found >= 0:
            position = found + len(content)
        elif message["role"] not in known:
            roles = ", ".join(known) or "none found"
            raise ChatTemplateError(
                f"message {i} (role {message['role']!r}) is missing from the rendered chat: the template "
                f"drops a role it does not know; roles it knows: {roles}"
            )
