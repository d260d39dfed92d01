"""One rollout report per candidate batch, ``BATCH/rollout.html``: the gate's decision and every number
it was made on, for the reviewer who signs a rollout off. Self-contained (plotly inlined once, no
network), a few MB; written by the gate right after ``gate.json``.

Sections: the decision and every check (value, limit, verdict); feature drift (the most drifted
columns first, with their distributions in both batches); embedding drift (both batches'
embeddings of the same users at the same time, projected together, and where the score lies among
the calibration's clean retrains); the space as consumers see it (same-user cosine unaligned,
within-space kNN@10 overlap of embeddings next to that of the users' feature vectors, the serving
batch's heads on the candidate's embeddings per task); stability after alignment; downstream quality of both batches on the same users and labels,
with 95% intervals and the paired difference. Evidently's full drift report stays beside it
(``BatchDir.drift_report``).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from userrep.batch.layout import BatchDir

CALIBRATION = Path(__file__).with_name("gate_calibration.json")  # bench/gate_calibration.py --write
Z95 = 1.96
SHOWN_COLUMNS = 20  # feature columns in the drift table (every column is measured)
PLOTTED_COLUMNS = 4  # of which the distributions are drawn
POINTS = 1000  # users per batch in the embedding projection

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.pass{color:#070}.block{color:#b00}.decision{font-size:2em;font-weight:bold}"""


def calibration() -> dict | None:
    """The gate's scores on the calibration's clean retrains and planted shifts (None: not written)."""
    return json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else None


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict) and "candidate" in value:  # a quality comparison
        same = (
            f", paired difference {value['difference']:+.4f} (se {value['se']:.4f}), {value['n']} users"
            if "se" in value
            else ""
        )
        other = html.escape(value["batch"]) if "batch" in value else "serving"  # the gate's memory names its batch
        return f"{_num(value['candidate'])} vs {other} {_num(value['serving'])}{same}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_num(v)}" for k, v in list(value.items())[:5]) or "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return html.escape(str(value))


def _verdict(passed: bool) -> str:
    return '<span class="pass">PASS</span>' if passed else '<span class="block">BLOCK</span>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bold_best(values: list[float | None]) -> list[bool]:
    """Which cells of one column hold its best (highest) value, as printed (``report.is_best``)."""
    from userrep.report import is_best

    finite = [v for v in values if v is not None and math.isfinite(v)]
    return [bool(finite) and is_best(v, max(finite), 4) for v in values]


def checks_table(record: dict) -> str:
    rows = [
        [html.escape(name), _num(check["value"]), _num(check["limit"]), _verdict(check["passed"])]
        for name, check in record["checks"].items()
    ]
    return _table(["check", "value", "limit", "verdict"], rows)


def drift_section(evidence: dict, record: dict) -> tuple[str, list[go.Figure]]:
    """The most drifted feature columns first, and the distributions of the top ones."""
    scores, detected = evidence["column_scores"], evidence["column_drifted"]
    order = sorted(scores, key=lambda c: (not detected.get(c, False), -scores[c]))
    limit = record["policy"]["max_column_drift"]
    rows = [
        [html.escape(c), f"{scores[c]:.3f}", "yes" if detected.get(c) else "no", _verdict(scores[c] <= limit)]
        for c in order[:SHOWN_COLUMNS]
    ]
    text = (
        f"<p>{sum(detected.values())} of {len(scores)} comparable columns drifted by Evidently's test "
        f"(share {record['inputs']['drift_share']:.3f}, limit {record['policy']['max_drift_share']}); "
        f"a column's Wasserstein distance in reference standard deviations may be at most {limit}. "
        f"The {min(SHOWN_COLUMNS, len(order))} most drifted:</p>"
        + _table(["column", "drift score", "drifted", "column limit"], rows)
    )
    figures = []
    cur, ref = evidence["current"], evidence["reference"]
    for column in order[:PLOTTED_COLUMNS]:
        figure = go.Figure()
        figure.add_histogram(x=ref[column], name="serving", opacity=0.6, histnorm="probability")
        figure.add_histogram(x=cur[column], name="candidate", opacity=0.6, histnorm="probability")
        figure.update_layout(barmode="overlay", title=f"{column} (score {scores[column]:.3f})", height=300)
        figures.append(figure)
    return text, figures


def embedding_figures(evidence: dict, record: dict, calibration: dict | None) -> list[go.Figure]:
    """Both batches' embeddings of the same users at the same time (candidate aligned onto the
    serving space), projected on their joint first two principal components; the drift score
    among the calibration's clean retrains."""
    aligned, same_time = evidence["aligned"][:POINTS], evidence["same_time"][:POINTS]
    both = np.vstack([aligned, same_time])
    centred = both - both.mean(axis=0)
    _, _, basis = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ basis[:2].T
    figure = go.Figure()
    figure.add_scattergl(x=xy[len(aligned) :, 0], y=xy[len(aligned) :, 1], mode="markers", name="serving", opacity=0.5)
    figure.add_scattergl(
        x=xy[: len(aligned), 0], y=xy[: len(aligned), 1], mode="markers", name="candidate (aligned)", opacity=0.5
    )
    figure.update_layout(title="the same users embedded by both batches (joint PCA)", height=450)
    figures = [figure]
    value, limit = record["inputs"]["embedding_drift"], record["policy"]["max_embedding_drift"]
    clean = (calibration or {}).get("embedding_drift", {}).get("clean", [])
    shifted = (calibration or {}).get("embedding_drift", {}).get("shifted", [])
    scale = go.Figure()
    if clean:
        scale.add_histogram(x=clean, name="clean retrains (calibration)", opacity=0.6)
    if shifted:
        scale.add_histogram(x=shifted, name="planted shifts (calibration)", opacity=0.6)
    scale.add_vline(x=limit, line_dash="dash", annotation_text=f"limit {limit}")
    scale.add_vline(x=value, line_color="black", annotation_text=f"this candidate {value:.3f}")
    scale.update_layout(
        barmode="overlay", title="embedding drift (domain-classifier ROC AUC)", height=300, xaxis_range=[0.4, 1.0]
    )
    return [*figures, scale]


def stability_figure(evidence: dict, record: dict) -> go.Figure:
    overlaps, floor = evidence["knn_overlaps"], record["policy"]["min_knn_overlap"]
    figure = go.Figure()
    figure.add_histogram(x=overlaps, xbins={"start": -0.05, "end": 1.05, "size": 0.1}, name="users")
    figure.add_vline(x=floor, line_dash="dash", annotation_text=f"floor {floor} (on the mean)")
    figure.add_vline(x=float(np.mean(overlaps)), line_color="black", annotation_text=f"mean {np.mean(overlaps):.3f}")
    figure.update_layout(title="kNN@10 overlap per query user after alignment", height=300)
    return figure


def _label(quality: dict, task: str) -> str:
    return f"{task} {quality[task].get('metric', '')}".strip()


def space_section(evidence: dict, record: dict) -> tuple[str, go.Figure]:
    """The space as a consumer on the serving batch sees it: no alignment anywhere."""
    inputs = record["inputs"]
    space, kept = inputs.get("space") or {}, inputs.get("heads_kept_by_task") or {}
    how = (
        "the candidate continues the serving batch's space (userrep.continuity), so the serving heads read "
        "its embeddings as served"
        if inputs.get("continues")
        else "the candidate starts a new space, so the serving heads read its embeddings after alignment"
    )
    rows = [
        [
            "same-user cosine, unaligned (median / 10th percentile)",
            f"{_num(space.get('cosine_median'))} / {_num(space.get('cosine_p10'))}",
            str(space.get("users", "-")),
        ],
        [
            "kNN@10 overlap, each batch searched in its own space: embeddings",
            _num(space.get("knn_embeddings")),
            str(space.get("queries", "-")),
        ],
        [
            "the same users' feature vectors (what their data kept)",
            _num(space.get("knn_features")),
            str(space.get("queries", "-")),
        ],
        *[[f"serving {html.escape(t)} head on the candidate / on its own", _num(v), "-"] for t, v in kept.items()],
    ]
    text = f"<p>{how}. Floor on the worst head: {_num(record['policy'].get('min_heads_kept'))}.</p>" + _table(
        ["measure", "value", "users"], rows
    )
    figure = go.Figure()
    per_user = evidence.get("space") or {}
    for name in ("cosine", "knn_embeddings", "knn_features"):
        if name in per_user:
            figure.add_histogram(x=list(per_user[name]), xbins={"start": -1.05, "end": 1.05, "size": 0.1}, name=name)
    figure.update_layout(barmode="overlay", title="per user: same-user cosine and kNN@10 overlaps", height=300)
    figure.update_traces(opacity=0.6)
    return text, figure


def consumers_note(root: Path, record: dict) -> str:
    """Who is on which batch (``userrep batch pin``): the teams a promotion leaves on the old space."""
    from userrep.batch.registry import consumers, read_pointer

    pinned = consumers(read_pointer(root))
    if not pinned:
        return "<p>No consumer has pinned a batch (<code>userrep batch pin BATCH --consumer NAME</code>).</p>"
    rows = [[html.escape(b), html.escape(", ".join(names))] for b, names in sorted(pinned.items())]
    return (
        f"<p>Consumers pinned to a batch: after a promotion they keep reading it (<code>batch_id</code>) while "
        f"it is live. {html.escape(str(record['serving']))} is serving now.</p>" + _table(["batch", "consumers"], rows)
    )


def _half_width(pair: dict, side: str) -> float:
    """Half the 95% interval of one batch's mean (0: not measured per user)."""
    sd, n = pair.get(f"sd_{side}"), pair.get("n")
    return Z95 * sd / math.sqrt(n) if sd is not None and n and math.isfinite(sd) else 0.0


def quality_section(record: dict) -> tuple[str, go.Figure | None]:
    """Both batches on the same users and labels (means with 95% intervals; the best per column
    bold), the paired differences, and each batch's own recorded validation metric."""
    quality = record["inputs"]["quality"]
    if not quality:
        return "<p>No downstream task to compare (the serving batch has none, or this is the first batch).</p>", None
    tasks = list(quality)
    sides = ("candidate", "serving")
    columns = []  # per task, the two cells (candidate, serving), the best bold
    for task in tasks:
        pair = quality[task]
        texts = [
            _num(pair[side])
            + (f" ({pair[side] - h:.3f}-{pair[side] + h:.3f})" if (h := _half_width(pair, side)) else "")
            for side in sides
        ]
        columns.append([f"<b>{t}</b>" if bold else t for t, bold in zip(texts, _bold_best([pair[s] for s in sides]))])
    means = _table(
        ["batch", *(_label(quality, t) for t in tasks)],
        [[side, *(c[i] for c in columns)] for i, side in enumerate(sides)],
    )
    paired_rows = []
    for task in tasks:
        pair, check = quality[task], record["checks"][f"quality_{task}"]
        se = pair.get("se", math.nan)
        interval = (
            f" ({pair['difference'] - Z95 * se:.4f} to {pair['difference'] + Z95 * se:.4f})"
            if math.isfinite(se)
            else ""
        )
        recorded = pair.get("recorded") or {}
        paired_rows.append(
            [
                html.escape(task),
                _num(pair.get("difference")) + interval,
                str(pair.get("n", "-")),
                f"-{check['limit']}",
                _num(recorded.get("candidate")) + " / " + _num(recorded.get("serving")),
                _verdict(check["passed"]),
            ]
        )
    header = [
        "task",
        "paired difference (95% interval)",
        "users",
        "allowed",
        "own validation (candidate / serving)",
        "verdict",
    ]
    text = (
        "<p>Both batches' deployed heads on the candidate's validation users and label window; each batch "
        "embeds the users with its own encoders and model. Means with 95% intervals; the best value per "
        "column bold.</p>" + means + _table(header, paired_rows)
    )
    figure = go.Figure()
    for side in sides:
        figure.add_bar(
            x=[_label(quality, t) for t in tasks],
            y=[quality[t][side] for t in tasks],
            error_y={"type": "data", "array": [_half_width(quality[t], side) for t in tasks]},
            name=side,
        )
    figure.update_layout(title="downstream quality on the same users and labels", height=350)
    return text, figure


def write_rollout(path: Path, record: dict, evidence: dict | None, calibration: dict | None = None) -> Path:
    """Render the report of one gate decision (``record``: gate.json; ``evidence``: what ``measure``
    kept for the pictures, None for a first batch)."""
    passed = record["passed"]
    parts = [
        f"<h1>Rollout of {html.escape(record['candidate'])}</h1>",
        f"<p>Candidate <b>{html.escape(record['candidate'])}</b> against serving "
        f"<b>{html.escape(str(record['serving']))}</b>, decided {html.escape(record['decided_at'])}.</p>",
        f'<p class="decision">{_verdict(passed)}</p>',
        "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in record["reasons"]) + "</ul>"
        if record["reasons"]
        else "",
        "<h2>Checks</h2>",
        checks_table(record),
    ]
    figures: list[go.Figure] = []

    def place(figure: go.Figure) -> str:
        figures.append(figure)
        return f"<!--figure {len(figures) - 1}-->"

    if evidence is not None:
        drift_text, drift_figures = drift_section(evidence, record)
        space_text, space_figure = space_section(evidence, record)
        space_text += consumers_note(path.parent.parent, record)
        parts += ["<h2>Feature drift</h2>", drift_text, *map(place, drift_figures)]
        parts += [
            "<h2>Embedding drift</h2>",
            f"<p>A domain classifier tells the aligned candidate's embeddings from the serving batch's "
            f"with ROC AUC {record['inputs']['embedding_drift']:.3f} (limit {record['policy']['max_embedding_drift']}; "
            "0.5: indistinguishable).</p>",
            *map(place, embedding_figures(evidence, record, calibration)),
            "<h2>The space, as consumers see it</h2>",
            space_text,
            place(space_figure),
            "<h2>Stability after alignment</h2>",
            f"<p>Mean kNN@10 overlap {record['inputs']['knn_overlap']:.3f} (floor {record['policy']['min_knn_overlap']}) "
            "of the same users in the serving index, the candidate aligned onto it.</p>",
            place(stability_figure(evidence, record)),
        ]
        quality_text, quality_figure = quality_section(record)
        parts += ["<h2>Downstream quality</h2>", quality_text] + ([place(quality_figure)] if quality_figure else [])
        drift = html.escape(BatchDir(path.parent).drift_report.name)
        parts.append(f'<p>Evidently\'s full drift report: <a href="{drift}">{drift}</a>.</p>')
    else:
        parts.append("<p>No serving batch to compare with: only the batch's own completeness was checked.</p>")
    page = "\n".join(parts)
    for i, figure in enumerate(figures):
        page = page.replace(
            f"<!--figure {i}-->", figure.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
        )
    title = f"userrep rollout: {html.escape(record['candidate'])} {'PASS' if passed else 'BLOCK'}"
    path.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>'
        f"<body>{page}</body></html>",
        encoding="utf-8",
    )
    return path
