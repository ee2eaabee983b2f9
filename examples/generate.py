"""The toy world: small, exact skills a 5-20M-parameter model can learn on two CPU cores.

Three skills with exact answers, the subjects of each split in three parts: SFT's (three fifths), the aligned part
the preference stages ask about (a fifth) and a held-out part no stage trains on (a fifth):

- addition of two numbers below 30;
- capitals of invented countries (facts stated in the pretrain text for every country; a model can only answer
  about a country SFT never asked about by combining what pretraining taught with the answer format SFT taught);
- upper-casing and reversing short words.

And one tool skill, in conversations of its own (`sft_tools.jsonl`, kept apart from `sft.jsonl`, which trains under
templates that cannot show tools too): a country's population, through a lookup tool. The number is drawn anew in
every conversation, so a model gives it only by calling the tool with the country's name and reading back its
result; held-out conversations ask about the same countries, each with a number of its own. The same questions as
prompts for a rollout stage that calls the tool (`rl_tool_prompts.jsonl`), answered by the number the toy world's tool
gives (examples/tools.py).

Pretrain text states every fact in prose, in every phrasing, and never uses the chat format,
so a pretrain-only model continues text while an SFT model answers. An answer is the fact's
canonical sentence ("The capital of Zorbia is Quellon."): SFT teaches the format and the model
completes it from what pretraining taught, which is what lets it answer held-out questions. The generator is seeded and
writes the same bytes every time: `python -m examples.generate` rewrites `examples/data/`, and a test checks that the
bundled files are exactly what it writes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Literal

from examples.tools import population

SEED = 1234
TOOL_ROWS, TOOL_HELDOUT_ROWS = 800, 200  # the tool skill's training and held-out conversations
TOOL_PROMPTS, TOOL_HELDOUT_PROMPTS = 400, 100  # its questions for a rollout stage calling the tool
DATA_DIR = Path(__file__).resolve().parent / "data"

SYLLABLES = ["zor", "qua", "mel", "tin", "bar", "vex", "lu", "ran", "do", "fi", "kel", "mor", "sa", "pel", "gri", "ux"]
WORDS = [
    "cat",
    "dog",
    "sun",
    "map",
    "red",
    "box",
    "cup",
    "pen",
    "hat",
    "owl",
    "fox",
    "bee",
    "jam",
    "kit",
    "lamp",
    "fish",
    "tree",
    "moon",
    "star",
    "frog",
    "ship",
    "rain",
    "milk",
    "coin",
    "bird",
    "leaf",
    "rock",
    "wind",
    "door",
    "king",
    "rose",
    "salt",
    "bell",
    "corn",
    "duck",
    "fire",
    "gold",
    "hill",
]
SYSTEM = "You are a careful assistant. Answer in one sentence."


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def countries(rng: random.Random, n: int = 40) -> dict[str, str]:
    table: dict[str, str] = {}
    while len(table) < n:
        country, capital = _name(rng, 2) + "ia", _name(rng, 2)
        if country not in table and capital not in table.values():
            table[country] = capital
    return table


def split(items: list, rng: random.Random, fraction: float = 0.2) -> tuple[list, list, list]:
    """(SFT's part, the aligned part, the held-out part): a fraction each for the last two."""
    items = list(items)
    rng.shuffle(items)
    cut = int(len(items) * fraction)
    return items[2 * cut :], items[cut : 2 * cut], items[:cut]


Part = Literal["sft", "aligned", "heldout"]


class Skills:
    """Questions with exact answers, drawn from one of three parts of each skill's subjects: the part SFT asks about,
    the part the preference stages train on (SFT never asks about it), and the held-out part no stage trains on."""

    def __init__(self, rng: random.Random):
        self.table = countries(rng)
        pairs = [(a, b) for a in range(30) for b in range(30)]
        self.pairs, self.aligned_pairs, self.heldout_pairs = split(pairs, rng)
        self.countries, self.aligned_countries, self.heldout_countries = split(sorted(self.table), rng)
        self.words, self.aligned_words, self.heldout_words = split(WORDS, rng)

    def subjects(self, part: Part) -> tuple[list, list, list]:
        """The part's (pairs, countries, words)."""
        if part == "sft":
            return self.pairs, self.countries, self.words
        if part == "aligned":
            return self.aligned_pairs, self.aligned_countries, self.aligned_words
        return self.heldout_pairs, self.heldout_countries, self.heldout_words

    def question(self, rng: random.Random, part: Part) -> tuple[str, str]:
        """A question about the part's subjects and its exact answer: the canonical sentence pretraining states the
        fact in."""
        pairs, countries_, words = self.subjects(part)
        skill = rng.choice(["add", "capital", "upper", "reverse"])
        if skill == "add":
            a, b = rng.choice(pairs)
            return rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."]), self.sentence(
                skill, (a, b), a + b
            )
        if skill == "capital":
            country = rng.choice(countries_)
            question = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."])
            return question, self.sentence(skill, country, self.table[country])
        word = rng.choice(words)
        if skill == "upper":
            return f"Write {word} in capital letters.", self.sentence(skill, word, word.upper())
        return f"Reverse the letters of {word}.", self.sentence(skill, word, word[::-1])

    @staticmethod
    def sentence(skill: str, subject, value, template: int = 0) -> str:
        """Fact sentences; template 0 is the canonical one, which SFT answers use."""
        if skill == "add":
            a, b = subject
            return [
                f"{a} plus {b} equals {value}.",
                f"The sum of {a} and {b} is {value}.",
                f"Adding {a} to {b} gives {value}.",
            ][template]
        if skill == "capital":
            return [
                f"The capital of {subject} is {value}.",
                f"{value} is the capital city of {subject}.",
                f"In {subject}, the government sits in {value}.",
            ][template]
        if skill == "upper":
            return [
                f"The word {subject} in capital letters is {value}.",
                f"{value} is how {subject} looks in capitals.",
            ][template]
        return [f"The word {subject} reversed is {value}.", f"Written backwards, {subject} becomes {value}."][template]

    def another_subject(self, answer: str, rng: random.Random) -> str:
        """The right answer to a different question of the same skill, drawn from the training part of the world:
        the mistake an SFT model makes on a question about something it was never asked about (it answers about
        something it was asked about)."""
        if answer.startswith("The capital of"):
            country = rng.choice([c for c in self.countries if c not in answer])
            return self.sentence("capital", country, self.table[country])
        if " in capital letters is " in answer or " reversed is " in answer:
            skill = "upper" if " in capital letters is " in answer else "reverse"
            word = rng.choice([w for w in self.words if f" {w} " not in answer])
            return self.sentence(skill, word, word.upper() if skill == "upper" else word[::-1])
        a, b = rng.choice([p for p in self.pairs if f"{p[0]} plus {p[1]} " not in answer])
        return self.sentence("add", (a, b), a + b)

    def wrong_answers(self, question: str, answer: str, rng: random.Random, n: int) -> list[str]:
        """Plausible wrong answers, closest first, for preference pairs and ranked lists."""
        value = answer.rstrip(".").split()[-1]
        subject_and_value = answer.rstrip(".").rsplit(" ", 1)[0] + " "
        if value.isdigit():
            offsets = sorted({rng.choice([-1, 1]) * k for k in range(1, 8)}, key=abs)
            wrong = [str(max(int(value) + o, 0)) for o in offsets if max(int(value) + o, 0) != int(value)]
        elif value in self.table.values():
            wrong = rng.sample([c for c in self.table.values() if c != value], n)
        else:  # upper / reverse: the word unchanged, then other transforms of it
            word = question.split()[-1].rstrip(".") if question.startswith("Reverse") else question.split()[1]
            wrong = [
                c
                for c in dict.fromkeys(
                    [word, word.upper()[::-1], word.capitalize(), word[::-1].upper(), word[1:] + word[0]]
                )
                if c != value
            ]
        return [subject_and_value + w + "." for w in wrong[:n]]

    def fact_sentences(self) -> list[str]:
        """Every fact in every phrasing, held-out ones included (pretraining sees the whole world)."""
        facts = [self.sentence("add", (a, b), a + b, t) for a in range(30) for b in range(30) for t in range(3)]
        for country, capital in self.table.items():
            facts += [self.sentence("capital", country, capital, t) for t in range(3)] * 6
        for word in WORDS:
            facts += [self.sentence("upper", word, word.upper(), t) for t in range(2)] * 6
            facts += [self.sentence("reverse", word, word[::-1], t) for t in range(2)] * 6
        return facts


def pretrain_docs(skills: Skills, rng: random.Random, n_docs: int) -> list[dict]:
    facts = skills.fact_sentences()
    return [{"text": " ".join(rng.sample(facts, rng.randint(3, 9)))} for _ in range(n_docs)]


def conversation(skills: Skills, rng: random.Random, heldout: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(rng.choice([1, 1, 2, 3])):
        question, answer = skills.question(rng, "heldout" if heldout else "sft")
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"conversations": messages}


def preference(skills: Skills, rng: random.Random, heldout: bool) -> dict:
    """The right answer chosen; rejected, half the time a wrong value, half the time an answer about another subject.
    Training pairs ask about the aligned part: questions SFT never asked, on which the SFT model makes the mistakes
    the pairs reject (on SFT's own questions it already answers right, and a pair there teaches nothing that carries
    over to a subject it has not seen)."""
    question, answer = skills.question(rng, "heldout" if heldout else "aligned")
    rejected = (
        skills.another_subject(answer, rng) if rng.random() < 0.5 else skills.wrong_answers(question, answer, rng, 1)[0]
    )
    return {"prompt": question, "chosen": answer, "rejected": rejected}


def ranked(skills: Skills, rng: random.Random, heldout: bool) -> dict:
    """Four candidates, shuffled: the right answer scores 1, then the closest wrong value 0.6, a further wrong
    value 0.4, and an answer about another subject (it does not answer the question at all) 0.2. Asked about the
    aligned part, as preference pairs are."""
    question, answer = skills.question(rng, "heldout" if heldout else "aligned")
    values = skills.wrong_answers(question, answer, rng, 2)
    wrong = [values[0], values[-1], skills.another_subject(answer, rng)]
    scored = [(answer, 1.0)] + [(w, round(0.6 - 0.2 * i, 2)) for i, w in enumerate(wrong)]
    rng.shuffle(scored)
    return {"instruction": question, "input": "", "output": [c for c, _ in scored], "score": [s for _, s in scored]}


# Instructions phrased as no SFT conversation phrases them: the RL prompts use the first half of each skill's, the
# held-out RL prompts the second half.
PHRASINGS = {
    "add": [
        "How much is {a} and {b} together?",
        "{a} + {b} = ?",
        "Sum {a} and {b}.",
        "Tell me {a} plus {b}.",
        "What do you get when you add {a} to {b}?",
        "Give the sum of {a} and {b}.",
        "{a} plus {b} makes what?",
        "Work out {a} + {b}.",
    ],
    "capital": [
        "Which city is the capital of {s}?",
        "Tell me the capital of {s}.",
        "{s}: what is its capital?",
        "Where does the government of {s} sit?",
        "What city is the capital of {s}?",
        "Give the capital of {s}.",
        "I need the capital of {s}.",
        "In which city does {s} have its government?",
    ],
    "upper": [
        "Write {s} in upper case.",
        "Capitalise every letter of {s}.",
        "How is {s} written in capitals?",
        "Give {s} in capital letters.",
        "Turn {s} into capital letters.",
        "Put {s} in capitals.",
        "Spell {s} in upper case letters.",
        "What is {s} in capital letters?",
    ],
    "reverse": [
        "Spell {s} backwards.",
        "Write {s} reversed.",
        "What is {s} written backwards?",
        "Reverse the word {s}.",
        "Give the letters of {s} in reverse order.",
        "Turn {s} around, letter by letter.",
        "How does {s} read backwards?",
        "Write the word {s} backwards.",
    ],
}


def rl_prompt(skills: Skills, rng: random.Random, heldout: bool) -> dict:
    """An instruction phrased as SFT never phrased one, and the answer a reward checks for: the whole canonical
    sentence, subject and value.

    An SFT model follows such an instruction some of the time (it keys on the phrasings it was trained on), so a
    group of its sampled replies is often part right, part wrong: what GRPO learns from. Its subjects are the ones
    SFT asked about (an SFT model never names a subject it was not asked about, so GRPO could never be rewarded on
    one); sums come from the held-out pairs in the held-out prompts, whose phrasings GRPO never trains on either.
    The reward is on the whole sentence: a reply that gives the right value about another subject is the toy world's
    typical mistake, and a reward on the value alone pays for it."""
    skill = rng.choice(list(PHRASINGS))
    phrasings = PHRASINGS[skill][4:] if heldout else PHRASINGS[skill][:4]
    phrasing = rng.choice(phrasings)
    if skill == "add":
        a, b = rng.choice(skills.heldout_pairs if heldout else skills.pairs)
        return {"prompt": phrasing.format(a=a, b=b), "answer": skills.sentence(skill, (a, b), a + b)}
    if skill == "capital":
        country = rng.choice(skills.countries)
        return {"prompt": phrasing.format(s=country), "answer": skills.sentence(skill, country, skills.table[country])}
    word = rng.choice(skills.words)
    value = word.upper() if skill == "upper" else word[::-1]
    return {"prompt": phrasing.format(s=word), "answer": skills.sentence(skill, word, value)}


# The lookup tool the tool skill offers, as OpenAI and TRL rows define a tool.
POPULATION = {
    "type": "function",
    "function": {
        "name": "population",
        "description": "How many people live in a country today.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]},
    },
}
POPULATION_QUESTIONS = ["How many people live in {c}?", "What is the population of {c}?"]


def tool_conversation(rng: random.Random, country: str) -> dict:
    """A country's population asked, the lookup tool called with the country's name, its result (a number drawn anew
    each time: a model can only give it by reading the result), and the answer sentence: a TRL row (tool calls on the
    assistant message, the tools beside the messages)."""
    people = rng.randint(1000, 99999)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    call = {"type": "function", "function": {"name": "population", "arguments": {"country": country}}}
    messages += [
        {"role": "user", "content": rng.choice(POPULATION_QUESTIONS).format(c=country)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(people)},
        {"role": "assistant", "content": f"{country} has {people} people."},
    ]
    return {"conversations": messages, "tools": [POPULATION]}


def tool_conversations(skills: Skills, rng: random.Random, n_train: int, n_heldout: int) -> tuple[list, list]:
    """Conversations about the countries SFT and the preference stages ask about, held-out ones too, each with a
    number no other conversation has: a held-out call is right when the model calls the tool for the country asked
    about, and its answer when it reads back the new number. (Naming a country no tool conversation named is out of
    the toy model's reach, as answering about subjects SFT never asked about is: it names a trained one.)"""
    trained = skills.countries + skills.aligned_countries
    return [tool_conversation(rng, rng.choice(trained)) for _ in range(n_train)], [
        tool_conversation(rng, rng.choice(trained)) for _ in range(n_heldout)
    ]


def tool_prompts(skills: Skills, rng: random.Random, n: int) -> list[dict]:
    """Population questions for a rollout stage with the toy world's tool (examples/tools.py): the reference answer
    is the number the tool gives for the country, so a reply earns the answer reward only by calling the tool and
    reading its result back."""
    trained = skills.countries + skills.aligned_countries
    rows = []
    for _ in range(n):
        country = rng.choice(trained)
        question = rng.choice(POPULATION_QUESTIONS).format(c=country)
        rows.append({"prompt": question, "answer": str(population(country))})
    return rows


def toy_facts(skills: Skills, rng: random.Random, n_sums: int = 60) -> list[dict]:
    """A multiple-choice benchmark on the facts pretraining states: each country's capital among four capitals, and
    sums among four numbers (the right one and its near misses), as plain text to complete."""
    rows = []
    for country, capital in sorted(skills.table.items()):
        choices = [capital, *rng.sample([c for c in skills.table.values() if c != capital], 3)]
        rng.shuffle(choices)
        rows.append({"question": f"The capital of {country} is", "choices": choices, "answer": choices.index(capital)})
    for a, b in rng.sample([(a, b) for a in range(30) for b in range(30)], n_sums):
        value = a + b
        choices = [str(value), *(str(value + offset) for offset in rng.sample([-2, -1, 1, 2, 10], 3))]
        rng.shuffle(choices)
        rows.append({"question": f"{a} plus {b} equals", "choices": choices, "answer": choices.index(str(value))})
    return rows


def toy_skills(skills: Skills, rng: random.Random, n: int = 100) -> list[dict]:
    """A generation benchmark: held-out questions (no stage trains on them), answered in the canonical sentence."""
    return [dict(zip(("question", "answer"), skills.question(rng, "heldout"))) for _ in range(n)]


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    skills = Skills(rng)
    files: dict[str, list[dict]] = {
        "pretrain.jsonl": pretrain_docs(skills, rng, 6000),
        "pretrain_heldout.jsonl": pretrain_docs(skills, rng, 200),
    }
    for stem, make, n_train, n_heldout in [
        ("sft", conversation, 4000, 200),
        ("preference", preference, 2000, 200),
        ("ranked", ranked, 1500, 200),
        ("rl_prompts", rl_prompt, 1000, 200),
    ]:
        files[f"{stem}.jsonl"] = [make(skills, rng, False) for _ in range(n_train)]
        files[f"{stem}_heldout.jsonl"] = [make(skills, rng, True) for _ in range(n_heldout)]
    # from a stream of their own: every file of the other skills keeps its bytes
    rng = random.Random(f"{seed}-tools")
    files["sft_tools.jsonl"], files["sft_tools_heldout.jsonl"] = tool_conversations(
        skills, rng, TOOL_ROWS, TOOL_HELDOUT_ROWS
    )
    files["rl_tool_prompts.jsonl"] = tool_prompts(skills, rng, TOOL_PROMPTS)
    files["rl_tool_prompts_heldout.jsonl"] = tool_prompts(skills, rng, TOOL_HELDOUT_PROMPTS)
    # the benchmarks' (examples/benchmarks), from a stream of their own too
    rng = random.Random(f"{seed}-benchmarks")
    files["toy_facts.jsonl"], files["toy_skills.jsonl"] = toy_facts(skills, rng), toy_skills(skills, rng)
    return files


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the toy world's jsonl files.")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in generate(args.seed).items():
        (args.out / name).write_text(render(rows), encoding="utf-8")
        print(f"{args.out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
