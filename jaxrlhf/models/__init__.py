"""The decoder: one config, pure functions of params, a KV cache, and Hugging Face weights in and out.

    config       ModelConfig (every architecture switch), PRESETS (the one table of named models)
    layers       dense, LayerNorm / RMSNorm, dropout, GELU, SwiGLU, RoPE
    transformer  init_params, forward (the trunk), lm_logits / lm_token_logprobs, scalar heads
    armorm       ArmoRM's gated multi-objective reward head (OBJECTIVES; transformer.armorm_outputs)
    kv_cache     KVCache, prefill, decode_step (the sampler's path)
    hf           load / save / load_reward_model: transformers checkpoints of every family

Imports only `jaxrlhf.ops` and `jaxrlhf.parallel` below it.
"""

from jaxrlhf.models import armorm, kv_cache, layers, transformer
from jaxrlhf.models.config import HUB_PRESETS, PRESETS, SMALL_GPTS, ModelConfig

# ----------------------------------------------------------------------------------------- the decoder
from jaxrlhf.models.transformer import Params as Params
from jaxrlhf.models.transformer import armorm_outputs as armorm_outputs
from jaxrlhf.models.transformer import check_params as check_params
from jaxrlhf.models.transformer import check_scalar_model as check_scalar_model
from jaxrlhf.models.transformer import forward as forward
from jaxrlhf.models.transformer import init_params as init_params
from jaxrlhf.models.transformer import init_scalar_head as init_scalar_head
from jaxrlhf.models.transformer import init_scalar_model as init_scalar_model
from jaxrlhf.models.transformer import lm_logits as lm_logits
from jaxrlhf.models.transformer import lm_token_logprobs as lm_token_logprobs
from jaxrlhf.models.transformer import logits_fn as logits_fn
from jaxrlhf.models.transformer import scalar_fn as scalar_fn
from jaxrlhf.models.transformer import scalar_head as scalar_head
from jaxrlhf.models.transformer import sequence_scores as sequence_scores

# ------------------------------------------------------------------------------------------- decoding
from jaxrlhf.models.kv_cache import KVCache as KVCache
from jaxrlhf.models.kv_cache import decode_step as decode_step
from jaxrlhf.models.kv_cache import init_cache as init_cache
from jaxrlhf.models.kv_cache import prefill as prefill

__all__ = [
    "HUB_PRESETS", "PRESETS", "SMALL_GPTS", "KVCache", "ModelConfig", "Params", "armorm", "armorm_outputs",
    "check_params",
    "check_scalar_model", "decode_step", "forward", "init_cache", "init_params", "init_scalar_head",
    "init_scalar_model", "kv_cache", "layers", "lm_logits", "lm_token_logprobs", "logits_fn", "prefill",
    "scalar_fn", "scalar_head", "sequence_scores", "transformer",
]  # fmt: skip
