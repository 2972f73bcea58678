"""What a policy is asked, and how the synthetic world rewards it, for RLHF and DPO.

instructions  the instruction tasks (`World.instruction_data`), instruction-format prompts,
              judged by correctness, then style and length (`World.judge`)
reviews       controlled sentiment generation (Rafailov et al. 2023, Fig. 2): continue a
              review's neutral opening (plain-text prompt); the true reward is the
              continuation's sentiment balance (`World.sentiment_judge`), the stand-in for a
              sentiment classifier. Preference pairs: `World.review_pairs`.
arithmetic    multi-step word problems with one integer answer (`World.arithmetic_problems`),
              a verifiable reward: 1 if the completion's last integer is the answer, plus
              FORMAT_WEIGHT if it ends with "The answer is N." (true reward: correctness alone)

The rewards are rewards as code (`fft.rl.rewards`): functions
`(prompts, completions, metadata) -> list[float]`, named in configs as
'python:fft.rl.tasks:<function>'; `REWARDS` maps a prompt set to its own ('judge').
"""

from __future__ import annotations

import functools

from fft.config_lib import ConfigError
from fft.data.synthetic import World
from fft.data.synthetic import arithmetic as arithmetic_lib

PROMPT_SETS = ("instructions", "reviews", "arithmetic")

# prompt set -> (its training reward, 'judge'; its true reward, reported as true_reward).
REWARDS = {
    "instructions": ("python:fft.rl.tasks:instruction_judge",) * 2,
    "reviews": ("python:fft.rl.tasks:sentiment",) * 2,
    "arithmetic": ("python:fft.rl.tasks:arithmetic", "python:fft.rl.tasks:arithmetic_correct"),
}

# Weight of the format reward in `arithmetic`: small, so a right answer always outranks form.
FORMAT_WEIGHT = 0.1


def check(name: str, key: str, choices=PROMPT_SETS) -> None:
    """A clear error for a prompt set in config field `key` that is not one of `choices`."""
    if name not in choices:
        raise ConfigError(f"config.{key}={name!r}: choose one of {', '.join(choices)}.")


@functools.lru_cache(maxsize=4)
def world(seed: int) -> World:
    """The synthetic world of `seed`, built once per process (reward functions share it)."""
    return World(seed)


def prompts(world: World, name: str, split: str, n: int, tasks=None) -> list[dict]:
    """`n` prompt records of `split` (`tasks` filters the instruction tasks)."""
    if name == "reviews":
        # The sentiment reward reads the world's lexicon: the records say which world.
        return [dict(r, world_seed=world.seed) for r in world.review_prompts(split, n)]
    if name == "arithmetic":
        return world.arithmetic_problems(split, n)
    return world.instruction_data(split, n, tasks)


def as_chat(records: list[dict], example: dict | None = None) -> list[dict]:
    """`records` with `messages` for the 'chat' prompt format (the tokenizer's own template):
    the instruction and input as one user turn, after `example` (a solved problem) as a first
    user / assistant exchange, so that an instruction-tuned model answers in the rewarded form.
    The other fields stay: the reward functions read them as metadata."""

    def user(r):
        return {"role": "user", "content": f"{r['instruction']}\n\n{r.get('input', '')}".strip()}

    shot = (
        []
        if example is None
        else [user(example), {"role": "assistant", "content": example["output"]}]
    )
    return [dict(r, messages=[*shot, user(r)]) for r in records]


def prompt_format(name: str) -> str:
    """How the records render as prompts (`fft.data.formats.encode_prompt`)."""
    return "prompt_completion" if name == "reviews" else "instruction"


# ---------------------------------------------------------------------------------------------
# Rewards as code
# ---------------------------------------------------------------------------------------------


def instruction_judge(prompts, completions, metadata) -> list[float]:
    """The synthetic judge (`World.judge`): exact answer first, then style and length.

    Needs each record's exact `output` (and `instruction`/`input`) in `metadata`.
    """
    del prompts
    return [World.judge(m, c) for c, m in zip(completions, metadata, strict=True)]


def sentiment(prompts, completions, metadata) -> list[float]:
    """Sentiment balance of a review continuation in [-1, 1) (`World.sentiment_judge`).

    The lexicon is that of `metadata[i]['world_seed']` (0 when absent).
    """
    del prompts
    return [
        world(int(m.get("world_seed", 0))).sentiment_judge(m, c)
        for c, m in zip(completions, metadata, strict=True)
    ]


def arithmetic_correct(prompts, completions, metadata) -> list[float]:
    """1.0 if the completion's last integer equals `metadata[i]['answer']`, else 0.0.

    The extraction rule is `fft.data.synthetic.arithmetic.extract_answer`: the last integer
    (optional '-' then digits) anywhere in the completion.
    """
    del prompts
    return [
        float(arithmetic_lib.extract_answer(c) == int(m["answer"]))
        for c, m in zip(completions, metadata, strict=True)
    ]


def answer_format(prompts, completions, metadata) -> list[float]:
    """1.0 if the completion ends with "The answer is N." (N an integer), else 0.0."""
    del prompts, metadata
    return [float(arithmetic_lib.has_answer_format(c)) for c in completions]


def arithmetic(prompts, completions, metadata) -> list[float]:
    """The arithmetic task's training reward: correct + FORMAT_WEIGHT * format."""
    correct = arithmetic_correct(prompts, completions, metadata)
    form = answer_format(prompts, completions, metadata)
    return [c + FORMAT_WEIGHT * f for c, f in zip(correct, form, strict=True)]
