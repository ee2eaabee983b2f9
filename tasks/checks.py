"""The data checks a run makes before any model loads, shared by `lifecycle validate`, `lifecycle run` and the flow.

Files read whole are validated by their pandera contracts; streamed corpora are checked line by line at flat memory.
Every problem of every file is gathered into one DataError. A file that passed is remembered in the home by its
content digest, format and policy (and the project's version), so a re-run does not read unchanged data again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from schemas.data import DataError, Problem, check_files
from schemas.spec import PipelineSpec
from stages.common.folders import partial_folder, publish
from tasks.home import Home
from tasks.keys import check_key


@dataclass(frozen=True)
class Checked:
    """What the check of one file (or one streamed corpus) found."""

    files: int
    rows: int
    rejected: int  # rows set aside under on_invalid: skip
    notes: list[str]  # not errors: e.g. tied scores in a ranked list


def _remembered(home: Home | None, key: str) -> Checked | None:
    if home is None:
        return None
    try:
        return Checked(**json.loads((home.cache("checked", key) / "checked.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _remember(home: Home | None, key: str, checked: Checked) -> None:
    if home is None:
        return
    target = home.cache("checked", key)
    partial = partial_folder(target)
    (partial / "checked.json").write_text(json.dumps(asdict(checked)))
    publish(partial, target)


def check_contracts(spec: PipelineSpec, home: Home | None = None) -> list[Checked]:
    """Every data file of the spec against its contract, streamed corpora line by line; all problems at once.

    With `home`, files that passed before (same content, format and policy) are not read again."""
    problems: list[Problem] = []
    checked: list[Checked] = []
    pending = []
    for source, fmt, on_invalid in spec.data_contracts():
        key = check_key([source], fmt, on_invalid)
        if (found := _remembered(home, key)) is not None:
            checked.append(found)
        else:
            pending.append((key, (source, fmt, on_invalid)))
    try:
        results = check_files([file for _, file in pending])
    except DataError as err:
        results, problems = {}, err.problems
    for key, (source, _, _) in pending:
        if source in results:
            result = results[source]
            found = Checked(
                len(source.files), len(result.frame), result.rejected_rows, [str(note) for note in result.notes]
            )
            _remember(home, key, found)
            checked.append(found)
    if spec.streamed():
        from stages.common.streaming import check_corpus  # loads torch: only specs that stream pay for it

        for stage in spec.streamed():
            key = check_key(stage.data, "text", stage.on_invalid)  # the spec expanded its patterns into files
            if (found := _remembered(home, key)) is not None:
                checked.append(found)
                continue
            try:
                corpus = check_corpus(stage.data, stage.on_invalid)
            except DataError as err:
                problems += err.problems
                continue
            found = Checked(corpus.files, corpus.rows, corpus.invalid, [])
            _remember(home, key, found)
            checked.append(found)
    if problems:
        raise DataError(problems)
    return checked
