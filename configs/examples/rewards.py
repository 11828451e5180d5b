"""Rule-based rewards for the RL examples (`ppo.reward_fn: rewards:letter_e`): a toy task a
tiny random model can learn in a few iterations, with a reward that is easy to check.

A reward function takes the decoded prompts and responses of a batch and returns one
number per response.
"""


def letter_e(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of the response's characters that are the letter e (0 for an empty one).
    The tiny random-initialised model scores about 0.1: e is its most frequent letter."""
    return [response.count("e") / len(response) if response else 0.0 for response in responses]
