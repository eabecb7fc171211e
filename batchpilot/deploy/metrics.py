"""One Prometheus exposition for several replicas: each replica's samples labelled with its name."""

from __future__ import annotations


def merge_metrics(texts: dict[str, str]) -> str:
    """One exposition of several replicas' metrics, each sample labelled with its replica."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            # the parser drops a counter's `_total`; the text format keeps it in HELP and TYPE
            name = f"{fam.name}_total" if fam.type == "counter" else fam.name
            _, _, lines = families.setdefault(name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                labels = {**s.labels, "replica": replica}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{body}}} {s.value}")
    out = []
    for name, (kind, doc, lines) in families.items():
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
