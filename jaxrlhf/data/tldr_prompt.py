"""The TL;DR prompt, fitted to a token budget by cutting the post at a natural boundary.

No tokenizer dependency: the caller passes the length function.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_VERTEX_SUFFIX = "[summary]:"


def clean_post(post: str) -> str:
    """Strips whitespace and the vertex format's trailing "[summary]:" marker."""
    post = post.strip()
    if post.endswith(_VERTEX_SUFFIX):
        post = post[: -len(_VERTEX_SUFFIX)].rstrip()
    return post


def _paragraph_prefixes(post: str) -> list[str]:
    prefixes = [post[: m.start()].rstrip() for m in re.finditer(r"\n", post)]
    return sorted({p for p in prefixes if p}, key=len)


def _sentence_prefixes(post: str) -> list[str]:
    return [post[: m.end()] for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s)", post)]


def _word_prefixes(post: str) -> list[str]:
    return [post[: m.end()] for m in re.finditer(r"\S(?=\s)", post)]


def _longest_fitting(prefixes: list[str], fits: Callable[[str], bool]) -> str | None:
    """Binary search for the longest prefix that fits (token count grows with the prefix)."""
    lo, hi = 0, len(prefixes)  # prefixes[:lo] fit, prefixes[hi:] don't
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(prefixes[mid]):
            lo = mid + 1
        else:
            hi = mid
    return prefixes[lo - 1] if lo else None


def format_tldr_prompt(
    subreddit: str,
    title: str,
    post: str,
    max_prompt_tokens: int,
    tokenizer_len_fn: Callable[[str], int],
) -> str:
    """The prompt "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:" in a budget.

    If the whole prompt is longer than `max_prompt_tokens` (as measured by `tokenizer_len_fn` on the
    full prompt string), the post is cut at the last paragraph boundary (a newline) that fits; if
    not even the first paragraph fits, at the last sentence end (.!? then whitespace); else at the
    last word boundary. The SUBREDDIT / TITLE line is left out when its field is empty (the vertex
    comparisons have neither), and a vertex post's trailing " [summary]: " is removed.

    Args:
      subreddit: without the "r/" prefix.
      title: the post title.
      post: the post body.
      max_prompt_tokens: the budget for the whole prompt.
      tokenizer_len_fn: text -> number of tokens (e.g. `lambda s: len(tokenizer.encode(s))`).

    Returns:
      The prompt, ending in "TL;DR:" with no trailing space.

    Raises:
      ValueError: the prompt does not fit even with the post cut to its first word.
    """
    post = clean_post(post)
    header = []
    if subreddit:
        header.append(f"SUBREDDIT: r/{subreddit}")
    if title:
        header.append(f"TITLE: {title}")

    def render(body: str) -> str:
        return "\n".join([*header, f"POST: {body}", "TL;DR:"])

    def fits(body: str) -> bool:
        return tokenizer_len_fn(render(body)) <= max_prompt_tokens

    if fits(post):
        return render(post)
    for prefixes in (_paragraph_prefixes(post), _sentence_prefixes(post), _word_prefixes(post)):
        body = _longest_fitting(prefixes, fits)
        if body is not None:
            return render(body)
    raise ValueError(
        f"TL;DR prompt does not fit in {max_prompt_tokens} tokens even with the post cut to its "
        f"first word (title: {title[:60]!r})"
    )
