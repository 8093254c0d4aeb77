"""jaxrlhf: RLHF in pure JAX. The map of the package, bottom to top; a module imports only from the rows
above its own (tests/test_layout.py holds the arrow), so each concept reads as one column: the maths in
`losses/policy.py`, its jitted step in `train/policy.py`, its loop in `stages/policy.py`.

    ops, parallel, validate, xla_cpu   masked reductions and logprobs; meshes and batch sharding; argument
                                       checks; the XLA:CPU tunings (named, each with its why)
    data/      the datasets: tweets, TL;DR, SST-2, UltraFeedback, GSM8K (local files or a pinned download)
    models/    the decoder as pure functions: config (one preset table), layers, transformer, kv_cache,
               hf/ (one name table per family, used for import and export; one safetensors reader)
    text/      tokenizers (characters, GPT-2 BPE, any Hugging Face tokenizer), chat templates
    rollout/   the jitted sampler; rewards and scores (rules, VADER, a reward model, no-EOS penalty); pairs
    losses/    every objective as `(loss, metrics)`, usable inside your own jit or shard_map (axis_name)
    train/     TrainState and optimizers; the jitted steps: lm, reward, preference, policy, micro-batching
    engine/    the run loop (metrics, TensorBoard, checkpoints every N steps, signals), checkpoints, the
               run directory and its lock, the one flag parser, host-memory tracking
    export     any stage checkpoint as a Hugging Face directory (`python -m jaxrlhf.export`)
    stages/    a pipeline's stages (lm, reward, policy, preference, online), their hand-off through
               checkpoints, and `recipe.main`: one command line, lock, resume and exit codes for every
               pipeline
    happy      HappyGPT, the laptop pipeline (`python -m jaxrlhf.happy`)
    arith      arithmetic with a verifiable reward, the laptop RLVR pipeline (`python -m jaxrlhf.arith`);
               experiments/ holds the others

Import what you use from its subpackage (`from jaxrlhf import losses`); this file imports nothing, so
`import jaxrlhf.losses` does not load the models or the engine.
"""
