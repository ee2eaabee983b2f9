"""The eval stage and generation: metrics by hand, a report on tiny checkpoints, replies through the stored template,
the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

from examples.generate import DATA_DIR
from flows.cli import format_metrics, format_samples, main
from schemas.load import load_spec
from schemas.spec import EvalStage, PretrainStage, SFTStage, TrainSpec
from stages import eval as eval_stage
from stages import pretrain, sft
from stages.common import reward_model
from stages.common.checkpoint import load_model
from stages.common.contract import StageInputs
from stages.common.generation import ChatModel, Sampling, answer, generate, stop_ids, turn_end_id
from stages.common.metrics import kendall_tau, perplexity, preference, ranking
from stages.common.reward_functions import answer_matches
from stages.common.templates import encode_prompt, end_of_turn_id, store_template
from stages.eval import implicit_reward_margin, labelled_logp, text_blocks
from tasks.home import Home
from tasks.lineage import TAG, client, experiment_id
from tasks.plan import plan

from .conftest import TINY, use_home
from .test_tools import MULTIPLY

# fewer rows than conftest's
FAST = dict(batch_size=4, lr=3e-3, warmup=0.0, logging_steps=10, save_steps=20, precision="fp32")
ASKED = [
    [{"role": "user", "content": "Compute 26 plus 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write rain in capital letters."}],
    [{"role": "user", "content": "What is the capital of Uxrania?"}],
]


# ---------------------------------------------------------------- metrics by hand


def test_kendall_tau_without_ties() -> None:
    # pairs (0,1): x falls, y falls: concordant; (0,2): concordant; (1,2): x falls, y rises: discordant
    # τ = (C − D) / sqrt((C + D)(C + D)) = (2 − 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_tau_b_with_ties() -> None:
    # x = [1, 1, 2], y = [1, 2, 3]: (0,1) tied in x only; (0,2), (1,2) concordant. C = 2, D = 0, T_x = 1, T_y = 0
    # τ_b = (C − D) / sqrt((C + D + T_y)(C + D + T_x)) = 2 / sqrt(2 · 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))  # symmetric
    assert math.isnan(kendall_tau([1, 1], [2, 3]))  # one side all ties: no ordering to agree with


def test_ranking_top1_counts_a_tie_for_best() -> None:
    model = [[0.1, 0.5, 0.2], [0.9, 0.1, 0.0]]
    reference = [[3, 2, 1], [1, 1, 0]]
    # list 1: model's best is candidate 1, scored 2 < 3: a miss; τ: (0,1) D, (0,2) D, (1,2) C → −1/3
    # list 2: model's best is candidate 0, tied for the reference's best: a hit; τ_b = 2 / sqrt((2 + 1)(2 + 0))
    found = ranking(model, reference)
    assert found["top1"] == 0.5
    assert found["kendall_tau"] == pytest.approx((-1 / 3 + 2 / math.sqrt(6)) / 2)


def test_preference_accuracy_margin_and_implicit_reward() -> None:
    found = preference(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -3.0]))
    # differences 0.5, −1.0, 2.5: two of three positive, mean 2/3
    assert found["accuracy"] == pytest.approx(2 / 3) and found["margin"] == pytest.approx(2 / 3)
    policy, reference = torch.tensor([[-10.0, -12.0], [-8.0, -9.0]]), torch.tensor([[-11.0, -11.0], [-8.0, -8.0]])
    # log-ratios [[1, −1], [0, −1]]: margins 2 and 1
    assert implicit_reward_margin(policy, reference) == pytest.approx(1.5)
    assert implicit_reward_margin(policy, reference, beta=0.1) == pytest.approx(0.15)
    assert implicit_reward_margin(reference, reference) == 0.0


class Uniform(torch.nn.Module):
    """A model whose every next-token distribution is uniform over `vocab`: its perplexity is exactly vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})


def test_perplexity_is_token_weighted_over_blocks() -> None:
    assert perplexity(-6.0, 3) == pytest.approx(math.exp(2.0))
    blocks = [[1, 2, 3, 4], [5, 6]]  # 3 + 1 predicted tokens; padding of the short block counts for nothing
    total, tokens = labelled_logp(Uniform(10), [(ids, ids) for ids in blocks], pad_id=0)
    assert tokens == 4 and total == pytest.approx(-4 * math.log(10))
    assert perplexity(total, tokens) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("reply", "reference", "expected"),
    [
        ("7 plus 24 equals 31.", "31", True),
        ("7 plus 24 equals 310.", "31", False),
        ("It is 3.31 or 31.5", "31", False),
        ("It is -31", "31", False),
        ("It is 31.0", "31", True),
        ("That makes 1,000 exactly", "1000", True),
        ("The capital of Uxrania is Melgri.", "Melgri", True),
        ("The capital of Uxrania is Melgrian.", "Melgri", False),
        ("The word rain in capital letters is RAIN.", "RAIN", True),
        # case is the task: repeating the question's word is not the answer
        (
            "The word rain in capital letters is rain.",
            "RAIN",
            False,
        ),
        ("Ｍｅｌｇｒｉ,  of course", "Melgri.", True),  # NFKC and the reference's final full stop
        ("anything", "  ", False),
    ],
)
def test_answer_matching_rule(reply: str, reference: str, expected: bool) -> None:
    assert answer_matches(reply, reference) is expected


# ---------------------------------------------------------------- tiny checkpoints


@pytest.fixture(scope="module")
def checkpoints(trained_tokenizer: Path, tmp_path_factory) -> dict[str, Path]:
    """A 2-layer 64-wide pretrain of 20 steps, and a 20-step SFT on it (chatml): lineage order.

    Smaller than conftest's shared `pretrained` (40 steps of 8 rows), so this file alone stays well under a minute."""
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    pre_spec = PretrainStage(
        name="pretrain",
        kind="pretrain",
        data=[DATA_DIR / "pretrain.jsonl"],
        packing={"block_size": 64},
        train=TrainSpec(max_steps=20, **FAST),
    )
    pre = pretrain.run(
        pre_spec,
        StageInputs(TINY, trained_tokenizer, pretrain.prepare(pre_spec, tok).datasets),
        tmp_path_factory.mktemp("pre"),
    )
    sft_spec = SFTStage(
        name="sft",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        max_len=128,
        template="chatml",
        train=TrainSpec(max_steps=20, **FAST),
    )
    tuned = sft.run(
        sft_spec,
        StageInputs(pre.checkpoint, trained_tokenizer, sft.prepare(sft_spec, tok).datasets),
        tmp_path_factory.mktemp("sft"),
    )
    return {"pretrain": pre.checkpoint, "sft": tuned.checkpoint}


@pytest.fixture(scope="module")
def llama2_checkpoint(checkpoints: dict[str, Path], tmp_path_factory) -> Path:
    """The SFT checkpoint with the llama2 template stored in its tokenizer instead."""
    folder = tmp_path_factory.mktemp("llama2") / "model"
    shutil.copytree(checkpoints["sft"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    store_template(tok, "llama2")
    tok.save_pretrained(folder)
    return folder


def test_eval_report_has_a_row_per_checkpoint_and_a_plot(
    checkpoints: dict[str, Path], trained_tokenizer: Path, tmp_path: Path
) -> None:
    spec = EvalStage(
        name="eval",
        kind="eval",
        text=[DATA_DIR / "pretrain_heldout.jsonl"],
        conversations=[DATA_DIR / "sft_heldout.jsonl"],
        prompts=[DATA_DIR / "rl_prompts_heldout.jsonl"],
        preference=[DATA_DIR / "preference_heldout.jsonl"],
        ranked=[DATA_DIR / "ranked_heldout.jsonl"],
        limit=4,
        max_len=128,
        max_new_tokens=8,
        template="chatml",
    )
    report = eval_stage.run(spec, checkpoints, trained_tokenizer, tmp_path)
    columns = [
        "checkpoint",
        "perplexity",
        "response_loss",
        "exact_match",
        "task_accuracy",
        "preference_accuracy",
        "preference_margin",
        "reward_margin",
        "kendall_tau",
        "top1",
    ]
    assert [list(row) for row in report.metrics] == [columns, columns]
    assert [row["checkpoint"] for row in report.metrics] == ["pretrain", "sft"]
    pre, tuned = report.metrics
    # the first checkpoint is the reference
    assert math.isnan(pre["reward_margin"]) and math.isfinite(tuned["reward_margin"])
    assert all(math.isfinite(row[c]) for row in report.metrics for c in columns[1:] if c != "reward_margin")
    # measured with seed 0 (CPU, fp32): perplexity 184, inside (1, 512) by 183 and 328; response loss 5.42 → 4.37,
    # a fall of 1.05 clearing 0.5 by 0.55 (seeds 1, 2: 174 and 192; falls of 0.95 and 0.87)
    assert 1 < float(tuned["perplexity"]) < 512
    assert float(tuned["response_loss"]) < float(pre["response_loss"]) - 0.5
    # each share counts the `limit` (4) rows of its file: 0, 1/4, ..., 1
    assert all(
        row[c] * 4 in {0, 1, 2, 3, 4}
        for row in report.metrics
        for c in ("exact_match", "task_accuracy", "preference_accuracy", "top1")
    )
    # four held-out prompts, each answered by both checkpoints
    first_prompts = [
        json.loads(line)["prompt"] for line in (DATA_DIR / "rl_prompts_heldout.jsonl").read_text().splitlines()[:4]
    ]
    assert [row["prompt"] for row in report.samples] == first_prompts  # no samples named: the first held-out prompts
    assert all(set(row) == {"prompt", "pretrain", "sft"} for row in report.samples)
    assert report.plot == tmp_path / "metrics.png" and report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.metrics_table()["checkpoint"] == ["pretrain", "sft"]

    only_text = EvalStage(
        name="eval",
        kind="eval",
        text=[DATA_DIR / "pretrain_heldout.jsonl"],
        samples=["Say hi."],
        limit=4,
        max_len=64,
        max_new_tokens=4,
        template="chatml",
    )
    small = eval_stage.run(only_text, {"sft": checkpoints["sft"]}, trained_tokenizer, tmp_path / "small")
    assert [list(row) for row in small.metrics] == [["checkpoint", "perplexity"]]
    assert [row["prompt"] for row in small.samples] == ["Say hi."]


def test_short_text_still_counts_its_tail_block(trained_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    blocks = text_blocks(["one two three", "four"], tok, max_len=4)
    stream = [
        t
        for text in ("one two three", "four")
        for t in (*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id)
    ]
    assert sum(blocks, []) == stream and all(len(b) == 4 for b in blocks[:-1]) and len(blocks[-1]) <= 4


def test_eval_scores_the_greedy_replies_with_the_rewards_and_the_reward_model(
    checkpoints: dict[str, Path], trained_tokenizer: Path, tmp_path: Path
) -> None:
    # a reward model as a reward stage saves it: the SFT checkpoint with a one-output head and its template stored
    scorer_folder = tmp_path / "reward"
    tok = AutoTokenizer.from_pretrained(checkpoints["sft"])
    torch.manual_seed(0)
    load_model(checkpoints["sft"], tok, AutoModelForSequenceClassification, num_labels=1).save_pretrained(scorer_folder)
    tok.save_pretrained(scorer_folder)
    spec = EvalStage(
        name="eval",
        kind="eval",
        prompts=[DATA_DIR / "rl_prompts_heldout.jsonl"],
        limit=6,
        max_new_tokens=8,
        template="chatml",
        reward_model="reward",
        rewards=[{"kind": "answer"}, {"kind": "regex", "pattern": "^The ", "weight": 0.5}],
    )
    report = eval_stage.run(spec, checkpoints, trained_tokenizer, tmp_path / "eval", {"reward": scorer_folder})
    assert [list(row) for row in report.metrics] == [["checkpoint", "task_accuracy", "reward", "reward_model"]] * 2
    # scored independently: the same greedy replies, the reward stage's scoring function, the same rules
    rows = [json.loads(line) for line in (DATA_DIR / "rl_prompts_heldout.jsonl").read_text().splitlines()[:6]]
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    scorer = AutoModelForSequenceClassification.from_pretrained(scorer_folder).eval()
    for row in report.metrics:
        model = load_model(checkpoints[row["checkpoint"]], tok).eval()
        replies = answer(model, tok, prompts, "chatml", 8)
        right = [answer_matches(reply, r["answer"]) for reply, r in zip(replies, rows)]
        assert row["task_accuracy"] == pytest.approx(sum(right) / 6)
        assert row["reward"] == pytest.approx(
            sum(right) / 6 + 0.5 * sum(reply.startswith("The ") for reply in replies) / 6
        )
        assert row["reward_model"] == pytest.approx(
            sum(reward_model.scores(scorer, tok, prompts, replies, "chatml")) / 6, rel=1e-4
        )


def test_pairs_whose_replies_max_len_cuts_away_are_left_out(trained_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    spec = EvalStage(
        name="eval",
        kind="eval",
        preference=[DATA_DIR / "preference_heldout.jsonl"],
        limit=4,
        max_len=128,
        template="chatml",
    )
    kept = eval_stage.held_out(spec, tok)
    assert kept.pairs.num_rows == 4 and kept.pair_tokens.shape == (4, 2) and bool((kept.pair_tokens > 0).all())
    cut = eval_stage.held_out(spec.model_copy(update={"max_len": 8}), tok)  # every prompt is longer than 8 tokens
    assert cut.pairs is None and cut.columns(spec) == []


# ---------------------------------------------------------------- generation through the stored template


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_generation_renders_and_stops_as_training(
    template: str, checkpoints: dict[str, Path], llama2_checkpoint: Path
) -> None:
    folder = {"chatml": checkpoints["sft"], "llama2": llama2_checkpoint}[template]
    chat = ChatModel.load(folder, device="cpu")
    assert turn_end_id(chat.tokenizer) == end_of_turn_id(chat.tokenizer, template)
    for messages in ASKED:
        assert chat.prompt_ids(messages) == encode_prompt(messages, chat.tokenizer, template)
    # the same prompt ids give the same replies, whether the template is named or read from the folder
    by_folder = [reply.text for reply in chat.reply(ASKED, Sampling(max_new_tokens=12))]
    assert by_folder == answer(chat.model, chat.tokenizer, ASKED, template, max_new_tokens=12)


def test_batched_generation_equals_one_prompt_at_a_time(checkpoints: dict[str, Path]) -> None:
    chat = ChatModel.load(checkpoints["sft"], device="cpu")
    prompts = [chat.prompt_ids(messages) for messages in ASKED * 2]
    greedy = Sampling(max_new_tokens=16)
    batched = generate(chat.model, prompts, chat.stops, chat.pad_id, greedy, batch_size=6)
    alone = generate(chat.model, prompts, chat.stops, chat.pad_id, greedy, batch_size=1)
    assert batched == alone
    # cut at the first stop: no padding kept
    assert all(len(ids) <= 16 and chat.stops[0] not in ids[:-1] for ids in batched)
    assert stop_ids(chat.tokenizer, chat.stops[0]) == chat.stops


def test_sampling_is_seeded_and_checked(checkpoints: dict[str, Path]) -> None:
    chat = ChatModel.load(checkpoints["pretrain"], device="cpu")
    hot = Sampling(temperature=1.5, top_p=0.95, max_new_tokens=12)
    runs = []
    for _ in range(2):
        set_seed(7)
        runs.append([r.text for r in chat.reply(ASKED, hot)])
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=0.7, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)


# ---------------------------------------------------------------- the CLI


def test_report_tables_are_aligned() -> None:
    metrics = {
        "columns": ["checkpoint", "perplexity", "exact_match"],
        "data": [["pretrain", 51.234567, None], ["sft-lora", 9.5, 0.25]],
    }
    assert format_metrics(metrics).splitlines() == [
        "checkpoint   perplexity   exact_match",
        "─────────────────────────────────────",
        "pretrain          51.23             -",
        "sft-lora            9.5          0.25",
    ]
    samples = {"columns": ["prompt", "pretrain", "sft"], "data": [["Add 2 and 3.", "2 2 2", "5\nexactly"]]}
    assert format_samples(samples).splitlines() == [
        "[1] Add 2 and 3.",
        "    pretrain | 2 2 2",
        "    sft      | 5",
        "             | exactly",
    ]


def test_generate_cli_answers_a_file_in_order(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    use_home(monkeypatch, tmp_path / "home")
    given = tmp_path / "prompts.jsonl"
    given.write_text(
        '{"prompt": "Compute 26 plus 4.", "answer": "30"}\n{"prompt": "Write jam in capital letters."}\n'
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the letters '
        'of tree."}]}\n'
    )
    out = tmp_path / "answers.jsonl"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(checkpoints["sft"]),
                "--input",
                str(given),
                "--output",
                str(out),
                "--max-new-tokens",
                "8",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [
        "Compute 26 plus 4.",
        "Write jam in capital letters.",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the letters of tree."}],
    ]
    assert [set(row) for row in rows] == [{"prompt", "answer", "reference"}, {"prompt", "answer"}, {"prompt", "answer"}]
    assert rows[0]["reference"] == "30" and all(isinstance(row["answer"], str) for row in rows)
    # greedy by default: the file holds what the template-named path answers
    model, tok = load_model(checkpoints["sft"], tok := AutoTokenizer.from_pretrained(checkpoints["sft"])), tok
    asked = [
        [{"role": "user", "content": "Compute 26 plus 4."}],
        [{"role": "user", "content": "Write jam in capital letters."}],
    ]
    assert [row["answer"] for row in rows[:2]] == answer(model, tok, asked, "chatml", max_new_tokens=8)

    assert main(["generate", "--checkpoint", str(tmp_path), "hello"]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_generate_cli_offers_the_tools_of_a_file(checkpoints: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    use_home(monkeypatch, tmp_path / "home")
    tools = tmp_path / "tools.json"
    # a bare definition, as LLaMA-Factory writes one: read as the conversations format reads a row's tools
    tools.write_text(json.dumps([MULTIPLY["function"]]))
    out = tmp_path / "answers.jsonl"
    words = ["--checkpoint", str(checkpoints["sft"]), "--max-new-tokens", "8", "--output", str(out)]
    assert main(["generate", *words, "--tools", str(tools), "What is 12 times 34?"]) == 0
    # greedy: what the template-named path answers with the tools rendered in the prompt
    model, tok = load_model(checkpoints["sft"], tok := AutoTokenizer.from_pretrained(checkpoints["sft"])), tok
    asked = [[{"role": "user", "content": "What is 12 times 34?"}]]
    assert [json.loads(out.read_text())["answer"]] == answer(model, tok, asked, "chatml", 8, tools=[[MULTIPLY]])
    tools.write_text('[{"type": "function", "function": {"description": "no name"}}]')
    assert main(["generate", *words, "--tools", str(tools), "hello"]) == 2
    assert f"--tools {tools}: tools[0].function.name: required" in capsys.readouterr().err


SPEC = f"""
name: eval-report
model: {{init: {{hidden_size: 64, layers: 2, heads: 2}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {DATA_DIR}/pretrain.jsonl, heldout: {DATA_DIR}/pretrain_heldout.jsonl}}
  - {{name: sft, kind: sft, data: {DATA_DIR}/sft.jsonl}}
  - {{name: eval, kind: eval}}
"""


def test_report_prints_the_eval_runs_tables_and_generate_names_an_unrun_stage(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    use_home(monkeypatch, tmp_path / "home")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC)
    assert main(["report", str(spec_path)]) == 2
    assert "eval stage 'eval' has no finished run; run `lifecycle run" in capsys.readouterr().err

    # the eval stage's finished run, holding what the flow logs
    spec, home = load_spec(spec_path), Home.from_env()
    mlflow = client(home)
    fingerprint = next(stage.fingerprint for stage in plan(spec) if stage.name == "eval")
    run_id = mlflow.create_run(
        experiment_id(mlflow, home, spec.name), run_name="eval", tags={f"{TAG}fingerprint": fingerprint}
    ).info.run_id
    metrics = {"checkpoint": ["pretrain", "sft"], "perplexity": [80.5, 20.25], "exact_match": [math.nan, 0.5]}
    mlflow.log_table(run_id, metrics, "eval/metrics.json")
    mlflow.log_table(run_id, {"prompt": ["Add 2 and 3."], "pretrain": ["2 2"], "sft": ["5"]}, "eval/samples.json")
    mlflow.set_terminated(run_id)
    assert main(["report", str(spec_path)]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = out.split("\n\n")[1].splitlines()  # the table, after the line naming the run
    assert header.split() == ["checkpoint", "perplexity", "exact_match"] and set(rule) == {"─"}
    assert [row.split() for row in rows] == [["pretrain", "80.5", "-"], ["sft", "20.25", "0.5"]]
    assert "[1] Add 2 and 3.\n    pretrain | 2 2\n    sft      | 5" in out
    assert main(["report", str(spec_path), "--stage", "sft"]) == 2
    assert "no eval stage named 'sft'; the eval stages are eval" in capsys.readouterr().err

    assert main(["generate", str(spec_path), "--stage", "sft", "hello"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {spec_path}: stage 'sft' has no finished run; run `lifecycle run {spec_path}` first"
    )
