"""Offline schema validation of the manifests in kuberay/, as the API server would do it.

- RayCluster / RayJob: the KubeRay v1.7.0 CRDs (schemas/kuberay-v1.7.0/crds/). Their
  openAPIV3Schema is turned into a JSON Schema and checked with `jsonschema`, after applying
  the schema's defaults the way the API server does. Unknown fields are rejected, as
  `kubectl apply` (field validation Strict) does: every object schema without
  `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`.
- Core kinds (PersistentVolumeClaim, ConfigMap, ...) and the pod templates embedded in the
  Ray resources: `kubernetes-validate` (strict), whose Kubernetes schemas ship with the
  package, so nothing is fetched.

Each check returns a list of one-line error strings; an empty list means valid.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Upstream KubeRay files carried in the repository (source and refresh: its README.md).
KUBERAY_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
CRD_FILES = {
    "RayCluster": KUBERAY_SCHEMAS / "crds" / "ray.io_rayclusters.yaml",
    "RayJob": KUBERAY_SCHEMAS / "crds" / "ray.io_rayjobs.yaml",
}
CRD_VERSION = "v1"
# Oldest Kubernetes minor the manifests must be valid for (kubernetes-validate picks the newest
# schema set not newer than this).
KUBERNETES_VERSION = "1.30.0"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# Keywords that mean the same in OpenAPI v3 (structural schemas) and JSON Schema.
COPIED_KEYWORDS = (
    "enum",
    "required",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
)


# ---------------------------------------------------------------- CRD -> JSON Schema


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load(CRD_FILES[kind].read_text())


def crd_version_schema(kind: str, version: str = CRD_VERSION) -> dict[str, Any]:
    """The openAPIV3Schema of one served version of a CRD."""
    for entry in crd(kind)["spec"]["versions"]:
        if entry["name"] == version and entry.get("served", False):
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} CRD serves no version {version}")


def crd_api_version(kind: str, version: str = CRD_VERSION) -> str:
    return f"{crd(kind)['spec']['group']}/{version}"


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """One structural-schema node as JSON Schema (draft 2020-12)."""
    out: dict[str, Any] = {}
    if "anyOf" in node:
        out["anyOf"] = [to_json_schema(sub) for sub in node["anyOf"]]
    elif node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    for key in COPIED_KEYWORDS:
        if key in node:
            out[key] = node[key]
    if node.get("nullable") and "enum" in out:
        out["enum"] = [*out["enum"], None]
    if node.get("type") == "integer" and node.get("format") in ("int32", "int64"):
        low, high = INT32 if node["format"] == "int32" else INT64
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = to_json_schema(extra)
    elif isinstance(extra, bool):
        out["additionalProperties"] = extra
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        # A structural schema prunes (and strict field validation rejects) unknown fields.
        out["additionalProperties"] = False
    if node.get("x-kubernetes-embedded-resource"):
        for field in ("apiVersion", "kind"):
            out.setdefault("properties", {}).setdefault(field, {"type": "string"})
        out.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    return out


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = to_json_schema(crd_version_schema(kind))
    # The root metadata is an ObjectMeta that the API server checks itself; it is validated
    # against the core ObjectMeta schema in crd_errors.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"]["status"] = {}  # never part of a manifest
    return jsonschema.Draft202012Validator(schema)


# ---------------------------------------------------------------- defaulting


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """A copy of `value` with the schema's defaults filled in, as the API server does on create:
    missing properties of an object that is present get their `default`, then recurse."""
    if isinstance(value, dict):
        value = dict(value)
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            known = node.get("properties", {})
            for name in value:
                if name not in known:
                    value[name] = apply_defaults(value[name], extra)
        return value
    if isinstance(value, list) and "items" in node:
        return [apply_defaults(item, node["items"]) for item in value]
    return value


def defaulted(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Ray manifest as the API server would store it (CRD defaults applied)."""
    return apply_defaults(manifest, crd_version_schema(manifest["kind"]))


# ---------------------------------------------------------------- rules the schema cannot carry


def _walk_list_rules(value: Any, node: dict[str, Any], path: str) -> list[str]:
    """`x-kubernetes-list-type: map/set` uniqueness (e.g. two env vars with the same name) and
    CEL rules (`x-kubernetes-validations`), which this offline validator cannot evaluate: a
    manifest that sets a field guarded by CEL is reported, so that nobody trusts an unchecked
    rule."""
    errors: list[str] = []
    if node.get("x-kubernetes-validations") and path:
        rules = "; ".join(rule["rule"] for rule in node["x-kubernetes-validations"])
        errors.append(f"{path}: guarded by CEL rules not checked offline ({rules})")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                errors += _walk_list_rules(value[name], sub, f"{path}.{name}".lstrip("."))
    elif isinstance(value, list) and "items" in node:
        errors += _list_uniqueness(value, node, path)
        for i, item in enumerate(value):
            errors += _walk_list_rules(item, node["items"], f"{path}[{i}]")
    return errors


def _list_uniqueness(value: list[Any], node: dict[str, Any], path: str) -> list[str]:
    kind = node.get("x-kubernetes-list-type")
    if kind == "map":
        keys = node.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
    elif kind == "set":
        seen = [yaml.safe_dump(item) for item in value]
    else:
        return []
    duplicates = sorted({str(s) for s in seen if seen.count(s) > 1})
    return [f"{path}: duplicate entries in a list-type={kind}: {d}" for d in duplicates]


# ---------------------------------------------------------------- public checks


def format_error(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(root)"
    if error.validator == "additionalProperties" and error.validator_value is False:
        return f"{where}: unknown field(s): {error.message}"
    return f"{where}: {error.message}"


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    """Validate a RayCluster / RayJob against its KubeRay CRD, defaults applied first."""
    kind = manifest.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not a KubeRay kind this validator knows ({sorted(CRD_FILES)})"]
    errors = []
    if manifest.get("apiVersion") != crd_api_version(kind):
        errors.append(
            f"apiVersion: {manifest.get('apiVersion')!r}, expected {crd_api_version(kind)!r}"
        )
    stored = defaulted(manifest)
    validator = _crd_validator(kind)
    errors += sorted(format_error(e) for e in validator.iter_errors(stored))
    errors += _walk_list_rules(stored, crd_version_schema(kind), "")
    metadata = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest.get("metadata")}
    errors += core_errors(metadata)  # paths start with "metadata"
    return errors


def core_errors(obj: dict[str, Any]) -> list[str]:
    """Validate a core Kubernetes object with kubernetes-validate (strict: unknown fields fail)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(root)"
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def pod_template_errors(template: dict[str, Any]) -> list[str]:
    """An embedded pod template, validated as the core PodTemplate object it would become."""
    wrapper = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "embedded"},
        "template": template,
    }
    return [re.sub(r"^template\.?", "", e) or e for e in core_errors(wrapper)]
