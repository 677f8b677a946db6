"""The forgetting benchmark's results as the Markdown that docs/multi-run.md and the README show,
written between their `<!-- slao-bench -->` markers from bench/results/slao.json, so the
documents say what the last full run measured and nothing else (a test compares them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (REPO / "docs" / "multi-run.md", REPO / "README.md")
START, END = "<!-- slao-bench:start -->", "<!-- slao-bench:end -->"
SECTION = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
COLUMNS = ("ACC", "BWT", "FWT", "forgetting")


def markdown(result: dict[str, Any]) -> str:
    """The measurement, its calibration, the table (mean ± sd over seeds and orders), the goal
    run by run, and what it recommends."""
    settings, calibration = result["settings"], result["calibration"]
    runs = len({(run["seed"], tuple(run["order"])) for run in result["runs"]})
    lines = [
        f"Measured on {result['machine']} in {result['dtype']}: {len(settings['seeds'])} seeds x "
        f"{len(settings['orders'])} orders, {settings['steps']} steps a task at lr "
        f"{settings['learning_rate']:g}, LoRA r {settings['lora_r']} on {settings['targets']}, "
        f"batch {settings['batch_size']}, replay {settings['replay']:g} in the +replay variants; "
        f"{result['wall_seconds'] / 60:.1f} min. Mean ± sd over the {runs} runs, in points:",
        "",
        "| variant | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for variant, means in result["summary"].items():
        cells = [f"{means[name]:.1f} ± {means[name + '_sd']:.1f}" for name in COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Multi-task upper bound: ACC {result['multitask_upper_bound_ACC']:.1f}"
        f" (seed {result['multitask_upper_bound_seed']}).",
        "Calibration (every task alone at least 85% in every seed, sequential BWT at most -15 in "
        "every run): "
        + ("passed." if calibration["passed"] else "not met: " + "; ".join(calibration["short"]))
        + " Each task alone, by seed: "
        + "; ".join(
            f"seed {seed} " + ", ".join(f"{a:.0%}" for a in accuracies)
            for seed, accuracies in calibration["alone"].items()
        )
        + ".",
        "",
        "BWT at least 10 points above sequential's, with an ACC no lower, run by run:",
        "",
    ]
    for variant, checks in result["goal"].items():
        held = sum(checks.values())
        lines.append(f"- {variant}: {held} of {len(checks)} runs")
    best = result["recommended"]
    if best:
        verdict = (
            f"Meets the goal in every run: **{best}**; the default of `backprop multi-run` "
            "follows this measurement."
        )
    else:
        measured = best_measured(result["summary"])
        means = result["summary"][measured]
        verdict = (
            "No variant meets the goal in every run. Measured best (mean ACC, then BWT): "
            f"**{measured}**, ACC {means['ACC']:.1f}, BWT {means['BWT']:.1f}."
        )
    lines += ["", verdict]
    return "\n".join(lines)


def best_measured(summary: dict[str, dict[str, float]]) -> str:
    """The variant with the best mean ACC, then BWT, sequential training aside."""
    return max(
        (variant for variant in summary if variant != "sequential"),
        key=lambda variant: (summary[variant]["ACC"], summary[variant]["BWT"]),
    )


def section(result: dict[str, Any]) -> str:
    return f"{START}\n{markdown(result)}\n{END}"


def write_tables(result: dict[str, Any]) -> None:
    for document in DOCUMENTS:
        text = document.read_text()
        if START not in text:
            raise SystemExit(f"{document} has no {START} ... {END} section to write the table in")
        document.write_text(SECTION.sub(lambda _: section(result), text))


def shown(document: Path) -> str | None:
    """The section a document shows now (None: it has none)."""
    found = SECTION.search(document.read_text())
    return found.group(0) if found else None


if __name__ == "__main__":
    write_tables(json.loads((REPO / "bench" / "results" / "slao.json").read_text()))
