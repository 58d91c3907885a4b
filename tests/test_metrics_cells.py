"""Counter cells (``Metrics.counter``): the same series ``Metrics.inc`` adds to, held as
an object whose ``inc()`` adds one. Every test compares with a registry fed only through
``Metrics.inc`` for the same operations: the scrape must not tell the two apart (same
render bytes), whatever mix of cells and ``inc`` calls produced it.

Also ``_bucket`` (now ``cpdef`` on a C double): still ``bisect_left`` over the bounds.

Each test runs on the compiled registry and on the pure-Python source of the same module
(loaded from metrics.py under another name), since both builds ship.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from bisect import bisect_left
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastedge.observe.metrics as metrics_module
from fastedge.observe.metrics import DURATION_BUCKETS


def _python_twin() -> ModuleType:
    """fastedge/observe/metrics.py itself, whatever the compiled build imports."""
    name = "_fastedge_metrics_python_twin"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(metrics_module.__file__).parent / "metrics.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


IMPLS = {"compiled": metrics_module, "python": _python_twin()}
impls = pytest.mark.parametrize("mod", list(IMPLS.values()), ids=list(IMPLS))

NAME = "fastedge_test_cells_total"
OTHER = "fastedge_test_other_total"
A = (("policy", "p"), ("result", "ok"))
B = (("policy", "p"), ("result", "invalid"))
C = (("policy", "q"), ("result", "ok"))


def counter_lines(m: Any, name: str) -> list[str]:
    """The HELP, TYPE and sample lines of family ``name`` in ``m``'s scrape."""
    return [
        line
        for line in m.render().decode().splitlines()
        if line.startswith((name, f"# HELP {name} ", f"# TYPE {name} "))
    ]


# --------------------------------------------------------------------------- identity


def test_compiled_metrics_module_is_the_extension() -> None:
    """The tests below run against the compiled registry (not a silent fallback)."""
    assert metrics_module.__file__ is not None and metrics_module.__file__.endswith(".so")


@impls
def test_same_name_and_labels_give_the_same_cell(mod: ModuleType) -> None:
    """Equal labels (even a distinct tuple) give the very same cell; another label set or
    another name gives another one. A new cell starts at zero."""
    m = mod.Metrics()
    cell = m.counter(NAME, A)
    assert isinstance(cell, mod.Counter)
    assert cell.value == 0
    assert m.counter(NAME, (("policy", "p"), ("result", "ok"))) is cell
    assert m.counter(NAME, B) is not cell
    assert m.counter(OTHER, A) is not cell
    assert m.counter(NAME) is m.counter(NAME, ())  # no labels: one series too
    # Label order is part of the series (as with inc): reversed pairs are another cell.
    assert m.counter(NAME, tuple(reversed(A))) is not cell
    cell.inc()
    cell.inc()
    assert m.counter(NAME, A).value == 2
    assert m.counter(NAME, B).value == 0


# --------------------------------------------------------------------------- render


@impls
def test_cell_and_inc_values_are_summed(mod: ModuleType) -> None:
    """Two cell increments and ``inc(..., 3)`` on the same series render as one sample
    of 5, byte for byte what five ``inc`` of one render."""
    m, ref = mod.Metrics(), mod.Metrics()
    cell = m.counter(NAME, A)
    cell.inc()
    m.inc(NAME, A, 3)
    cell.inc()
    for _ in range(5):
        ref.inc(NAME, A)
    assert counter_lines(m, NAME)[-1] == f'{NAME}{{policy="p",result="ok"}} 5'
    assert m.render() == ref.render()


@impls
def test_integral_sums_render_as_integers(mod: ModuleType) -> None:
    """A cell's value is a float (a C double compiled); whole sums still render as
    ``3``, not ``3.0``, and fractional ones as the float."""
    m = mod.Metrics()
    cell = m.counter(NAME, A)
    for _ in range(3):
        cell.inc()
    assert counter_lines(m, NAME)[-1].endswith("} 3")
    m.inc(NAME, A, 0.5)
    assert counter_lines(m, NAME)[-1].endswith("} 3.5")
    ref = mod.Metrics()
    ref.inc(NAME, A, 3)
    ref.inc(NAME, A, 0.5)
    assert m.render() == ref.render()


@impls
def test_zero_cells_are_not_rendered(mod: ModuleType) -> None:
    """A cell that never counted adds no sample; a family of zero cells only adds no
    family at all (no HELP or TYPE line either), as if never touched."""
    m = mod.Metrics()
    m.describe(OTHER, "counter", "Never counted.")
    m.counter(OTHER, A)
    m.counter(OTHER, B)
    m.counter(NAME, A)  # stays zero
    m.counter(NAME, B).inc()
    text = m.render().decode()
    assert OTHER not in text
    assert 'result="ok"' not in text
    assert counter_lines(m, NAME)[-1] == f'{NAME}{{policy="p",result="invalid"}} 1'
    assert OTHER not in {f.name for f in m.families()}
    ref = mod.Metrics()
    ref.describe(OTHER, "counter", "Never counted.")
    ref.inc(NAME, B)
    assert m.render() == ref.render()


@impls
def test_a_zero_cell_with_an_inc_series_shows_the_inc_value(mod: ModuleType) -> None:
    """A zero cell does not hide the series ``inc`` made (even ``inc(..., 0)``): the
    sample is the ``inc`` total, as without the cell."""
    m, ref = mod.Metrics(), mod.Metrics()
    m.counter(NAME, A)
    m.counter(NAME, B)
    m.inc(NAME, A, 2)
    m.inc(NAME, B, 0)
    ref.inc(NAME, A, 2)
    ref.inc(NAME, B, 0)
    assert m.render() == ref.render()
    assert f'{NAME}{{policy="p",result="invalid"}} 0' in counter_lines(m, NAME)


@pytest.mark.parametrize("described", [True, False], ids=["described", "default-help"])
@impls
def test_a_cells_only_counter_is_rendered_with_its_help(mod: ModuleType, described: bool) -> None:
    """A counter with cells and no ``inc`` series is a family of its own, with the HELP
    and TYPE ``describe`` gave it (or the default from its name, as for ``inc``)."""
    m, ref = mod.Metrics(), mod.Metrics()
    if described:
        for r in (m, ref):
            r.describe(NAME, "counter", "Cells only.\nSecond line.")
    m.counter(NAME, A).inc()
    ref.inc(NAME, A)
    help_text = "Cells only.\\nSecond line." if described else NAME.replace("_", " ")
    assert counter_lines(m, NAME) == [
        f"# HELP {NAME} {help_text}",
        f"# TYPE {NAME} counter",
        f'{NAME}{{policy="p",result="ok"}} 1',
    ]
    assert m.render() == ref.render()
    (family,) = (f for f in m.families() if f.name == NAME)
    assert family.type == "counter"
    assert [(s[0], s[1], s[2]) for s in family.samples] == [(NAME, A, 1)]


@impls
def test_cells_across_label_sets_are_sorted_like_inc_series(mod: ModuleType) -> None:
    """Cells made in any order render in the order ``inc`` series do (sorted labels),
    mixed with ``inc`` series of other label sets of the same name."""
    label_sets = [C, B, (("policy", "a"), ("result", "z")), A, ()]
    m, ref = mod.Metrics(), mod.Metrics()
    for i, labels in enumerate(label_sets):
        cell = m.counter(NAME, labels)
        for _ in range(i + 1):
            cell.inc()
        ref.inc(NAME, labels, i + 1)
    m.inc(NAME, (("policy", "m"), ("result", "x")), 7)  # an inc-only series between them
    ref.inc(NAME, (("policy", "m"), ("result", "x")), 7)
    assert m.render() == ref.render()
    samples = [line for line in counter_lines(m, NAME) if not line.startswith("#")]
    assert samples == [
        f"{NAME} 5",
        f'{NAME}{{policy="a",result="z"}} 3',
        f'{NAME}{{policy="m",result="x"}} 7',
        f'{NAME}{{policy="p",result="invalid"}} 2',
        f'{NAME}{{policy="p",result="ok"}} 4',
        f'{NAME}{{policy="q",result="ok"}} 1',
    ]


@impls
def test_families_are_sorted_by_name_with_cells_only_ones(mod: ModuleType) -> None:
    """A cells-only family takes its place among the others by name in the scrape."""
    m, ref = mod.Metrics(), mod.Metrics()
    m.counter("fastedge_zz_total").inc()
    m.inc("fastedge_aa_total")
    m.counter("fastedge_mm_total", A).inc()
    for name, labels in (
        ("fastedge_zz_total", ()),
        ("fastedge_aa_total", ()),
        ("fastedge_mm_total", A),
    ):
        ref.inc(name, labels)
    assert m.render() == ref.render()
    types = [line.split()[2] for line in m.render().decode().splitlines() if "# TYPE" in line]
    assert types == sorted(types)
    assert {"fastedge_aa_total", "fastedge_mm_total", "fastedge_zz_total"} <= set(types)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["bad-name", "1abc", "", "a b", "fastedge_é_total", "x{y}"])
@impls
def test_a_bad_metric_name_raises_like_inc(mod: ModuleType, name: str) -> None:
    """``counter`` refuses what ``inc`` refuses, with the same error, and registers
    nothing: the scrape is the same as a fresh registry's, and asking again still fails."""
    with pytest.raises(ValueError, match="invalid metric name") as from_inc:
        mod.Metrics().inc(name, A)
    m = mod.Metrics()
    with pytest.raises(ValueError, match="invalid metric name") as from_counter:
        m.counter(name, A)
    assert str(from_counter.value) == str(from_inc.value)
    with pytest.raises(ValueError, match="invalid metric name"):
        m.counter(name, B)
    assert m.render() == mod.Metrics().render()


@impls
def test_a_good_name_with_colons_is_accepted(mod: ModuleType) -> None:
    """Colons are allowed in metric names (recording rules), for cells as for inc."""
    m, ref = mod.Metrics(), mod.Metrics()
    m.counter("fastedge:test_total", A).inc()
    ref.inc("fastedge:test_total", A)
    assert m.render() == ref.render()


# --------------------------------------------------------------------------- property

_NAMES = st.sampled_from([NAME, OTHER, "fastedge_third_total"])
_LABELS = st.sampled_from([(), A, B, C, (("policy", 'q"\\'), ("result", "ok\n"))])
# Whole numbers and exact binary fractions: their sums do not depend on the order of
# addition, so the cells' separate totals add up to the same float as inc's running one.
_AMOUNTS = st.integers(0, 1000) | st.sampled_from([0.5, 0.25, 1.75, 2.0])
_OPS = st.lists(
    st.tuples(st.sampled_from(["cell", "inc", "touch", "describe"]), _NAMES, _LABELS, _AMOUNTS),
    max_size=40,
)


@impls
@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_any_mix_of_cells_and_inc_renders_as_inc_alone(
    mod: ModuleType, ops: list[tuple[Any, ...]]
) -> None:
    """For any sequence of cell increments, ``inc`` calls, cells taken and never used,
    and ``describe``: the scrape equals a registry that only saw ``inc`` (a cell
    increment is ``inc(name, labels)``; a cell never used is nothing)."""
    m, ref = mod.Metrics(), mod.Metrics()
    for op, name, labels, amount in ops:
        if op == "cell":
            cell = m.counter(name, labels)
            for _ in range(int(amount) % 4 + 1):
                cell.inc()
                ref.inc(name, labels)
        elif op == "inc":
            m.inc(name, labels, amount)
            ref.inc(name, labels, amount)
        elif op == "touch":
            m.counter(name, labels)
        else:
            for r in (m, ref):
                r.describe(name, "counter", f"help {amount}")
    assert m.render() == ref.render()
    assert sorted(f.name for f in m.families()) == sorted(f.name for f in ref.families())


@impls
def test_cells_keep_counting_after_a_scrape(mod: ModuleType) -> None:
    """Rendering reads the cells; it neither resets nor detaches them."""
    m = mod.Metrics()
    cell = m.counter(NAME, A)
    cell.inc()
    first = m.render()
    assert first == m.render()
    cell.inc()
    assert m.counter(NAME, A) is cell
    assert counter_lines(m, NAME)[-1].endswith("} 2")


# --------------------------------------------------------------------------- _bucket


def _bucket_values() -> list[float]:
    values: list[float] = [0.0, -0.0, -1.0, 1e-9, 100.0, 1e300, math.inf, -math.inf]
    for bound in DURATION_BUCKETS:
        values += [bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)]
    return values


@impls
@pytest.mark.parametrize("seconds", _bucket_values())
def test_bucket_is_bisect_left(mod: ModuleType, seconds: float) -> None:
    """The cpdef ``_bucket`` (callable from Python) is ``bisect_left`` over the bounds:
    a value on a bound falls in that bound's bucket (Prometheus ``le``)."""
    assert mod._bucket(seconds) == bisect_left(DURATION_BUCKETS, seconds)


@impls
@given(seconds=st.floats(allow_nan=False) | st.integers(-(10**6), 10**6))
def test_bucket_is_bisect_left_for_any_number(mod: ModuleType, seconds: float) -> None:
    """Floats of any size, and ints (converted to a C double when compiled)."""
    assert mod._bucket(seconds) == bisect_left(DURATION_BUCKETS, seconds)
