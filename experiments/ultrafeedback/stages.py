"""The UltraFeedback stages on the stage layer (jaxrlhf.stages.online / reward / preference), and RECIPE,
the pipeline that runs them; recipe.py has the config and the data. Each function runs one stage instance
("rm", "generate_2", ...) and returns a result with a `.summary`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from experiments.ultrafeedback import encoding
from experiments.ultrafeedback import recipe as common
from jaxrlhf import models, parallel
from jaxrlhf import text as jaxrlhf_tokenizers
from jaxrlhf.engine import loop
from jaxrlhf.models import hf
from jaxrlhf.rollout import scoring
from jaxrlhf.stages import batches, handoff, online, recipe, reward
from jaxrlhf.stages import preference as pairs
from jaxrlhf.stages.setup import Setup
from jaxrlhf.text import pad_batch


def _result(summary: dict | None) -> loop.StageResult:
    return loop.StageResult(state=None, history=[], summary=summary or {"stopped": True})


def check_data_stages(setup: Setup, names) -> None:
    """Every refusal of the data stages in `names` (data without --resume, another config), before any
    write."""
    cfg = setup.cfg
    for name in names:
        stage, t = common.split_instance(name)
        if stage in ("generate", "score", "filter"):
            online.check_data_stage(
                common.iter_dir(cfg, t) / stage, common.stage_meta(cfg, name), resume=cfg.resume
            )


# ---------------------------------------------------------------------------------------------- rm


def run_rm(setup: Setup) -> loop.StageResult:
    """Bradley-Terry on UltraFeedback's (chosen, rejected) pairs, from the base model; held-out accuracy on
    the eval split."""
    cfg = setup.cfg
    train_pairs, train_counts = encoding.load_comparisons(setup, "train", cfg.data.max_rm_pairs)
    val_pairs, val_counts = encoding.load_comparisons(setup, "validation", cfg.data.max_val_rows)
    if len(train_pairs.prompt) < cfg.rm.batch_size:
        raise ValueError(
            f"{train_counts['pairs']} UltraFeedback training pairs fit the length budget ({train_counts}), "
            f"fewer than one --rm.batch_size {cfg.rm.batch_size} batch: raise --data.max_prompt_tokens / "
            "--data.max_answer_tokens or lower --rm.batch_size"
        )
    return reward.run_reward_stage(
        setup, cfg.rm, common.stage_run(cfg, "rm"), kind="pairwise", rows=train_pairs, val=val_pairs,
        trunk=common.base_params(setup), reference=lambda: encoding.chosen_rows(train_pairs),
        summary={"train_counts": train_counts, "val_counts": val_counts},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- generate


def policy_params(setup: Setup, t: int) -> tuple[object, str]:
    """The policy that samples iteration t: the base model for t = 1, else rebel_{t-1}'s final params;
    with where they came from."""
    cfg = setup.cfg
    if t == 1:
        return common.base_params(setup), "base"
    n_pairs = common.pairs_of(cfg, t - 1)
    steps = cfg.rebel.steps(n_pairs)
    target = handoff.state_target(setup.mesh, pairs.pair_state_init(setup, cfg.rebel, n_pairs))
    state, _ = handoff.restore_finished(cfg.out, f"rebel_{t - 1}", steps, target)
    return state.params, f"rebel_{t - 1} step {steps}"


def needs_reference(cfg) -> bool:
    return cfg.rebel.algo != "rebel" or cfg.rebel.kl_coef > 0


def run_generate(setup: Setup, t: int) -> loop.StageResult:
    cfg = setup.cfg
    name = f"generate_{t}"
    prompts, counts = encoding.iteration_prompts(setup, t)
    if len(prompts.index) == 0:
        raise ValueError(
            f"none of the {counts['train_prompts']} training prompts is left: "
            f"{counts['dropped_empty_prompt']} are empty, {counts['dropped_long_prompt']} longer than "
            f"--data.max_prompt_tokens {cfg.data.max_prompt_tokens} (raise it)"
        )
    params, source = policy_params(setup, t)
    reference = common.base_params(setup) if needs_reference(cfg) and t > 1 else None
    run = common.stage_run(cfg, name)
    summary = online.run_generate(
        setup, cfg.generate, root=common.iter_dir(cfg, t) / "generate", meta=common.stage_meta(cfg, name),
        prompts=prompts, params=params, reference=reference, sample_cfg=common.sample_config(setup),
        key=run.root_key, progress=cfg.progress, stop_after=run.stop_after,
        summary={"iteration": t, "policy": source, **counts},
    )  # fmt: skip
    return _result(summary)


# ------------------------------------------------------------------------------------------- score


def _score_rows(setup: Setup, params, mcfg):
    """(tokens [N, T], mask) -> [N] scores of a scalar model, batched and sharded."""
    mesh, b = setup.mesh, setup.cfg.score.batch_size

    def score(params, batch):
        return models.sequence_scores(params, batch[0], batch[1], mcfg)

    fn = batches.jit_eval(score, mesh, params)
    return lambda tokens, mask: batches.evaluate_rows(fn, params, (tokens, mask), b, mesh)


def _rows_scorer(setup: Setup, params, mcfg):
    """scorer(arrays, texts) of a scalar model on the written [prompt | answer] rows."""
    score = _score_rows(setup, params, mcfg)

    def scorer(arrays, texts):
        tokens = np.concatenate([arrays["prompt"], arrays["response"]], axis=1)
        mask = np.concatenate([arrays["prompt_mask"], arrays["response_mask"]], axis=1)
        return score(tokens, mask)

    return scorer


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids (the same tokenizer.json model and added tokens)."""
    ta, tb = getattr(a, "_tok", None), getattr(b, "_tok", None)
    if ta is None or tb is None:
        return False
    return (
        ta.get_vocab(with_added_tokens=True) == tb.get_vocab(with_added_tokens=True) and a.eos_id == b.eos_id
    )


def hf_scorer(setup: Setup):
    """scorer of a Hugging Face sequence-classification reward model (--score.reward_model). With the
    policy's tokenizer it scores the written rows as they are; with another tokenizer each (prompt,
    answer) is re-rendered with the reward model's chat template and re-tokenized.

    Returns:
      (scorer, retokenized).

    Raises:
      ValueError: another tokenizer without a chat template; one line naming the flag.
    """
    cfg = setup.cfg
    path = cfg.score.reward_model
    try:
        rm_tok = jaxrlhf_tokenizers.load_tokenizer(path)
    except FileNotFoundError as err:
        raise ValueError(f"--score.reward_model {path}: {err}") from None
    params, rm_cfg = hf.load_reward_model(path)
    if cfg.bf16:
        rm_cfg = dataclasses.replace(rm_cfg, compute_dtype="bfloat16")
    params = parallel.put(params, setup.mesh)
    if same_tokenizer(setup.tokenizer, rm_tok):
        return _rows_scorer(setup, params, rm_cfg), False
    if getattr(rm_tok, "chat_template", None) is None:
        raise ValueError(
            f"--score.reward_model {path}: its tokenizer is not the policy's and has no chat template to "
            "re-render the answers with; give it its tokenizer_config.json with chat_template"
        )
    score = _score_rows(setup, params, rm_cfg)

    def scorer(arrays, texts):
        convs = [
            [*encoding.messages(rec["prompt"], cfg.data), {"role": "assistant", "content": answer}]
            for rec in texts
            for answer in rec["answers"]
        ]
        seqs = [rm_tok.apply_chat_template(c, date_string=cfg.data.date_string).ids for c in convs]
        width = -(-max(len(s) for s in seqs) // 64) * 64  # few shapes: few compiles
        tokens, mask = pad_batch(seqs, width, pad_id=rm_tok.pad_id, side="right")
        return score(tokens.astype(np.int32), mask)

    return scorer, True


def vader_scorer(setup: Setup):
    def scorer(arrays, texts):
        return scoring.vader_scores([a for rec in texts for a in rec["answers"]])

    return scorer


def make_scorer(setup: Setup) -> tuple[object, dict]:
    cfg = setup.cfg
    if cfg.score.reward == "rm":
        target = handoff.state_target(setup.mesh, reward.reward_state_init(setup, cfg.rm))
        state, _ = handoff.restore_finished(cfg.out, "rm", cfg.rm.steps, target)
        return _rows_scorer(setup, state.params, setup.model_cfg), {"reward": "rm"}
    if cfg.score.reward == "hf":
        scorer, retokenized = hf_scorer(setup)
        return scorer, {"reward": "hf", "reward_model": cfg.score.reward_model, "retokenized": retokenized}
    return vader_scorer(setup), {"reward": "vader"}


def run_score(setup: Setup, t: int) -> loop.StageResult:
    cfg = setup.cfg
    name = f"score_{t}"
    answers = online.require(
        common.iter_dir(cfg, t) / "generate.json",
        f"the generate stage of iteration {t}",
        f"run --stages generate --iteration {t} (--resume)",
    )
    scorer, info = make_scorer(setup)
    recipe.say(f"[ultrafeedback] {name}: reward {info}")
    summary = online.run_score(
        root=common.iter_dir(cfg, t) / "score", answers_root=common.iter_dir(cfg, t) / "generate",
        n_shards=answers["shards"], meta=common.stage_meta(cfg, name), scorer=scorer, progress=cfg.progress,
        stop_after=common.stop_after_for(cfg, name), summary={"iteration": t, **info},
    )  # fmt: skip
    return _result(summary)


# ------------------------------------------------------------------------------------------ filter


def iteration_rows(cfg, t: int) -> tuple[dict, np.ndarray, dict]:
    """(written rows, their scores, the generate summary) of iteration t."""
    root = common.iter_dir(cfg, t)
    gen = online.require(root / "generate.json", f"the generate stage of iteration {t}",
                         f"run --stages generate --iteration {t}")  # fmt: skip
    online.require(
        root / "score.json", f"the score stage of iteration {t}", f"run --stages score --iteration {t}"
    )
    rows = online.read_shards(root / "generate", gen["shards"])
    scores = online.read_shards(root / "score", gen["shards"])["scores"]
    return rows, scores, gen


def run_filter(setup: Setup, t: int) -> loop.StageResult:
    """Unfinished / over-long / too-short answers, duplicates and ties dropped and counted, a (best, worst)
    pair per prompt; <out>/iter_t/filter/pairs.npz (+ pairs.jsonl as text) and filter.json.

    Raises:
      ValueError: no pair is left (one line with the counts), before anything trains on nothing.
    """
    cfg, tok = setup.cfg, setup.tokenizer
    root = common.iter_dir(cfg, t)
    rows, scores, gen = iteration_rows(cfg, t)
    online.start_data_stage(root / "filter", common.stage_meta(cfg, f"filter_{t}"))
    rewards_, penalty = scores, cfg.filter.no_eos_penalty
    if penalty is not None or (cfg.rebel.algo == "rebel" and cfg.rebel.kl_coef > 0):
        kl_coef = cfg.rebel.kl_coef if cfg.rebel.algo == "rebel" else 0.0
        rewards_ = np.asarray(scoring.rebel_rewards(
            scores, rows["finished"], rows["policy_logprobs"], rows["ref_logprobs"], kl_coef=kl_coef,
            no_eos_penalty=penalty,
        ))  # fmt: skip
    n = cfg.generate.answers
    selection = pairs.filter_answers(
        rows, rewards_, n, special_ids=tok.special_ids, max_answer_tokens=cfg.answer_limit,
        min_answer_tokens=cfg.filter.min_answer_tokens, keep_unfinished=penalty is not None,
    )  # fmt: skip
    stats = {
        "iteration": t,
        "train_prompts": gen["train_prompts"],
        "dropped_empty_prompt": gen["dropped_empty_prompt"],
        "dropped_long_prompt": gen["dropped_long_prompt"],
        "answers": int(len(scores)),
        **pairs.selection_stats(selection),
        "kl_coef": cfg.rebel.kl_coef if cfg.rebel.algo == "rebel" else 0.0,
    }
    if selection.num_pairs == 0:
        handoff.write_json(root / "filter" / "stats.json", stats)
        counts = ", ".join(f"{k} {v}" for k, v in stats.items() if v)
        raise ValueError(
            f"iteration {t}: no pairs left after the filter ({counts}; {root / 'filter' / 'stats.json'}): "
            "raise --data.max_answer_tokens or --generate.answers, or use a reward that tells answers apart"
        )
    chosen = {
        "prompt_index": rows["prompt_index"][selection.chosen_index],
        "chosen": selection.chosen_index,
        "rejected": selection.rejected_index,
        "chosen_reward": selection.chosen_reward,
        "rejected_reward": selection.rejected_reward,
    }
    special = np.asarray(sorted(tok.special_ids))

    def text(row: int) -> str:
        r, m = rows["response"][row], rows["response_mask"][row]
        return tok.decode(r[m & ~np.isin(r, special)].tolist())

    online.write_jsonl(root / "filter" / "pairs.jsonl", [
        {"prompt_index": int(p), "chosen": text(c), "rejected": text(r), "chosen_reward": float(rc),
         "rejected_reward": float(rr)}
        for p, c, r, rc, rr in zip(*chosen.values(), strict=True)
    ])  # fmt: skip
    online.write_npz(root / "filter" / "pairs.npz", chosen)
    handoff.write_json(root / "filter.json", stats)
    online.sync(f"{root}:filter")
    return _result(stats)


# ------------------------------------------------------------------------------------------- rebel


def run_rebel(setup: Setup, t: int) -> loop.StageResult:
    """REBEL (or DPO / IPO) from the policy that sampled iteration t, on its fixed pairs."""
    cfg = setup.cfg
    root = common.iter_dir(cfg, t)
    online.require(
        root / "filter.json", f"the filter of iteration {t}", f"run --stages filter --iteration {t}"
    )
    rows, _, _ = iteration_rows(cfg, t)
    selected = online.read_npz(root / "filter" / "pairs.npz", root / "filter.json")
    batch = pairs.pref_pairs(rows, selected, cfg.rebel.algo)
    params, source = policy_params(setup, t)
    return pairs.run_pair_stage(
        setup, cfg.rebel, common.stage_run(cfg, f"rebel_{t}"), pairs=batch, params=params,
        temperature=cfg.generate.temperature, summary={"iteration": t, "from": source},
    )  # fmt: skip


RUNNERS = {"generate": run_generate, "score": run_score, "filter": run_filter, "rebel": run_rebel}


def runner_of(name: str):
    stage, t = common.split_instance(name)
    if stage == "rm":
        return run_rm
    return functools.partial(RUNNERS[stage], t=t)


class _Runners(Mapping):
    """stage instance name ("rm", "generate_2", ...) -> its runner (`runner_of`)."""

    def __getitem__(self, name):
        return runner_of(name)

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


RECIPE = recipe.Recipe(
    name="ultrafeedback", defaults=common.UfConfig(), make_setup=common.make_setup, runners=_Runners(),
    steps=lambda cfg, name: cfg.rm.steps if name == "rm" else None, names=common.instance_names,
    finished=common.stage_finished, meta=common.stage_meta,
    checkpointed=lambda name: common.split_instance(name)[0] in ("rm", "rebel"),
    exports=lambda cfg: {"policy": f"rebel_{cfg.iteration or cfg.iterations}",
                         **({"reward_model": "rm"} if cfg.score.reward == "rm" else {})},
    guard=check_data_stages, check=common.check, inactive=common.inactive_message,
    renamed={"--mesh_fsdp": "--mesh-fsdp"}, description=common.__doc__,
)  # fmt: skip
