"""`lifecycle`: run, inspect and browse pipeline runs from one spec file.

The home is configured before Prefect is imported (Prefect reads PREFECT_HOME when it
loads), so `validate` and `status` never start Prefect at all.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from flows import server
from schemas.errors import LifecycleError
from schemas.load import SpecError, load_spec
from schemas.spec_doc import render
from stages.common.progress import quiet_libraries
from tasks.checks import check_contracts
from tasks.home import Home


class UsageError(LifecycleError, ValueError):
    """A command given what it cannot work with (a missing folder, clashing options): one line, exit 2."""


KEY_METRICS = (
    "train_loss",
    "heldout_loss",
    "exact_match_before",
    "exact_match",
    "heldout_preference_accuracy_before",
    "heldout_preference_accuracy",
    "heldout_kendall_tau",
    "heldout_reward_accuracy",
    "train_tokens_per_second",
    "world_size",
    "vocab_size",
)


def _check(spec_path: Path, home: Home | None = None, device_memory: float | None = None) -> None:
    """Spec, machine and data, everything a run checks before any model loads; with `home`, data that passed before
    is not read again; with `device_memory` (bytes), the memory estimate is against a device of that size."""
    from stages.common import estimate, memory  # torch and transformers: after `quiet_libraries`, where needed

    spec = load_spec(spec_path)
    memory.check(spec, spec_path)
    device = ("a device of the size given", device_memory) if device_memory is not None else None
    peaks = estimate.check(spec, spec_path, device)
    checked = check_contracts(spec, home)
    rows, rejected = sum(c.rows for c in checked), sum(c.rejected for c in checked)
    verdict = f"{rejected} invalid rows will be skipped (on_invalid: skip)" if rejected else "all valid"
    print(
        f"{spec_path}: spec valid; {len(spec.stages) + 1} stages; {sum(c.files for c in checked)} data files, {rows} "
        f"rows, {verdict}"
    )
    for result in checked:
        for note in result.notes[:5]:
            print(f"note: {note}")
    for peak in peaks:
        print(f"memory: {peak.line()}")
    if spec.sweep is not None:
        from tasks.plan import sweep_cost

        print(sweep_cost(spec).line())


def _size(text: str) -> float:
    """Bytes from '24GiB', '80GB', '512MiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 24GiB, 80GB or 512MiB")
    unit = (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return float(match.group(1)) * scale[unit]


def cmd_validate(args: argparse.Namespace) -> int:
    _check(args.spec, device_memory=args.device_memory)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    home = Home.from_env()
    if args.deployment is not None:  # the workers of the deployment's pool run it (flows/submit.py)
        from flows.submit import submit

        print("\n".join(submit(args.spec, args.deployment, home)))
        return 0
    _stop_on_sigterm(args.spec)
    if args.branch is None:  # a sweep's branch: the sweep checked its spec and data
        _check(args.spec, home)  # bad input starts nothing
    # the home's own server serves no UI: a link to one would answer 404
    own_server = "PREFECT_API_URL" not in os.environ
    # a new server starts while this process opens the store and loads the flow
    os.environ["PREFECT_API_URL"], answering = server.start(home)
    if own_server:
        server.keep_alive(os.environ["PREFECT_API_URL"])
    from tasks.lineage import open_store

    open_store(home)
    from flows.lifecycle import lifecycle  # after PREFECT_API_URL is set: Prefect reads its settings on import

    answering()

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_no_traceback_for_messages)
        if not args.verbose:
            # a sweep's branch runs on the sweep's server: its link is the sweep's to give
            logging.getLogger(name).addFilter(_Bookkeeping(link=not own_server and args.branch is None))
    lifecycle(str(args.spec.resolve()), checked=True, branch=args.branch, sweep_run=args.sweep_run)
    return 0


class _Bookkeeping(logging.Filter):
    """Prefect's lines that say nothing the stage lines do not: a task or flow that began or completed (a third of a
    run's output), and the flow run's link where no UI serves it. Failures, retries and the stages' own lines stay."""

    ROUTINE = ("Finished in state Completed", "Beginning flow run")

    def __init__(self, link: bool):
        super().__init__()
        self.link = link

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.ROUTINE) or (not self.link and message.startswith("View at ")))


def _no_traceback_for_messages(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task or flow with its traceback; a LifecycleError's message, or a server's refusal of
    this client, says all there is (and the command prints it last), so its traceback is left out. Any other failure
    keeps its traceback."""
    if record.exc_info and (isinstance(record.exc_info[1], LifecycleError) or _outside(record.exc_info[1])):
        record.exc_info, record.exc_text = None, None
    return True


def _resumes(how: str, spec: Path) -> str:
    return (
        f"{how}; the stage it was in is recorded as KILLED, and `lifecycle run {spec}` resumes it from its last "
        "in-stage checkpoint, reusing every finished stage"
    )


def _stop_on_sigterm(spec: Path) -> None:
    """SIGTERM (how Docker, Kubernetes and Slurm stop a job) ends a run with one line and exit status 143. Inside the
    flow Prefect turns the signal into its TerminationSignal, which closes the stage's run and the pipeline run as
    KILLED on its way out (tasks/lineage.py), then hands the signal on to this handler."""

    def stopped(number: int, frame) -> None:
        print(f"error: {_resumes(f'stopped by {signal.Signals(number).name}', spec)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + number)

    signal.signal(signal.SIGTERM, stopped)


def _outside(err: BaseException) -> str | None:
    """One line for a failure from outside the pipeline (a server refusing or gone, a full disk); None otherwise."""
    return _refusal(err) or _disk_full(err) or _unreachable(err)


def _unreachable(err: BaseException) -> str | None:
    """What to say when the Prefect API stopped answering mid-run (its server died, the network went): what is
    recorded and how to go on; None for any other error."""
    httpx = sys.modules.get("httpx")
    if httpx is None or not isinstance(err, httpx.TransportError):
        return None
    return (
        f"the Prefect API at {os.environ.get('PREFECT_API_URL')} stopped answering ({type(err).__name__}: {err}); "
        "every stage that finished is recorded in MLflow: run again once it answers, and they are reused"
    )


def _disk_full(err: BaseException) -> str | None:
    """What to say when a disk filled up (a checkpoint, a cache entry, the store): where, and that nothing half-written
    counts; None for any other error."""
    if not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        return None
    where = f" writing {err.filename}" if err.filename else ""
    return (
        f"the disk is full{where} (no space left on device): nothing half-written is recorded as finished; free some "
        "space (`du -sh` on the home's work and cache folders shows where it went) and run again: finished stages are "
        "reused and the interrupted one resumes from its last complete in-stage checkpoint"
    )


def _refusal(err: BaseException) -> str | None:
    """What to say when the tracking server or the Prefect API refused this client (HTTP 401 or 403); None for any
    other error."""
    mlflow = sys.modules.get("mlflow.exceptions")
    if mlflow is not None and isinstance(err, mlflow.MlflowException):
        if err.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            what = "refused these credentials" if err.error_code == "UNAUTHENTICATED" else "gave no permission for this"
            return (
                f"the tracking server at {os.environ.get('MLFLOW_TRACKING_URI')} {what} "
                f"({err.error_code.lower().replace('_', ' ')}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account with access to the experiment"
            )
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403):
        return (
            f"the Prefect API at {os.environ.get('PREFECT_API_URL')} refused this client (HTTP "
            f"{err.response.status_code}): set PREFECT_API_AUTH_STRING to the server's auth string (user:password)"
        )
    return None


def cmd_gc(args: argparse.Namespace) -> int:
    """What the home holds that nothing will read again (tasks/gc.py), with sizes; removed unless --dry-run."""
    from stages.common.progress import size
    from tasks.gc import collect
    from tasks.lineage import open_store

    home = Home.from_env()
    found = collect(open_store(home), home, args.dry_run, args.unfinished)
    if not found:
        print(f"{home.root}: nothing to remove")
        return 0
    verb = "to remove" if args.dry_run else "removed"
    rows = [
        [str(item.path.relative_to(home.root)), size(item.size), verb if item.removed else "kept", item.why]
        for item in found
    ]
    print(text_table(["path", "size", "state", "why"], rows, [False, True, False, False]))
    freed = sum(item.size for item in found if item.removed)
    print(f"\n{size(freed)} {verb} from {home.root}" + ("; run without --dry-run to remove it" if args.dry_run else ""))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = server.stop(Home.from_env())
    print("the home's Prefect server stopped" if stopped else "no Prefect server was running for this home")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """One row per stage; a sweep's stages once per branch, each row naming its branch."""
    from schemas.sweep import branches
    from tasks.claims import stage_statuses
    from tasks.lineage import client
    from tasks.plan import plan

    spec = load_spec(args.spec)
    home = Home.from_env()
    mlflow = client(home)
    swept = [(b.name, stage_statuses(mlflow, home, spec.name, plan(b.spec))) for b in branches(spec)]
    if args.json:
        found = [({"branch": name} if spec.sweep else {}) | row.__dict__ for name, rows in swept for row in rows]
        print(json.dumps(found, indent=2))
        return 0
    lines = [
        ([name] if spec.sweep else [])
        + [
            row.name,
            row.kind,
            row.fingerprint[:12],
            row.state,
            row.run_id or "-",
            "  ".join(f"{k}={row.metrics[k]:.4g}" for k in KEY_METRICS if k in row.metrics),
        ]
        for name, rows in swept
        for row in rows
    ]
    columns = ["stage", "kind", "fingerprint", "state", "run id", "metrics"]
    print(text_table((["branch"] if spec.sweep else []) + columns, lines))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Decoded training examples of one stage with the trained spans marked."""
    from transformers import AutoTokenizer

    from schemas.data import describe
    from stages import training_stage
    from stages.common.marked import render_marked
    from tasks.lineage import client, experiment_id, finished_run
    from tasks.plan import plan
    from tasks.registry import fetch_checkpoint

    spec = load_spec(args.spec)
    stage = next((s for s in spec.stages if s.name == args.stage), None)
    if stage is None:
        raise SpecError(
            f"{args.spec}: no stage named {args.stage!r}; the stages are {', '.join(s.name for s in spec.stages)}"
        )
    if stage.kind == "eval":
        raise SpecError(
            f"{args.spec}: stage {stage.name!r} trains nothing; `lifecycle report {args.spec}` shows what it measured"
        )
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        home = Home.from_env()
        mlflow = client(home)
        experiment = experiment_id(mlflow, home, spec.name, create=False)
        planned = plan(spec)[0]
        run = finished_run(mlflow, experiment, planned) if experiment else None
        tokenizer_dir = fetch_checkpoint(mlflow, home, run) if run else _preview_tokenizer(spec, home, planned)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    colour = sys.stdout.isatty()
    for field, (sources, fmt) in stage.files().items():
        for source in sources:
            print(f"{stage.name} {field}: {describe(source, fmt, stage.on_invalid)}")
    for i, (input_ids, labels) in enumerate(training_stage(stage.kind).examples(stage, tokenizer, args.n)):
        trained = sum(label != -100 for label in labels)
        print(
            f"--- {stage.name} example {i + 1}: {len(input_ids)} tokens, {trained} trained"
            + ("" if colour else " (trained spans in ⟦ ⟧)")
        )
        print(render_marked(input_ids, labels, tokenizer, colour))
    return 0


def _preview_tokenizer(spec, home: Home, planned) -> Path:
    """The spec's tokenizer before any run has made it: built as the tokenizer stage builds it (adopted, or trained on
    the spec's text: seconds), kept in the home's cache by its fingerprint, not recorded as a run."""
    from stages import tokenizer
    from stages.common.folders import partial_folder, publish

    target = home.cache("preview-tokenizer", planned.fingerprint)
    if not target.exists():
        started = time.monotonic()
        partial = partial_folder(target)
        publish(tokenizer.build(spec, partial).checkpoint, target)
        shutil.rmtree(partial)
        print(
            f"note: the tokenizer stage has not run yet: built its tokenizer for this preview in "
            f"{time.monotonic() - started:.0f} s; `lifecycle run` trains and records it"
        )
    return target


def _stage_checkpoint(spec_path: Path, name: str) -> Path:
    """The checkpoint of the stage's finished run, fetched into the home's cache."""
    from tasks.lineage import client
    from tasks.registry import fetch_checkpoint

    home = Home.from_env()
    return fetch_checkpoint(client(home), home, _finished_stage_run(spec_path, name))


def _finished_stage_run(spec_path: Path, name: str):
    """The finished run of a language-model stage of the spec."""
    from tasks.lineage import client, experiment_id, finished_run
    from tasks.plan import plan

    spec = load_spec(spec_path)
    planned = {stage.name: stage for stage in plan(spec)}
    if name not in planned:
        raise SpecError(
            f"{spec_path}: no stage named {name!r}; the stages are {', '.join(s.name for s in spec.stages)}"
        )
    if planned[name].kind in ("tokenizer", "eval", "reward"):
        raise SpecError(
            f"{spec_path}: stage {name!r} ({planned[name].kind}) is not a language model; name a stage that trains one"
        )
    home = Home.from_env()
    mlflow = client(home)
    experiment = experiment_id(mlflow, home, spec.name, create=False)
    run = finished_run(mlflow, experiment, planned[name]) if experiment else None
    if run is None:
        raise SpecError(f"{spec_path}: stage {name!r} has no finished run; run `lifecycle run {spec_path}` first")
    return run


def _model_checkpoint(uri: str) -> Path:
    """The language model a `models:/` URI names, fetched into the home's cache (an adapter with its base)."""
    from tasks.lineage import open_store
    from tasks.registry import fetch_language_model

    home = Home.from_env()
    return fetch_language_model(open_store(home), home, uri)


def _prompt_rows(args: argparse.Namespace, prompts: list[str]) -> tuple[list[list[dict]], list[str | None]]:
    """The conversations to answer and their reference answers: from --input (the prompts format), or the command
    line."""
    if args.input is None:
        if not prompts:
            raise UsageError("give prompts to answer, or --input FILE")
        return [[{"role": "user", "content": text}] for text in prompts], [None] * len(prompts)
    if prompts:
        raise UsageError("give prompts on the command line or with --input, not both")
    from schemas.data import read_files
    from stages.common.templates import conversations

    frame = read_files([args.input], "prompts").frame
    return conversations(frame, "prompt_"), frame["answer"].to_list()


def _tools(path: Path) -> list[dict]:
    """The tool definitions --tools names (a JSON list, as a conversation row's tools are written), checked as the
    conversations format checks a row's tools."""
    from schemas.tools import definitions
    from schemas.values import Shape

    try:
        tools, _ = definitions(json.loads(path.read_text(encoding="utf-8")), "tools")
    except (OSError, json.JSONDecodeError, Shape) as err:
        raise UsageError(f"--tools {path}: {err}") from None
    if tools is None:
        raise UsageError(f"--tools {path}: defines no tools")
    return json.loads(tools)


def answer_row(messages: list[dict], reply: str, reference: str | None) -> dict:
    """One line of the answers file: the prompt (its text when it is a single user turn), the answer, the reference
    if given."""
    prompt = messages[0]["content"] if len(messages) == 1 else messages
    return {"prompt": prompt, "answer": reply} | ({"reference": reference} if reference is not None else {})


CHECKPOINT_FILES = ("config.json", "adapter_config.json")  # a model folder has one, an adapter folder the other


def _checkpoint_folder(folder: Path) -> Path:
    """A folder a model loads from, or a usage error saying it is not one."""
    if not any((folder / f).exists() for f in CHECKPOINT_FILES):
        raise UsageError(f"{folder} is not a checkpoint folder (no config.json or adapter_config.json in it)")
    return folder


def cmd_generate(args: argparse.Namespace) -> int:
    """Replies of one checkpoint through the chat template stored with it."""
    from transformers import set_seed

    from stages.common.generation import ChatModel, Sampling

    words = list(args.words)
    try:
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.stage is not None:
        if not words:
            raise UsageError('--stage needs the spec first: lifecycle generate SPEC --stage NAME "prompt" ...')
        spec_path = Path(words.pop(0))
    elif args.checkpoint is not None:
        _checkpoint_folder(args.checkpoint)
    prompts, references = _prompt_rows(args, words)
    tools = _tools(args.tools) if args.tools is not None else None
    if args.stage is not None:
        checkpoint = _stage_checkpoint(spec_path, args.stage)
    else:
        checkpoint = _model_checkpoint(args.model) if args.model is not None else args.checkpoint
    set_seed(args.seed)
    replies = ChatModel.load(checkpoint).reply(prompts, sampling, args.batch_size, [tools] * len(prompts))
    rows = [answer_row(m, r.text, ref) for m, r, ref in zip(prompts, replies, references)]
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"{len(rows)} answers written to {args.output}")
    elif args.input is not None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        for row in rows:
            print(f"> {row['prompt']}\n{row['answer']}\n")
    return 0


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"  # not measured (log_table writes nan as null)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def text_table(columns: list[str], rows: list[list[str]], numeric: list[bool] | None = None) -> str:
    """Aligned columns (rich's table, as plain text): the header, a rule, the rows; `numeric` columns right-aligned.
    Cells are text as given, never markup."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column, right in zip(columns, numeric or [False] * len(columns)):
        table.add_column(Text(str(column)), justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*map(Text, row))
    out = io.StringIO()
    Console(file=out, width=1 << 16, color_system=None).print(table)
    lines = [line.rstrip() for line in out.getvalue().rstrip("\n").splitlines()]
    lines[1] = "─" * max(map(len, lines))  # the header's rule under the whole table, however wide
    return "\n".join(lines)


def format_metrics(table: dict) -> str:
    """A log_table JSON ({"columns": [...], "data": [[...], ...]}) as aligned text: text left, numbers right, '-'
    where not measured."""
    columns, data = table["columns"], table["data"]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in data) for i in range(len(columns))]
    return text_table(columns, [[_cell(value) for value in row] for row in data], numeric)


def format_samples(table: dict) -> str:
    """Each sample prompt, then every checkpoint's reply beneath it under the checkpoint's name."""
    columns, data = table["columns"], table["data"]
    names = columns[1:]
    width = max(map(len, names), default=0)
    blocks = []
    for number, (prompt, *replies) in enumerate(data, 1):
        lines = [f"[{number}] {prompt}"]
        for name, reply in zip(names, replies):
            text = (reply or "").splitlines() or [""]
            lines.append(f"    {name:<{width}} | {text[0]}")
            lines += [f"    {'':<{width}} | {more}" for more in text[1:]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _sweep_report(path: Path, spec) -> int:
    """A sweep's comparison (tasks/sweeps.py): per point, each checkpoint's figures over the seeds and each stage's
    change over its input, then the best point."""
    from schemas.sweep import branches
    from tasks.lineage import client, experiment_id
    from tasks.sweeps import report

    home = Home.from_env()
    mlflow = client(home)
    experiment = experiment_id(mlflow, home, spec.name, create=False)
    branched = branches(spec)
    found = report(mlflow, experiment, spec, branched) if experiment else None
    if found is None or not found.points:
        raise SpecError(f"{path}: no branch of the sweep has a finished eval run; run `lifecycle run {path}` first")
    done = sum(point.seeds for point in found.points)
    print(f"sweep {spec.name}: {done} of {len(branched)} branches measured by eval stage {found.eval_stage}")
    for point in found.points:
        print(f"\n{point.name or 'the spec as it is'} ({point.seeds} seed{'s' * (point.seeds != 1)}): mean ± std")
        rows = [[stage, *(row[m].cell(point.seeds) for m in found.metrics)] for stage, row in point.levels.items()]
        print(text_table(["checkpoint", *found.metrics], rows, [False] + [True] * len(found.metrics)))
        if point.changes:
            rows = [
                [f"{stage} − {found.inputs[stage]}", *(row[m].cell(point.seeds, change=True) for m in found.metrics)]
                for stage, row in point.changes.items()
            ]
            print("\n" + text_table(["stage − input", *found.metrics], rows, [False] + [True] * len(found.metrics)))
    print("\n* the change's 95 % interval over the seeds leaves out 0 (from 3 seeds)")
    if found.best:
        print(found.best)
    return 0


def _served_model(source: str):
    """The model a SPEC[:STAGE] or models:/ URI names: (store client, the run that made it, pipeline name, its
    checkpoint fetched into the home's cache). SPEC alone names its last language-model stage."""
    from tasks.lineage import client, open_store
    from tasks.registry import fetch_checkpoint, fetch_language_model, model_id_of

    home = Home.from_env()
    if source.startswith("models:/"):
        mlflow = open_store(home)
        model = mlflow.get_logged_model(model_id_of(mlflow, source))
        checkpoint = fetch_language_model(mlflow, home, source)
        return mlflow, mlflow.get_run(model.source_run_id), mlflow.get_experiment(model.experiment_id).name, checkpoint
    spec_path, _, stage = source.partition(":")
    spec = load_spec(Path(spec_path))
    stage = stage or [s.name for s in spec.training_stages() if s.kind != "reward"][-1]
    mlflow, run = client(home), _finished_stage_run(Path(spec_path), stage)
    return mlflow, run, spec.name, fetch_checkpoint(mlflow, home, run)


def cmd_export(args: argparse.Namespace) -> int:
    """A stage's model as a self-contained Hugging Face folder with a model card naming its lineage; with --gguf, a
    GGUF file of it beside the folder."""
    from tasks.export import export

    # OUT.gguf beside OUT, whatever dots OUT's name has (with_suffix would replace the part after the last one)
    gguf = args.out.with_name(f"{args.out.name}.gguf")
    if args.gguf and gguf.exists():
        raise UsageError(f"{gguf} exists: export writes a new file")
    mlflow, run, pipeline, checkpoint = _served_model(args.source)
    folder = export(mlflow, run, checkpoint, args.out, pipeline)
    print(f"stage {run.data.tags['lifecycle.stage']} of {pipeline} exported to {folder}")
    if args.gguf:
        from tasks.gguf import write_gguf

        written = write_gguf(folder, gguf)
        print(f"and as GGUF to {written} (read back and checked against the folder)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """A stage's model behind an OpenAI-compatible API (transformers' server), until interrupted."""
    from tasks.serve import server

    folder = Path(args.source)
    if folder.is_dir():  # an exported folder (or any checkpoint folder): no store is read
        name, checkpoint = folder.resolve().name, _checkpoint_folder(folder)
    else:
        _, run, pipeline, checkpoint = _served_model(args.source)
        name = f"{pipeline}/{run.data.tags['lifecycle.stage']}"
    served = server(name, checkpoint, args.host, args.port)
    print(
        f"serving {name} at http://{args.host}:{args.port}/v1 (POST /v1/chat/completions, GET /v1/models); "
        "Ctrl-C stops it",
        flush=True,
    )
    served.run()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The eval stage's metrics table and sample replies, as its finished run logged them."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from tasks.lineage import client, experiment_id, finished_run
    from tasks.plan import plan

    spec = load_spec(args.spec)
    if spec.sweep is not None:
        return _sweep_report(args.spec, spec)
    evals = [stage for stage in plan(spec) if stage.kind == "eval"]
    if not evals:
        raise SpecError(f"{args.spec}: the spec has no eval stage; add one ({{name: eval, kind: eval}}) and run it")
    chosen = next((stage for stage in evals if stage.name == args.stage), None) if args.stage else evals[0]
    if chosen is None:
        raise SpecError(
            f"{args.spec}: no eval stage named {args.stage!r}; the eval stages are {', '.join(s.name for s in evals)}"
        )
    home = Home.from_env()
    mlflow = client(home)
    experiment = experiment_id(mlflow, home, spec.name, create=False)
    run = finished_run(mlflow, experiment, chosen) if experiment else None
    if run is None:
        raise SpecError(
            f"{args.spec}: eval stage {chosen.name!r} has no finished run; run `lifecycle run {args.spec}` first"
        )
    with tempfile.TemporaryDirectory() as folder:
        try:
            metrics, samples = (
                json.loads(Path(mlflow.download_artifacts(run.info.run_id, f"eval/{name}.json", folder)).read_text())
                for name in ("metrics", "samples")
            )
        except MlflowException as err:
            raise SpecError(
                f"{args.spec}: eval stage {chosen.name!r} (run {run.info.run_id}) holds no readable "
                f"eval/metrics.json and eval/samples.json: {err.message}"
            ) from None
    print(f"{chosen.name} (run {run.info.run_id}); plot: eval/metrics.png in that run\n")
    print(format_metrics(metrics))
    if spec.registry and chosen.spec.best_by is not None:
        try:
            why = mlflow.get_registered_model(spec.name).tags.get("lifecycle.best")
        except MlflowException:
            why = None  # registered by no run of this store yet
        if why:
            print(f"\nregistry {spec.name}, alias best: {why}")
    if samples["data"]:
        print("\n" + format_samples(samples))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """MLflow's UI on 127.0.0.1 against the home's store, with only what browsing needs.

    `mlflow ui` as it comes starts four uvicorn workers, and a job runner with seven huey queue consumers for jobs
    this tool never makes (GenAI judges, trace upkeep): 15 processes, 1.5 GB (proportional set size), and SIGINT to
    the command left the job runner and its consumers running. Here one worker serves the UI, and job execution is
    off through MLflow's own switch (MLFLOW_SERVER_ENABLE_JOB_EXECUTION, read by mlflow.server._run_server): two
    processes, mlflow's command and the server it starts, 0.4 GB. This process becomes that command, which passes
    SIGINT and SIGTERM on to the server and exits when it has; the server gives open requests at most
    UI_SHUTDOWN_SECONDS (Ctrl-C at a terminal signals both: the server, told twice, stops without waiting)."""
    home = Home.from_env()
    if home.tracking_uri.startswith(("http://", "https://")):
        print(f"the runs are on the tracking server: browse {home.tracking_uri}")
        return 0
    from mlflow.tracking.default_experiment import DEFAULT_EXPERIMENT_ID

    from tasks.lineage import open_store, ui_route

    address = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI on {address} for {home.tracking_uri}; Ctrl-C stops it")
    # MLflow 3.17's UI opens an experiment in its GenAI view (traces) unless the browser's GenAI / Model training
    # switch says otherwise: these addresses open each experiment's runs with the switch on Model training
    for experiment in open_store(home).search_experiments(max_results=20, order_by=["last_update_time DESC"]):
        if experiment.experiment_id != DEFAULT_EXPERIMENT_ID:
            print(f"  {experiment.name}: {address}/{ui_route(experiment.experiment_id)}")
    sys.stdout.flush()  # exec replaces this process, buffered output with it
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", home.tracking_uri]
    command += ["--registry-store-uri", home.tracking_uri]  # where the pipeline registers models (said, not guessed)
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    # no line per request: a browser's page makes dozens, and the terminal is for what the command says
    command += ["--uvicorn-opts", f"--timeout-graceful-shutdown {UI_SHUTDOWN_SECONDS} --no-access-log"]
    os.execve(sys.executable, command, os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


UI_SHUTDOWN_SECONDS = 3  # a browser's open request does not hold a stopping UI for longer


def cmd_join(args: argparse.Namespace) -> int:
    """Another node's ranks of a stage launched on `nodes` machines: they meet the first node's flow at
    `launch.master`."""
    spec = load_spec(args.spec)
    stage = next((s for s in spec.training_stages() if s.name == args.stage), None)
    if stage is None or stage.launch is None or stage.launch.nodes < 2:
        raise UsageError(f"{args.spec}: no training stage {args.stage!r} launched on more than one node")
    if not 0 < args.node_rank < stage.launch.nodes:
        raise UsageError(
            f"--node-rank must be 1 to {stage.launch.nodes - 1}: node 0 is the one running `lifecycle run`"
        )
    from tasks.torchrun import join

    join(stage.launch, args.node_rank)
    return 0


def cmd_spec_doc(args: argparse.Namespace) -> int:
    """The spec reference rendered from the models: printed, written to the file, or with --check compared with it."""
    text = render()
    if args.path is None:
        if args.check:
            print("lifecycle spec-doc --check needs the file to compare, e.g. docs/spec.md", file=sys.stderr)
            return 2
        print(text, end="")
        return 0
    if not args.check:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text, encoding="utf-8")
        print(f"{args.path}: the spec reference, written")
        return 0
    if args.path.exists() and args.path.read_text(encoding="utf-8") == text:
        print(f"{args.path}: the spec reference is up to date")
        return 0
    again = f"lifecycle spec-doc {args.path}"
    state = "is stale: it differs from the spec's models" if args.path.exists() else "does not exist"
    print(f"{args.path} {state}; run `{again}` to write it", file=sys.stderr)
    return 1


def cmd_new(args: argparse.Namespace) -> int:
    """A commented first spec for the user's model folder and data files, which `validate` accepts as written."""
    from schemas.starter import starter_spec

    if args.output.exists():
        raise UsageError(f"{args.output} exists: give another --output, or move it away")
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", args.model.resolve().name).strip("-._") or "my-model"
    text = starter_spec(name, args.model, args.data, args.output.parent)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}; check it with `lifecycle validate {args.output}`, then `lifecycle run {args.output}`")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lifecycle", description="Make a language model from a spec, stage by stage.")
    commands = top.add_subparsers(dest="command", required=True)
    spec_help = "the pipeline spec (YAML)"

    def command(name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
        """A subcommand whose line in `lifecycle --help` and whose own --help both say what it does."""
        return commands.add_parser(name, help=text, description=description or text[0].upper() + text[1:] + ".")

    for name, func, text in [
        ("run", cmd_run, "run every stage; a re-run reuses what finished and resumes the rest"),
        ("status", cmd_status, "one row per stage: name, kind, fingerprint, state, run id, key metrics"),
        ("validate", cmd_validate, "check the spec and every data file; nothing trains"),
    ]:
        sub = command(name, text)
        sub.add_argument("spec", type=Path, help=spec_help)
        sub.set_defaults(func=func)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "validate":
            sub.add_argument(
                "--device-memory",
                type=_size,
                metavar="SIZE",
                help="estimate each training stage's peak against a device of this size (e.g. 24GiB, 80GB) instead "
                "of this machine's memory or GPU",
            )
        if name == "run":
            sub.add_argument(
                "--deployment",
                metavar="NAME",
                help="submit to this Prefect deployment (lifecycle/NAME, on PREFECT_API_URL) for its workers to run, "
                "instead of running here; SPEC as the workers see it",
            )
            sub.add_argument(
                "--verbose",
                action="store_true",
                help="Prefect's own lines too: each task's start and finished state, the flow run's link",
            )
            sub.add_argument(
                "--branch",
                metavar="NAME",
                help="only this branch of the spec's sweep (as `validate` names it: 'dpo.beta=0.1 seed=0'), recorded "
                "under --sweep-run; how a sweep runs its branches side by side",
            )
            sub.add_argument("--sweep-run", metavar="RUN_ID", help="the sweep's MLflow run that --branch is under")
    new = command(
        "new",
        "write a commented first spec for your model folder and data files",
        "Write a commented first spec: each data file's format detected (any container: .jsonl, .json, "
        ".parquet, .csv, .tsv, .txt, .md, .arrow, compressed too), a stage for each format "
        "(pretrain, LoRA-SFT, DPO, KTO, PRO, GRPO, in that order), an eval of them all. A file named as held out "
        "(heldout, eval, test, valid, dev) is the held-out file of its format's stage.",
    )
    new.add_argument("model", type=Path, help="your model folder (Hugging Face: config.json, weights, tokenizer)")
    new.add_argument("data", type=Path, nargs="+", help="data files")
    new.add_argument("-o", "--output", type=Path, default=Path("spec.yaml"), help="default: spec.yaml")
    new.add_argument("--name", help="the pipeline's name (its MLflow experiment); default: the model folder's")
    new.set_defaults(func=cmd_new)
    inspect = command(
        "inspect",
        "how a stage's sources are read (containers, shapes, rows) and its decoded training examples, trained "
        "spans marked",
    )
    inspect.add_argument("spec", type=Path, help=spec_help)
    inspect.add_argument("--stage", required=True, help="the stage's name")
    inspect.add_argument("-n", type=int, default=3, help="how many examples")
    inspect.add_argument(
        "--tokenizer", type=Path, help="a tokenizer folder; default: the spec's finished tokenizer stage"
    )
    inspect.set_defaults(func=cmd_inspect)
    generate = command(
        "generate",
        "a checkpoint's replies to prompts, through the chat template stored with it",
        "Replies of one checkpoint: a stage's finished checkpoint (SPEC --stage NAME), a logged or "
        "registered model (--model models:/...), or a folder (--checkpoint). "
        "Greedy by default, so a reply is reproducible and is the one `lifecycle report` shows; "
        "--temperature above 0 samples (nucleus, --top-p).",
    )
    generate.add_argument(
        "words", nargs="*", metavar="[SPEC] PROMPT", help="with --stage: the spec, then the prompts; else the prompts"
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--stage", help="the stage whose finished checkpoint answers (give the spec first)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint folder (any stage's output)")
    source.add_argument(
        "--model",
        metavar="URI",
        help="a stage's model in the store: models:/<model id>, models:/<pipeline>/<version> or "
        "models:/<pipeline>@<alias> (each stage's name, or best)",
    )
    generate.add_argument(
        "--input", type=Path, help="a jsonl of prompts ({prompt} or {prompt, answer}, the prompts format)"
    )
    generate.add_argument(
        "--output", type=Path, help="where to write {prompt, answer, reference} lines; default: stdout"
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    generate.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (default 0.9)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="the longest reply, in tokens (default 128)")
    generate.add_argument("--batch-size", type=int, default=16, help="prompts generated together, left-padded")
    generate.add_argument("--seed", type=int, default=0, help="makes sampled replies repeatable")
    generate.add_argument(
        "--tools",
        type=Path,
        help="a JSON file of tool definitions ([{type: function, function: {name, description, parameters}}]) "
        "offered with every prompt; a reply calls them in <tool_call> blocks",
    )
    generate.set_defaults(func=cmd_generate)
    export = command(
        "export",
        "a stage's model as a Hugging Face folder to take elsewhere (merged safetensors, tokenizer and chat "
        "template, generation config, a model card naming its lineage and scores)",
    )
    export.add_argument(
        "source",
        help="SPEC:STAGE (SPEC alone: its last language-model stage), or a models:/ URI (models:/<pipeline>@best)",
    )
    export.add_argument("out", type=Path, help="the folder to write; it must not exist yet, or be empty")
    export.add_argument(
        "--gguf",
        action="store_true",
        help="also write OUT.gguf (llama and qwen2 architectures, byte-level BPE tokenizers), read back and checked",
    )
    export.set_defaults(func=cmd_export)
    serve = command(
        "serve",
        "a stage's model behind an OpenAI-compatible API: /v1/chat/completions (streaming, tools) and /v1/models",
    )
    serve.add_argument(
        "source",
        help="SPEC:STAGE (SPEC alone: its last language-model stage), a models:/ URI, or a model folder (an export: "
        "served under the folder's name, no store read)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000)")
    serve.set_defaults(func=cmd_serve)
    report = command("report", "the eval stage's metrics per checkpoint and their sample replies")
    report.add_argument("spec", type=Path, help=spec_help)
    report.add_argument("--stage", help="the eval stage's name; default: the first eval stage")
    report.set_defaults(func=cmd_report)
    ui = command("ui", "the MLflow UI on 127.0.0.1 against the project's store")
    ui.add_argument("--port", type=int, default=5000, help="the port to listen on (default 5000)")
    ui.set_defaults(func=cmd_ui)
    join = command(
        "join",
        "run another node's ranks of a stage launched on several machines",
        "On every node but the first, while the first runs `lifecycle run SPEC`: this node's "
        "ranks of the stage meet it at the stage's launch.master and take their work from it. The home "
        "must be on a filesystem every node shares.",
    )
    join.add_argument("spec", type=Path, help=spec_help)
    join.add_argument("--stage", required=True, help="the stage's name")
    join.add_argument("--node-rank", type=int, required=True, help="this node's number, 1 to launch.nodes - 1")
    join.set_defaults(func=cmd_join)
    stop = command("stop", "stop the home's Prefect server (the first `run` starts it and leaves it for the next)")
    stop.set_defaults(func=cmd_stop)
    gc = command("gc", "remove what the home holds that no run will read again, with sizes (--dry-run: only list it)")
    gc.add_argument("--dry-run", action="store_true", help="list what would go and what is kept, remove nothing")
    gc.add_argument(
        "--unfinished",
        action="store_true",
        help="also the work of stages that did not finish (their next run then starts from step 0)",
    )
    gc.set_defaults(func=cmd_gc)
    spec_doc = command(
        "spec-doc", "print (or write to PATH) the reference of every spec field, generated from the spec's models"
    )
    spec_doc.add_argument("path", nargs="?", type=Path, help="the file to write (this repository's: docs/spec.md)")
    spec_doc.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is stale")
    spec_doc.set_defaults(func=cmd_spec_doc)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra and args.command == "generate" and not any(word.startswith("--") for word in extra):
        args.words += extra  # argparse takes one run of positionals; prompts may also follow the options
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    Home.from_env().configure()
    quiet_libraries()  # inspect, generate and report load the same libraries a run does
    # OpenMP threads that wait by spinning lose their core to any busy process beside them: training beside two
    # was 1.3x-2.9x faster with passive waiting, and idle within noise (bench/threads.py). Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return args.func(args)
    except LifecycleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        if (refused := _outside(err)) is not None:
            print(f"error: {refused}", file=sys.stderr)
            return 2
        if args.command == "run" and isinstance(err, KeyboardInterrupt):
            print(f"error: {_resumes('interrupted (Ctrl-C)', args.spec)}", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
