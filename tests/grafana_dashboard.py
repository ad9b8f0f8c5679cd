"""The Grafana dashboard's queries (deploy/grafana/dashboards/inferstream.json), with its variables
substituted the way Grafana substitutes them before a query reaches Prometheus, and the metric names
a query reads (from the PromQL syntax tree of `promql-parser`, a real PromQL parser).

Grafana's rules used here (Grafana docs, "Global variables" and "Prometheus template variables"):
- `$__interval` is the time range over the panel's data points, never below the datasource's
  minimum interval (`timeInterval`, the scrape interval); `$__rate_interval` is
  max($__interval + scrape interval, 4 x scrape interval); `$__range` is the dashboard's range.
- a multi-value template variable with "All" selected becomes its `allValue` (`.*` here); with
  values selected it becomes `(v1|v2|...)`, each value regex-escaped (variables are used in `=~`).
- `label_values(selector, label)` lists the values of `label` on the series `selector` matches.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import promql_parser

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "inferstream.json"
_LABEL_VALUES = re.compile(r"\s*label_values\(\s*(?:(?P<selector>.*),)?\s*(?P<label>\w+)\s*\)\s*")
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(frozen=True)
class PanelQuery:
    where: str  # "panel 12 'End-to-end latency' A"
    expr: str  # PromQL with Grafana variables
    instant: bool  # an instant query (tables) rather than a range query (graphs, stats)


@dataclass(frozen=True)
class TemplateVariable:
    name: str
    selector: str | None  # label_values' series selector (None: the label over every series)
    label: str
    all_value: str | None  # what "All" stands for (None: every value, as `(v1|v2|...)`)


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def all_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panel_queries(dashboard: dict) -> list[PanelQuery]:
    return [PanelQuery(f"panel {panel['id']} {panel.get('title')!r} {target.get('refId', '')}", target["expr"],
                       bool(target.get("instant")) and not target.get("range"))
            for panel in all_panels(dashboard["panels"]) for target in panel.get("targets", []) if target.get("expr")]


def template_variables(dashboard: dict) -> list[TemplateVariable]:
    """The dashboard's query variables; each must be a `label_values(...)` query."""
    variables = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var.get("query"), dict) else var.get("query", "")
        match = _LABEL_VALUES.fullmatch(query)
        assert match, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
        variables.append(TemplateVariable(var["name"], match["selector"], match["label"],
                                          var.get("allValue") if var.get("includeAll") else None))
    return variables


def rate_interval_s(interval_s: float, scrape_interval_s: float) -> float:
    return max(interval_s + scrape_interval_s, 4 * scrape_interval_s)


def multi_value(values: list[str]) -> str:
    """Grafana's formatting of a multi-value selection for Prometheus (prometheusSpecialRegexEscape):
    regex specials get a backslash that is itself escaped for the PromQL string literal."""
    escaped = (_REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), v.replace("\\", "\\" * 4)) for v in values)
    return "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, str], interval_s: float, scrape_interval_s: float, range_s: float) -> str:
    """`expr` as Grafana sends it: global variables, then template variables (`variables`: name ->
    formatted value). An unknown variable is an error, not an empty string."""
    builtins = {"__interval": f"{interval_s:g}s", "__interval_ms": f"{interval_s * 1000:g}",
                "__rate_interval": f"{rate_interval_s(interval_s, scrape_interval_s):g}s",
                "__range": f"{range_s:g}s", "__range_s": f"{range_s:g}", "__range_ms": f"{range_s * 1000:g}"}

    def value(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name in builtins:
            return builtins[name]
        assert name in variables, f"{expr!r} uses ${name}, which the dashboard does not define"
        return variables[name]

    return _VARIABLE.sub(value, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables substituted first)."""
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.update([node.name] if node.name else [m.value for m in node.matchers.matchers
                                                          if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal])
            return
        if isinstance(node, promql_parser.MatrixSelector):
            return visit(node.vector_selector)
        for child in (getattr(node, attr, None) for attr in ("expr", "param", "lhs", "rhs")):
            if child is not None:
                visit(child)
        for arg in getattr(node, "args", None) or []:
            visit(arg)

    visit(promql_parser.parse(expr))
    return names


def static_form(expr: str, dashboard: dict) -> str:
    """`expr` with every variable at its "All" value and a one-minute range: parseable PromQL."""
    variables = {v.name: v.all_value or ".*" for v in template_variables(dashboard)}
    return substitute(expr, variables, interval_s=15, scrape_interval_s=15, range_s=60)
