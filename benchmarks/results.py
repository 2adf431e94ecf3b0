"""The results file: ``<out>/<date>-<machine>.md`` with tables, targets and PNG plots, plus the same numbers
as ``<date>-<machine>.json``. Plots are drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """A markdown table; cells are formatted by ``fmt``."""

    columns: list[str]
    """Header cells."""
    rows: list[list[Any]] = field(default_factory=list)
    """Body rows, one value per column."""
    title: str = ""
    """Bold line above the table (optional)."""

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table row has {len(cells)} cells, the header {len(self.columns)}: {cells!r}")
        self.rows.append(list(cells))

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "--:" for i in range(len(self.columns))) + "|")
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def fmt(value: Any) -> str:
    """Numbers with sensible precision; None as an em dash; dicts (errors by status) compactly."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        a = abs(value)
        return f"{value:.0f}" if a >= 1000 else f"{value:.1f}" if a >= 10 else f"{value:.2f}" if a >= 0.1 else f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "0"
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Target:
    """One target of the issue: what was measured against what was asked."""

    name: str
    """What is measured, e.g. ``digits CNN: server req/s at c=64 / echo ceiling``."""
    target: str
    """The threshold in words, e.g. ``>= 0.70``."""
    measured: float | None
    """The measured value (None: could not be measured, see ``note``)."""
    met: bool | None
    """Whether the target is met (None: not measured)."""
    note: str = ""
    """Why it was missed or not measured, and what would close it; or how it was measured."""


@dataclass
class Plot:
    """A figure to save as PNG next to the results file."""

    slug: str
    """File name part: ``<date>-<machine>-<slug>.png``."""
    title: str
    series: dict[str, tuple[Sequence[Any], Sequence[float | None]]]
    """Label -> (x values, y values); None y values are skipped."""
    xlabel: str
    ylabel: str
    kind: str = "line"
    """``line`` (x numeric, log2 scale) or ``bar`` (grouped bars over categorical x)."""
    logy: bool = False


@dataclass
class Section:
    heading: str
    blocks: list[Table | Plot | str] = field(default_factory=list)


def machine_slug() -> str:
    """``<host>-<N>cpu`` (plus ``-<gpu>`` with CUDA), safe for file names."""
    name = f"{socket.gethostname().split('.')[0]}-{_cores()}cpu"
    gpu = gpu_name()
    if gpu:
        name += "-" + gpu
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()[:60]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch, or a broken CUDA install: report no GPU
        return None


def hardware() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": _cores(), "memory_gb": memory_gb, "gpu": gpu_name(),
                            "os": platform.platform(), "python": platform.python_version()}
    for module in ("torch", "onnxruntime", "fastapi", "uvicorn", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


class Report:
    """Collects sections and targets, then writes markdown + JSON + PNGs."""

    def __init__(self, title: str, *, settings: dict[str, Any] | None = None) -> None:
        self.title = title
        self.started = datetime.now()
        self.hardware = hardware()
        self.settings = dict(settings or {})
        self.sections: list[Section] = []
        self.targets: list[Target] = []
        self.data: dict[str, Any] = {}
        """Raw numbers per scenario, written to the JSON file."""

    def section(self, heading: str) -> Section:
        section = Section(heading)
        self.sections.append(section)
        return section

    def target(self, *args: Any, **kwargs: Any) -> Target:
        t = Target(*args, **kwargs)
        self.targets.append(t)
        return t

    def hardware_line(self) -> str:
        h = self.hardware
        text = f"{h['cpu']}, {h['cores']} cores available"
        if h.get("memory_gb"):
            text += f", {h['memory_gb']} GB RAM"
        if h.get("gpu"):
            text += f", GPU {h['gpu']}"
        return text

    def targets_table(self) -> Table:
        table = Table(["target", "measured", "asked", "met", "why / what would close it"])
        for t in self.targets:
            met = "—" if t.met is None else ("**met**" if t.met else "**missed**")
            table.add(t.name, t.measured, t.target, met, t.note)
        return table

    def write(self, out: Path, stem: str | None = None) -> Path:
        """Write ``out/<stem>.md`` (and .json, and one PNG per plot); returns the markdown path."""
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"{self.started:%Y-%m-%d}-{machine_slug()}"
        h = self.hardware
        lines = [f"# {self.title}", "",
                 f"Run {self.started:%Y-%m-%d %H:%M}. Hardware: {self.hardware_line()}.", "",
                 "Software: " + ", ".join(f"{k} {h[k]}" for k in ("python", "torch", "onnxruntime", "fastapi",
                                                                    "uvicorn") if h.get(k)) + ".", ""]
        if h.get("load_average"):
            lines += [f"Load average when the run started: {h['load_average']} (a busy machine lowers every number).", ""]
        if self.settings:
            lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in self.settings.items()) + ".", ""]
        if self.targets:
            lines += ["## Targets", "", self.targets_table().markdown(), ""]
        for section in self.sections:
            lines += [f"## {section.heading}", ""]
            for block in section.blocks:
                if isinstance(block, Table):
                    lines += [block.markdown(), ""]
                elif isinstance(block, Plot):
                    png = draw(block, out / f"{stem}-{block.slug}.png")
                    if png is not None:
                        lines += [f"![{block.title}]({png.name})", ""]
                else:
                    lines += [block, ""]
        path = out / f"{stem}.md"
        path.write_text("\n".join(lines).rstrip() + "\n")
        payload = {"title": self.title, "started": self.started.isoformat(timespec="seconds"),
                   "hardware": self.hardware, "settings": self.settings,
                   "targets": [asdict(t) for t in self.targets], "data": self.data}
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        return path


def draw(plot: Plot, path: Path) -> Path | None:
    """Save ``plot`` as a PNG; None when there is nothing to draw."""
    series = {k: [(x, y) for x, y in zip(*v) if y is not None] for k, v in plot.series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    if plot.kind == "bar":
        categories = list(dict.fromkeys(x for points in series.values() for x, _ in points))
        width = 0.8 / len(series)
        for i, (label, points) in enumerate(series.items()):
            values = dict(points)
            xs = [j + i * width for j, c in enumerate(categories) if c in values]
            ax.bar(xs, [values[c] for c in categories if c in values], width, label=label)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(categories))])
        ax.set_xticklabels([str(c) for c in categories], rotation=20, ha="right", fontsize=8)
    else:
        for label, points in series.items():
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        xs = sorted({x for points in series.values() for x, _ in points})
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
    if plot.logy:
        ax.set_yscale("log")
    ax.set_title(plot.title, fontsize=10)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
