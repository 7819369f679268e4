"""History (state.History) as a user reads it: rows, best(), its text and HTML tables, its state; and the curves
drawn from it (plots.py): integer epoch ticks, a log axis for losses over more than two decades, resume marks."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etappe.errors import UsageError
from etappe.plots import figure, log_scale, plot_history, render
from etappe.state import History

losses = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False)
rows_strategy = st.lists(
    st.fixed_dictionaries({"train_loss": losses, "val_loss": losses,
                           "val_accuracy": st.floats(min_value=0, max_value=1)}),
    min_size=1, max_size=30)


def history_of(rows: list[dict], resumed: list[float] = ()) -> History:
    h = History()
    for i, row in enumerate(rows, start=1):
        order = [k for k in ("train_loss", "val_loss", "val_accuracy") if k in row]  # as the loop writes them
        h.append({"epoch": i, "step": 10 * i, **{k: row[k] for k in order}, **row})
    for x in resumed:
        h.mark_resumed(x)
    return h


class Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows, self.headers, self.tables = 0, [], 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        self.rows += tag == "tr"
        self._in_th = tag == "th"

    def handle_data(self, data):
        if getattr(self, "_in_th", False):
            self.headers.append(data)
            self._in_th = False


def test_rows_are_plain_dict_copies_and_index_like_a_list():
    h = history_of([{"train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9}] * 3)
    assert type(h[-1]) is dict and h[-1]["epoch"] == 3 and h[0]["epoch"] == 1
    h[-1]["train_loss"] = 99.0  # a copy: the history itself is unchanged
    assert h[-1]["train_loss"] == 0.5 and h.rows[-1]["train_loss"] == 0.5
    assert [r["epoch"] for r in h] == [1, 2, 3] and len(h) == 3
    assert [r["epoch"] for r in h[1:3]] == [2, 3] and all(type(r) is dict for r in h[:])
    with pytest.raises(IndexError, match=r"history\[5\]: this history has 3 epochs"):
        h[5]
    with pytest.raises(UsageError, match="expected a metric's name"):
        h.best(None)


def test_best_takes_the_lowest_loss_and_the_highest_accuracy_and_names_what_it_has():
    h = history_of([{"train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.7},
                    {"train_loss": 0.8, "val_loss": 0.3, "val_accuracy": 0.8},
                    {"train_loss": 0.6, "val_loss": 0.4, "val_accuracy": 0.9}])
    assert h.best()["epoch"] == 2  # val_loss by default, lowest
    assert h.best("val_accuracy")["epoch"] == 3  # "acc": highest
    assert h.best("val_loss", mode="max")["epoch"] == 1
    with pytest.raises(UsageError, match="no epoch of this history has 'val_acc'; its metrics are: .*val_accuracy"):
        h.best("val_acc")
    with pytest.raises(UsageError, match="expected 'min' or 'max'"):
        h.best("val_loss", mode="lowest")
    with pytest.raises(UsageError, match="no epochs yet"):
        History().best()


@given(rows_strategy, st.sampled_from(["train_loss", "val_loss", "val_accuracy"]), st.sampled_from([None, "min", "max"]))
def test_best_is_the_first_epoch_with_the_extreme_value(rows, metric, mode):
    h = history_of(rows)
    values = [r[metric] for r in rows]
    highest = mode == "max" or (mode is None and "acc" in metric)
    target = max(values) if highest else min(values)
    assert h.best(metric, mode)["epoch"] == values.index(target) + 1


@given(rows_strategy, st.lists(st.floats(min_value=0, max_value=30), max_size=3))
def test_state_dict_round_trips_and_an_uninterrupted_history_keeps_its_old_format(rows, resumed):
    h = history_of(rows, resumed)
    state = h.state_dict()
    assert set(state) == ({"epochs", "resumed"} if resumed else {"epochs"})  # checkpoints of straight runs unchanged
    again = History()
    again.load_state_dict(state)
    assert again.rows == h.rows and again.resumed == [float(x) for x in resumed]
    old = History()
    old.load_state_dict({"epochs": state["epochs"]})  # a checkpoint from before resume marks
    assert old.rows == h.rows and old.resumed == []


@given(rows_strategy)
def test_repr_and_html_show_one_line_per_epoch_up_to_twenty_then_the_ends(rows):
    h = history_of(rows)
    shown = min(len(rows), 21)  # 20 epochs, or the first and last ten with "..." between
    lines = repr(h).splitlines()
    assert lines[0] == f"History({len(rows)} epochs)"
    assert lines[1].split() == ["epoch", "step", "train_loss", "val_loss", "val_accuracy"]
    assert len(lines) == 2 + shown
    assert lines[-1].split()[0] == str(len(rows))
    cells = Cells()
    cells.feed(h._repr_html_())
    assert cells.tables == 1 and cells.rows == 1 + shown
    assert cells.headers == ["epoch", "step", "train_loss", "val_loss", "val_accuracy"]


def test_repr_formats_values_for_reading():
    h = history_of([{"train_loss": 0.94801, "val_loss": 2e-5, "val_accuracy": 0.5}])
    h.epochs[0].update(lr=0.001, seconds=3.2931, samples_per_s=1234.6)
    assert repr(h).splitlines()[2].split() == ["1", "10", "0.9480", "2e-05", "0.5000", "0.001", "3.3", "1,235"]
    h.mark_resumed(0.5)
    assert repr(h).startswith("History(1 epochs; resumed after 0.50 epochs)")
    assert repr(History()) == "History(no epochs yet)"
    assert "&lt;b&gt;" in history_of([{"train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 1.0, "note": "<b>"}])._repr_html_()


@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(), st.integers()), max_size=20))
def test_log_scale_exactly_when_positive_finite_losses_span_more_than_two_decades(values):
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    expected = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100
    assert log_scale(values) == expected


def test_log_scale_examples():
    assert log_scale([0.5, 0.01, 0.001]) and not log_scale([2.3, 0.05]) and not log_scale([1.0, 0.0, 1e-5])


@settings(max_examples=15, deadline=None)
@given(rows_strategy, st.lists(st.floats(min_value=0, max_value=30), max_size=2))
def test_figure_has_integer_epoch_ticks_a_log_axis_when_due_and_one_mark_per_resume(rows, resumed):
    fig = figure(history_of(rows).epochs, resumed)
    loss_ax, acc_ax = fig.axes
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        marks = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(marks) == len(resumed)
    assert (loss_ax.get_yscale() == "log") == log_scale([r[k] for r in rows for k in ("train_loss", "val_loss")])
    assert [line.get_label() for line in loss_ax.lines[:2]] == ["train loss", "validation loss"]


def test_sine_like_losses_are_drawn_on_a_log_axis_and_files_are_images(tmp_path):
    rows = [{"epoch": i, "train_loss": 0.5 * 10 ** -i, "val_loss": 0.6 * 10 ** -i} for i in range(1, 6)]
    assert figure(rows).axes[0].get_yscale() == "log" and len(figure(rows).axes) == 1  # no accuracy axis
    assert render(rows)[:8] == b"\x89PNG\r\n\x1a\n"
    out = plot_history(rows, tmp_path / "curves.svg", resumed=[2.5])
    assert out.read_bytes().lstrip().startswith(b"<?xml") and b"resumed" in out.read_bytes()
    with pytest.raises(UsageError, match=r"cannot draw .*curves.txt: '.txt' is not an image format .*\.png"):
        plot_history(rows, tmp_path / "curves.txt")


def test_drawing_leaves_pyplot_and_its_backend_alone():
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    render([{"epoch": 1, "train_loss": 1.0}])
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend
