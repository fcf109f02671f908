#!/usr/bin/env python3
"""Validate custom resources and skaffold.yaml against their real schemas.

    validate_crs.py crs SCHEMA_DIR [--crd CRD.yaml]... FILE...
                                               custom resources in FILEs against the CRDs in SCHEMA_DIR
                                               and in each --crd file (e.g. one generated at run time
                                               by `nexus-analytics crd`)
    validate_crs.py skaffold SCHEMA.json FILE  every document of a skaffold.yaml

Custom resources: every document whose apiVersion group is not a built-in
Kubernetes group is validated against the openAPIV3Schema of the matching CRD
version found under SCHEMA_DIR (*.yaml CRDs, e.g. prometheus-operator v0.93.0,
KEDA v2.20.2) or given with --crd. The OpenAPI v3 structural schema is turned
into JSON Schema:

  * x-kubernetes-int-or-string: true  -> anyOf integer | string
  * nullable: true                    -> the type also admits null
  * objects with properties and neither additionalProperties nor
    x-kubernetes-preserve-unknown-fields reject unknown fields, as the API
    server does under kubectl's default strict field validation
  * x-kubernetes-validations (CEL) rules are evaluated for the rules known
    below; an unknown rule on a validated object is reported as a failure so
    a CRD upgrade cannot silently weaken the check.
  * apiVersion, kind (strings) and metadata (object) are always allowed at the
    root, as the API server does even when the schema does not list them
    (kube-derive CRDs list only spec and status).

A custom kind without a CRD in SCHEMA_DIR fails. Built-in kinds are skipped
(kubernetes-validate covers them). Prints one line per resource; exit 1 on
any failure.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import sys

import jsonschema
import yaml

BUILTIN_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "rbac.authorization.k8s.io",
    "networking.k8s.io", "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io",
    "apiextensions.k8s.io", "admissionregistration.k8s.io", "certificates.k8s.io",
    "discovery.k8s.io", "events.k8s.io", "node.k8s.io", "flowcontrol.apiserver.k8s.io",
    "apiregistration.k8s.io", "resource.k8s.io", "authentication.k8s.io",
    "authorization.k8s.io", "storagemigration.k8s.io", "internal.apiserver.k8s.io",
}


def _min_le_max(obj: dict) -> bool:
    mx = obj.get("maxReplicaCount", 100)
    return "minReplicaCount" not in obj or obj["minReplicaCount"] <= mx


# CEL rules we can evaluate exactly, keyed by the rule text (whitespace-normalised).
KNOWN_CEL = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": _min_le_max,
}


def _norm(rule: str) -> str:
    return " ".join(rule.split())


def convert(node, strict: bool = True):
    """OpenAPI v3 structural schema -> JSON Schema (draft 7)."""
    if isinstance(node, list):
        return [convert(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: convert(v, strict) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = convert(value, strict) if isinstance(value, (dict, list)) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(v, strict) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description", "format", "example"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        int_or_string = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        out.pop("type", None)
        out = {"allOf": [out, int_or_string]} if out else int_or_string
    if node.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif isinstance(t, list) and "null" not in t:
            out["type"] = t + ["null"]
    if (
        strict
        and node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def collect_cel(node, path=()):
    """Yield (json-path tuple, rule, message) for every x-kubernetes-validations entry."""
    if not isinstance(node, dict):
        return
    for rule in node.get("x-kubernetes-validations", []) or []:
        yield path, rule.get("rule", ""), rule.get("message", rule.get("rule", ""))
    for name, sub in (node.get("properties") or {}).items():
        yield from collect_cel(sub, path + (name,))


ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}


def root_schema(raw: dict) -> dict:
    """The CRD's schema with the implicit root fields added (see the module docstring)."""
    raw = copy.deepcopy(raw)
    props = raw.setdefault("properties", {})
    for name, schema in ROOT_FIELDS.items():
        props.setdefault(name, schema)
    return raw


def load_crds(schema_dir: str, extra_files: list[str] = ()) -> dict:
    crds = {}
    files = sorted(glob.glob(os.path.join(schema_dir, "**", "*.yaml"), recursive=True)) + list(extra_files)
    for f in files:
        with open(f) as fh:
            for doc in yaml.safe_load_all(fh):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for ver in spec["versions"]:
                    raw = ver["schema"]["openAPIV3Schema"]
                    key = (f"{spec['group']}/{ver['name']}", spec["names"]["kind"])
                    crds[key] = {
                        "file": f if f in extra_files else os.path.relpath(f, schema_dir),
                        "schema": convert(root_schema(raw)),
                        "cel": list(collect_cel(raw)),
                        "served": ver.get("served", True),
                    }
    return crds


def get_path(obj, path):
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return None
        obj = obj[p]
    return obj


def fmt_err(e: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in e.absolute_path) or "(root)"
    return f"{where}: {e.message[:300]}"


def cmd_crs(schema_dir: str, files: list[str]) -> int:
    extra, rest = [], []
    it = iter(files)
    for a in it:
        if a == "--crd":
            crd_file = next(it, None)
            if crd_file is None:
                print("FAIL --crd needs a file")
                return 2
            extra.append(crd_file)
        else:
            rest.append(a)
    files = rest
    crds = load_crds(schema_dir, extra)
    if not crds:
        print(f"FAIL no CRDs found under {schema_dir}")
        return 1
    for f in extra:
        if not any(c["file"] == f for c in crds.values()):
            print(f"FAIL {f} holds no CustomResourceDefinition")
            return 1
    failed = checked = 0
    for f in files:
        with open(f) as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d]
        for doc in docs:
            api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            group = api.rsplit("/", 1)[0] if "/" in api else ""
            if group in BUILTIN_GROUPS:
                continue
            name = (doc.get("metadata") or {}).get("name", "?")
            label = f"{kind}/{name} ({api}) in {os.path.basename(f)}"
            crd = crds.get((api, kind))
            checked += 1
            if crd is None:
                print(f"FAIL {label}: no CRD schema for {api} {kind} under {schema_dir}")
                failed += 1
                continue
            if not crd["served"]:
                print(f"FAIL {label}: version {api} is not served by the CRD")
                failed += 1
                continue
            errors = sorted(jsonschema.Draft7Validator(crd["schema"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
            problems = [fmt_err(e) for e in errors]
            for path, rule, message in crd["cel"]:
                target = get_path(doc, path)
                if target is None:
                    continue
                check = KNOWN_CEL.get(_norm(rule))
                if check is None:
                    problems.append(f"{'/'.join(path)}: CEL rule not evaluated by this script: {rule!r}")
                elif not check(target):
                    problems.append(f"{'/'.join(path)}: {message}")
            if problems:
                failed += 1
                print(f"FAIL {label} against {crd['file']}")
                for p in problems:
                    print(f"     {p}")
            else:
                print(f"ok   {label} against {crd['file']}")
    if checked == 0:
        print("note: no custom resources in the given files")
    return 1 if failed else 0


def cmd_skaffold(schema_file: str, target: str) -> int:
    with open(schema_file) as fh:
        schema = json.load(fh)
    validator = jsonschema.Draft7Validator(schema)
    with open(target) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    failed = 0
    for i, doc in enumerate(docs):
        name = (doc.get("metadata") or {}).get("name", f"document {i}")
        errors = list(validator.iter_errors(doc))
        if errors:
            failed += 1
            print(f"FAIL skaffold config {name} ({doc.get('apiVersion')})")
            # anyOf errors are opaque: dig into the best match for a useful message.
            best = jsonschema.exceptions.best_match(errors)
            print(f"     {fmt_err(best)}")
            for ctx in (best.context or [])[:5]:
                print(f"     - {fmt_err(ctx)}")
        else:
            print(f"ok   skaffold config {name} ({doc.get('apiVersion')})")
    return 1 if failed or not docs else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "crs":
        return cmd_crs(argv[1], argv[2:])
    if len(argv) == 3 and argv[0] == "skaffold":
        return cmd_skaffold(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
