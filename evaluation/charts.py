"""The plots a run and a comparison log to MLflow, drawn with Pillow.

Pillow rather than matplotlib because of when they are drawn: at the end of every
run, inside the time tracking may cost (under 3% of a Split-MNIST run). Importing
matplotlib alone takes 0.6 s here and a figure 0.1 s; these take milliseconds.
Every chart is drawn at a size that reads at 1:1 in the MLflow artifact viewer, with
axis titles. `cl schedules --plot`, drawn on request, uses matplotlib.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

# matplotlib's tab10, so the lab's charts look like the ones researchers draw themselves
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# Five anchors of viridis; colours in between are interpolated.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def viridis(v: float) -> tuple[int, int, int]:
    pos = min(max(v, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (pos - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return tuple(int(round(c)) for c in rgb)


def _font(size: int = 14):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # flat-colour charts compress well even so; 3x faster than 6
    return buf.getvalue()


def _text_width(draw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _vertical_text(img, xy: tuple[int, int], text: str, font) -> None:
    """`text` rotated 90 degrees, read bottom to top, centred on `xy`: a y-axis title."""
    from PIL import Image, ImageDraw

    w = _text_width(ImageDraw.Draw(img), text, font) + 4
    label = Image.new("RGB", (w, font.size + 6), "white")
    ImageDraw.Draw(label).text((2, 1), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (xy[0] - label.width // 2, xy[1] - label.height // 2))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.3g}"


def heatmap_png(R, title: str = "accuracy matrix", *, row_labels: Sequence[str] | None = None,
                col_labels: Sequence[str] | None = None, ylabel: str = "trained through",
                xlabel: str = "evaluated on", vmin: float = 0.0, vmax: float = 1.0) -> bytes:
    """A matrix as a heatmap with its values in the cells, a colorbar and both axis titles.
    NaN cells are grey."""
    from PIL import Image, ImageDraw

    R = np.asarray(R, dtype=float)
    n_rows, n_cols = R.shape
    font, small = _font(14), _font(12)
    row_labels = list(row_labels) if row_labels is not None else [f"row{i}" for i in range(n_rows)]
    col_labels = list(col_labels) if col_labels is not None else [f"task{j}" for j in range(n_cols)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w, cell_h = 64, 34
    left = 40 + max(_text_width(probe, s, font) for s in row_labels)
    top, bar_w = 70, 18
    width = max(left + cell_w * n_cols + 110, _text_width(probe, title, font) + 30)
    img = Image.new("RGB", (width, top + cell_h * n_rows + 60), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 10), title, fill="black", font=font)
    span = max(vmax - vmin, 1e-12)
    for j, label in enumerate(col_labels):
        x = left + j * cell_w + (cell_w - _text_width(draw, label, small)) // 2
        draw.text((x, top - 20), label, fill="black", font=small)
    for i, label in enumerate(row_labels):
        y = top + i * cell_h
        draw.text((left - 8 - _text_width(draw, label, small), y + 10), label, fill="black", font=small)
        for j in range(n_cols):
            x, v = left + j * cell_w, R[i, j]
            shade = (v - vmin) / span
            colour = (215, 215, 215) if np.isnan(v) else viridis(shade)
            draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=colour)
            text = "-" if np.isnan(v) else f"{v:.2f}"
            ink = "black" if np.isnan(v) or shade > 0.6 else "white"
            draw.text((x + (cell_w - _text_width(draw, text, font)) // 2, y + 9), text, fill=ink, font=font)
    grid_right, grid_bottom = left + cell_w * n_cols, top + cell_h * n_rows
    label = xlabel
    draw.text((left + (cell_w * n_cols - _text_width(draw, label, font)) // 2, top - 44), label,
              fill="black", font=font)
    _vertical_text(img, (14, top + cell_h * n_rows // 2), ylabel, font)
    # colorbar
    bx = grid_right + 24
    for y in range(top, grid_bottom):
        draw.line([bx, y, bx + bar_w, y], fill=viridis(1 - (y - top) / max(grid_bottom - top - 1, 1)))
    for v in nice_ticks(vmin, vmax, 4):
        y = grid_bottom - 1 - int((v - vmin) / span * (grid_bottom - top - 1))
        draw.line([bx + bar_w, y, bx + bar_w + 4, y], fill="black")
        draw.text((bx + bar_w + 7, y - 7), _tick_label(v), fill="black", font=small)
    return _png(img)


class _Axes:
    """A plot area: data coordinates to pixels, axes with ticks and titles."""

    def __init__(self, img, box, xlim, ylim, xlabel, ylabel, xticks=None):
        from PIL import ImageDraw

        self.img, self.draw = img, ImageDraw.Draw(img)
        self.x0, self.y0, self.x1, self.y1 = box
        self.xlim, self.ylim = xlim, ylim
        font, small = _font(14), _font(12)
        d = self.draw
        d.rectangle(box, outline="black")
        for v in nice_ticks(*ylim, 5):
            y = self.py(v)
            d.line([self.x0, y, self.x1, y], fill=(230, 230, 230))
            d.line([self.x0 - 4, y, self.x0, y], fill="black")
            text = _tick_label(v)
            d.text((self.x0 - 8 - _text_width(d, text, small), y - 7), text, fill="black", font=small)
        for v in xticks if xticks is not None else nice_ticks(*xlim, 6):
            x = self.px(v)
            d.line([x, self.y1, x, self.y1 + 4], fill="black")
            text = _tick_label(v)
            d.text((x - _text_width(d, text, small) // 2, self.y1 + 7), text, fill="black", font=small)
        d.text(((self.x0 + self.x1 - _text_width(d, xlabel, font)) // 2, self.y1 + 26), xlabel, fill="black",
               font=font)
        _vertical_text(img, (16, (self.y0 + self.y1) // 2), ylabel, font)

    def px(self, x: float) -> int:
        lo, hi = self.xlim
        return int(self.x0 + (x - lo) / max(hi - lo, 1e-12) * (self.x1 - self.x0))

    def py(self, y: float) -> int:
        lo, hi = self.ylim
        return int(self.y1 - (y - lo) / max(hi - lo, 1e-12) * (self.y1 - self.y0))


def _limits(values: list[float], lo: float | None, hi: float | None) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    a = lo if lo is not None else (min(finite) if finite else 0.0)
    b = hi if hi is not None else (max(finite) if finite else 1.0)
    if b <= a:
        a, b = a - 0.5, b + 0.5
    pad = 0.0 if lo is not None and hi is not None else 0.05 * (b - a)
    return (a if lo is not None else a - pad, b if hi is not None else b + pad)


def _legend(draw, x: int, y: int, names: Sequence[str]) -> None:
    font = _font(13)
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle([x, y + 20 * k + 3, x + 14, y + 20 * k + 15], fill=colour)
        draw.text((x + 20, y + 20 * k), name, fill="black", font=font)


def line_chart_png(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
                   title: str, xlabel: str, ylabel: str, *, ylim: tuple[float | None, float | None] = (None, None),
                   vlines: Sequence[float] = (), integer_x: bool = False) -> bytes:
    """One line per series {name: (xs, ys, errors or None)}, with error bars where given,
    markers when a series has few points, dashed vertical lines at `vlines` (experience
    boundaries) and a legend. NaN points break a line."""
    from PIL import Image, ImageDraw

    names = list(series)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = 40 + max((_text_width(probe, n, _font(13)) for n in names), default=0)
    img = Image.new("RGB", (600 + legend_w, 420), "white")
    draw = ImageDraw.Draw(img)
    draw.text((14, 10), title, fill="black", font=_font(15))
    xs_all = [float(x) for xs, _, _ in series.values() for x in xs]
    ys_all = [float(y) + s * float(e) for _, ys, es in series.values()
              for y, e in zip(ys, es if es is not None else [0.0] * len(ys)) for s in (-1, 1)]
    xlim = _limits(xs_all, None, None) if not integer_x else (min(xs_all, default=0) - 0.3,
                                                               max(xs_all, default=1) + 0.3)
    xticks = sorted(set(int(x) for x in xs_all)) if integer_x and len(set(xs_all)) <= 20 else None
    ax = _Axes(img, (80, 44, 570, 350), xlim, _limits(ys_all, *ylim), xlabel, ylabel, xticks)
    for v in vlines:
        x = ax.px(v)
        for y in range(ax.y0, ax.y1, 8):
            draw.line([x, y, x, min(y + 4, ax.y1)], fill=(150, 150, 150))
    for k, (xs, ys, errs) in enumerate(series.values()):
        colour = PALETTE[k % len(PALETTE)]
        points = [(ax.px(x), ax.py(y)) if math.isfinite(y) else None for x, y in zip(xs, ys)]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                draw.line([a, b], fill=colour, width=2)
        marks = len(points) <= 40
        for i, p in enumerate(points):
            if p is None:
                continue
            if marks:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
            if errs is not None and math.isfinite(errs[i]) and errs[i] > 0:
                lo, hi = ax.py(ys[i] - errs[i]), ax.py(ys[i] + errs[i])
                draw.line([p[0], lo, p[0], hi], fill=colour, width=1)
                draw.line([p[0] - 4, lo, p[0] + 4, lo], fill=colour)
                draw.line([p[0] - 4, hi, p[0] + 4, hi], fill=colour)
    _legend(draw, 590, 50, names)
    return _png(img)


def bar_chart_png(groups: Sequence[str], bars: dict[str, tuple[Sequence[float], Sequence[float]]],
                  title: str, ylabel: str = "") -> bytes:
    """Grouped bars: for each group (a strategy), one bar per entry of `bars` {name: (means,
    errors)} with its error bar (the std over seeds); a zero line when values go negative."""
    from PIL import Image, ImageDraw

    width = max(640, 150 + 34 * len(groups) * (len(bars) + 1))
    img = Image.new("RGB", (width + 160, 440), "white")
    draw = ImageDraw.Draw(img)
    draw.text((14, 10), title, fill="black", font=_font(15))
    values = [m + s * (e if math.isfinite(e) else 0.0) for means, errs in bars.values()
              for m, e in zip(means, errs) if math.isfinite(m) for s in (-1, 1)]
    lo, hi = _limits(values + [0.0], None, None)
    ax = _Axes(img, (80, 44, width, 330), (0, len(groups)), (min(lo, 0.0), hi), "", ylabel, xticks=[])
    zero = ax.py(0.0)
    draw.line([ax.x0, zero, ax.x1, zero], fill="black")
    slot = (ax.x1 - ax.x0) / max(len(groups), 1)
    bar_w = slot * 0.8 / max(len(bars), 1)
    small = _font(12)
    for g, group in enumerate(groups):
        gx = ax.x0 + g * slot + slot * 0.1
        for k, (means, errs) in enumerate(bars.values()):
            m, e = means[g], errs[g]
            if not math.isfinite(m):
                continue
            x = int(gx + k * bar_w)
            top, bottom = sorted((ax.py(m), zero))
            draw.rectangle([x, top, int(x + bar_w) - 2, bottom], fill=PALETTE[k % len(PALETTE)])
            if math.isfinite(e) and e > 0:
                c = int(x + bar_w / 2) - 1
                draw.line([c, ax.py(m - e), c, ax.py(m + e)], fill="black")
                draw.line([c - 4, ax.py(m - e), c + 4, ax.py(m - e)], fill="black")
                draw.line([c - 4, ax.py(m + e), c + 4, ax.py(m + e)], fill="black")
        label = group if len(group) <= 16 else group[:15] + "…"
        draw.text((int(gx + slot * 0.4 - _text_width(draw, label, small) / 2), ax.y1 + 8), label, fill="black",
                  font=small)
    _legend(draw, width + 20, 50, list(bars))
    return _png(img)


def panels_png(images: Sequence[bytes], columns: int = 3) -> bytes:
    """PNG images side by side, `columns` to a row: the heatmaps of several runs at a glance."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    tiles = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    columns = max(1, min(columns, len(tiles)))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * w, (k // columns) * h))
    return _png(sheet)
