"""The cells of the bench's tables: medians over the rounds, with their spread."""

import statistics


def column(results: dict[str, list], name: str, key: str) -> list[float]:
    """`key` of each round's result of `name`."""
    return [result[key] for result in results[name]]


def spread(values: list[float], digits: int = 1) -> str:
    """Median, then min-max when the values differ."""
    median = f"{statistics.median(values):.{digits}f}"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return median if low == high else f"{median} ({low}-{high})"
