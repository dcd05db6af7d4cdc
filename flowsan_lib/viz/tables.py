"""Tables of the 04_flowsan metrics for its notebook (pandas).
"""
from __future__ import annotations


def auc_table(metrics: dict):
    """Seen classifiers' test AUC: one row per (classifier, method), columns original and t = 1..n."""
    import pandas as pd
    rows = []
    for g, r in metrics["aux_auc"].items():
        for method, vals in r.items():
            if method == "original":
                continue
            rows.append({"classifier": g, "method": method, "original": r["original"],
                         **{f"t={t}": v for t, v in enumerate(vals, 1)}})
    return pd.DataFrame(rows).set_index(["classifier", "method"]).round(3)


def tmr_table(metrics: dict):
    """Auxiliary matcher's TMR at FMR 1% (original vs perturbed image of the same person)."""
    import pandas as pd
    m = metrics["matcher"]
    rows = [{"method": k[4:], "original": m["tmr_original"], **{f"t={t}": v for t, v in enumerate(vals, 1)}}
            for k, vals in m.items() if k.startswith("tmr_") and k != "tmr_original"]
    return pd.DataFrame(rows).set_index("method").round(3)


def edit_table(metrics: dict):
    """Each FlowSAN stage's edit of its own input on the test faces (grey levels; see stage_edits)."""
    import pandas as pd
    rows = metrics.get("stage_edits", [])
    return pd.DataFrame(rows, index=pd.Index(range(1, len(rows) + 1), name="stage")).round(3)


def time_table(timings: dict):
    """Seconds per stage: training and the transform of the training set before it (04's timings.json)."""
    import pandas as pd
    s = timings
    n = len(s["flowsan_train"])
    ens = s["ensemble_train"] or [None] * n
    return pd.DataFrame({"flowsan_train_s": s["flowsan_train"], "flowsan_transform_s": s["flowsan_transform"],
                         "ensemble_train_s": ens}, index=pd.Index(range(1, n + 1), name="stage"))
