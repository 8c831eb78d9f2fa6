"""Every figure of the stages and the tutorials, drawn by ``plot_panels`` (panels side by side with
a caption that says what to see) and ``plot_scatter``; ``plot_metrics`` and ``plot_metric_panels``
draw a run's logged metrics against the step, ``plot_truth_and_kl`` the truth.png that DPO and
rejection sampling share. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from . import files


def plot_panels(path, panels: list[dict], caption: str = "", title: str = "", width: float = 5.0,
                height: float = 4.0, columns: int | None = None) -> Path:
    """Panels in one PNG (side by side, or in rows of ``columns``), with a caption under them that
    says what to see.

    One panel per unit. Each panel is a dict with ``title``, ``xlabel`` and ``ylabel`` (each naming
    its unit) and ``curves``, a list of ``(x, y, label)``, ``(x, y, label, fmt)`` or ``(x, y, label,
    fmt, style)`` (``style``: matplotlib's keywords, e.g. ``{"markersize": 16}``) whose labels are
    words, not metric keys; optional ``hlines`` (a list of ``(y, label)``), ``bars`` (a list of
    ``(x, heights, label)``), ``notes`` (a list of ``(x, y, text)`` written beside a point),
    ``arrows`` (True: each curve's points joined by arrows, in the order given), ``xlim``,
    ``ylim``, ``xscale``, ``yscale``, ``xticks`` (positions, labels) and ``legend`` (a matplotlib
    legend location, ``"outside"`` to the right of the panel, or False).

    So that every measurement shows: a series of at most 30 points drawn without a ``fmt`` gets
    markers, and one much sparser than another curve of its panel (a held-out figure measured every
    few hundred steps beside a training curve) is drawn as markers alone, not as a line between
    them. A ``ylim`` that cuts points off (with no ``xlim``) gets a panel of the whole range before
    it, its zoom.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for panel in panels for p in _with_whole_range(panel)]
    columns = min(columns or len(panels), len(panels))
    rows = -(-len(panels) // columns)
    fig_width = max(width * columns, 6.5)  # a lone panel gets room for its caption
    fig, axes = plt.subplots(rows, columns, figsize=(fig_width, height * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        curves = [c for c in panel.get("curves", []) if len(c[0])]
        densest = max((len(c[0]) for c in curves), default=0)
        for x, y, label, *fmt in curves:
            style = dict(fmt[1]) if len(fmt) > 1 else {}
            fmt = fmt[:1]
            if not fmt and densest > 30 and 3 * len(x) <= densest:
                style = {"marker": "o", "linestyle": "none", **style}
            elif not fmt and len(x) <= 30:
                style = {"marker": "o", **style}
            if panel.get("arrows"):
                style = {"linestyle": "none", **style}
            (line,) = ax.plot(x, y, *fmt, label=label, **style)
            if panel.get("arrows"):
                for i in range(len(x) - 1):
                    ax.annotate("", xy=(x[i + 1], y[i + 1]), xytext=(x[i], y[i]),
                                arrowprops={"arrowstyle": "->", "color": line.get_color(), "lw": 1.2,
                                            "shrinkA": 4, "shrinkB": 4})
        bars = panel.get("bars", [])
        for i, (x, heights, label) in enumerate(bars):
            w = 0.8 / len(bars)
            ax.bar([xi + (i - (len(bars) - 1) / 2) * w for xi in x], heights, w, label=label)
        for y, label in panel.get("hlines", []):
            ax.axhline(y, linestyle="--", color="gray", label=label)
        for x, y, text in panel.get("notes", []):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for key in ("xscale", "yscale"):
            if panel.get(key):
                getattr(ax, f"set_{key}")(panel[key])
        if panel.get("xlim") is not None:
            ax.set_xlim(*panel["xlim"])
        if panel.get("ylim") is not None:
            ax.set_ylim(*panel["ylim"])
        if panel.get("xticks") is not None:
            ax.set_xticks(*panel["xticks"])
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        where = panel.get("legend", "best")
        if where and ax.get_legend_handles_labels()[0]:
            if where == "outside":
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
            else:
                ax.legend(loc=where, fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path, caption)
    plt.close(fig)
    return Path(path)


def _with_whole_range(panel: dict) -> list[dict]:
    """``[panel]``, or, when its ``ylim`` cuts off points of its curves (a zoom on the end of a
    run), a panel of the whole range first and the zoom after it, so that no point is hidden. A
    panel with an ``xlim`` as well is a zoom on a region, whose outside is meant to be cut."""
    ylim, xlim = panel.get("ylim"), panel.get("xlim")
    if xlim is not None:
        return [panel]
    ys = [v for c in panel.get("curves", []) for v in c[1] if v == v]  # v == v: not NaN
    if ylim is None or not ys or ylim[0] <= min(ys) and max(ys) <= ylim[1]:
        return [panel]
    whole = {k: v for k, v in panel.items() if k != "ylim"}
    whole["title"] = f"{panel.get('title', '')}: the whole run".lstrip(": ")
    zoom = {**panel, "title": f"zoom on the range [{ylim[0]:.3g}, {ylim[1]:.3g}]", "legend": False}
    return [whole, zoom]


def _save(fig, path, caption: str) -> None:
    """Write ``fig`` with ``caption`` in italics under it, wrapped to the figure's width."""
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(caption, int(width * 15)) if caption else []
    if lines:
        fig.text(0.5, 0.02, "\n".join(lines), ha="center", va="bottom", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, (0.08 + 0.17 * len(lines)) / height if lines else 0, 1, 1))
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=Path(path).suffix[1:] or "png"))


def plot_scatter(path, x, y, xlabel: str, ylabel: str, title: str = "", caption: str = "",
                 jitter: float = 0.0) -> Path:
    """One point per item, ``y`` against ``x`` (``jitter`` spreads an ``x`` that takes few values)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    dx = np.random.default_rng(0).uniform(-jitter, jitter, len(x)) if jitter else 0.0
    ax.scatter(np.asarray(x) + dx, y, s=6, alpha=0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _save(fig, path, caption)
    plt.close(fig)
    return Path(path)


def plot_metrics(run, keys, filename: str, title: str = "", hlines: dict | None = None, ylabel: str = "",
                 ylim: tuple | None = None, caption: str = "", xlabel: str = "step") -> Path | None:
    """One panel of ``run``'s logged metrics against the step: ``keys`` maps each metric to its
    legend in words (a list of keys is drawn with the keys as labels); ``hlines`` maps a label to a
    horizontal line; ``ylabel`` and ``xlabel`` name the unit; ``caption`` says what to see."""
    panel = {"metrics": keys, "title": title, "ylabel": ylabel, "xlabel": xlabel,
             "hlines": [(y, label) for label, y in (hlines or {}).items()], "ylim": ylim}
    return plot_metric_panels(run, filename, [panel], caption)


def plot_metric_panels(run, filename: str, panels: list[dict], caption: str = "", title: str = "") -> Path | None:
    """``plot_panels`` of ``run``'s logged metrics, into its folder: a panel's ``metrics``
    ({key: legend}) are drawn against the step, beside any explicit ``curves`` it has. Only the
    writing rank draws (under torchrun, rank 0)."""
    if not run.writes:
        return None
    drawn = []
    for panel in panels:
        metrics = panel.get("metrics") or {}
        labels = metrics if isinstance(metrics, dict) else {k: k for k in metrics}
        curves = [run.series(key) + (label,) for key, label in labels.items()]
        drawn.append({**panel, "curves": curves + list(panel.get("curves", []))})
    return plot_panels(run.dir / filename, drawn, caption, title)


def plot_truth_and_kl(run, x: str, truth: dict, start: float, caption: str) -> Path | None:
    """truth.png of a stage that trains a policy away from pi_ref: what the hidden truth says of the
    policy's samples (``truth``: a panel's ``title``, ``metrics`` and ``ylabel``), the start model's
    value dashed, beside the KL to pi_ref that was paid for it (the logged ``kl``)."""
    return plot_metric_panels(run, "truth.png", [
        {**truth, "hlines": [(start, f"SFT model, {start:.3f}")], "xlabel": x},
        {"title": "distance from the reference", "metrics": {"kl": "KL(pi_theta || pi_ref), sampled"}, "xlabel": x,
         "ylabel": "KL, nats per response"}], caption)


def standardise(values: list[float]) -> list[float]:
    """(v - mean) / std over the list (all 0 if the values are all equal): two series of different
    units on one axis, when only their trends compare."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out
