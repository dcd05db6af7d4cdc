"""Training histories (our own CSV callback) as altair charts.
"""
from __future__ import annotations

from pathlib import Path


def read_histories(paths):
    """Long table (run, epoch, split, term, value) of History CSV files, run = file stem."""
    import pandas as pd
    frames = []
    for p in paths:
        p = Path(p)
        if not p.exists() or p.stat().st_size == 0:
            continue
        h = pd.read_csv(p).drop(columns=["seconds"], errors="ignore").melt("epoch", var_name="key")
        h[["split", "term"]] = h["key"].str.split("_", n=1, expand=True)
        h["run"] = p.stem
        frames.append(h.drop(columns="key"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["epoch", "value", "split", "term", "run"])


def history_chart(paths, terms=None):
    """Altair small multiples: one panel per loss term, one line per run, dashed = validation."""
    import altair as alt
    h = read_histories(paths)
    if terms:
        h = h[h["term"].isin(terms)]
    return alt.Chart(h).mark_line(point=True).encode(
        x="epoch:Q", y=alt.Y("value:Q", title=None), color="run:N", strokeDash="split:N",
        tooltip=["run", "split", "term", "epoch", "value"],
    ).properties(width=220, height=150).facet(facet="term:N", columns=4).resolve_scale(y="independent")
