"""The alignment stages on a tiny chat model: LoRA merges exactly, DPO's invariants hold, preferences move.

The invariants are TRL's kind: at step 0 the policy is the reference, so every DPO reference
strategy must give loss log 2 with equal rewards; merged adapters must give the adapter's
logits. The behaviour tests train for a few seconds and check the held-out preference
accuracy rises.

A behaviour test compares a measured outcome with a threshold that its seed's result clears by a
stated margin (the comment beside it gives both, measured on CPU in fp32); shares of held-out pairs
are compared as counts of pairs and other figures as Python floats: a metric read back as a float32
number (0.205 is 0.20499999821186066) must not decide a comparison.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from examples.generate import DATA_DIR
from schemas.data import read_files
from schemas.spec import DPOStage, LoraSpec, PROStage, RewardStage, SFTStage, TrainSpec, TunaStage
from stages import dpo, pro, reward, sft, tuna
from stages.common import candidates, reward_model
from stages.common.contract import StageInputs, adapter_base, is_adapter
from stages.common.reference import REFERENCE_FILE
from stages.common.templates import conversations, encode_completion, encode_prompt

QUICK = dict(batch_size=8, warmup=0.0, logging_steps=1, precision="fp32")


def pairs(share: float, total: int) -> int:
    """A share of `total` held-out pairs, as the whole number of pairs it counts."""
    return round(float(share) * total)


class Logs(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_merged_lora_gives_the_adapters_logits(trained_tokenizer: Path, chat_model: Path, tmp_path: Path) -> None:
    spec = SFTStage(
        name="sft-lora",
        kind="sft",
        data=[DATA_DIR / "sft.jsonl"],
        max_len=256,
        template="chatml",
        lora=LoraSpec(r=4, alpha=8, targets="all-linear", merge=True),
        train=TrainSpec(max_steps=15, lr=3e-3, **QUICK),
    )
    datasets = sft.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    result = sft.run(spec, StageInputs(chat_model, trained_tokenizer, datasets), tmp_path)
    assert is_adapter(result.adapter) and adapter_base(result.adapter) == chat_model
    assert (result.adapter / "adapter_model.safetensors").stat().st_size < (
        result.checkpoint / "model.safetensors"
    ).stat().st_size / 5

    base = AutoModelForCausalLM.from_pretrained(chat_model)
    adapted = PeftModel.from_pretrained(base, result.adapter).eval()  # unmerged: base weights plus the low-rank path
    merged = AutoModelForCausalLM.from_pretrained(result.checkpoint).eval()
    ids = torch.tensor(
        [AutoTokenizer.from_pretrained(trained_tokenizer)("The capital of Samoria is Uxkel.")["input_ids"]]
    )
    with torch.no_grad():
        with adapted.disable_adapter():
            plain = adapted(ids).logits
        # the adapter learned something: its logits move by 0.89 at most (seed 0; 1.16 and 1.30 with seeds 1 and 2),
        # 890x 1e-3
        assert not torch.allclose(adapted(ids).logits, plain, atol=1e-3)
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)  # measured: 5.4e-6 at most


@pytest.mark.parametrize("reference, lora", [("frozen", None), ("adapter-off", LoraSpec(r=4)), ("precomputed", None)])
def test_dpo_at_step_zero_gives_log_2_and_equal_rewards(
    reference, lora, trained_tokenizer: Path, chat_model: Path, tmp_path: Path
) -> None:
    spec = DPOStage(
        name="dpo",
        kind="dpo",
        data=[DATA_DIR / "preference.jsonl"],
        max_len=128,
        template="chatml",
        reference=reference,
        lora=lora,
        train=TrainSpec(max_steps=1, lr=1e-3, **QUICK),
    )
    datasets = dpo.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    logs = Logs()
    dpo.run(
        spec, StageInputs(chat_model, trained_tokenizer, datasets, (logs,), reference=tmp_path / "ref"), tmp_path / "w"
    )
    # logged at step 1: the loss of the first batch, before any update
    step = next(log for log in logs.logs if "loss" in log)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and step["rewards/rejected"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert step["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    if reference == "precomputed":
        assert (tmp_path / "ref" / REFERENCE_FILE).exists()  # kept for the next run on this input model


def test_dpo_logps_default_to_mean_for_ipo_and_sum_stays_a_choice() -> None:
    # IPO's squared loss on summed log-probs grows with the reply's length: length-averaged by default, as in TRL
    def stage(**fields) -> DPOStage:
        return DPOStage(name="dpo", kind="dpo", data=[DATA_DIR / "preference.jsonl"], **fields)

    assert stage(loss="ipo").logps is None and stage(loss="ipo").mean_logps()
    assert not stage(loss="ipo", logps="sum").mean_logps()
    assert not stage(loss="sigmoid").mean_logps() and not stage(loss="hinge").mean_logps()
    assert stage(loss="orpo").mean_logps() and stage(loss="simpo").mean_logps()
    assert stage(loss="sigmoid", logps="mean").mean_logps()


def test_dpo_stage_gives_orpo_the_token_mean_nll_and_ipo_mean_logps(trained_tokenizer: Path, chat_model: Path) -> None:
    """The stage's wiring of the losses on a real batch: expectations recomputed in float64 from the summed
    log-probs."""

    def spec(**fields) -> DPOStage:
        return DPOStage(
            name="dpo", kind="dpo", data=[DATA_DIR / "preference.jsonl"], max_len=128, template="chatml", **fields
        )

    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    rows = dpo.prepare(spec(), tok).datasets["train"].select(range(8))
    batch = candidates.CandidatesCollator(tok.pad_token_id)(list(rows))
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    with torch.no_grad():
        sums, counts = (x.double() for x in candidates.candidate_logps(model, batch))
    means = sums / counts
    assert len(set(counts[:, 0].tolist())) > 1  # chosen replies of different lengths: token-mean ≠ mean of row means

    def stage_loss(stage: DPOStage, batch: dict) -> tuple[float, dict]:
        trainer = object.__new__(dpo.DPOTrainer)  # compute_loss alone: no Trainer set-up needed
        recorded: dict = {}
        trainer.spec, trainer.record = stage, lambda **figures: recorded.update(figures)
        with torch.no_grad():
            return float(trainer.compute_loss(model, batch)), recorded

    beta = 0.25
    loss, recorded = stage_loss(spec(loss="orpo", beta=beta), batch)
    nll = -sums[:, 0].sum() / counts[:, 0].sum()
    log_odds = (means - torch.log(-torch.expm1(means))) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert float(recorded["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(nll) != pytest.approx(float(-means[:, 0].mean()), rel=1e-3)
    assert loss == pytest.approx(float(nll + beta * torch.nn.functional.softplus(-log_odds).mean()), rel=1e-5)

    # IPO by default on length-averaged log-probs, the reference's sums divided by the same counts
    reference = torch.tensor([[-20.0, -30.0]] * len(rows), dtype=torch.float64)
    loss, _ = stage_loss(
        spec(loss="ipo", beta=beta, reference="precomputed"), batch | {"reference_logps": reference.float()}
    )
    h = (means[:, 0] - reference[:, 0] / counts[:, 0]) - (means[:, 1] - reference[:, 1] / counts[:, 1])
    assert loss == pytest.approx(float(((h - 1 / (2 * beta)) ** 2).mean()), rel=1e-5)
    loss, _ = stage_loss(
        spec(loss="ipo", beta=beta, reference="precomputed", logps="sum"),
        batch | {"reference_logps": reference.float()},
    )
    h = (sums[:, 0] - reference[:, 0]) - (sums[:, 1] - reference[:, 1])
    assert loss == pytest.approx(float(((h - 1 / (2 * beta)) ** 2).mean()), rel=1e-5)


def test_short_dpo_raises_heldout_preference_accuracy(
    trained_tokenizer: Path, chat_model: Path, tmp_path: Path, train_seed: int
) -> None:
    spec = DPOStage(
        name="dpo",
        kind="dpo",
        data=[DATA_DIR / "preference.jsonl"],
        heldout=[DATA_DIR / "preference_heldout.jsonl"],
        max_len=128,
        template="chatml",
        beta=0.1,
        train=TrainSpec(seed=train_seed, max_steps=60, lr=1e-3, **(QUICK | {"logging_steps": 5})),
    )
    datasets = dpo.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    logs = Logs()
    result = dpo.run(spec, StageInputs(chat_model, trained_tokenizer, datasets, (logs,)), tmp_path)
    metrics, total = result.metrics, len(datasets["heldout"])
    # the training pairs ask about subjects SFT never asked about, the held-out pairs about others again. Seed 0: 69 of
    # 200 held-out pairs right before, 99 after: +30, clearing +1 by 29 (seeds 1-4: +3, +50, +27, +34). How much a
    # 64-wide model carries over to unseen subjects moves with the seed, so the firm check is the training margin below.
    right, right_before = (
        pairs(metrics["heldout_preference_accuracy"], total),
        pairs(metrics["heldout_preference_accuracy_before"], total),
    )
    assert right >= right_before + 1
    # the implicit reward margin on the training batches, 0 at step 0: the last 15 steps average 1.69 (seed 0),
    # clearing 1.0 by 0.69 (seeds 1-4: 1.55, 2.07, 1.95, 2.37)
    margins = [float(log["rewards/margin"]) for log in logs.logs if "rewards/margin" in log]
    assert sum(margins[-3:]) / 3 > 1.0 and all(f"logps/{side}" in logs.logs[0] for side in ("chosen", "rejected"))


def test_short_pro_raises_heldout_ranking_agreement(
    trained_tokenizer: Path, chat_model: Path, tmp_path: Path, train_seed: int
) -> None:
    # 300 steps (1.6 epochs of the 1500 lists): at 100 the best-vs-worst accuracy moved by 2 to 7 pairs of 200, by seed
    spec = PROStage(
        name="pro",
        kind="pro",
        data=[DATA_DIR / "ranked.jsonl"],
        heldout=[DATA_DIR / "ranked_heldout.jsonl"],
        max_len=128,
        template="chatml",
        curriculum=[4],
        sft_weight=0.0,
        train=TrainSpec(seed=train_seed, max_steps=300, lr=3e-3, **(QUICK | {"logging_steps": 50})),
    )
    datasets = pro.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    result = pro.run(spec, StageInputs(chat_model, trained_tokenizer, datasets), tmp_path)
    metrics, total = result.metrics, len(datasets["heldout"])
    assert result.counts["list_length"] == 4 and result.counts["short_lists_left_out"] == 0
    # held-out pairs here: each list's best candidate against its worst (an answer about another subject).
    # Before: 28 of 200 right. Seed 0: 138, +110 pairs, clearing +50 by 60 (seeds 1-4: +107, +121, +104, +109).
    right, right_before = (
        pairs(metrics["heldout_preference_accuracy"], total),
        pairs(metrics["heldout_preference_accuracy_before"], total),
    )
    assert right >= right_before + 50
    # the whole ranking of the 4 candidates: Kendall tau −0.298 before; seed 0 0.193, +0.492, clearing +0.3 by 0.192
    # (seeds 1-4: +0.462, +0.583, +0.478, +0.448)
    assert float(metrics["heldout_kendall_tau"]) >= float(metrics["heldout_kendall_tau_before"]) + 0.3


def test_pro_sub_stage_cuts_lists_to_its_length(trained_tokenizer: Path) -> None:
    spec = PROStage(name="pro", kind="pro", data=[DATA_DIR / "ranked_heldout.jsonl"], max_len=128, template="chatml")
    dataset = pro.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets["train"]
    uneven = dataset.map(
        lambda row, i: {k: row[k][: 2 + i % 3] for k in ("input_ids", "labels", "scores")}, with_indices=True
    )
    datasets, lists = candidates.with_length({"train": uneven}, 3)
    kept = datasets["train"]
    assert lists == {"list_length": 3, "short_lists_left_out": sum(1 for i in range(len(uneven)) if i % 3 == 0)}
    assert all(len(ids) == 3 for ids in kept["input_ids"]) and all(s == sorted(s, reverse=True) for s in kept["scores"])


def test_tuna_trains_its_ranking_and_mle_terms(
    trained_tokenizer: Path, chat_model: Path, tmp_path: Path, train_seed: int
) -> None:
    spec = TunaStage(
        name="tuna",
        kind="tuna",
        data=[DATA_DIR / "ranked.jsonl"],
        heldout=[DATA_DIR / "ranked_heldout.jsonl"],
        max_len=128,
        template="chatml",
        train=TrainSpec(seed=train_seed, max_steps=20, lr=1e-3, **(QUICK | {"logging_steps": 10})),
    )
    datasets = tuna.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
    logs = Logs()
    result = tuna.run(spec, StageInputs(chat_model, trained_tokenizer, datasets, (logs,)), tmp_path)
    steps = [
        {k: float(v) for k, v in log.items() if isinstance(v, (int, float))}
        for log in logs.logs
        if "ranking_loss" in log
    ]
    # steps 1-10 average 2.49, steps 11-20 1.03 (seed 0): a fall of 1.47, clearing 0.5 by 0.97 (seeds 1-4: 1.05,
    # 1.34, 1.56, 1.22)
    assert steps[-1]["ranking_loss"] < steps[0]["ranking_loss"] - 0.5
    # the logged loss is the sum of the two terms (mle_weight 1), each averaged over the same 10 steps: equal but
    # for float32 rounding (measured: 1e-8 to 7e-8 apart, relatively)
    assert steps[0]["loss"] == pytest.approx(steps[0]["ranking_loss"] + steps[0]["mle_loss"], rel=1e-5)
    assert result.counts["list_length"] == 4
    # the checkpoint holds the trained weights, not those the stage started from
    trained, started = (AutoModelForCausalLM.from_pretrained(p) for p in (result.checkpoint, chat_model))
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), started.parameters()))


def test_reward_model_learns_pairs_and_scores_replies(
    trained_tokenizer: Path, chat_model: Path, tmp_path: Path, train_seed: int
) -> None:
    spec = RewardStage(
        name="reward",
        kind="reward",
        data=[DATA_DIR / "preference.jsonl"],
        heldout=[DATA_DIR / "preference_heldout.jsonl"],
        max_len=128,
        template="chatml",
        train=TrainSpec(seed=train_seed, max_steps=120, lr=3e-4, **(QUICK | {"logging_steps": 30})),
    )
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    datasets = reward.prepare(spec, tok).datasets
    result = reward.run(spec, StageInputs(chat_model, trained_tokenizer, datasets), tmp_path)
    metrics, total = result.metrics, len(datasets["heldout"])
    # half the rejected replies answer about another subject: telling them apart from the question is hard for a 64-wide
    # model. The training loss falls well below chance: 0.468 (seed 0), clearing log 2 − 0.05 by 0.175 (seeds 1-4:
    # 0.183, 0.217, 0.191, 0.181)
    assert float(metrics["train_loss"]) < math.log(2) - 0.05
    # held-out pairs, about subjects no stage trains on: 127 of 200 right (seed 0), above chance by 27 (seeds 1-4: 116,
    # 112, 127, 123). The gain over the untrained head is not a direction that holds: +15, +17, +5, +18 and +1 on seeds
    # 0-4 (lr 3e-4, 120 steps); lr 1e-3 and 240 steps at 3e-4 were no steadier (-22 to +31)
    right = pairs(metrics["heldout_reward_accuracy"], total)
    assert right > total // 2

    # the saved model, scoring replies as the GRPO and eval stages do, ranks the held-out pairs as the stage measured
    scorer = AutoModelForSequenceClassification.from_pretrained(result.checkpoint)
    frame = read_files(spec.heldout, "preference").frame
    prompts = conversations(frame, "prompt_")
    chosen = reward_model.scores(scorer, tok, prompts, frame["chosen"].to_list(), "chatml")
    rejected = reward_model.scores(scorer, tok, prompts, frame["rejected"].to_list(), "chatml")
    assert sum(c > r for c, r in zip(chosen, rejected)) == right


def test_dpo_accumulation_matches_one_big_batch(trained_tokenizer: Path, chat_model: Path, tmp_path: Path) -> None:
    """TRL's equivalence: 8 pairs in one micro-batch and 2 micro-batches of 4 accumulated give the same loss and
    gradient.

    Compared through the first step's logged loss and gradient norm (before clipping): an accumulated loss the
    Trainer failed to scale would double the norm. (Weights after one Adam step could not tell: its first update
    is the gradient's sign, whatever the scale.)"""

    def first_step(batch_size: int, grad_accum: int) -> dict:
        spec = DPOStage(
            name="dpo",
            kind="dpo",
            data=[DATA_DIR / "preference.jsonl"],
            max_len=128,
            template="chatml",
            train=TrainSpec(max_steps=1, lr=1e-3, **(QUICK | {"batch_size": batch_size}), grad_accum=grad_accum),
        )
        datasets = dpo.prepare(spec, AutoTokenizer.from_pretrained(trained_tokenizer)).datasets
        logs = Logs()
        dpo.run(
            spec, StageInputs(chat_model, trained_tokenizer, datasets, (logs,)), tmp_path / f"{batch_size}x{grad_accum}"
        )
        return next(log for log in logs.logs if "grad_norm" in log)

    one, accumulated = first_step(8, 1), first_step(4, 2)
    assert one["loss"] == pytest.approx(math.log(2), abs=1e-5) == accumulated["loss"]
    assert one["grad_norm"] > 0 and accumulated["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_a_row_cut_to_no_reply_is_dropped_and_counted(trained_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained_tokenizer)
    short = [{"role": "user", "content": "Add 2 and 3."}]
    long = [{"role": "user", "content": "Add 2 and 3. " * 20}]
    listed = [
        (short, ["2 plus 3 equals 5.", "2 plus 3 equals 6."], [1.0, 0.0]),
        (long, ["2 plus 3 equals 5.", "2 plus 3 equals 6."], [1.0, 0.0]),
    ]
    whole = max(len(encode_completion(short, reply, tok, 1 << 30)[0]) for reply in listed[0][1])
    prompt = len(encode_prompt(short, tok))
    assert len(encode_prompt(long, tok)) > whole
    dataset, cut = candidates.encode(listed, tok, max_len=whole, template="chatml")
    # the long prompt alone fills max_len: its replies would score log p = 0, the best there is
    assert len(dataset) == 1 and cut == {"truncated": 0, "dropped": 1}
    dataset, cut = candidates.encode(listed[:1], tok, max_len=prompt + 2, template="chatml")
    assert cut == {"truncated": 2, "dropped": 0} and all(len(ids) == prompt + 2 for ids in dataset[0]["input_ids"])
