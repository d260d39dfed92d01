"""Run by the .tools interpreter (helm-python-sdk lives there, not in .venv): lint, validate
values against the chart's schema, render. Prints JSON; tests/test_k8s.py drives it."""

import json
import sys

import yaml
from helm_python import Chart, HelmError, lint


def main() -> None:
    chart_dir, values_file, namespace = sys.argv[1], sys.argv[2], sys.argv[3]
    values = yaml.safe_load(open(values_file)) if values_file != "-" else {}
    out = {"lint": None, "schema_error": None, "rendered": None}
    try:
        out["lint"] = str(lint(chart_dir, values=values, strict=True, namespace=namespace))
    except HelmError as exc:
        out["lint"] = f"ERROR {exc}"
    chart = Chart.load(chart_dir)
    try:
        merged = chart.merge_values(values) if hasattr(chart, "merge_values") else values
        chart.validate_schema(merged)
        out["rendered"] = chart.render(values, name="userrep", namespace=namespace, is_install=True)
    except HelmError as exc:
        out["schema_error"] = str(exc)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
