"""What a policy is asked, and how the synthetic world judges it, for RLHF and DPO.

instructions  the instruction tasks (`World.instruction_data`), instruction-format prompts,
              judged by correctness, then style and length (`World.judge`)
reviews       controlled sentiment generation (Rafailov et al. 2023, Fig. 2): continue a
              review's neutral opening (plain-text prompt); the true reward is the
              continuation's sentiment balance (`World.sentiment_judge`), the stand-in for a
              sentiment classifier. Preference pairs: `World.review_pairs`.
"""

from __future__ import annotations

from collections.abc import Callable

from fft.config_lib import ConfigError
from fft.data.synthetic import World

PROMPT_SETS = ("instructions", "reviews")


def check(name: str, key: str) -> None:
    """A clear error for an unknown prompt set in config field `key`."""
    if name not in PROMPT_SETS:
        raise ConfigError(f"config.{key}={name!r}: choose one of {', '.join(PROMPT_SETS)}.")


def prompts(world: World, name: str, split: str, n: int, tasks=None) -> list[dict]:
    """`n` prompt records of `split` (`tasks` filters the instruction tasks)."""
    if name == "reviews":
        return world.review_prompts(split, n)
    return world.instruction_data(split, n, tasks)


def prompt_format(name: str) -> str:
    """How the records render as prompts (`fft.data.formats.encode_prompt`)."""
    return "prompt_completion" if name == "reviews" else "instruction"


def judge(world: World, name: str) -> Callable[[dict, str], float]:
    """The true reward `(record, response) -> float` of the prompt set."""
    return world.sentiment_judge if name == "reviews" else world.judge
