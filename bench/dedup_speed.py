"""Time to find duplicate rows in 100,000 chat rows: exact (normalised text) and near (MinHash
LSH), through the filter the dataprep service uses. One row in twenty is an exact copy and one
in twenty a copy with a word changed. Printed as seconds and as a ratio to the exact pass;
written to bench/results/dedup_speed.json.

    .venv/bin/python bench/dedup_speed.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "dedup_speed.json"
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "ship",
    "keeper",
    "lamp",
    "storm",
    "north",
    "harbour",
    "rope",
    "sail",
    "tide",
    "light",
]


def rows(count: int) -> list[dict]:
    """Chat rows of 40 to 120 random words; every 20th a copy, every 20th + 1 a near copy."""
    generator = random.Random(0)
    made: list[dict] = []
    for n in range(count):
        if n % 20 == 0 and made:
            made.append(made[generator.randrange(len(made))])
            continue
        words = [generator.choice(WORDS) for _ in range(generator.randint(40, 120))]
        if n % 20 == 1 and made:
            words = made[-1]["messages"][1]["content"].split()
            words[len(words) // 2] = "changed"
        answer = " ".join(words)
        made.append(
            {
                "messages": [
                    {"role": "user", "content": f"Q{n}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return made


def main() -> None:
    from backpropagate_services.common.hardware import cpu_name
    from backpropagate_services.dataprep.duplicates import DuplicateFilter

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    data = rows(args.rows)
    results = {}
    for mode in ("exact", "near"):
        duplicates = DuplicateFilter(mode)
        started = time.perf_counter()
        removed = sum(
            duplicates.duplicate_of(row, line) is not None for line, row in enumerate(data, 1)
        )
        results[mode] = {"seconds": time.perf_counter() - started, "removed": removed}
    print(f"CPU: {cpu_name()}; {args.rows:,} rows")
    for mode, result in results.items():
        ratio = result["seconds"] / results["exact"]["seconds"]
        print(
            f"{mode:>6}: {result['seconds']:7.2f} s  {args.rows / result['seconds']:>9,.0f} rows/s"
            f"  {ratio:6.1f}x exact  removed {result['removed']:,}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"cpu": cpu_name(), "rows": args.rows, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
