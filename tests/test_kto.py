"""KTO on unpaired feedback: its data contract, pairs split into unpaired rows, mismatched pairs for the reference
point, the spec's checks, the step-0 invariant of every reference strategy, and a short run that moves the policy.

The stage tests train on the first PAIRS pairs of the bundled preference data (each split into a desirable and
an undesirable row), so preparation and a precomputed reference take well under a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from examples.generate import DATA_DIR
from schemas.data import DataError, read_file
from schemas.load import SpecError, load_spec
from schemas.spec import KTOStage, LoraSpec, TrainSpec
from stages import kto
from stages.common.contract import StageInputs
from stages.common.reference import REFERENCE_FILE
from stages.common.templates import IGNORE

from .test_alignment import QUICK, Logs
from .test_data import msgs, write

PAIRS = 64


def first_pairs(tmp_path: Path, n: int = PAIRS, source: str = "preference.jsonl") -> Path:
    path = tmp_path / source
    path.write_text("".join((DATA_DIR / source).read_text().splitlines(keepends=True)[:n]))
    return path


# ---- the unpaired format ------------------------------------------------------------------


def test_unpaired_shapes_and_pairs_normalise_to_labelled_completions(tmp_path: Path) -> None:
    prompt = {"prompt_roles": ["system", "user"], "prompt_contents": ["Be brief.", "Add 2 and 3."]}
    path = write(
        tmp_path,
        {"system": "Be brief.", "prompt": "Add 2 and 3.", "completion": "5", "label": True},  # TRL, standard
        {
            "prompt": msgs(("system", "Be brief."), ("user", "Add 2 and 3.")),  # TRL, conversational
            "completion": msgs(("assistant", "6")),
            "label": False,
        },
        # a pair, in any of its shapes
        {
            "system": "Be brief.",
            "prompt": "Add 2 and 3.",
            "chosen": "5",
            "rejected": "6",
        },
        {
            "chosen": msgs(("system", "Be brief."), ("user", "Add 2 and 3."), ("assistant", "5")),
            "rejected": msgs(("system", "Be brief."), ("user", "Add 2 and 3."), ("assistant", "6")),
        },
    )
    frame = read_file(path, "unpaired").frame
    assert [{k: v for k, v in row.items() if k != "line"} for row in frame.to_dicts()] == [
        prompt | {"completions": ["5"], "labels": [True]},
        prompt | {"completions": ["6"], "labels": [False]},
        prompt | {"completions": ["5", "6"], "labels": [True, False]},
        prompt | {"completions": ["5", "6"], "labels": [True, False]},
    ]
    # the stage's rows: one per labelled completion, a pair's line giving two, chosen desirable and rejected undesirable
    listed = kto.labelled(frame)
    assert [(completion, score) for _, completion, score in listed] == [
        (["5"], [1.0]),
        (["6"], [0.0]),
        (["5"], [1.0]),
        (["6"], [0.0]),
        (["5"], [1.0]),
        (["6"], [0.0]),
    ]
    assert all(
        p == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]
        for p, _, _ in listed
    )


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"prompt": "Q", "completion": "a", "label": "yes"},
            "label: must be true (desirable) or false (undesirable), not a string",
        ),
        (
            {"prompt": "Q", "completion": "a", "label": 1},
            "label: must be true (desirable) or false (undesirable), not a number",
        ),
        ({"prompt": "Q", "completion": "a"}, "label: required"),
        ({"prompt": "Q", "label": True}, "completion: required"),
        (
            {"prompt": "Q", "completion": msgs(("user", "a")), "label": True},
            "completion: beside a prompt, must be a string or a list of one assistant message",
        ),
        (
            {"completion": "a", "label": True},
            "prompt: required: an unpaired row is {prompt, completion, label: true|false} (or give a preference pair "
            "{prompt, chosen, rejected})",
        ),
        ({"prompt": "Q", "completion": " ", "label": False}, "completions: no completion may be empty"),
        (
            {"prompt": "Q", "chosen": "a", "rejected": " a"},
            "completions: a pair's rejected must differ from its chosen",
        ),
        ({"prompt": "Q", "chosen": "a"}, "rejected: required"),
        (
            {"prompt": msgs(("user", "Q"), ("assistant", "A")), "completion": "a", "label": True},
            "prompt_roles: the prompt's last turn must be the user's",
        ),
    ],
)
def test_every_unpaired_rule_names_file_line_field_and_rule(tmp_path: Path, line: dict, message: str) -> None:
    good = {"prompt": "Q", "completion": "a", "label": True}
    path = write(tmp_path, good, line, good)
    with pytest.raises(DataError) as err:
        read_file(path, "unpaired")
    assert [f"{p.file}:{p.line}: {p.field}: {p.rule}" for p in err.value.problems] == [f"{path}:2: {message}"]


def test_the_bundled_pairs_pass_the_unpaired_contract_as_two_rows_each() -> None:
    frame = read_file(DATA_DIR / "preference_heldout.jsonl", "unpaired").frame
    listed = kto.labelled(frame)
    assert len(listed) == 2 * len(frame) and [s for _, _, s in listed[:4]] == [[1.0], [0.0], [1.0], [0.0]]


# ---- mismatched pairs for z0 --------------------------------------------------------------


def test_every_row_is_paired_with_a_completion_of_another_prompt(tmp_path: Path) -> None:
    listed = kto.labelled(read_file(first_pairs(tmp_path), "unpaired").frame)
    paired = kto.with_mismatched(listed)
    assert paired == kto.with_mismatched(listed)  # a fixed draw: the prepared data does not depend on a run
    partner = kto.mismatched([p for p, _, _ in listed])
    for i, ((prompt, (completion, mismatched), scores), (_, (own,), (label,))) in enumerate(zip(paired, listed)):
        assert completion == own and scores == [label, 0.0] and mismatched == listed[partner[i]][1][0]
        # never a row of its own prompt (the two rows of a pair share one); another prompt may ask about the same
        # subject in other words, and its completion may then read the same
        assert listed[partner[i]][0] != prompt
    # desirable and undesirable completions both serve as mismatched ones
    assert {
        scores for scores in (listed[kto.mismatched([p for p, _, _ in listed])[i]][2][0] for i in range(len(listed)))
    } == {0.0, 1.0}


def test_a_single_prompt_cannot_estimate_the_reference_point(trained_tokenizer: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path, {"prompt": "Q", "completion": "a", "label": True}, {"prompt": "Q", "completion": "b", "label": False}
    )
    spec = KTOStage(name="kto", kind="kto", data=[path], template="chatml")
    with pytest.raises(
        DataError, match=f"{path}:0: \\(file\\): every row has the same prompt: KTO's reference point needs"
    ):
        kto.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer))


def test_inspect_shows_each_labelled_completion_trained(trained_tokenizer: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    spec = KTOStage(name="kto", kind="kto", data=[first_pairs(tmp_path, 2)], template="chatml")
    shown = kto.examples(spec, tok, 3)
    rows = [json.loads(line) for line in (tmp_path / "preference.jsonl").read_text().splitlines()]
    trained = [
        tok.decode([i for i, label in zip(ids, labels) if label != IGNORE], skip_special_tokens=True)
        for ids, labels in shown
    ]
    assert trained == [rows[0]["chosen"], rows[0]["rejected"], rows[1]["chosen"]]


# ---- the spec -----------------------------------------------------------------------------


def test_kto_spec_shares_dpos_reference_checks(tmp_path: Path) -> None:
    stage = KTOStage(name="kto", kind="kto", data=[DATA_DIR / "preference.jsonl"])
    assert (stage.beta, stage.desirable_weight, stage.undesirable_weight) == (0.1, 1.0, 1.0)
    assert stage.data_format == "unpaired" and stage.reference_strategy() == "frozen"
    assert (
        KTOStage(name="kto", kind="kto", data=[DATA_DIR / "preference.jsonl"], lora=LoraSpec()).reference_strategy()
        == "adapter-off"
    )
    with pytest.raises(ValueError, match="reference adapter-off needs a lora block"):
        KTOStage(name="kto", kind="kto", data=[DATA_DIR / "preference.jsonl"], reference="adapter-off")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""name: k
model: {{init: {{hidden_size: 64, layers: 1, heads: 1}}}}
stages:
  - {{name: pretrain, kind: pretrain, data: {DATA_DIR / "pretrain.jsonl"}}}
  - {{name: kto, kind: kto, data: {DATA_DIR / "preference.jsonl"}, desirable_weight: 0,
      launch: {{processes: 2, deepspeed: {{zero: 3}}}}}}
""")
    with pytest.raises(SpecError, match=r"stages\[1\]\.desirable_weight: Input should be greater than 0"):
        load_spec(spec)
    spec.write_text(spec.read_text().replace("desirable_weight: 0,", ""))
    with pytest.raises(SpecError, match=r"stages\[1\] \(kto\): a frozen reference copy is not sharded under ZeRO-3"):
        load_spec(spec)
    spec.write_text(spec.read_text().replace("kind: kto,", "kind: kto, reference: precomputed,"))
    assert load_spec(spec).stages[1].reference_strategy() == "precomputed"


def test_the_weight_ratio_outside_the_advised_range_is_warned(caplog) -> None:
    rows = Dataset.from_dict({"scores": [[1.0, 0.0]] * 3 + [[0.0, 0.0]] * 3})
    stage = KTOStage(name="kto", kind="kto", data=[DATA_DIR / "preference.jsonl"])
    with caplog.at_level(logging.WARNING, logger="stages.kto"):
        assert kto.weight_ratio(stage, rows)["desirable_weight_ratio"] == 1.0
        assert not caplog.records
        assert (
            kto.weight_ratio(stage.model_copy(update={"desirable_weight": 2.0}), rows)["desirable_weight_ratio"] == 2.0
        )
    (record,) = caplog.records
    assert (
        "is 2, outside the [1, 4/3] the KTO paper advises; with undesirable_weight 1, a desirable_weight in [1, 1.33] "
        "is" in record.getMessage()
    )


# ---- the stage on a tiny model ------------------------------------------------------------


@pytest.mark.parametrize("reference, lora", [("frozen", None), ("adapter-off", LoraSpec(r=4)), ("precomputed", None)])
def test_kto_at_step_zero_gives_half_of_each_weight_and_zero_rewards(
    reference, lora, trained_tokenizer: Path, chat_model: Path, tmp_path: Path
) -> None:
    # policy = reference: every implied reward and z0 are 0, so each loss is λ_y − λ_y·σ(0) = 0.5 with λ = 1
    spec = KTOStage(
        name="kto",
        kind="kto",
        data=[first_pairs(tmp_path)],
        max_len=128,
        template="chatml",
        reference=reference,
        lora=lora,
        train=TrainSpec(max_steps=1, lr=1e-3, **QUICK),
    )
    datasets = kto.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    logs = Logs()
    kto.run(
        spec, StageInputs(chat_model, trained_tokenizer, datasets, (logs,), reference=tmp_path / "ref"), tmp_path / "w"
    )
    step = next(log for log in logs.logs if "loss" in log)
    assert step["loss"] == pytest.approx(0.5, abs=1e-6) and step["reference_point"] == pytest.approx(0.0, abs=1e-6)
    assert step["rewards/desirable"] == pytest.approx(0.0, abs=1e-6) and step["rewards/undesirable"] == pytest.approx(
        0.0, abs=1e-6
    )
    if reference == "precomputed":
        assert (tmp_path / "ref" / REFERENCE_FILE).exists()


def test_short_kto_lifts_desirable_completions_above_undesirable_ones(
    trained_tokenizer: Path, chat_model: Path, tmp_path: Path, train_seed: int
) -> None:
    # two epochs of the 128 rows, logged once per epoch: the second epoch's batches against the first's
    spec = KTOStage(
        name="kto",
        kind="kto",
        data=[first_pairs(tmp_path)],
        heldout=[first_pairs(tmp_path, 50, "preference_heldout.jsonl")],
        max_len=128,
        template="chatml",
        train=TrainSpec(seed=train_seed, max_steps=32, lr=5e-4, **(QUICK | {"logging_steps": 16})),
    )
    datasets = kto.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    assert len(datasets["train"]) == 2 * PAIRS and len(datasets["heldout"]) == 100
    logs = Logs()
    result = kto.run(spec, StageInputs(chat_model, trained_tokenizer, datasets, (logs,)), tmp_path / "w")
    first, second = ({k: float(v) for k, v in log.items()} for log in logs.logs if "loss" in log)
    # the loss: 0.4935 in the first epoch, 0.4259 in the second (seed 0), a fall of 0.068 clearing 0.03 by 0.038
    # (seeds 1-4: 0.060, 0.089, 0.068, 0.087)
    assert second["loss"] < first["loss"] - 0.03
    # the implied reward margin, desirable minus undesirable: 0.068, then 0.645 (seed 0), a rise of 0.58 clearing 0.3
    # by 0.28 (seeds 1-4: 0.54, 0.90, 0.66, 0.66). Most of it is undesirable completions pushed down.
    assert second["rewards/margin"] > first["rewards/margin"] + 0.3
    # z0 is clamped at 0 once the policy's log-probs of mismatched pairs fall below the reference's, as they soon do
    # here
    assert first["reference_point"] >= 0 and second["reference_point"] >= 0
    counts = result.counts
    assert (
        counts["desirable_weight_ratio"] == 1.0
        and counts["train_desirable_rows"] == counts["train_undesirable_rows"] == PAIRS
    )
    # held out: the model's own log-prob gap moves by less than its spread over seeds in 32 steps; measured, not judged
    assert {"heldout_desirable_margin_before", "heldout_desirable_margin", "heldout_desirable_logps"} <= set(
        result.metrics
    )


def test_the_stage_feeds_each_completion_to_the_loss_and_the_mismatched_ones_to_z0(
    trained_tokenizer: Path, chat_model: Path, tmp_path: Path
) -> None:
    """The stage's wiring on a real batch, against kto_loss recomputed in float64 from the summed log-probs."""
    from transformers import AutoModelForCausalLM

    from stages.common.candidates import CandidatesCollator, candidate_logps

    spec = KTOStage(
        name="kto",
        kind="kto",
        data=[first_pairs(tmp_path)],
        max_len=128,
        template="chatml",
        reference="precomputed",
        beta=0.5,
        desirable_weight=1.5,
    )
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    rows = kto.prepare(spec, tok).datasets["train"].select(range(8))
    batch = CandidatesCollator(tok.pad_token_id)(list(rows))
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    with torch.no_grad():
        sums = candidate_logps(model, batch)[0].double()
    # a reference 1 nat below the policy on every completion and 3 nats above it on every mismatched pair: z0 would be
    # −3, clamped to 0, if the columns were right; 1 if they were swapped
    reference = sums - torch.tensor([1.0, -3.0], dtype=torch.float64)
    trainer = object.__new__(kto.KTOTrainer)  # compute_loss alone: no Trainer set-up needed
    recorded: dict = {}
    trainer.spec, trainer.record = spec, lambda **figures: recorded.update(figures)
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch | {"reference_logps": reference.float()}))
    desirable = batch["scores"][:, 0] > 0
    assert 0 < int(desirable.sum()) < 8 and float(recorded["reference_point"]) == 0.0
    # every completion's log-ratio is 1: desirable ones lose 1.5·(1 − σ(0.5)), undesirable ones 1 − σ(−0.5)
    sigmoid = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    expected = torch.where(desirable, 1.5 * (1 - sigmoid), sigmoid).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert float(recorded["rewards/margin"]) == pytest.approx(0.0, abs=1e-5)
    assert recorded["rewards/desirable"].tolist() == pytest.approx([0.5] * int(desirable.sum()), rel=1e-4)
