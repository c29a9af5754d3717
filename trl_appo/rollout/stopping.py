"""Stop ``model.generate`` at a tool protocol's stops, not only at end-of-sequence ids.

``model.generate`` ends a row at its eos ids only, so with the tag protocol every tool turn (``<python>…</python>``)
would decode the whole remaining completion budget, and the engine would throw away everything after the closing
tag. :func:`stopping_criteria` builds transformers stopping criteria from the protocol's ``stop_token_ids`` and
``stop_strings`` (closing tags are several tokens for real tokenizers, hence ``StopStringCriteria``). A stopped row
is padded with the pad id, like a row that met eos; the engine cuts every continuation at the first stop anyway
(``RolloutEngine._stop_cut``), so completions and masks are unchanged up to the stop. These criteria end rows only:
they are never eos ids, so TRL's eos trimming and masks see exactly what they saw before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def stopping_criteria(tokenizer: Any, stop_strings: Sequence[str] = (), stop_token_ids: Iterable[int] = ()):
    """A ``StoppingCriteriaList`` that ends a row at any of the stop ids or stop strings (None when there are none)."""
    from transformers import EosTokenCriteria, StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList()
    ids = sorted({int(t) for t in stop_token_ids if t is not None})
    if ids:
        criteria.append(EosTokenCriteria(eos_token_id=ids))
    if stop_strings:
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings)))
    return criteria or None


@contextlib.contextmanager
def generate_stopping_at(model: Any, criteria) -> Iterator[None]:
    """Within the block, ``model.generate(...)`` also gets ``stopping_criteria=criteria`` (for callers, such as TRL's
    ``_generate_single_turn``, whose generate call takes no criteria). The instance attribute is removed afterwards."""
    if not criteria:
        yield
        return
    had = "generate" in vars(model)
    old = vars(model).get("generate")
    model.generate = functools.partial(model.generate, stopping_criteria=criteria)
    try:
        yield
    finally:
        if had:
            model.generate = old
        else:
            del model.generate


def strip_stop_padding(row: Sequence[int], pad_id: int | None) -> list[int]:
    """A generated row without the padding that ``generate`` writes after a row stopped early.

    Call it only where the pad id is not an eos id (otherwise the first pad is the row's eos, kept as before)."""
    row = list(row)
    end = len(row)
    while pad_id is not None and end > 0 and row[end - 1] == pad_id:
        end -= 1
    return row[:end]
