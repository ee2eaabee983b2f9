"""`lifecycle`: run, inspect and browse pipeline runs from one spec file.

The home is configured before Prefect is imported (Prefect reads PREFECT_HOME when it
loads), so `validate` and `status` never start Prefect at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from schemas.data import DataError
from schemas.spec import SpecError, load_spec
from tasks.checks import check_contracts
from tasks.home import Home

KEY_METRICS = ("train_loss", "heldout_loss", "exact_match_before", "exact_match", "train_tokens_per_second", "vocab_size")


def _check(spec_path: Path) -> None:
    """Spec and data, everything a run checks before any model loads."""
    spec = load_spec(spec_path)
    results, corpora = check_contracts(spec)
    rows = sum(len(r.frame) for r in results.values()) + sum(c.rows for c in corpora)
    rejected = sum(r.rejected_rows for r in results.values()) + sum(c.invalid for c in corpora)
    verdict = f"{rejected} invalid rows will be skipped (on_invalid: skip)" if rejected else "all valid"
    print(f"{spec_path}: spec valid; {len(spec.stages) + 1} stages; {len(results) + sum(c.files for c in corpora)} data files, {rows} rows, {verdict}")
    for result in results.values():
        for note in result.notes[:5]:
            print(f"note: {note}")


def cmd_validate(args: argparse.Namespace) -> int:
    _check(args.spec)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _check(args.spec)
    from flows.lifecycle import lifecycle  # after Home.configure: Prefect reads its home on import

    lifecycle(str(args.spec.resolve()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tasks.lineage import client, stage_statuses
    from tasks.plan import plan

    spec = load_spec(args.spec)
    home = Home.from_env()
    rows = stage_statuses(client(home), home, spec.name, plan(spec))
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(f"{'stage':<14} {'kind':<10} {'fingerprint':<14} {'state':<9} {'run id':<34} metrics")
    for row in rows:
        metrics = "  ".join(f"{k}={row.metrics[k]:.4g}" for k in KEY_METRICS if k in row.metrics)
        print(f"{row.name:<14} {row.kind:<10} {row.fingerprint[:12]:<14} {row.state:<9} {row.run_id or '-':<34} {metrics}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Decoded training examples of one stage with the trained spans marked."""
    from transformers import AutoTokenizer

    from stages.inspect import render_marked
    from tasks.lineage import client, experiment_id, fetch_checkpoint, finished_run
    from tasks.plan import plan
    from tasks.stage import stage_module

    spec = load_spec(args.spec)
    stage = next((s for s in spec.stages if s.name == args.stage), None)
    if stage is None:
        raise SpecError(f"{args.spec}: no stage named {args.stage!r}; the stages are {', '.join(s.name for s in spec.stages)}")
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        home = Home.from_env()
        mlflow = client(home)
        experiment = experiment_id(mlflow, home, spec.name, create=False)
        run = finished_run(mlflow, experiment, plan(spec)[0]) if experiment else None
        if run is None:
            raise SpecError(f"{args.spec}: the tokenizer stage has not finished yet; run `lifecycle run {args.spec}` "
                            "(or pass --tokenizer PATH)")
        tokenizer_dir = fetch_checkpoint(mlflow, home, run)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    colour = sys.stdout.isatty()
    for i, (input_ids, labels) in enumerate(stage_module(stage.kind).examples(stage, tokenizer, args.n)):
        trained = sum(label != -100 for label in labels)
        print(f"--- {stage.name} example {i + 1}: {len(input_ids)} tokens, {trained} trained"
              + ("" if colour else " (trained spans in ⟦ ⟧)"))
        print(render_marked(input_ids, labels, tokenizer, colour))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    home = Home.from_env()
    if home.tracking_uri.startswith(("http://", "https://")):
        print(f"the runs are on the tracking server: browse {home.tracking_uri}")
        return 0
    print(f"MLflow UI on http://127.0.0.1:{args.port} for {home.tracking_uri}")
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", home.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(args.port)])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lifecycle", description="Make a language model from a spec, stage by stage.")
    commands = top.add_subparsers(dest="command", required=True)
    for name, func, text in [("run", cmd_run, "run every stage; a re-run reuses what finished and resumes the rest"),
                             ("status", cmd_status, "one row per stage: name, kind, fingerprint, state, run id, key metrics"),
                             ("validate", cmd_validate, "check the spec and every data file; nothing trains")]:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("spec", type=Path)
        sub.set_defaults(func=func)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
    inspect = commands.add_parser("inspect", help="decoded training examples of a stage, trained spans marked")
    inspect.add_argument("spec", type=Path)
    inspect.add_argument("--stage", required=True, help="the stage's name")
    inspect.add_argument("-n", type=int, default=3, help="how many examples")
    inspect.add_argument("--tokenizer", type=Path, help="a tokenizer folder; default: the spec's finished tokenizer stage")
    inspect.set_defaults(func=cmd_inspect)
    ui = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1 against the project's store")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    Home.from_env().configure()
    try:
        return args.func(args)
    except (SpecError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
