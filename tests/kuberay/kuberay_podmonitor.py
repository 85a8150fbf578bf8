"""Offline checks of kuberay/monitoring/podmonitor.elastic-trainer.yaml.

No Prometheus Operator CRD is carried in the repository, so the PodMonitor is checked
structurally: SCHEMA below is the subset of monitoring.coreos.com/v1 PodMonitor that the file
uses (field names and types as in the Prometheus Operator's API reference), with unknown fields
rejected, so a misspelt key fails here instead of being pruned by the API server. Then what no
schema can say: the selector must pick the head and worker pods KubeRay makes for the RayCluster,
and each endpoint's port name must be the containerPort where Ray serves its metrics.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from kuberay_invariants import KUBERAY_DIR, groups, ident, load_documents
from kuberay_pods import head_service_fqdn, ray_container, ray_start_params

PODMONITOR_FILE = KUBERAY_DIR / "monitoring" / "podmonitor.elastic-trainer.yaml"
# Prometheus durations as the operator's CRD accepts them (e.g. 15s, 1m30s).
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
RELABEL_ACTIONS = ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                   "lowercase", "uppercase", "keepequal", "dropequal"]  # fmt: skip


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STRINGS = {"type": "array", "items": {"type": "string"}}
_RELABELING = _closed(
    {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": LABEL_NAME}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"enum": RELABEL_ACTIONS + [a.capitalize() for a in RELABEL_ACTIONS]},
    }
)
_ENDPOINT = _closed(
    {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": DURATION},
        "scrapeTimeout": {"type": "string", "pattern": DURATION},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABELING},
        "metricRelabelings": {"type": "array", "items": _RELABELING},
    },
    required=("port",),
)
SCHEMA = _closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["name"],
        },
        "spec": _closed(
            {
                "jobLabel": {"type": "string"},
                "podTargetLabels": _STRINGS,
                "selector": _closed(
                    {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    }
                ),
                "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": _STRINGS}),
                "podMetricsEndpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
            },
            required=("selector", "podMetricsEndpoints"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)


def podmonitor() -> dict[str, Any]:
    docs = load_documents(PODMONITOR_FILE)
    assert len(docs) == 1, f"{PODMONITOR_FILE.name}: expected one document, found {len(docs)}"
    return docs[0]


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [
        f"{ident(manifest)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    ]


def pod_labels(cluster: dict[str, Any], node_type: str, group: dict[str, Any]) -> dict[str, str]:
    """The labels KubeRay puts on a group's pods: the template's plus its own ray.io/* ones."""
    labels = dict(group["template"].get("metadata", {}).get("labels", {}))
    labels["ray.io/cluster"] = cluster["metadata"]["name"]
    labels["ray.io/node-type"] = node_type
    labels["ray.io/group"] = group.get("groupName", "headgroup")
    return labels


def selection_errors(monitor: dict[str, Any], cluster: dict[str, Any]) -> list[str]:
    """Every Ray pod is selected, and scraped on the port where Ray serves metrics."""
    wanted = monitor["spec"]["selector"].get("matchLabels", {})
    fqdn = head_service_fqdn(cluster["metadata"]["name"])
    errors = []
    for label, node_type, group in groups(cluster):
        labels = pod_labels(cluster, node_type, group)
        missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
        if missing:
            errors.append(f"{ident(monitor)}: selector {missing} does not match {label} pods")
        ports = {p.get("name"): p["containerPort"] for p in ray_container(group).get("ports", [])}
        served = int(ray_start_params(group, node_type, fqdn)["metrics-export-port"])
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            port = ports.get(endpoint["port"])
            if port != served:
                errors.append(
                    f"{ident(monitor)}: port {endpoint['port']!r} is {port} on {label}, "
                    f"but Ray serves metrics on {served} (--metrics-export-port)"
                )
    return errors
