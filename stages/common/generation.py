"""Replies from a language model: greedy or sampled, batched with left padding, stopping at the end of the turn.

Two ways in. `answer` renders prompts through a named template exactly as training did (the
stages and the eval stage use it). `ChatModel` loads any checkpoint folder and renders with
the chat template stored in its tokenizer, finding the token that ends a turn from that
template alone (`turn_end_id`), so a folder answers correctly without anyone knowing which
template trained it. Both stop a reply at its first stop token: the end of the turn, or the
end-of-sequence token, which ends any text. A prompt may offer tools (each prompt's own list,
or None): both render them as training did, and a reply that calls one holds its calls as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig

from stages.common.checkpoint import load_model
from stages.common.templates import NO_CHAT_TEMPLATE, encode_prompt, end_of_turn_id, read_replies
from stages.common.tools import Chat

# rendered to find where the assistant's turn ends; the reply is a word every tokenizer has
PROBE = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: temperature 0 is greedy (argmax, deterministic); above 0, nucleus
    sampling from the smallest set of tokens holding top_p of the probability (no top-k cut-off)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    def config(self, stop_ids: list[int], pad_id: int) -> GenerationConfig:
        """A complete generation config, so nothing is inherited from a checkpoint's own generation_config.json."""
        chosen = (
            dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
            if self.temperature > 0
            else dict(do_sample=False)
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **chosen
        )


GREEDY = Sampling()


@dataclass(frozen=True)
class Reply:
    text: str
    # tokens the model generated, the stop token included; the padding of a finished row in a batch is not counted
    tokens: int
    stopped: bool  # whether the model ended its turn within max_new_tokens


def stop_ids(tokenizer, end_of_turn: int) -> list[int]:
    """The end of the turn, and the end-of-sequence token where it differs."""
    eos = tokenizer.eos_token_id
    return [end_of_turn] if eos is None or eos == end_of_turn else [end_of_turn, eos]


def stop_at_turn_end(model, tokenizer, stops: list[int]) -> None:
    """Make the model's own generation config stop where a reply ends (`stops`), so whatever reads that config alone
    (a server, an exported folder's users) stops there too, and pads with the tokenizer's pad token."""
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The generated ids up to and including the first stop token; everything after it is padding."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def generate(
    model, prompts: list[list[int]], stops: list[int], pad_id: int, sampling: Sampling = GREEDY, batch_size: int = 32
) -> list[list[int]]:
    """Each prompt's continuation up to and including its first stop token (all max_new_tokens where none came).

    Prompts are left-padded, so every row's last prompt token sits in the same column and generation
    starts for all rows at once; the attention mask hides the padding (and generate derives position
    ids from it), so a prompt continues as it would alone."""
    model.eval()
    config = sampling.config(stops, pad_id)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        out += [cut_at_stop(row, stops) for row in output[:, width:].tolist()]
    return out


def decode(tokenizer, ids: list[int], stops: list[int]) -> Reply:
    stopped = bool(ids) and ids[-1] in stops
    text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
    return Reply(text=text.strip(), tokens=len(ids), stopped=stopped)


def answer(
    model,
    tokenizer,
    prompts: list[list[dict]],
    template: str,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tools: list[list[dict] | None] | None = None,
) -> list[str]:
    """The model's reply to each conversation-so-far, rendered as in training with the tools each offers (`tools`,
    parallel to `prompts`; None: none offered), stopping at the end of its turn (greedy by default)."""
    stops = stop_ids(tokenizer, end_of_turn_id(tokenizer, template))
    offered = tools or [None] * len(prompts)
    encoded = [encode_prompt(messages, tokenizer, template, given) for messages, given in zip(prompts, offered)]
    sampling = Sampling(temperature, top_p, max_new_tokens)
    return [
        decode(tokenizer, ids, stops).text
        for ids in generate(model, encoded, stops, tokenizer.pad_token_id, sampling, batch_size)
    ]


def exact_match(model, tokenizer, conversations: list[Chat], template: str, max_new_tokens: int = 32) -> float:
    """Share of conversations whose last assistant turn the model reproduces exactly (greedy, both sides stripped)."""
    if not conversations:
        return float("nan")
    prompts, tools = [c.messages[:-1] for c in conversations], [c.tools for c in conversations]
    replies = answer(model, tokenizer, prompts, template, max_new_tokens, tools=tools)
    return sum(r == c.messages[-1]["content"].strip() for r, c in zip(replies, conversations)) / len(conversations)


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def turn_end_id(tokenizer) -> int:
    """The token that ends an assistant turn in the tokenizer's stored chat template, found without knowing its name.

    A probe exchange is rendered with and without its reply; what the reply's turn adds after the
    reply text is the template's end-of-turn markup, and its first special token is where a reply
    ends (<|im_end|> for chatml, </s> or the EOS for llama2). A template that marks the end of a turn
    with no special token falls back to the EOS token: stopping on plain text would need a string match."""
    if not tokenizer.chat_template:
        raise ValueError(NO_CHAT_TEMPLATE)
    prompt = tokenizer.apply_chat_template(PROBE[:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(PROBE, tokenize=False)
    reply = PROBE[1]["content"]
    if not whole.startswith(prompt) or reply not in whole[len(prompt) :]:
        raise ValueError(
            "the tokenizer's chat template does not render a reply after its generation prompt, "
            "so where a turn ends cannot be found from it"
        )
    turn = whole[len(prompt) :]
    markup = turn[turn.index(reply) + len(reply) :]
    special = _special_ids(tokenizer)
    found = next((i for i in tokenizer(markup, add_special_tokens=False)["input_ids"] if i in special), None)
    if found is not None:
        return found
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer's chat template ends a turn with no special token, and the tokenizer has no EOS token to "
            "stop at"
        )
    return tokenizer.eos_token_id


@dataclass(frozen=True)
class ChatModel:
    """A checkpoint ready to answer: its model in eval mode, its tokenizer, and the tokens that end a reply."""

    model: torch.nn.Module
    tokenizer: object
    stops: list[int]

    @classmethod
    def load(cls, folder: Path, device: str | torch.device | None = None) -> ChatModel:
        """Any stage's output folder (an adapter is merged into its base), in float32, on the GPU where there is one;
        its generation config stops where a reply ends, its tokenizer reads replies (and tool calls) back."""
        tokenizer = AutoTokenizer.from_pretrained(folder)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(Path(folder), tokenizer).to(device).eval()
        read_replies(tokenizer)
        stops = stop_ids(tokenizer, turn_end_id(tokenizer))
        stop_at_turn_end(model, tokenizer, stops)
        return cls(model, tokenizer, stops)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The conversation so far (offering `tools`) and the assistant header, rendered by the tokenizer's stored
        template."""
        rendered = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, add_generation_prompt=True, return_dict=True
        )
        return list(rendered["input_ids"])

    def reply(
        self,
        prompts: list[list[dict]],
        sampling: Sampling = GREEDY,
        batch_size: int = 32,
        tools: list[list[dict] | None] | None = None,
    ) -> list[Reply]:
        """Replies to the prompts, each offered its tools (`tools`, parallel to `prompts`; None: none offered)."""
        offered = tools or [None] * len(prompts)
        encoded = [self.prompt_ids(messages, given) for messages, given in zip(prompts, offered)]
        generated = generate(self.model, encoded, self.stops, self.pad_id, sampling, batch_size)
        return [decode(self.tokenizer, ids, self.stops) for ids in generated]

    @property
    def pad_id(self) -> int:
        # a tokenizer without a pad token pads with EOS: the attention mask hides padding whatever its id
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[-1]
