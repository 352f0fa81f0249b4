"""mkdocs hook: pages that hold `<!-- generated: NAME -->` get that reference, made from the code
at build time, so the docs cannot drift from what the daemon accepts and exports.

    config   every field of runtime.yaml (personaplex_edge.runtime.service.config_reference)
    metrics  every metric the daemon exports, with its type, labels and help (its registry)
"""

from __future__ import annotations

import re

from prometheus_client.registry import CollectorRegistry

MARKER = re.compile(r"<!-- generated: (\w+) -->")


def on_page_markdown(markdown: str, **_: object) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


def _config() -> str:
    from personaplex_edge.runtime.service.config_reference import reference_markdown

    return reference_markdown()


def _metrics() -> str:
    from personaplex_edge.runtime.service.metrics import Metrics

    registry: CollectorRegistry = Metrics(device_metrics=False).registry
    rows = ["| metric | type | labels | what it counts |", "|---|---|---|---|"]
    for family in registry.collect():
        labels = sorted({key for sample in family.samples for key in sample.labels
                         if key not in ("le", "quantile")})
        name = family.name + ("_total" if family.type == "counter" else "")
        name = name + "_info" if family.type == "info" else name
        rows.append(f"| `{name}` | {family.type} | {', '.join(f'`{k}`' for k in labels)} | "
                    f"{family.documentation} |")
    return "\n".join(rows) + "\n"


GENERATORS = {"config": _config, "metrics": _metrics}
