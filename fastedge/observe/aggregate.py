"""Merge Prometheus text expositions from several processes into one.

``fastedge run --workers N`` runs N processes, each with its own
:class:`~fastedge.observe.metrics.Metrics`; the supervisor's admin ``GET /metrics``
scrapes every worker and answers one exposition in which samples with the same name and
labels are **summed**. That is right for counters (requests, errors), histogram buckets,
sums and counts (the merged histogram is the histogram of all requests), and for the
gauges fastedge exports (open connections, pool sizes, queue lengths: totals across the
instance, as are the process metrics: CPU seconds, resident memory, open descriptors).
A gauge that holds the same value in every process comes out multiplied by the number of
workers (``process_max_fds``: the descriptors the instance may open in all).

Input is what :meth:`Metrics.render` writes (format 0.0.4, no timestamps): ``# HELP`` and
``# TYPE`` lines, then ``name{labels} value`` lines. Samples are matched by their name and
their label text exactly as rendered; every process renders labels in the same
deterministic order, so equal labels have equal text and nothing needs unescaping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fastedge.observe.metrics import MetricFamily, _escape_help, _format_labels, _format_value

__all__ = ["ExpositionError", "merge_expositions"]

_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
# Sample-name suffixes that belong to the family without them (exposition format spec).
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_info")


class ExpositionError(ValueError):
    """A line of an exposition could not be parsed."""


@dataclass
class _Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    # (sample name, rendered labels) -> summed value; dicts keep first-seen order.
    samples: dict[tuple[str, str], float] = field(default_factory=dict)


def _family_of(sample: str, current: _Family | None) -> str:
    """The family a sample line belongs to: the family announced last when the sample is
    its name or its name plus a standard suffix, else a family of its own."""
    if current is not None and (
        sample == current.name
        or (sample.startswith(current.name) and sample[len(current.name) :] in _SUFFIXES)
    ):
        return current.name
    return sample


def _parse_value(text: str, line: str) -> float:
    try:
        return float(text)  # accepts NaN, +Inf, -Inf as the format writes them
    except ValueError:
        raise ExpositionError(f"bad sample value in {line!r}") from None


def _merge_one(text: str, families: dict[str, _Family]) -> None:
    current: _Family | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                current = families.setdefault(name, _Family(name))
                rest = parts[3] if len(parts) == 4 else ""
                if parts[1] == "TYPE":
                    if rest not in _TYPES:
                        raise ExpositionError(f"unknown metric type in {line!r}")
                    current.type = rest
                elif current.help is None:
                    # Unescape what the writer escaped (backslash and line feed only).
                    current.help = rest.replace("\\n", "\n").replace("\\\\", "\\")
            continue  # other comments are allowed and ignored
        # `name{labels} value`: label values may hold spaces and braces, the value never
        # does, so the value is after the last space.
        head, sep, value_text = line.rpartition(" ")
        if not sep or not head:
            raise ExpositionError(f"bad sample line {line!r}")
        brace = head.find("{")
        sample, labels = (head, "") if brace == -1 else (head[:brace], head[brace:])
        if not sample or (labels and not labels.endswith("}")):
            raise ExpositionError(f"bad sample line {line!r}")
        family = families.get(_family_of(sample, current))
        if family is None:
            family = families[sample] = _Family(sample)
        key = (sample, labels)
        family.samples[key] = family.samples.get(key, 0.0) + _parse_value(value_text, line)


def merge_expositions(texts: Iterable[bytes], extra: Sequence[MetricFamily] = ()) -> bytes:
    """Sum ``texts`` (Prometheus text format 0.0.4) sample by sample into one exposition.

    ``extra`` families (e.g. the supervisor's own ``fastedge_workers`` gauge) are added as
    if a further process had reported them. Families come out sorted by name, like
    :meth:`Metrics.render`; HELP and TYPE are taken from the first text that gives them.
    Raises :class:`ExpositionError` on a line that is not valid exposition text.
    """
    families: dict[str, _Family] = {}
    for text in texts:
        _merge_one(text.decode("utf-8"), families)
    for extra_family in extra:
        family = families.setdefault(extra_family.name, _Family(extra_family.name))
        family.type = extra_family.type
        if family.help is None:
            family.help = extra_family.help
        for sample, labels, value in extra_family.samples:
            key = (sample, _format_labels(labels))
            family.samples[key] = family.samples.get(key, 0.0) + value
    lines: list[str] = []
    for name in sorted(families):
        family = families[name]
        if family.help is not None:
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {name} {family.type}")
        lines.extend(
            f"{sample}{labels} {_format_value(value)}"
            for (sample, labels), value in family.samples.items()
        )
    return ("\n".join(lines) + "\n").encode() if lines else b""
