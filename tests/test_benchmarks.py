"""Benchmarks in the eval stage: lm-evaluation-harness run for real on the toy world's tasks, against lm-eval run by
hand; scores reused; tasks and data a machine lacks refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.benchmarks import Benchmarks, Task
from schemas.load import SpecError, load_spec
from schemas.spec import EvalStage
from stages import eval as eval_stage
from stages.common import memory
from stages.common.benchmarks import Bench, columns_of, problems

from .conftest import QUICK

TASKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
LIMIT = 12


def benchmarks(**settings) -> Benchmarks:
    return Benchmarks(
        folder=TASKS, tasks=["toy_facts", {"task": "toy_skills", "chat": True}], limit=LIMIT, batch_size=8, **settings
    )


def test_lm_eval_results_become_task_metric_columns() -> None:
    results = {
        "toy_facts": {"alias": "toy_facts", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.25},
        "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2},
    }
    assert columns_of(results) == {
        "toy_facts/acc": 0.5,
        "toy_facts/acc_norm": 0.25,
        "gsm8k/exact_match_strict-match": 0.1,
        "gsm8k/exact_match_flexible-extract": 0.2,
    }


def test_eval_stage_runs_the_benchmarks_as_lm_eval_does_by_hand_and_reuses_them(
    pretrained, chat_model: Path, trained_tokenizer: Path, tmp_path: Path, capsys
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    checkpoints = {"pretrain": pretrained.checkpoint, "sft": chat_model}
    spec = EvalStage(
        name="eval",
        kind="eval",
        samples=["Say hi."],
        max_new_tokens=4,
        template="chatml",
        benchmarks=benchmarks(),
    )
    identities = {"pretrain": "run-1", "sft": "run-2"}
    store = tmp_path / "scores"
    report = eval_stage.run(
        spec, checkpoints, trained_tokenizer, tmp_path / "work", bench=Bench("eval", spec.benchmarks, store, identities)
    )
    columns = ["checkpoint", "toy_facts/acc", "toy_facts/acc_norm", "toy_skills/exact_match"]
    assert [list(row) for row in report.metrics] == [columns, columns]
    assert all(row[c] * LIMIT == round(row[c] * LIMIT) for row in report.metrics for c in columns[1:])
    assert [list(row) for row in report.seconds] == [["checkpoint", "toy_facts", "toy_skills"]] * 2
    assert all(row["toy_facts"] > 0 for row in report.seconds)
    said = capsys.readouterr().err
    assert "toy_skills on sft (2/2) in" in said and "of benchmarks left" in said

    # the same task on the same model, through lm-eval's own API by hand: the same scores, to the digit
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    manager = TaskManager(include_path=str(TASKS))
    by_hand = simple_evaluate(
        model=lm, tasks=["toy_skills"], task_manager=manager, limit=LIMIT, apply_chat_template=True, random_seed=1234
    )["results"]["toy_skills"]
    facts = simple_evaluate(model=lm, tasks=["toy_facts"], task_manager=manager, limit=LIMIT)["results"]["toy_facts"]
    sft_row = report.metrics[1]
    assert sft_row["toy_skills/exact_match"] == by_hand["exact_match,none"]
    assert (sft_row["toy_facts/acc"], sft_row["toy_facts/acc_norm"]) == (facts["acc,none"], facts["acc_norm,none"])

    # run again: every score is reused from the store, none measured anew
    again = eval_stage.run(
        spec,
        checkpoints,
        trained_tokenizer,
        tmp_path / "again",
        bench=Bench("eval", spec.benchmarks, store, identities),
    )
    assert again.metrics == report.metrics
    said = capsys.readouterr().err
    assert said.count(": reused, measured before in") == 4 and "of benchmarks left" not in said
    # a setting that changes a score is a new key: measured again
    fewer = Bench("eval", benchmarks(seed=7), store, {"sft": "run-2"})
    eval_stage.run(spec, {"sft": chat_model}, trained_tokenizer, tmp_path / "seed", bench=fewer)
    assert "reused" not in capsys.readouterr().err


def test_a_task_or_dataset_the_machine_lacks_is_refused_before_any_model_loads() -> None:
    spec = load_spec(QUICK)
    asked = benchmarks().model_copy(
        update={"tasks": [Task(task=n) for n in ("hellaswag", "no_such_task", "toy_facts")]}
    )
    spec = spec.model_copy(
        update={"stages": [s.model_copy(update={"benchmarks": asked}) if s.kind == "eval" else s for s in spec.stages]}
    )
    found = problems(spec)
    assert len(found) == 2, found
    missing, unknown = found
    assert "(eval).benchmarks: task hellaswag reads the Hugging Face dataset Rowan/hellaswag" in missing
    assert "not in the local datasets cache" in missing and "datasets.load_dataset('Rowan/hellaswag')" in missing
    assert unknown.endswith(f"no lm-eval task or group is named no_such_task (among lm-eval's or in {TASKS})")
    with pytest.raises(SpecError, match="hellaswag"):
        memory.check(spec, QUICK)
