"""Train steps: `make_*_step(cfg, tx, ...) -> step(state, batch, *, key) -> (state, metrics)`, un-jitted and
written for the whole (global) batch; `parallel.jit_step` compiles one per entry point.

    state           TrainState, OptimConfig / optim_field / make_optimizer (AdamW, Muon), update, run_epochs
    lm              LMBatch, lm_loss, make_lm_step / make_lm_eval (pretraining, SFT, PPO-ptx)
    reward          RankBatch, LabelBatch, make_rm_step (pairwise, K-way), make_binary_step, evals
    preference      pair_logprobs, make_dpo_step, make_rebel_step, make_pair_step
    rl_config       RLConfig: every RL algorithm's settings and defaults, with their sources
    experience      Experience, make_experience (old / reference logprobs, values, rewards, advantages)
    policy          make_rl_step, make_learn, make_fused_iteration (PPO, PG, GRPO, RLOO)
    micro_batching  gradient accumulation of the policy update

Imports `jaxrlhf.losses`, `jaxrlhf.rollout` and `jaxrlhf.models` below it.
"""

from jaxrlhf.train import experience, lm, micro_batching, policy, preference, reward, rl_config, state

# ----------------------------------------------------------------------------------------------- state
from jaxrlhf.train.state import OptimConfig as OptimConfig
from jaxrlhf.train.state import optim_field as optim_field
from jaxrlhf.train.state import TrainState as TrainState
from jaxrlhf.train.state import apply_gradients as apply_gradients
from jaxrlhf.train.state import init_train_state as init_train_state
from jaxrlhf.train.state import make_optimizer as make_optimizer
from jaxrlhf.train.state import make_per_model_optimizer as make_per_model_optimizer
from jaxrlhf.train.state import mean_metrics as mean_metrics
from jaxrlhf.train.state import run_epochs as run_epochs
from jaxrlhf.train.state import update as update

# ------------------------------------------------------------------------------------------------- lm
from jaxrlhf.train.lm import LMBatch as LMBatch
from jaxrlhf.train.lm import lm_loss as lm_loss
from jaxrlhf.train.lm import make_lm_eval as make_lm_eval
from jaxrlhf.train.lm import make_lm_step as make_lm_step

# --------------------------------------------------------------------------------------------- reward
from jaxrlhf.train.reward import LabelBatch as LabelBatch
from jaxrlhf.train.reward import RankBatch as RankBatch
from jaxrlhf.train.reward import make_binary_eval as make_binary_eval
from jaxrlhf.train.reward import make_binary_step as make_binary_step
from jaxrlhf.train.reward import make_rm_eval as make_rm_eval
from jaxrlhf.train.reward import make_rm_step as make_rm_step

# ----------------------------------------------------------------------------------------- preference
from jaxrlhf.rollout.pairs import PrefBatch as PrefBatch
from jaxrlhf.train.preference import make_dpo_step as make_dpo_step
from jaxrlhf.train.preference import make_pair_step as make_pair_step
from jaxrlhf.train.preference import make_rebel_step as make_rebel_step
from jaxrlhf.train.preference import pair_logprobs as pair_logprobs
from jaxrlhf.train.preference import pair_passes_step as pair_passes_step

# --------------------------------------------------------------------------------------------- policy
from jaxrlhf.train.experience import Experience as Experience
from jaxrlhf.train.experience import make_experience as make_experience
from jaxrlhf.train.rl_config import RLConfig as RLConfig
from jaxrlhf.train.policy import init_rl_params as init_rl_params
from jaxrlhf.train.policy import init_rl_state as init_rl_state
from jaxrlhf.train.policy import make_fused_iteration as make_fused_iteration
from jaxrlhf.train.policy import make_learn as make_learn
from jaxrlhf.train.policy import make_rl_step as make_rl_step

__all__ = [
    "Experience", "LMBatch", "LabelBatch", "OptimConfig", "PrefBatch", "RLConfig", "RankBatch", "TrainState",
    "apply_gradients", "experience", "init_rl_params", "init_rl_state", "init_train_state", "lm", "lm_loss",
    "make_binary_eval", "make_binary_step", "make_dpo_step", "make_experience", "make_fused_iteration",
    "make_learn", "make_lm_eval", "make_lm_step", "make_optimizer", "make_pair_step",
    "make_per_model_optimizer", "make_rebel_step", "make_rl_step", "make_rm_eval", "make_rm_step",
    "mean_metrics", "micro_batching", "optim_field",
    "pair_logprobs", "pair_passes_step", "policy", "preference", "reward", "rl_config", "run_epochs", "state",
    "update",
]  # fmt: skip
