"""What a rollout stage (grpo, ppo) calls on its samples, declared in the spec: the rewards it scores them with (a
tagged union on `kind`, each with a weight; the stage sums them) and the tools a reply may call.

What they compute is in stages/common/reward_functions.py and stages/common/tools.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from schemas.base import Strict

WEIGHT = "the factor of this reward in the sum of the stage's rewards"


class AnswerReward(Strict):
    """1 where the reply gives the prompt's reference `answer`, else 0.

    contains: the answer appears as a whole word or number (as the eval stage's task accuracy counts it);
    exact: the whole reply is the answer (both normalised: NFKC, whitespace runs as one space, ends trimmed);
    numeric: some number in the reply is within `tolerance` of the answer's (relative to max(1, |answer|))."""

    kind: Literal["answer"]
    match: Literal["contains", "exact", "numeric"] = Field("contains", description="how the answer is looked for")
    tolerance: float = Field(1e-6, ge=0, description="numeric: the largest relative difference that still counts")
    weight: float = Field(1.0, description=WEIGHT)


class RegexReward(Strict):
    """1 where the reply matches `pattern` (Python `re.search`), else 0: a format reward."""

    kind: Literal["regex"]
    pattern: str = Field(description="a Python regular expression")
    weight: float = Field(1.0, description=WEIGHT)

    @model_validator(mode="after")
    def _compiles(self) -> RegexReward:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        return self


class LengthReward(Strict):
    """DAPO's soft overlong penalty on the reply's tokens: 0 up to `limit - soft`, falling linearly to -1 at `limit`,
    -1 beyond."""

    kind: Literal["length"]
    limit: PositiveInt = Field(description="reply tokens at which the penalty reaches -1")
    soft: PositiveInt = Field(16, description="tokens over which the penalty falls from 0 to -1")
    weight: float = Field(1.0, description=WEIGHT)


# a Python function: module:name (importable where the pipeline runs) or file.py:name (a file, beside the spec when
# relative)
FUNCTION = r"^([A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_]\w*$"


class PythonReward(Strict):
    """Your own function, `module:name` (importable where the pipeline runs) or `file.py:name` (a file, beside the spec
    when relative), called once per batch as
    `fn(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]`: one value per
    completion, where prompts[i] and answers[i] are those of the prompt completions[i] answers."""

    kind: Literal["python"]
    function: str = Field(pattern=FUNCTION, description="module:name or file.py:name of your function")
    weight: float = Field(1.0, description=WEIGHT)


class ModelReward(Strict):
    """The score of the reward model that an earlier `reward` stage of this pipeline trained: its head's value at the
    reply's last token, the prompt and reply rendered through the template that stage trained with. The values are
    unbounded logits, not 0/1: weigh them against the other rewards (group-normalised advantages make the scale matter
    only between rewards)."""

    kind: Literal["reward_model"]
    stage: str = Field(description="the name of the reward stage whose model scores the completions")
    weight: float = Field(1.0, description=WEIGHT)


Reward = Annotated[AnswerReward | RegexReward | LengthReward | PythonReward | ModelReward, Field(discriminator="kind")]


class Tool(Strict):
    """A Python function a reply may call: `module:name` or `file.py:name` (a file, beside the spec when relative).

    The model is offered its definition, built from the function itself: its name, its docstring's first paragraph as
    the description, and a JSON Schema type for each parameter from its annotation (str, int, float, bool, list,
    dict; a parameter without a default is required). A call runs it with the call's arguments as keywords; what it
    returns, as text (JSON for anything but a string), is the tool turn. A function that raises, or runs past
    `timeout`, gives an error message as its result, which the reply reads like any other."""

    function: str = Field(pattern=FUNCTION, description="module:name or file.py:name of the function")
    timeout: float = Field(5.0, gt=0, description="seconds a call may run before its result is an error")

    def name(self) -> str:
        """The name the model calls it by: the function's."""
        return self.function.rsplit(":", 1)[1]
