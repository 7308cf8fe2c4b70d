"""The quality report in words and as a figure: the verdict lines the console prints and
`report.png` (the before/after grid beside the measured losses and style scores). Reads only
the report's dict (`sd_lora.train.report` measures it), so a report.json can be redrawn."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sd_lora.util.atomic import atomic_path


def verdict_lines(report: dict) -> list[str]:
    """One line per measure, each naming the images it is on."""
    style, leak = report["heldout_style_loss"], report["off_style_loss"]
    lines = [
        f"style loss on {style['name']}: {style['base']:.4f} -> {style['adapter']:.4f} "
        f"({style['change']:+.1%}; lower is better)",
    ]
    if leak:
        lines.append(f"off-style loss on {leak['name']}: {leak['base']:.4f} -> "
                     f"{leak['adapter']:.4f} ({leak['change']:+.1%}; near 0 means no leakage)")
    if report["style_score"]:
        s = report["style_score"]
        lines.append(
            f"{s['style']} score with the trigger {s['with_trigger']['base']:.2f} -> "
            f"{s['with_trigger']['adapter']:.2f}; without {s['without_trigger']['base']:.2f} -> "
            f"{s['without_trigger']['adapter']:.2f} (0 = plain world, 1 = the style)"
        )
    if report.get("renders_skipped"):
        lines.append(f"not rendered: {report['renders_skipped']}")
    return lines


def plot_report(report: dict, rows: list[list[Image.Image]], weights, name: str,
                path) -> None:
    """report.png: the grid `rows` (rows[prompt][weight]; none when the report rendered
    nothing) beside the loss bars and style scores, under the verdict lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows)
    bars = 3 if report["style_score"] else 2
    widths = ([1.6 * len(weights)] if rows else []) + [3.2]  # the grid's column, the figures'
    width = sum(widths) + 0.8 + 1.6 * bars if rows else 5.0
    fig = plt.figure(figsize=(width, 1.2 + 1.6 * max(n_rows, 2)))
    grid_spec = fig.add_gridspec(2, len(widths), width_ratios=widths, hspace=0.45)
    if rows:
        _plot_grid(fig.add_subplot(grid_spec[:, 0]), rows, weights, report["grid"]["prompts"])
    loss_sets = [report["heldout_style_loss"]] + [s for s in [report["off_style_loss"]] if s]
    _paired_bars(fig.add_subplot(grid_spec[0, -1]),
                 ["style\n" + _wrap(loss_sets[0]["name"], 18)]
                 + ["off-style\n" + _wrap(s["name"], 18) for s in loss_sets[1:]],
                 [s["base"] for s in loss_sets], [s["adapter"] for s in loss_sets],
                 "denoising loss (fixed noise)")
    if report["style_score"]:
        s = report["style_score"]
        _paired_bars(
            fig.add_subplot(grid_spec[1, -1]),
            ["with trigger", "without"],
            [s["with_trigger"]["base"], s["without_trigger"]["base"]],
            [s["with_trigger"]["adapter"], s["without_trigger"]["adapter"]],
            f"{s['style']} score of generations",
        )
    # Above the figure (the tight bounding box grows to hold it): inside, its lines overlapped
    # the grid's title when the grid has few rows.
    fig.suptitle(f"{name}: " + "\n".join(verdict_lines(report)), fontsize=8, x=0.02, y=1.0,
                 ha="left", va="bottom")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_grid(axis, rows: list[list[Image.Image]], weights, prompts: list[str]) -> None:
    cells = [np.concatenate([np.asarray(im.convert("RGB")) for im in row], axis=1) for row in rows]
    axis.imshow(np.concatenate(cells, axis=0), interpolation="nearest")
    h, w = rows[0][0].size[1], rows[0][0].size[0]
    axis.set_xticks([w * (i + 0.5) for i in range(len(weights))], [f"weight {x:g}" for x in weights])
    axis.set_yticks([h * (i + 0.5) for i in range(len(rows))], [_wrap(p) for p in prompts],
                    fontsize=7)
    axis.set_title("fixed prompts and seeds, adapter weight per column", fontsize=9)


def _paired_bars(axis, names, base, adapter, title) -> None:
    x = np.arange(len(names))
    axis.bar(x - 0.2, base, 0.4, label="base (weight 0)", color="#9aa5b1")
    axis.bar(x + 0.2, adapter, 0.4, label="with adapter", color="#d9480f")
    axis.set_xticks(x, names, fontsize=8)
    axis.set_xlim(-0.7, len(names) - 0.3)  # a lone pair keeps the width of one of two
    axis.set_title(title, fontsize=9)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7)


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])
