"""Rewards as code: loading 'python:module:function', one clear error with the prompt index,
the built-in synthetic rewards as such functions, and the arithmetic task scored by hand."""

import os

import numpy as np
import pytest

from fft import config_lib
from fft.data.synthetic import arithmetic as arith
from fft.methods import rlhf
from fft.rl import registry, rewards, tasks

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


# Module-level reward functions the tests name as 'python:tests.rl.test_rewards_code:<fn>'.
def length_reward(prompts, completions, metadata):
    return [float(len(c)) for c in completions]


def fails_on_x(prompts, completions, metadata):
    return [1.0 / (c != "x") for c in completions]  # ZeroDivisionError on "x"


def wrong_length(prompts, completions, metadata):
    return [0.0]


def nan_reward(prompts, completions, metadata):
    return [float("nan") if c == "b" else 0.0 for c in completions]


SPEC = "python:tests.rl.test_rewards_code:"


def test_code_reward_runs_with_prompts_completions_metadata():
    fn = rewards.code_reward_fn(SPEC + "length_reward")
    recs = [{"prompt": "p", "x": 1}, {"instruction": "Do.", "input": "i"}]
    np.testing.assert_array_equal(fn(recs, None, ["ab", "abcd"]), np.float32([2, 4]))
    assert rewards.prompt_text(recs[1]) == "### Instruction: Do.\n### Input: i\n### Response: "


def test_code_reward_errors_name_the_prompt_index():
    recs = [{"prompt": "p"}] * 3
    with pytest.raises(rewards.RewardError, match=r"fails_on_x: prompt 2: ZeroDivisionError"):
        rewards.code_reward_fn(SPEC + "fails_on_x")(recs, None, ["a", "b", "x"])
    with pytest.raises(rewards.RewardError, match=r"returned 1 values for 3 prompts"):
        rewards.code_reward_fn(SPEC + "wrong_length")(recs, None, ["a", "b", "c"])
    with pytest.raises(rewards.RewardError, match=r"prompt 1: the reward is nan"):
        rewards.code_reward_fn(SPEC + "nan_reward")(recs, None, ["a", "b", "c"])


@pytest.mark.parametrize(
    "spec,match",
    [
        ("tests.rl.test_rewards_code:length_reward", "python:package.module:function"),
        ("python:no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        (SPEC + "missing", "has no function 'missing'"),
    ],
)
def test_bad_reward_spec_is_a_config_error(spec, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        rewards.load_code_reward(spec)


def test_builtin_rewards_are_code_rewards():
    world = tasks.world(0)
    rec = world.instruction_data("test", 1)[0]
    texts = [rec["output"], "wrong"]
    fn = rewards.code_reward_fn(tasks.REWARDS["instructions"][0])
    np.testing.assert_allclose(fn([rec, rec], None, texts), [world.judge(rec, t) for t in texts])
    rev = tasks.prompts(world, "reviews", "test", 1)[0]
    assert rev["world_seed"] == 0
    words = world.train_sentiment_words()
    texts = [" ".join(words["positive"][:3]), " ".join(words["negative"][:3])]
    got = rewards.code_reward_fn(tasks.REWARDS["reviews"][0])([rev, rev], None, texts)
    np.testing.assert_allclose(got, [world.sentiment_judge(rev, t) for t in texts])
    assert got[0] > got[1]


# ---------------------------------------------------------------------------------------------
# Arithmetic word problems
# ---------------------------------------------------------------------------------------------


def test_answer_extraction_rule():
    assert arith.extract_answer("12 + 5 = 17. 17 - 3 = 14. The answer is 14.") == 14
    assert arith.extract_answer("it is -3") == -3
    assert arith.extract_answer("no number") is None
    assert arith.has_answer_format("5 + 2 = 7. The answer is 7.")
    assert arith.has_answer_format("The answer is 7 ")
    assert not arith.has_answer_format("The answer is 7. Bye.")
    assert not arith.has_answer_format("7")


def test_arithmetic_reward_on_hand_made_completions():
    rec = {"answer": "14"}
    completions = [
        "12 + 5 = 17. 17 - 3 = 14. The answer is 14.",  # right, formatted: 1 + 0.1
        "The answer is 14",  # right, formatted (the period is optional)
        "I think 14 apples",  # right (last integer), not formatted: 1
        "The answer is 15.",  # wrong, formatted: 0.1
        "It is 14. Then 3.",  # last integer 3: wrong, not formatted: 0
        "",  # nothing: 0
    ]
    got = tasks.arithmetic([""] * 6, completions, [rec] * 6)
    np.testing.assert_allclose(got, [1.1, 1.1, 1.0, 0.1, 0.0, 0.0])
    np.testing.assert_allclose(
        tasks.arithmetic_correct([""] * 6, completions, [rec] * 6), [1, 1, 1, 0, 0, 0]
    )


def test_arithmetic_problems_are_consistent_and_split():
    world = tasks.world(0)
    train, test = world.arithmetic_problems("train", 50), world.arithmetic_problems("test", 50)
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    for r in train + test:
        # The worked solution scores full marks, and each of its equations is right.
        assert tasks.arithmetic([""], [r["output"]], [r]) == [1.1]
        for eq in r["output"].split(". ")[:-1]:
            lhs, rhs = eq.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs), eq  # noqa: S307 - digits and + - * only
        assert int(r["answer"]) >= 0
    assert world.arithmetic_problems("train", 3) == train[:3]  # deterministic


def test_arithmetic_config_resolves():
    c = config_lib.load_config(os.path.join(ROOT, "configs/rlhf.py"), "arithmetic")
    adv, loss = rlhf._check(c)
    assert (adv.name, loss.name) == ("grpo", "ppo_clip") and c.lora.rank > 0
    assert c.init_from == "smollm2-135m-instruct" and c.rlhf.prompts == "arithmetic"
    reward_fn, eval_reward_fn, true_fn = rlhf.rewards(c, [], [])
    rec = tasks.world(0).arithmetic_problems("test", 1)[0]
    texts = [rec["output"], "The answer is -1."]
    np.testing.assert_allclose(reward_fn([rec] * 2, None, texts), [1.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(true_fn([rec] * 2, None, texts), [1.0, 0.0])
    assert eval_reward_fn is reward_fn  # trained on correct + format, reported beside accuracy


def test_unknown_objective_names_fail_before_loading():
    c = config_lib.load_config(os.path.join(ROOT, "configs/rlhf.py"), "smoke", **{"rlhf.loss": "x"})
    with pytest.raises(config_lib.ConfigError, match="registered losses are"):
        rlhf._check(c)
    c = config_lib.load_config(
        os.path.join(ROOT, "configs/rlhf.py"), "smoke", **{"rlhf.dynamic_sampling": True}
    )
    with pytest.raises(config_lib.ConfigError, match="dynamic_sampling"):
        rlhf._check(c)  # PPO (gae) has no groups to drop
    assert set(registry.ALGOS) >= {"ppo", "grpo"}


def test_arithmetic_chat_prompts_render_with_the_chat_template():
    """rlhf.chat: a held-out train problem as a solved first turn, then the problem, rendered
    by the tokenizer's chat template with the generation prompt; the metadata stays."""
    from configs import rlhf as rlhf_configs
    from fft.data import formats

    c = rlhf_configs.get_config("arithmetic")
    c.rlhf.chat, c.rlhf.train_prompts, c.rlhf.eval_prompts = True, 5, 3
    train, evals, fmt = rlhf.prompt_records(c, tasks.world(0))
    plain = tasks.prompts(tasks.world(0), "arithmetic", "train", 5)
    assert fmt == "chat" and len(train) == 4 and len(evals) == 3
    shot = plain[0]
    assert train[0]["answer"] == plain[1]["answer"]  # the example is not trained on
    m = evals[0]["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "user"]
    assert m[1]["content"] == shot["output"] and m[2]["content"].endswith(evals[0]["input"])

    class Tok:  # the chat template SmolLM2's GGUF carries (ChatML), on a character tokenizer
        chat_template = (
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
        bos_token = eos_token = None
        bos_id = eos_id = -1

        def encode(self, s):
            return [ord(ch) for ch in s]

    text = "".join(map(chr, formats.encode_prompt(evals[0], "chat", Tok())))
    want = (
        f"<|im_start|>user\n{m[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
        f"{shot['output']}<|im_end|>\n<|im_start|>user\n{m[2]['content']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == want
