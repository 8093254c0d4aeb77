"""What every pipeline starts from: the model of --model / --init-from, its tokenizer and the device mesh.

A pipeline's config keeps the model flags at its top level (`--model`, `--init-from`, `--n-layer`, ...);
`model_spec(cfg)` reads them into a `ModelSpec`, which is all the functions here look at.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax

from jaxrlhf import data, models, parallel, text
from jaxrlhf.engine.flags import flag_message
from jaxrlhf.models import HUB_PRESETS, PRESETS, ModelConfig, hf
from jaxrlhf.text import GPT2Tokenizer, Tokenizer
from jaxrlhf.validate import check_at_least

MODELS = tuple(PRESETS)  # the architectures of --model


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model flags of a pipeline (their help text is in the pipeline's config).

    Attributes:
      model: "tiny", a GPT-2 size, an open model's shape, or None (the --init-from directory's, else gpt2).
      init_from: a local Hugging Face directory, a GPT-2 hub name, "random", or None (see `init_source`).
      n_layer, n_head, n_embd: overrides of the preset's shape (random init only).
      dropout: embedding / residual / attention dropout.
      bf16: bfloat16 matmuls (float32 params).
      remat: rematerialise each block in the backward pass.
    """

    model: str | None = None
    init_from: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float = 0.0
    bf16: bool = False
    remat: bool = False

    def __post_init__(self):
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"model={self.model!r}; use one of {', '.join(MODELS)}")
        check_at_least(self, 1, "n_layer", "n_head", "n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}; use a rate in [0, 1)")


def model_spec(cfg: Any) -> ModelSpec:
    """The `ModelSpec` fields of a pipeline config that declares them at its top level."""
    return ModelSpec(**{field.name: getattr(cfg, field.name) for field in dataclasses.fields(ModelSpec)})


def flag(name: str) -> str:
    """The flag of a top-level field: `n_layer` -> `--n-layer`."""
    return "--" + name.replace("_", "-")


def init_source(spec: ModelSpec) -> str | None:
    """Where the first stage's weights come from: a directory or hub name, or None for a random init."""
    if spec.init_from is None:
        name = spec.model or "gpt2"
        return name if name in HUB_PRESETS else None
    return None if spec.init_from == "random" else spec.init_from


def _preset(spec: ModelSpec, vocab_size: int, block_size: int = 1024) -> ModelConfig:
    """--model's preset with the tokenizer's vocabulary (and `block_size` where the preset has none)."""
    name = spec.model or "gpt2"
    return ModelConfig.preset(
        name, vocab_size=vocab_size, block_size=PRESETS[name].get("block_size", block_size)
    )


def model_config(spec: ModelSpec, length: int, length_flags: str, vocab_size: int = 50257) -> ModelConfig:
    """The model of --model / --init-from with block_size `length`, the dropout and dtype flags applied.

    A local --init-from directory gives the architecture (its config.json; --model, when given, must
    agree); a random init takes `vocab_size` (the tokenizer's) and the --n-layer / --n-head / --n-embd
    overrides. Params are float32 (the optimizer's); --bf16 sets the compute dtype.

    Args:
      spec: the model flags.
      length: T, the longest row the pipeline feeds the model.
      length_flags: the flags that make `length`, for messages ("--data.max_prompt_tokens 64 + ...").
      vocab_size: the tokenizer's, for a random init.

    Raises:
      ValueError: a bad config.json, a --model that is not the directory's, or rows longer than the
        directory's learned positions; one line naming the flags.
    """
    common = dict(
        block_size=length,
        embd_pdrop=spec.dropout,
        resid_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        param_dtype="float32",
        compute_dtype="bfloat16" if spec.bf16 else "float32",
        remat=spec.remat,
    )
    source = init_source(spec)
    if source is not None and os.path.isdir(source):
        try:
            file_cfg = hf.read_config(source)
        except ValueError as err:
            raise ValueError(f"--init-from {source}: {err}") from None
        if spec.model is not None:  # a named shape must be the directory's
            bad = hf.architecture_differences(_preset(spec, file_cfg.vocab_size), file_cfg)
            if bad:
                raise ValueError(
                    f"--model {spec.model} is not the architecture of --init-from {source} "
                    f"({'; '.join(bad)}); drop --model (the directory's config.json gives it)"
                )
        if file_cfg.position == "learned" and length > file_cfg.block_size:
            raise ValueError(
                f"{length_flags} = {length} tokens, more than the {file_cfg.block_size} positions of "
                f"{source}; lower them"
            )
        return dataclasses.replace(file_cfg, **common)
    preset = _preset(spec, vocab_size, length)
    sizes = {name: getattr(spec, name) for name in ("n_layer", "n_head", "n_embd") if getattr(spec, name)}
    return dataclasses.replace(preset, **sizes, **common)


def check_model(spec: ModelSpec, length: int, length_flags: str) -> None:
    """What the model flags cannot check alone: weights to start from, a local --init-from directory's
    config.json, the shape flags against pretrained weights, and GPT-2's 1024 positions.

    Raises:
      ValueError: one line naming the flags and the fix.
    """
    source = init_source(spec)
    if (
        source is None
        and spec.init_from is None
        and PRESETS[spec.model].get("position") == "rope"
        and spec.model != "tiny-llama"
    ):
        raise ValueError(
            f"--model {spec.model} has no weights to download here: pass --init-from DIR (a local Hugging "
            "Face directory of the model) or --init-from random"
        )
    if source is not None and not os.path.isdir(source) and source not in HUB_PRESETS:
        # A hub name other than GPT-2's: its architecture would be known only after a download.
        raise ValueError(
            f"--init-from {source} is not a local directory; download the model (config.json, safetensors, "
            "tokenizer files) and pass its directory (hub names: GPT-2 sizes only)"
        )
    try:
        mcfg = model_config(spec, length, length_flags)
    except ValueError as err:
        raise ValueError(flags_message(str(err), ModelConfig)) from None
    if source is None:
        return
    fixed = [flag(name) for name in ("n_layer", "n_head", "n_embd") if getattr(spec, name)]
    if fixed:
        verb, pronoun = ("acts", "it") if len(fixed) == 1 else ("act", "them")
        raise ValueError(
            f"{', '.join(fixed)} {verb} for a random init only (--model tiny or --init-from random); the "
            f"weights of {source} fix the architecture: drop {pronoun}"
        )
    if source in HUB_PRESETS and mcfg.block_size > 1024:
        raise ValueError(
            f"{length_flags} = {mcfg.block_size} tokens, more than GPT-2's 1024 positions; lower them"
        )


def flags_message(message: str, cls: type) -> str:
    """A top-level config's `field=value; fix` error as `--field value; fix`."""
    return flag_message(message, cls, flag)


def load_tokenizer(tokenizer_dir: str | None, source: str | None, *, dir_flag: str = "--data.tokenizer_dir"):
    """The tokenizer from `tokenizer_dir`, the --init-from directory `source`, the data dir's GPT-2 BPE or
    the hub's "gpt2" (see `tokenizers.load_tokenizer`: tokenizer.json, or GPT-2's BPE files).

    A directory without tokenizer files is passed over (but `tokenizer_dir`); one with a bad or half pair
    of files is an error naming the file, never a silent fall-back to another tokenizer.

    Raises:
      FileNotFoundError: `tokenizer_dir` is not a directory or holds no tokenizer.
      OSError: nothing found and the hub unreachable.
    """
    if tokenizer_dir and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(
            f"{dir_flag} {tokenizer_dir} is not a directory; pass the folder of tokenizer.json or vocab.json"
        )
    candidates = [tokenizer_dir, source]
    if os.environ.get(data.common.ENV_DATA_DIR):
        candidates.append(os.path.join(os.environ[data.common.ENV_DATA_DIR], "gpt2_tokenizer"))
    for path in candidates:
        if path and os.path.isdir(path):
            try:  # a TokenizerFileError (bad files) is never passed over
                return text.load_tokenizer(path)
            except FileNotFoundError:
                if path == tokenizer_dir:
                    raise
    try:
        from huggingface_hub import snapshot_download

        return GPT2Tokenizer.from_dir(snapshot_download("gpt2", allow_patterns=["vocab.json", "merges.txt"]))
    except Exception as err:
        raise OSError(
            f"no GPT-2 tokenizer found and the hub's 'gpt2' could not be fetched ({type(err).__name__}); "
            f"pass {dir_flag} DIR with vocab.json + merges.txt"
        ) from err


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every stage needs: the pipeline's config (for the recipe; stages never read it), the model
    config, the tokenizer (and a local copy of its files to save with each checkpoint) and the mesh;
    `extras` holds what a recipe keeps across its stages (its data, stage results)."""

    cfg: Any
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    tokenizer_path: str
    mesh: jax.sharding.Mesh
    extras: dict = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        """Remove the temporary copy of the tokenizer files."""
        shutil.rmtree(self.tokenizer_path, ignore_errors=True)


def chat_tokenizer(cfg: Any, dataset: str):
    """The policy's tokenizer (--data.tokenizer_dir, else --init-from's), refused unless it has a chat
    template: `dataset`'s prompts are chat-templated.

    Raises:
      ValueError: no chat template; one line naming the flags.
    """
    tok = load_tokenizer(cfg.data.tokenizer_dir, init_source(model_spec(cfg)))
    if not isinstance(tok, text.HFTokenizer) or tok.chat_template is None:
        raise ValueError(
            f"the tokenizer ({tok!r}) has no chat template, and {dataset} prompts are chat-templated: pass "
            "--init-from (or --data.tokenizer_dir) an instruct model's directory with tokenizer.json and a "
            "tokenizer_config.json holding chat_template"
        )
    return tok


def make_setup(
    cfg: Any,
    *,
    batch_sizes: Mapping[str, int],
    length: int,
    length_flags: str,
    tokenizer_dir: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> Setup:
    """The mesh, model config and tokenizer of a pipeline config (`recipe.RecipeConfig`).

    Args:
      cfg: the pipeline's config, with the `ModelSpec` fields and mesh_fsdp at its top level.
      batch_sizes: flag -> global batch size; each must split over the mesh's data devices.
      length, length_flags: the model's block size and the flags that make it.
      tokenizer_dir: --data.tokenizer_dir.
      tokenizer: the pipeline's own tokenizer (HappyGPT's characters), instead of loading one.

    Returns:
      The Setup; call `Setup.close()` when done (`recipe.main` does).

    Raises:
      ValueError: --mesh-fsdp does not divide the devices, a batch size does not split, or the tokenizer
        has more ids than the model.
    """
    n_devices = len(jax.devices())
    if n_devices % cfg.mesh_fsdp:
        raise ValueError(
            f"--mesh-fsdp {cfg.mesh_fsdp} does not divide the {n_devices} devices; use a divisor of "
            f"{n_devices}"
        )
    mesh = parallel.make_mesh(fsdp=cfg.mesh_fsdp)
    n = parallel.batch_size_multiple(mesh)
    bad = [f"{k} {v}" for k, v in batch_sizes.items() if v % n]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} not divisible by the {n} devices of the mesh (each batch is split over all of "
            f"them); use multiples of {n}"
        )
    spec = model_spec(cfg)
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir, init_source(spec))
    model_cfg = model_config(spec, length, length_flags, tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocab_size "
            f"{model_cfg.vocab_size} (--init-from {init_source(spec)}); pass the model's own tokenizer "
            "(--data.tokenizer_dir)"
        )
    tokenizer_path = tempfile.mkdtemp(prefix="jaxrlhf_tokenizer_")
    atexit.register(shutil.rmtree, tokenizer_path, ignore_errors=True)  # the copy checkpoints are saved from
    try:
        tokenizer.save(tokenizer_path)
    except BaseException:
        shutil.rmtree(tokenizer_path, ignore_errors=True)
        raise
    return Setup(cfg, model_cfg, tokenizer, tokenizer_path, mesh)


def use_compile_cache(path: str) -> None:
    """Persist compiled programs under `path` ("" : off): a second run or a --resume skips most compiles."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def initial_params(setup: Setup, key: jax.Array) -> models.Params:
    """The first stage's params: Hugging Face weights (--init-from, any supported architecture) or a
    random init."""
    source = init_source(model_spec(setup.cfg))
    if source is None:
        return models.init_params(key, setup.model_cfg)
    params, _ = hf.load(source, setup.model_cfg)
    return params
