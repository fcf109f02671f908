#!/usr/bin/env python3
"""Small checks used by scripts/validate-k8s.

    k8s_checks.py env-drift ALLOWED_FILE RENDERED.yaml...
        Every environment variable the chart gives the nexus-analytics containers
        (env[].name, and the keys of ConfigMaps/Secrets pulled in with envFrom)
        must be one the binary reads: a line of ALLOWED_FILE (the output of
        `nexus-analytics env-vars`); a line ending in '*' is a prefix, and
        KAFKA_PROPERTY_* (librdkafka pass-through) is always allowed. The
        operator container may also set POD_NAME (read by src/operator/mod.rs
        for its Events, not listed by `env-vars`).
    k8s_checks.py operator-rbac CLUSTER_RENDER.yaml NAMESPACED_RENDER.yaml WATCH_NS
        The operator's RBAC: a ClusterRole + ClusterRoleBinding in the first
        render, a Role + RoleBinding in WATCH_NS in the second, with the same
        rules, no wildcard, bound to the operator Deployment's ServiceAccount,
        and `--namespace WATCH_NS` exactly when namespaced.
    k8s_checks.py values-table VALUES.yaml
        Print the README table of every value documented with a '# --' comment.
    k8s_checks.py values-doc VALUES.yaml README.md
        Fail unless every leaf of VALUES.yaml is documented (itself or an
        ancestor carries a '# --' comment) and every documented key appears in
        README.md as `key`.
    k8s_checks.py extract-rules RENDERED.yaml OUT.yaml
        Write the rule groups of every PrometheusRule into a Prometheus rules
        file for promtool.
    k8s_checks.py skaffold-refs SKAFFOLD.yaml
        Every file skaffold.yaml points at exists: Dockerfiles, chart paths,
        values files, rawYaml globs (also inside profile patches).
    k8s_checks.py adapter-rules ADAPTER_VALUES.yaml CHART_VALUES.yaml OUT.yaml
        Expand the prometheus-adapter external rules into plain PromQL (a rules
        file for `promtool check rules`) and check that the metric they serve is
        the one the chart's HPA asks for.
"""
from __future__ import annotations

import json
import re
import sys

import yaml

OUR_NAME = "nexus-analytics"
OUR_COMPONENTS = {"consumer", "migrations", "operator"}
ALWAYS_ALLOWED_PREFIXES = ("KAFKA_PROPERTY_",)
# Variables a component reads outside the Settings that `env-vars` lists.
EXTRA_ALLOWED = {"operator": {"POD_NAME"}}


def load_docs(paths):
    docs = []
    for p in paths:
        with open(p) as fh:
            docs.extend(d for d in yaml.safe_load_all(fh) if d)
    return docs


def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def cmd_env_drift(allowed_file, rendered):
    exact, prefixes = set(), list(ALWAYS_ALLOWED_PREFIXES)
    with open(allowed_file) as fh:
        for line in fh:
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if name.endswith("*"):
                prefixes.append(name[:-1])
            else:
                exact.add(name)
    if not exact:
        print(f"FAIL {allowed_file} lists no environment variables")
        return 1
    docs = load_docs(rendered)
    maps = {(d["kind"], d["metadata"]["name"]): d for d in docs if d.get("kind") in ("ConfigMap", "Secret")}
    bad, seen, problems = {}, set(), []
    workloads = 0
    for doc in docs:
        labels = (doc.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/name") != OUR_NAME or labels.get("app.kubernetes.io/component") not in OUR_COMPONENTS:
            continue
        spec = pod_spec(doc)
        if not spec:
            continue
        workloads += 1
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        extra = EXTRA_ALLOWED.get(labels.get("app.kubernetes.io/component"), set())
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            names = [e["name"] for e in c.get("env") or []]
            for src in c.get("envFrom") or []:
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src:
                        ref = maps.get((kind, src[key]["name"]))
                        if ref is None:
                            problems.append(f"{where}: envFrom {kind} {src[key]['name']} is not rendered, its keys cannot be checked")
                            continue
                        prefix = src.get("prefix", "")
                        keys = list((ref.get("data") or {}).keys()) + list((ref.get("stringData") or {}).keys())
                        names.extend(prefix + k for k in keys)
            for n in names:
                seen.add(n)
                if n not in exact and n not in extra and not n.startswith(tuple(prefixes)):
                    bad.setdefault(n, set()).add(where)
    if workloads == 0:
        problems.append("no nexus-analytics workload found in the rendered manifests")
    for n, wheres in sorted(bad.items()):
        problems.append(f"{n} (in {', '.join(sorted(wheres))}) is not read by the binary")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    unused = sorted(exact - seen)
    print(f"ok   {len(seen)} variables across {workloads} workloads are all read by the binary"
          + (f"; binary also reads (not set by the chart): {' '.join(unused)}" if unused else ""))
    return 0


# ---------------------------------------------------------------- operator RBAC

def _operator_parts(path):
    docs = load_docs([path])
    comp = lambda d: ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
    ops = [d for d in docs if comp(d) == "operator"]
    by_kind = {}
    for d in ops:
        by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


def _norm_rules(rules):
    return sorted(
        (tuple(sorted(r.get("apiGroups") or [])), tuple(sorted(r.get("resources") or [])),
         tuple(sorted(r.get("verbs") or [])), tuple(sorted(r.get("resourceNames") or [])),
         tuple(sorted(r.get("nonResourceURLs") or [])))
        for r in rules
    )


def cmd_operator_rbac(cluster_render, ns_render, watch_ns):
    problems = []
    rules = {}
    for path, role_kind, binding_kind, ns in (
        (cluster_render, "ClusterRole", "ClusterRoleBinding", None),
        (ns_render, "Role", "RoleBinding", watch_ns),
    ):
        parts = _operator_parts(path)
        where = path.rsplit("/", 1)[-1]
        kinds = {k: len(v) for k, v in parts.items()}
        want = {"ServiceAccount": 1, "Deployment": 1, role_kind: 1, binding_kind: 1}
        if kinds != want:
            problems.append(f"{where}: operator objects {kinds}, want {want}")
            continue
        role, binding = parts[role_kind][0], parts[binding_kind][0]
        sa, dep = parts["ServiceAccount"][0], parts["Deployment"][0]
        for obj in (role, binding):
            if obj["metadata"].get("namespace") != ns:
                problems.append(f"{where}: {obj['kind']} namespace {obj['metadata'].get('namespace')!r}, want {ns!r}")
        for r in role.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in (r.get(field) or []):
                    problems.append(f"{where}: wildcard in {field} of {r}")
            if r.get("nonResourceURLs"):
                problems.append(f"{where}: unexpected nonResourceURLs {r['nonResourceURLs']}")
        rules[role_kind] = _norm_rules(role.get("rules") or [])
        ref = binding["roleRef"]
        if (ref["kind"], ref["name"]) != (role_kind, role["metadata"]["name"]):
            problems.append(f"{where}: {binding_kind} refers to {ref['kind']}/{ref['name']}")
        subj = {(s["kind"], s["name"], s.get("namespace")) for s in binding.get("subjects") or []}
        want_subj = {("ServiceAccount", sa["metadata"]["name"], sa["metadata"]["namespace"])}
        if subj != want_subj:
            problems.append(f"{where}: {binding_kind} subjects {subj}, want {want_subj}")
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        if pod.get("serviceAccountName") != sa["metadata"]["name"]:
            problems.append(f"{where}: operator Deployment runs as {pod.get('serviceAccountName')!r}")
        if spec.get("replicas") != 1 or (spec.get("strategy") or {}).get("type") != "Recreate":
            problems.append(f"{where}: operator Deployment must have 1 replica and Recreate (no leader election)")
        args = pod["containers"][0].get("args") or []
        if args[:3] != ["operator", "--port", "8080"]:
            problems.append(f"{where}: operator args {args}")
        if ns:
            has_ns = "--namespace" in args and args[args.index("--namespace") + 1] == ns
        else:
            has_ns = "--namespace" in args
        if (ns is not None) != has_ns:
            problems.append(f"{where}: operator args {args} (namespace scoping {ns!r})")
    if len(rules) == 2 and rules["ClusterRole"] != rules["Role"]:
        problems.append("ClusterRole and Role rules differ")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    n = len(rules.get("Role", []))
    print(f"ok   {n} rules, identical in the ClusterRole and the Role in {watch_ns}, no wildcard, bound to the operator's ServiceAccount")
    return 0


# ---------------------------------------------------------------- values docs

KEY_RE = re.compile(r"^(\s*)([A-Za-z0-9_.\-]+):(?:\s|$)")


def documented_keys(values_path):
    """Map dotted key path -> description, from '# --' comments above keys."""
    out, stack, pending = {}, [], None
    list_indent = None
    with open(values_path) as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            stripped = line.strip()
            if not stripped:
                continue
            indent = len(line) - len(line.lstrip(" "))
            if list_indent is not None:
                if indent >= list_indent and not (stripped.startswith("#") and indent < list_indent):
                    continue
                list_indent = None
            if stripped.startswith("# --"):
                pending = stripped[4:].strip()
                continue
            if stripped.startswith("#"):
                continue
            if stripped.startswith("- "):
                list_indent = indent
                pending = None
                continue
            m = KEY_RE.match(line)
            if not m:
                continue
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            path = ".".join(k for _, k in stack)
            if pending is not None:
                out[path] = pending
                pending = None
    return out


def leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


def get(node, path):
    for k in path.split("."):
        node = node[k]
    return node


def type_of(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    return "object"


def cmd_values_table(values_path):
    with open(values_path) as fh:
        values = yaml.safe_load(fh)
    docs = documented_keys(values_path)
    print("| Key | Type | Default | Description |")
    print("|-----|------|---------|-------------|")
    for path, desc in docs.items():
        v = get(values, path)
        default = json.dumps(v, separators=(",", ":"))
        default = default.replace("|", "\\|")
        print(f"| `{path}` | {type_of(v)} | `{default}` | {desc.replace('|', chr(92) + '|')} |")
    return 0


def cmd_values_doc(values_path, readme_path):
    with open(values_path) as fh:
        values = yaml.safe_load(fh)
    docs = documented_keys(values_path)
    with open(readme_path) as fh:
        readme = fh.read()
    problems = []
    for path, _ in leaves(values):
        parts = path.split(".")
        if not any(".".join(parts[:i]) in docs for i in range(1, len(parts) + 1)):
            problems.append(f"{path} has no '# --' description in {values_path}")
    for path in docs:
        if f"`{path}`" not in readme:
            problems.append(f"{path} is missing from {readme_path}")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    print(f"ok   {len(docs)} documented values, all leaves covered, all in {readme_path}")
    return 0


# ---------------------------------------------------------------- prometheus

def cmd_extract_rules(rendered, out):
    groups = []
    for d in load_docs([rendered]):
        if d.get("kind") == "PrometheusRule":
            groups.extend(d["spec"].get("groups") or [])
    if not groups:
        print(f"FAIL no PrometheusRule groups in {rendered}")
        return 1
    with open(out, "w") as fh:
        yaml.safe_dump({"groups": groups}, fh, sort_keys=False)
    print(f"ok   {sum(len(g.get('rules', [])) for g in groups)} rules in {len(groups)} groups -> {out}")
    return 0


def cmd_adapter_rules(adapter_values, chart_values, out):
    with open(adapter_values) as fh:
        adapter = yaml.safe_load(fh)
    with open(chart_values) as fh:
        chart = yaml.safe_load(fh)
    want = chart["autoscaling"]["hpa"]["metricName"]
    rules, served = [], []
    for i, r in enumerate(adapter.get("rules", {}).get("external") or []):
        series = r["seriesQuery"]
        metric = re.match(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", series).group(1)
        name = (r.get("name") or {}).get("as") or metric
        served.append(name)
        matchers = 'namespace="default",consumer_group="analytics-service"'
        q = (r["metricsQuery"].replace("<<.Series>>", metric)
             .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "namespace"))
        rules.append({"record": f"adapter:series_query:{i}", "expr": series})
        rules.append({"record": f"adapter:{name}", "expr": q})
    if want not in served:
        print(f"FAIL prometheus-adapter serves {served}, the chart's HPA asks for {want}")
        return 1
    with open(out, "w") as fh:
        yaml.safe_dump({"groups": [{"name": "prometheus-adapter-expanded", "rules": rules}]}, fh, sort_keys=False)
    print(f"ok   adapter serves {want} (expanded queries -> {out})")
    return 0


def cmd_skaffold_refs(path):
    import glob
    import os
    problems, checked = [], 0

    def need(pattern, what):
        nonlocal checked
        checked += 1
        if not glob.glob(pattern):
            problems.append(f"{what}: {pattern} matches no file")

    def walk_build(build, where):
        for a in (build or {}).get("artifacts") or []:
            ctx = a.get("context", ".")
            need(os.path.join(ctx, (a.get("docker") or {}).get("dockerfile", "Dockerfile")), f"{where} artifact {a['image']}")

    def walk_deploy(deploy, where):
        for r in ((deploy or {}).get("helm") or {}).get("releases") or []:
            if "chartPath" in r:
                need(os.path.join(r["chartPath"], "Chart.yaml"), f"{where} helm release {r['name']}")
            for v in r.get("valuesFiles") or []:
                need(v, f"{where} helm release {r['name']} valuesFiles")

    for doc in load_docs([path]):
        name = (doc.get("metadata") or {}).get("name", "?")
        walk_build(doc.get("build"), name)
        walk_deploy(doc.get("deploy"), name)
        for pat in (doc.get("manifests") or {}).get("rawYaml") or []:
            need(pat, f"{name} manifests.rawYaml")
        for prof in doc.get("profiles") or []:
            where = f"{name} profile {prof['name']}"
            walk_build(prof.get("build"), where)
            walk_deploy(prof.get("deploy"), where)
            for patch in prof.get("patches") or []:
                vals = patch.get("value")
                vals = vals if isinstance(vals, list) else [vals]
                for v in vals:
                    if isinstance(v, str) and (v.endswith(".yaml") or v.endswith(".yml")):
                        need(v, f"{where} patch {patch['path']}")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    print(f"ok   {checked} file references in {path} resolve")
    return 0


def main(argv):
    cmds = {
        "env-drift": (lambda a: cmd_env_drift(a[0], a[1:]), 2),
        "values-table": (lambda a: cmd_values_table(a[0]), 1),
        "values-doc": (lambda a: cmd_values_doc(a[0], a[1]), 2),
        "extract-rules": (lambda a: cmd_extract_rules(a[0], a[1]), 2),
        "adapter-rules": (lambda a: cmd_adapter_rules(a[0], a[1], a[2]), 3),
        "skaffold-refs": (lambda a: cmd_skaffold_refs(a[0]), 1),
        "operator-rbac": (lambda a: cmd_operator_rbac(a[0], a[1], a[2]), 3),
    }
    if not argv or argv[0] not in cmds or len(argv) - 1 < cmds[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    return cmds[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
