"""One rule for every family: a checkpoint either matches the model key for key and shape
for shape, or the user gets one sentence naming what is missing, extra or mis-shaped."""

from __future__ import annotations

from collections.abc import Mapping

from medalign.core.errors import CheckpointError

Shape = tuple[int, ...]


def key_list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_keys(
    expected: Mapping[str, Shape],
    found: Mapping[str, Shape],
    what: str,
    ignorable: Mapping[str, Shape] | None = None,
) -> None:
    """Raise CheckpointError("<what> does not match the model: missing keys ...; ...") on any mismatch.

    ``ignorable`` keys may be present (e.g. stale buffers a family deliberately drops) but
    must still have their documented shape.
    """
    ignorable = ignorable or {}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in ignorable]
    wrong = [
        f"{k} {list(shape)} (expected {list(want)})"
        for k, shape in found.items()
        if (want := expected.get(k, ignorable.get(k))) is not None and tuple(shape) != tuple(want)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {key_list(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected keys {key_list(sorted(unexpected))}")
    if wrong:
        problems.append(f"wrong shapes {key_list(sorted(wrong), 4)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: {'; '.join(problems)}.")


def shapes(tensors: Mapping) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in tensors.items()}
