"""The evaluation report: one self-contained HTML page (plotly inlined, no network needed).

Metric bars per task and method, a 2-D (t-SNE) map of the embedding space coloured by dominant genre,
the cold -> warm convergence curve and the ablation table.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sklearn.manifold import TSNE

from userrep.tasks import registry


def columns() -> tuple[tuple[str, str], ...]:
    """Every (row, metric) the report shows, from the registered tasks' ``columns``."""
    return tuple(
        (row, metric) for task in registry.tasks().values() for row, found in task.columns.items() for metric in found
    )


def main_metric() -> dict[str, str]:
    """Each row's headline metric: the first of its columns."""
    return {row: found[0] for task in registry.tasks().values() for row, found in task.columns.items()}


_MAP_POINTS = 2000


def write_report(
    metrics: dict, ctx, embeddings: np.ndarray, genres: tuple[str, ...], data_dir: Path, path: Path
) -> None:
    figures = [
        _task_bars(metrics),
        _embedding_map(ctx, embeddings, genres, data_dir),
        _convergence(metrics),
        _freshness(metrics),
    ]
    parts = [
        f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
        for i, f in enumerate(f for f in figures if f is not None)
    ]
    skipped = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in metrics["skipped"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>userrep evaluation: {html.escape(metrics["dataset"])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}.neg{{color:#b00}}.pos{{color:#070}}</style></head><body>
<h1>Evaluation: {html.escape(metrics["dataset"])}</h1>
<p>{html.escape(metrics["note"])}. Users with a representation: {metrics["n_users"]:,};
warm train/test {metrics["counts"]["warm_train"]:,}/{metrics["counts"]["warm_test"]:,}; cold {metrics["counts"]["cold"]:,} ({metrics["counts"]["cold_held_out"]:,} held out as new);
top-K artists {metrics["counts"]["top_k_artists"]:,}. Total time {metrics["timings_s"]["total"]} s.</p>
{f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Tasks</h2>{_metrics_table(metrics)}{parts[0]}
<h2>Embedding space</h2>{"".join(parts[1:2])}
<h2>Cold &rarr; warm convergence</h2><p>Mean cosine between a warm user's embedding from only its first d days of history and
from all of it (d = 0: onboarding and attributes only).</p>{"".join(parts[2:3])}
<h2>Freshness</h2>{_freshness_text(metrics)}{"".join(parts[3:4])}
<h2>Ablations</h2><p>The autoencoder retrained without each feature group; difference to the full embedding (gur).</p>
{_ablation_table(metrics)}</body></html>"""
    path.write_text(page, encoding="utf-8")


def _metrics_table(metrics: dict) -> str:
    """Methods x metrics per task; value with its 95% interval; the best value per column bold."""
    out = []
    for task, methods in metrics["tasks"].items():
        names = list(dict.fromkeys(k for v in methods.values() for k in v if not k.endswith("_ci")))
        best = {n: _best(methods, n) for n in names}
        out.append(f"<tr><th>{html.escape(task)}</th>{''.join(f'<th>{html.escape(n)}</th>' for n in names)}</tr>")
        for method, values in methods.items():
            cells = "".join(
                f"<td{' style=font-weight:bold' if is_best(values.get(n), best[n], 4) else ''}>"
                f"{_fmt(values.get(n))}{_ci_text(values.get(f'{n}_ci'))}</td>"
                for n in names
            )
            out.append(f"<tr><td>{html.escape(method)}</td>{cells}</tr>")
    return f"<table>{''.join(out)}</table>{_comparison_list(metrics)}"


def _best(methods: dict, metric: str):
    found = [v.get(metric) for v in methods.values() if v.get(metric) is not None]
    return max(found) if found else None


def is_best(value, best, digits: int) -> bool:
    """Whether ``value`` is its column's best as printed (``digits`` decimals): every value that
    shows the same as the best is bold, not only the one that is larger in a later decimal."""
    return value is not None and best is not None and f"{value:.{digits}f}" == f"{best:.{digits}f}"


def _ci_text(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def comparison_lines(metrics: dict) -> list[str]:
    """One line per task metric: our best row vs the best baseline, paired difference, verdict."""
    lines = []
    for task, by_metric in metrics.get("comparisons", {}).items():
        for metric, c in by_metric.items():
            if c["diff"] is None:
                continue
            verdict = (
                "significantly better"
                if c["significant"] and c["diff"] > 0
                else "significantly worse"
                if c["significant"]
                else "not significantly different"
            )
            lines.append(
                f"{task} {metric}: {c['ours']} vs {c['baseline']} {c['diff']:+.4f}{_ci_text(c['diff_ci'])}: {verdict}"
            )
    return lines


def _comparison_list(metrics: dict) -> str:
    lines = comparison_lines(metrics)
    return (
        (
            "<p>Our best row against the best baseline (paired bootstrap, 95%):</p><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
            + "</ul>"
        )
        if lines
        else ""
    )


def _task_bars(metrics: dict) -> go.Figure:
    fig, main = go.Figure(), main_metric()
    methods = sorted({m for task in metrics["tasks"].values() for m in task})
    for method in methods:
        x, y = [], []
        for task, values in metrics["tasks"].items():
            if method in values:
                x.append(f"{task}<br>{main.get(task, '')}")
                y.append(values[method].get(main.get(task)))
        fig.add_bar(name=method, x=x, y=y)
    fig.update_layout(barmode="group", height=420, margin=dict(t=30), legend_title="method")
    return fig


def _embedding_map(ctx, embeddings: np.ndarray, genres: tuple[str, ...], data_dir: Path) -> go.Figure:
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(embeddings), size=min(_MAP_POINTS, len(embeddings)), replace=False))
    # t-SNE, not PCA: 2-D PCA shows activity level; t-SNE keeps taste neighbourhoods (10-NN genre
    # accuracy in 2-D 0.46 vs 0.24 on the default world) for ~5 s on 2,000 points.
    xy = TSNE(n_components=2, init="pca", perplexity=30, random_state=0).fit_transform(embeddings[rows])
    labels, source = _dominant_genre(ctx, genres, data_dir, rows)
    fig = go.Figure()
    for label in pd.Series(labels).value_counts().index[:20]:
        mask = labels == label
        fig.add_scattergl(x=xy[mask, 0], y=xy[mask, 1], mode="markers", name=str(label), marker=dict(size=4))
    fig.update_layout(
        height=520, margin=dict(t=30), title=f"t-SNE of {len(rows):,} user embeddings, coloured by {source}"
    )
    return fig


def _dominant_genre(ctx, genres: tuple[str, ...], data_dir: Path, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Hidden dominant genre when the dataset has truth.parquet, else the top genre of the history."""
    truth = data_dir / "truth.parquet"
    users = ctx.features.user_ids[rows]
    if truth.exists():
        dominant = pd.read_parquet(truth, columns=["user_id", "dominant_genre"]).set_index("user_id")["dominant_genre"]
        return dominant.reindex(users).fillna("unknown").to_numpy(), "hidden dominant genre (truth.parquet)"
    groups = [n for n, _ in ctx.features.schema.groups if n.startswith("genres_")]
    if not groups or not genres:
        return np.full(len(rows), "all"), "nothing (no genres)"
    shares = ctx.features.matrix[rows][:, ctx.features.schema.slices()[groups[-1]]]
    top = np.array(genres, dtype=object)[shares.argmax(axis=1)]
    return np.where(shares.sum(axis=1) > 0, top, "no history"), f"top genre in {groups[-1]}"


def _convergence(metrics: dict) -> go.Figure | None:
    if not metrics["convergence"]:
        return None
    days = list(metrics["convergence"])
    fig = go.Figure(
        go.Scatter(x=[int(d) for d in days], y=[metrics["convergence"][d] for d in days], mode="lines+markers")
    )
    fig.update_layout(
        height=360,
        margin=dict(t=30),
        xaxis_title="days of history",
        yaxis_title="mean cosine to full",
        yaxis_range=[min(0, *metrics["convergence"].values()), 1],
    )
    return fig


def _freshness_text(metrics: dict) -> str:
    found = metrics.get("freshness")
    if not found:
        return "<p>Not measured: it needs a global time split and test users with later plays.</p>"
    return (
        f"<p>The deployed <code>gur+history</code> head on {found['users'][0]:,} test users, each day d after the "
        f"cut-off scored on their plays of the next {found['window_days']} days, with the user state frozen "
        "at the cut-off and near-real-time (the events since added). A retrained arm: "
        "<code>bench/freshness.py</code>.</p>"
    )


def _freshness(metrics: dict) -> go.Figure | None:
    found = metrics.get("freshness")
    if not found:
        return None
    fig = go.Figure()
    for arm, name in (("frozen", "frozen at the cut-off"), ("nrt", "near-real-time")):
        fig.add_scatter(x=found["day"], y=found[arm], name=name, mode="lines+markers")
    fig.update_layout(
        height=360,
        margin=dict(t=30),
        xaxis_title="days after the cut-off",
        yaxis_title=f"future listening nDCG@10, next {found['window_days']} days",
    )
    return fig


def _freshness_table(metrics: dict) -> str:
    """Frozen against near-real-time by day (``userrep.evaltasks.run_freshness``)."""
    found = metrics.get("freshness")
    if not found:
        return ""
    lines = [
        f"\n**Freshness** (gur+history, test users' plays of the next {found['window_days']} days; "
        "state frozen at the cut-off or near-real-time):\n",
        "| day | users | frozen | near-real-time | gain (95% interval) |",
        "|---|---|---|---|---|",
    ]
    for i, day in enumerate(found["day"]):
        low, high = found["gain_ci"][i]
        gain = found["nrt"][i] - found["frozen"][i]
        ci = "" if low is None or high is None else f" ({low:+.3f} to {high:+.3f})"
        lines.append(
            f"| {day} | {found['users'][i]:,} | {found['frozen'][i]:.3f} | {found['nrt'][i]:.3f} | {gain:+.3f}{ci} |"
        )
    return "\n".join(lines) + "\n"


def _ablation_table(metrics: dict) -> str:
    if not metrics["ablations"]:
        return "<p>(not run)</p>"
    full, main = metrics["tasks"], main_metric()
    head = "".join(f"<th>{html.escape(t)} {html.escape(main[t])}</th>" for t in main if t in full)
    body = []
    for group, tasks in metrics["ablations"].items():
        cells = []
        for task in (t for t in main if t in full):
            value = tasks.get(task, {}).get(main[task])
            base = full[task].get("gur", {}).get(main[task])
            if value is None or base is None:
                cells.append("<td>-</td>")
                continue
            delta = value - base
            cells.append(f"<td>{value:.4f} <span class='{'neg' if delta < 0 else 'pos'}'>({delta:+.4f})</span></td>")
        body.append(f"<tr><td>without {html.escape(group)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>ablation</th>{head}</tr>{''.join(body)}</table>"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_summary(metrics: dict) -> str:
    """One markdown table: methods x main metrics with 95% intervals, the best per column bold, then
    the paired comparisons (the README's results tables)."""
    tasks, shown = metrics["tasks"], columns()
    methods = list(dict.fromkeys(m for task in tasks.values() for m in task))
    header = "| method | " + " | ".join(f"{t.replace('_', ' ')} {m}" for t, m in shown) + " |"
    lines = [header, "|---" * (len(shown) + 1) + "|"]
    for method in methods:
        cells = []
        for task, metric in shown:
            values = tasks.get(task, {}).get(method, {})
            value, best = values.get(metric), _best(tasks.get(task, {}), metric)
            text = "-" if value is None else f"{value:.3f}"
            text = f"**{text}**" if is_best(value, best, 3) else text
            ci = values.get(f"{metric}_ci")
            cells.append(text + ("" if not ci or ci[0] is None else f" ({ci[0]:.3f}-{ci[1]:.3f})"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    compared = "".join(f"\n- {line}" for line in comparison_lines(metrics))
    skipped = "".join(f"\n\n{task} skipped: {reason}" for task, reason in metrics["skipped"].items())
    return (
        "\n".join(lines)
        + ("\n" + compared if compared else "")
        + skipped
        + "\n"
        + _seeds_table(metrics)
        + _freshness_table(metrics)
        + _ablations_table(metrics)
    )


ABLATION_COLUMNS = (
    ("future_listening", "ndcg@10"),
    ("cold_start", "ndcg@10"),
    ("similar_users", "ndcg@50_taste"),
    ("similar_users", "ndcg@50"),
)  # the paper's ablation view: listening, cold start, and the space's neighbourhoods


def _ablations_table(metrics: dict) -> str:
    """The full model (``gur``) and each ablation, with 95% intervals (when --ablations ran)."""
    ablations = metrics.get("ablations")
    if not ablations:
        return ""
    rows = {"gur (all groups)": {t: v.get("gur", {}) for t, v in metrics["tasks"].items()}}
    rows.update({f"without {group}": tasks for group, tasks in ablations.items()})
    shown = [(t, m) for t, m in ABLATION_COLUMNS if any(m in r.get(t, {}) for r in rows.values())]
    lines = [
        "\nAblations (the autoencoder retrained without each group; same heads, users and resamples):\n",
        "| model | " + " | ".join(f"{t.replace('_', ' ')} {m}" for t, m in shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for name, tasks in rows.items():
        cells = []
        for task, metric in shown:
            values = tasks.get(task, {})
            value, ci = values.get(metric), values.get(f"{metric}_ci")
            text = "-" if value is None else f"{value:.3f}"
            cells.append(text + ("" if not ci or ci[0] is None else f" ({ci[0]:.3f}-{ci[1]:.3f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seeds_table(metrics: dict) -> str:
    """Mean +- standard deviation over the seeds' runs, best mean per column bold (when --seeds > 1)."""
    seeds = metrics.get("over_seeds")
    if not seeds:
        return ""
    runs = len(next(v for task in seeds.values() for m in task.values() for v in m.values())["values"])
    methods, shown = list(dict.fromkeys(m for task in seeds.values() for m in task)), columns()
    lines = [
        f"\nOver {runs} seeds (mean +- standard deviation):\n",
        "| method | " + " | ".join(f"{t.replace('_', ' ')} {m}" for t, m in shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for method in methods:
        cells = []
        for task, metric in shown:
            found = seeds.get(task, {}).get(method, {}).get(metric)
            means = [
                v[metric]["mean"] for v in seeds.get(task, {}).values() if metric in v and v[metric]["mean"] is not None
            ]
            text = "-" if not found or found["mean"] is None else f"{found['mean']:.3f} +- {found['std']:.3f}"
            best = max(means) if means else None
            cells.append(f"**{text}**" if found and is_best(found["mean"], best, 3) else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
