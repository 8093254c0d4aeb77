"""Text <-> ids: a character-level tokenizer (HappyGPT), GPT-2's BPE, any Hugging Face tokenizer.json with
its chat template, and padding into fixed-shape arrays.

    tokenizer     Tokenizer (the shared API), CharTokenizer, GPT2Tokenizer, pad_batch
    hf_tokenizer  HFTokenizer: stop ids, special ids, apply_chat_template
    chat          chat templates rendered as transformers renders them (sandboxed Jinja)
    files         load_tokenizer: any of them back from their files; save_for_transformers

Imports `jaxrlhf.models` (its JSON reader) below it.
"""

from jaxrlhf.text import chat
from jaxrlhf.text.hf_tokenizer import HFTokenizer as HFTokenizer
from jaxrlhf.text.files import load_tokenizer as load_tokenizer
from jaxrlhf.text.files import save_for_transformers as save_for_transformers
from jaxrlhf.text.tokenizer import CharTokenizer as CharTokenizer
from jaxrlhf.text.tokenizer import GPT2Tokenizer as GPT2Tokenizer
from jaxrlhf.text.tokenizer import Tokenizer as Tokenizer
from jaxrlhf.text.tokenizer import TokenizerFileError as TokenizerFileError
from jaxrlhf.text.tokenizer import pad_batch as pad_batch

__all__ = [
    "CharTokenizer", "GPT2Tokenizer", "HFTokenizer", "Tokenizer", "TokenizerFileError", "chat",
    "load_tokenizer", "pad_batch", "save_for_transformers",
]  # fmt: skip
