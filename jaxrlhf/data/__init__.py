"""Data sets as TFDS builders (array_record, read without TensorFlow).

    load_tweets(split, data_dir=None, *, cache_dir=None)        tweets: text, sentiment
    load_tldr(split, data_dir=None, *, cache_dir=None)          TL;DR post/summary pairs
    load_comparisons(split, data_dir=None, *, cache_dir=None)   TL;DR chosen/rejected pairs
    load_sst2(split, data_dir=None, *, cache_dir=None)          GLUE SST-2: sentence, label
    load_ultrafeedback(split, data_dir=None, *, cache_dir=None) UltraFeedback: prompt, chosen, rejected
    load_gsm8k(split, data_dir=None, *, cache_dir=None)         GSM8K: question, answer, final
    gsm8k_reward(texts, golds), extract_answer(text)            GSM8K's answer checker (a verifier)
    format_tldr_prompt(...)                                     TL;DR prompt in a token budget

Where the files come from (data_dir > $JAXRLHF_DATA_DIR > cache > checked download): `common`. A source
file that does not parse is a `DataFormatError` (a ValueError) naming the file, the line and the field.
"""

from jaxrlhf.data.common import CacheDirError, ChecksumError, DataFormatError, DataNotFoundError
from jaxrlhf.data.gsm8k import extract_answer, gsm8k_reward, load_gsm8k
from jaxrlhf.data.sst2 import load_sst2
from jaxrlhf.data.tldr import load_comparisons, load_tldr
from jaxrlhf.data.tldr_prompt import format_tldr_prompt
from jaxrlhf.data.tweets import load_tweets
from jaxrlhf.data.ultrafeedback import load_ultrafeedback

__all__ = [
    "CacheDirError",
    "ChecksumError",
    "DataFormatError",
    "DataNotFoundError",
    "extract_answer",
    "format_tldr_prompt",
    "gsm8k_reward",
    "load_comparisons",
    "load_gsm8k",
    "load_sst2",
    "load_tldr",
    "load_tweets",
    "load_ultrafeedback",
]
