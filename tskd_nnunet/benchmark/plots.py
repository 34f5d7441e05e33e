"""Figures of the benchmark report: label efficiency, boxplots, worst/median/best overlays.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so
no global backend is switched and nothing needs a display. Every PNG is written atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from tskd_nnunet.atomic_io import atomic_path

PathLike = Union[str, os.PathLike]
ArrayOrPath = Union[np.ndarray, str, os.PathLike]

METRIC_LABELS = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def budget_sort_key(b) -> Tuple[int, float, str]:
    """Numeric budgets in numeric order, anything else (e.g. 'all') after them."""
    try:
        return (0, float(b), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(b))


def sorted_budgets(values) -> List:
    return sorted(pd.unique(pd.Series(list(values))), key=budget_sort_key)


def _method_colors(methods: Sequence[str]) -> Dict[str, tuple]:
    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_label_efficiency(summary: pd.DataFrame, out_png: PathLike, metric: str = "dice") -> Path:
    """Metric (mean, 95% CI bars) against the number of labelled cases, one line per method.

    ``summary`` has dataset, method, budget, status, ``{metric}_mean``, ``{metric}_ci_lo``,
    ``{metric}_ci_hi``. Failed (method, budget) points are drawn as a red cross on the x axis's
    label row, never as a value, and named in the legend.
    """
    datasets = list(pd.unique(summary["dataset"]))
    methods = list(pd.unique(summary["method"]))
    colors = _method_colors(methods)
    fig = new_figure(5.5 * len(datasets) + 1.5, 4.2)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        s = summary[summary["dataset"] == ds]
        budgets = sorted_budgets(s["budget"])
        xpos = {b: i for i, b in enumerate(budgets)}
        # methods side by side at each budget (a small horizontal offset), so overlapping CIs stay readable
        dodge = {m: (i - (len(methods) - 1) / 2) * min(0.06, 0.3 / max(1, len(methods))) for i, m in enumerate(methods)}
        for m in methods:
            g = s[s["method"] == m]
            g = g.iloc[sorted(range(len(g)), key=lambda k: budget_sort_key(g["budget"].iloc[k]))]
            ok = g[np.isfinite(g[f"{metric}_mean"].astype(float))]
            failed = g[g["status"].astype(str).str.startswith("FAILED") & ~np.isfinite(g[f"{metric}_mean"].astype(float))]
            label = m + (f" (FAILED at n={', '.join(map(str, failed['budget']))})" if len(failed) else "")
            if len(ok):
                x = [xpos[b] + dodge[m] for b in ok["budget"]]
                y = ok[f"{metric}_mean"].to_numpy(float)
                err = np.vstack([y - ok[f"{metric}_ci_lo"].to_numpy(float), ok[f"{metric}_ci_hi"].to_numpy(float) - y])
                ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, color=colors[m], label=label)
            elif len(failed):
                ax.plot([], [], marker="x", color=colors[m], linestyle="none", label=label)
            for b in failed["budget"]:
                ax.plot(xpos[b], 0, marker="x", color="red", markersize=10, mew=2, clip_on=False,
                        transform=ax.get_xaxis_transform())
                ax.annotate(f"{m} FAILED", (xpos[b], 0), xycoords=ax.get_xaxis_transform(), xytext=(6, 6),
                            textcoords="offset points", color="red", fontsize=7)
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.set_xlabel("number of labelled training cases")
        ax.set_ylabel(f"mean {METRIC_LABELS.get(metric, metric)} (95% CI)")
        ax.set_title(str(ds))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return save_figure(fig, out_png)


def plot_boxplots(case_values: pd.DataFrame, summary: pd.DataFrame, out_png: PathLike, metric: str = "dice") -> Path:
    """Per-case distribution of a metric: one panel per (dataset, budget), one box per method.

    ``case_values`` has dataset, method, budget, case and the metric (one value per case);
    methods in ``summary`` without values are labelled with their status (e.g. FAILED) in place of a box.
    """
    panels = [(ds, b) for ds in pd.unique(summary["dataset"])
              for b in sorted_budgets(summary.loc[summary["dataset"] == ds, "budget"])]
    methods = list(pd.unique(summary["method"]))
    ncols = min(3, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig = new_figure(max(4.0, 0.9 * len(methods) + 1.5) * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _method_colors(methods)
    for ax, (ds, b) in zip(axes, panels):
        for i, m in enumerate(methods):
            v = case_values.loc[(case_values["dataset"] == ds) & (case_values["budget"] == b)
                                & (case_values["method"] == m), metric].to_numpy(float)
            v = v[np.isfinite(v)]
            if v.size:
                bp = ax.boxplot([v], positions=[i], widths=0.6, patch_artist=True, showfliers=True)
                bp["boxes"][0].set_facecolor((*colors[m][:3], 0.45))
            else:
                st = summary.loc[(summary["dataset"] == ds) & (summary["budget"] == b) & (summary["method"] == m), "status"]
                text = str(st.iloc[0]).split(" ")[0] if len(st) else "MISSING"
                ax.text(i, 0.5, text, transform=ax.get_xaxis_transform(), ha="center", va="center",
                        rotation=90, color="red" if text == "FAILED" else "gray", fontweight="bold")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"{ds}, n={b} labels", fontsize=10)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return save_figure(fig, out_png)


@dataclass
class OverlayItem:
    """One case to draw: image, reference and prediction as arrays or nnU-Net-readable paths."""
    image: ArrayOrPath
    reference: ArrayOrPath
    prediction: ArrayOrPath
    title: str = ""


def _read(x: ArrayOrPath, is_seg: bool) -> np.ndarray:
    if not isinstance(x, (str, os.PathLike)):
        return np.asarray(x)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    name = os.fspath(x)
    ending = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    rw = determine_reader_writer_from_file_ending(ending, verbose=False)()
    arr, _ = rw.read_seg(name) if is_seg else rw.read_images((name,))
    return np.asarray(arr)[0]  # first channel


def _to_2d(image: np.ndarray, ref: np.ndarray, pred: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squeeze singleton axes; for 3D take the slice (axis 0) where the reference (else prediction) is largest."""
    image, ref, pred = (np.squeeze(a) for a in (image, ref, pred))
    if image.ndim == 3 and image.shape[-1] in (3, 4) and ref.ndim == 2:  # RGB image
        image = image.mean(-1)
    if ref.ndim == 3:
        area = (ref > 0).sum(axis=(1, 2))
        if not area.any():
            area = (pred > 0).sum(axis=(1, 2))
        z = int(np.argmax(area))
        image, ref, pred = image[z], ref[z], pred[z]
    return image, ref, pred


def select_worst_median_best(scores: pd.Series) -> List[Tuple[str, str]]:
    """[('worst', case), ('median', case), ('best', case)] from a Series of per-case scores (higher = better)."""
    s = scores.dropna().sort_values(kind="stable")
    if s.empty:
        return []
    return [("worst", s.index[0]), ("median", s.index[(len(s) - 1) // 2]), ("best", s.index[-1])]


def plot_overlay_grid(rows: Sequence[Sequence[Optional[OverlayItem]]], row_labels: Sequence[str],
                      out_png: PathLike, col_labels: Sequence[str] = ("worst", "median", "best")) -> Path:
    """Grid of image overlays: reference contour-filled green, prediction red, overlap yellow.

    3D arrays are shown at the slice where the reference is largest. ``None`` cells stay blank.
    """
    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig = new_figure(3.2 * ncols + 0.5, 3.2 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # 0 none, 1 reference only, 2 prediction only, 3 both
    cmap = ListedColormap([(0, 0, 0, 0), (0.1, 0.9, 0.1, 0.5), (0.95, 0.1, 0.1, 0.5), (1.0, 0.9, 0.0, 0.35)])
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            item = row[j] if j < len(row) else None
            if item is None:
                ax.set_axis_off()
                continue
            img, ref, pred = _to_2d(_read(item.image, False), _read(item.reference, True), _read(item.prediction, True))
            lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0, 1)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            code = (ref > 0).astype(np.uint8) + 2 * (pred > 0).astype(np.uint8)
            ax.imshow(code, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(item.title or (col_labels[j] if j < len(col_labels) else ""), fontsize=9)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=9)
    fig.suptitle("green: reference only, red: prediction only, yellow: both", fontsize=9)
    return save_figure(fig, out_png)
