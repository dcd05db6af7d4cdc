"""The explorer: browse test images, methods and stages over precomputed evaluation arrays.

Everything shown comes from files: the evaluation stage's `scores.npz` (every classifier's P(male)
and every matcher's cosine against the original, per method, t and image) and the FlowSAN stage's
test sequences. Moving a control only looks numbers up and composes pictures; no model runs.
In report mode (papermill, HTML report) the explorer shows a static grid instead of live widgets.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from flowsan_lib.method.apply import Sequences, load_sequences
from flowsan_lib.viz import charts

BROWSE = ("all", "men", "women", "best anonymised first", "worst anonymised first")


def in_report_mode(report: bool | None = None) -> bool:
    """True when the notebook renders for a static report; decided by the notebook's explicit parameter."""
    return True if report is None else bool(report)


class Explorer:
    """Precomputed scores of one run's test images, with lookups, pictures and a widget UI."""

    def __init__(self, scores: dict, seq: Sequences):
        self.s = scores
        self.seq = seq
        self.methods = [str(m) for m in scores["methods"]]
        self.classifiers = [str(c) for c in scores["classifiers"]]
        self.kinds = [str(k) for k in scores["classifier_kinds"]]
        self.matchers = [str(m) for m in scores["matchers"]]
        self.matcher_seen = [bool(x) for x in scores["matcher_seen"]]
        self.is_male = np.asarray(scores["is_male"], bool)
        self.test_set = np.asarray(scores["test_set"]).astype(str)
        self.identity = np.asarray(scores["identity"]).astype(str)
        self.n = seq.n
        self.p_male = np.stack([scores[f"p_male/{c}"] for c in self.classifiers])     # [C, methods, n+1, N]
        self.sim = np.stack([scores[f"self_sim/{m}"] for m in self.matchers]) if self.matchers else None

    @classmethod
    def from_files(cls, scores_npz: Path, sequences_npz: Path) -> "Explorer":
        with np.load(scores_npz, allow_pickle=False) as z:
            scores = {k: z[k] for k in z.files}
        return cls(scores, load_sequences(sequences_npz))

    # --- lookups ----------------------------------------------------------------------------

    def _m(self, method: str) -> int:
        return self.methods.index(method)

    def image(self, method: str, t: int, i: int) -> np.ndarray:
        """The picture a method shows for test image i at stage t (Ens-Best: the first classifier's pick)."""
        best = self.s.get(f"best_choice/{self.classifiers[0]}") if self.classifiers else None
        return charts.method_image(self.seq, method, t, i, self.s["gibbs_choice"], best)

    def anonymisation(self, method: str, t: int) -> np.ndarray:
        """[N] mean over the unseen classifiers of P(true gender): 0.5 = chance, lower = label flipped."""
        unseen = [k for k, kind in enumerate(self.kinds) if kind != "auxiliary"] or list(range(len(self.kinds)))
        p = self.p_male[unseen, self._m(method), t]
        return np.nanmean(np.where(self.is_male, p, 1 - p), axis=0)

    def order(self, test_set: str, browse: str, method: str, t: int) -> np.ndarray:
        """Test images to browse: one test set (or 'all'), filtered or sorted as `browse` says."""
        idx = np.arange(len(self.is_male)) if test_set == "all" else np.flatnonzero(self.test_set == test_set)
        if browse == "men":
            return idx[self.is_male[idx]]
        if browse == "women":
            return idx[~self.is_male[idx]]
        if browse in ("best anonymised first", "worst anonymised first"):
            dist = np.abs(self.anonymisation(method, t)[idx] - 0.5)        # distance from chance
            key = np.argsort(dist if browse.startswith("best") else -dist, kind="stable")
            return idx[key]
        return idx

    def numbers(self, method: str, t: int, i: int) -> dict:
        """Every classifier's P(male) and every matcher's cosine vs the original, at (method, t) and t = 0."""
        m = self._m(method)
        clf = {c: (float(self.p_male[k, m, t, i]), float(self.p_male[k, m, 0, i]), self.kinds[k])
               for k, c in enumerate(self.classifiers)}
        mat = {}
        for k, name in enumerate(self.matchers):
            mat[name] = (float(self.sim[k, m, t, i]) if self.sim is not None else float("nan"), self.matcher_seen[k])
        return {"classifiers": clf, "matchers": mat}

    # --- pictures ---------------------------------------------------------------------------

    def sequence_png(self, method: str, t: int, i: int, cell: int = 112) -> bytes:
        """The row I, I'_1..I'_n of a method for one image, the selected stage framed in red."""
        from PIL import ImageDraw
        imgs = [self.image(method, k, i) for k in range(self.n + 1)]
        grid = charts.image_grid([imgs], [""], ["I"] + [f"I'_{k}" for k in range(1, self.n + 1)], cell=cell, label_w=4)
        d = ImageDraw.Draw(grid)
        x0 = 4 + t * (cell + 4)
        d.rectangle([x0 - 2, 16, x0 + cell + 1, 18 + cell + 1], outline="red", width=2)
        return charts.png_bytes(grid)

    def numbers_html(self, method: str, t: int, i: int) -> str:
        """The numbers of `numbers()` as an HTML table."""
        nb = self.numbers(method, t, i)
        head = (f"<b>test image {i}</b> ({html.escape(self.test_set[i])}, "
                f"{'man' if self.is_male[i] else 'woman'}, identity {html.escape(self.identity[i] or 'unknown')}); "
                f"method <b>{html.escape(charts.METHOD_LABEL.get(method, method))}</b>, t = <b>{t}</b>")
        rows = ["<tr><th>gender classifier</th><th>kind</th><th>P(male) here</th><th>P(male) original</th></tr>"]
        for c, (p, p0, kind) in nb["classifiers"].items():
            rows.append(f"<tr><td>{html.escape(c)}</td><td>{kind}</td><td class='pm'>{p:.3f}</td><td>{p0:.3f}</td></tr>")
        rows.append("<tr><th>face matcher</th><th>seen</th><th colspan=2>cosine vs original</th></tr>")
        for name, (sim, seen) in nb["matchers"].items():
            why = "n/a: Ens-Best is per classifier" if method == "ens_best" else "n/a: test set without identities"
            cell = why if not np.isfinite(sim) else f"{sim:.3f}"
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{'yes' if seen else 'no'}</td>"
                        f"<td colspan=2 class='sim'>{cell}</td></tr>")
        return f"<div>{head}</div><table class='explorer-table'>{''.join(rows)}</table>"

    def static_grid(self, per_set: int = 2, methods=None, seed: int = 0):
        """The report version: per test set a few random men and women (seeded), one row each: the
        original, then I'_1..I'_n of every method; under each picture 'P' = mean P(true gender) over
        the classifiers (0.5 = chance) and 'c' = mean matcher cosine against the original."""
        rng = np.random.default_rng([seed, 6])
        methods = [m for m in (methods or self.methods) if m != "original"]
        rows, labels, caps = [], [], []
        for ts in dict.fromkeys(self.test_set):
            for male in (True, False):
                pool = np.flatnonzero((self.test_set == ts) & (self.is_male == male))
                for i in rng.choice(pool, size=min(per_set, len(pool)), replace=False) if len(pool) else []:
                    cells = [("original", 0)] + [(m, t) for m in methods for t in range(1, self.n + 1)]
                    rows.append([self.image(m, t, i) for m, t in cells])
                    caps.append([self._caption(m, t, i) for m, t in cells])
                    labels.append(f"{ts} #{i} ({'man' if male else 'woman'})")
        cols = ["I"] + [f"{charts.METHOD_LABEL.get(m, m).split(' ')[0]} {t}" for m in methods for t in range(1, self.n + 1)]
        return charts.image_grid(rows, labels, cols, cell=80, label_w=160, captions=caps)

    def _caption(self, method, t, i) -> str:
        an = self.anonymisation(method, t)[i]
        sim = np.nanmean(self.sim[:, self._m(method), t, i]) if self.sim is not None and \
            np.isfinite(self.sim[:, self._m(method), t, i]).any() else float("nan")
        return f"P{an:.2f} c{sim:.2f}" if np.isfinite(sim) else f"P{an:.2f}"

    # --- widgets ----------------------------------------------------------------------------

    def widget(self):
        """Dropdowns and sliders over test set, browse order, image, method and t; live picture and table."""
        import ipywidgets as W
        sets = ["all"] + list(dict.fromkeys(self.test_set))
        ts_dd = W.Dropdown(options=sets, value=sets[1] if len(sets) > 1 else "all", description="test set")
        browse_dd = W.Dropdown(options=BROWSE, value="all", description="browse")
        method_dd = W.Dropdown(options=[(charts.METHOD_LABEL.get(m, m), m) for m in self.methods if m != "original"]
                               or [("Orig.", "original")], description="method")
        t_sl = W.IntSlider(value=min(1, self.n), min=0, max=self.n, description="stage t", continuous_update=True)
        img_sl = W.IntSlider(value=0, min=0, max=0, description="image", continuous_update=True)
        pic = W.Image(format="png", layout=W.Layout(width=f"{8 + (self.n + 1) * 116}px"))  # natural size
        table = W.HTML()
        t_sl.add_class("explorer-t-slider")
        img_sl.add_class("explorer-image-slider")
        pic.add_class("explorer-picture")
        table.add_class("explorer-numbers")
        state = {"order": np.arange(0)}

        def refresh_order(*_):
            state["order"] = self.order(ts_dd.value, browse_dd.value, method_dd.value, t_sl.value)
            img_sl.max = max(len(state["order"]) - 1, 0)
            render()

        def render(*_):
            order = state["order"]
            if not len(order):
                table.value = "<i>no image in this selection</i>"
                return
            i = int(order[min(img_sl.value, len(order) - 1)])
            pic.value = self.sequence_png(method_dd.value, t_sl.value, i)
            table.value = self.numbers_html(method_dd.value, t_sl.value, i)

        for w in (ts_dd, browse_dd):
            w.observe(refresh_order, names="value")
        for w in (method_dd, t_sl):
            w.observe(lambda ch: refresh_order() if browse_dd.value.endswith("first") else render(), names="value")
        img_sl.observe(render, names="value")
        refresh_order()
        ui = W.VBox([W.HBox([ts_dd, browse_dd]), W.HBox([img_sl, method_dd]), t_sl, pic, table])
        ui.add_class("flowsan-explorer")
        return ui

    def show(self, report: bool | None = None):
        """Report mode: the static grid (PNG); otherwise the live widget."""
        from IPython.display import Image, display
        if in_report_mode(report):
            display(Image(charts.png_bytes(self.static_grid())))
        else:
            display(self.widget())


def run_explore_stage(*, scores: Path, test_outputs: Path, out: Path, seed: int = 0) -> Explorer:
    """Build the explorer (05's scores.npz, 04's outputs_test.npz); save its static grid and metrics.json in out."""
    import json
    ex = Explorer.from_files(scores, test_outputs)
    stage_dir = Path(out)
    ex.static_grid(seed=seed).save(stage_dir / "explorer_grid.png")
    (stage_dir / "metrics.json").write_text(json.dumps({
        "n_test_images": int(len(ex.is_male)), "n_stages": ex.n, "methods": ",".join(ex.methods),
        "classifiers": len(ex.classifiers), "matchers": len(ex.matchers), "static_grid": "explorer_grid.png"}, indent=1))
    return ex
