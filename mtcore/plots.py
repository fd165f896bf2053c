"""metrics.png: one titled panel per quantity across a run's iterations, written atomically. The toy
world plots its gold-judged metrics (toy.plot); a real run, its own numbers (run_panels)."""

from dataclasses import dataclass
from pathlib import Path

from mtcore.errors import MtcoreError
from mtcore.files import remove_quietly


@dataclass
class Panel:
    title: str
    ylabel: str
    xs: list[int]
    ys: list[float]
    line: float | None = None  # a horizontal reference line (e.g. tau)
    unit_range: bool = True  # the y axis from 0 to 1


def save_panels(path, title: str, panels: list[Panel], xlabel: str = "iteration") -> None:
    """A PNG of the panels side by side under one title; a failed write is one error naming the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_panels(title, panels, xlabel)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as e:
        remove_quietly(tmp)
        raise MtcoreError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)


def draw_panels(title: str, panels: list[Panel], xlabel: str = "iteration"):
    """The figure of save_panels. Axes show plain values, never an offset ("1e-6+6.9314e-1" above a
    loss that moved by 1e-6)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=100, squeeze=False)
    for ax, p in zip(axes[0], panels):
        ax.plot(p.xs, [float("nan") if y is None else y for y in p.ys], marker="o")
        if p.line is not None:
            ax.axhline(p.line, color="grey", linestyle="--", linewidth=1)
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.set_xticks(p.xs)
        if p.unit_range:
            ax.set_ylim(0, 1)
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run_panels(metrics: dict, tau: float) -> list[Panel]:
    """A real run's numbers per iteration: DPO's last loss and accuracy, the selection's best win
    rate against tau, and (with the M-step) the RM's last accuracy."""
    its = [e for e in metrics["iterations"] if "dpo" in e and "select" in e]
    xs = [e["iteration"] for e in its]
    panels = [Panel("DPO: loss at the last step", "loss", xs, [e["dpo"]["loss"] for e in its], unit_range=False),
              Panel("DPO: accuracy at the last step", "accuracy", xs, [e["dpo"]["accuracy"] for e in its]),
              Panel("selection: best win rate vs pi_{t-1}", "win rate (dashed: tau)", xs,
                    [e["select"]["win_rate"] for e in its], line=tau)]
    if any("rm" in e for e in its):
        panels.append(Panel("RM: accuracy at the last step", "accuracy", xs,
                            [e["rm"]["accuracy"] if "rm" in e else None for e in its]))
    return panels
