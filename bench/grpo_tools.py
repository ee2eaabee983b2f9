"""The demo's grpo-tools stage (examples/toy.yaml) from a trained tools checkpoint, under settings given as JSON: the
held-out task accuracy (the answer read back from the tool) and tool calls before and after, and the first replies.

    python -m bench.grpo_tools CHECKPOINT                                        # as toy.yaml has it (adapters)
    python -m bench.grpo_tools CHECKPOINT '{"lora": null}'                       # every weight, lr 3e-4
    python -m bench.grpo_tools CHECKPOINT '{"lora": null, "train": {"lr": 5e-5}}'

CHECKPOINT: the demo's `tools` model folder (its tokenizer inside), e.g. the one `lifecycle run examples/toy.yaml`
fetched into .lifecycle/cache/checkpoint/. The settings are the stage's in toy.yaml, each JSON key replacing one
(`train` keys one of train's). 30 steps of 8 prompts x 4 replies, about 3 min on 2 cores. The figures go to
bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from schemas.spec import GRPOStage
from stages import grpo
from stages.common.contract import StageInputs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def demo_stage(changes: dict) -> GRPOStage:
    """toy.yaml's grpo-tools stage, its paths made absolute, with `changes` applied."""
    (stage,) = [s for s in yaml.safe_load((EXAMPLES / "toy.yaml").read_text())["stages"] if s["name"] == "grpo-tools"]
    stage = {key: value for key, value in stage.items() if key != "from"} | {"template": "chatml"}
    for field in ("data", "heldout"):
        stage[field] = [EXAMPLES / stage[field]]
    stage["tools"] = [tool | {"function": str(EXAMPLES / tool["function"])} for tool in stage["tools"]]
    stage["train"] = stage["train"] | {"save_steps": 1000} | changes.pop("train", {})
    return GRPOStage.model_validate(stage | changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the demo's tools model folder")
    parser.add_argument("changes", nargs="?", default="{}", help="settings replacing the stage's, as JSON")
    args = parser.parse_args()
    spec = demo_stage(json.loads(args.changes))
    datasets = grpo.prepare(spec, AutoTokenizer.from_pretrained(args.checkpoint)).datasets
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = grpo.run(spec, StageInputs(args.checkpoint, args.checkpoint, datasets), Path(work))
    metrics = result.metrics
    print(f"{args.changes}: {time.perf_counter() - started:.0f} s")
    for name in ("heldout_task_accuracy", "heldout_tool_calls", "heldout_reward"):
        print(f"  {name}: {metrics.get(name + '_before', float('nan')):.3f} -> {metrics.get(name, float('nan')):.3f}")
    kept = result.tables[grpo.SAMPLES_TABLE]
    for completion, reward in list(zip(kept["completion"], kept["reward"]))[:4]:
        print(f"  {reward:.0f}  {completion[:160]!r}")


if __name__ == "__main__":
    main()
