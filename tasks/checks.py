"""The data checks a run makes before any model loads, shared by `lifecycle validate` and the flow.

Files read whole are validated by their pandera contracts; streamed corpora are checked line
by line at flat memory. Every problem of every file is gathered into one DataError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.data import DataError, Problem, Validated, check_files
from schemas.spec import PipelineSpec

if TYPE_CHECKING:
    from stages.streaming import CorpusCheck


def check_contracts(spec: PipelineSpec) -> tuple[dict[str, Validated], list[CorpusCheck]]:
    """Every data file of the spec against its contract, streamed corpora line by line; all problems at once."""
    problems: list[Problem] = []
    try:
        results = check_files(spec.data_contracts())
    except DataError as err:
        results, problems = {}, err.problems
    corpora = []
    if spec.streamed():
        from stages.streaming import check_corpus  # loads torch: only specs that stream pay for it

        for stage in spec.streamed():
            try:
                corpora.append(check_corpus(stage.data, stage.on_invalid))
            except DataError as err:
                problems += err.problems
    if problems:
        raise DataError(problems)
    return results, corpora
