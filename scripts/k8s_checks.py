#!/usr/bin/env python3
"""Small checks used by scripts/validate-k8s.

    k8s_checks.py env-drift ALLOWED_FILE RENDERED.yaml...
        Every environment variable the chart gives the nexus-analytics containers
        (env[].name, and the keys of ConfigMaps/Secrets pulled in with envFrom)
        must be one the binary reads: a line of ALLOWED_FILE (the output of
        `nexus-analytics env-vars`); a line ending in '*' is a prefix, and
        KAFKA_PROPERTY_* (librdkafka pass-through) is always allowed. The
        operator container may also set POD_NAME and POD_NAMESPACE (the Lease's
        namespace, clap's env for --lease-namespace); POD_NAME is read by src/operator/mod.rs
        for its Events, not listed by `env-vars`).
    k8s_checks.py operator-rbac CLUSTER_RENDER.yaml NAMESPACED_RENDER.yaml WATCH_NS
        The operator's RBAC: a ClusterRole + ClusterRoleBinding in the first
        render, a Role + RoleBinding in WATCH_NS in the second, with the same
        rules, no wildcard, bound to the operator Deployment's ServiceAccount,
        and `--namespace WATCH_NS` exactly when namespaced.
    k8s_checks.py operator-knobs SA_RENDER.yaml NO_RBAC_RENDER.yaml
        operator.replicas=3 with serviceAccount.name=pipelines-operator (+ an
        annotation) in the first render: 3 replicas, that ServiceAccount created,
        annotated, run by the Deployment and bound by every operator binding; the
        second (serviceAccount.create=false, name existing-sa, rbac.create=false):
        no operator ServiceAccount, Role, ClusterRole or binding, run as existing-sa.
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
    k8s_checks.py operator-scaling RENDERED.yaml ADAPTER_VALUES.yaml
        What `nexus-analytics operator-render` printed for an HPA pipeline: the HPA
        asks for an External metric the prometheus-adapter rule serves, selects
        consumer_group = the pipeline's group, and the ServiceMonitor sets that
        label on every series.
    k8s_checks.py dashboard DASHBOARD.json MIGRATIONS_DIR METRICS.txt OUT.yaml
        The Grafana dashboard: valid JSON, schemaVersion >= 39, datasource
        variables DS_PROMETHEUS (prometheus) and DS_POSTGRES
        (grafana-postgresql-datasource), unique panel ids, every panel (rows
        aside) and target on one of them, no overlapping panels; every analytics_*
        metric it names is one the binary exports (METRICS.txt: the output of
        `nexus-analytics metrics`; histograms: _bucket, _sum, _count); every SQL query is time-filtered and reads only analytics.*
        relations that migrations/ create (and do not drop). Every PromQL
        expression goes into OUT.yaml as a recording rule, Grafana's $__rate_interval,
        $__interval and $__range replaced by 5m and dashboard variables by .*, for
        `promtool check rules`.
    k8s_checks.py dashboard-configmap RENDERED.yaml DASHBOARD.json [--absent]
            [--namespace NS] [--label KEY=VALUE] [--annotation KEY=VALUE]
        Exactly one dashboard ConfigMap (none with --absent) carrying the label
        (and annotation), in NS, whose data is the JSON file byte for byte.
    k8s_checks.py chart-features CHART_VALUES.yaml RENDERED.yaml [VALUES.yaml...]
        The api/partitioning/retention/maintenance/routing values (chart defaults
        merged with the VALUES files) reach the consumer as the binary's env vars:
        ConfigMap keys, Secret keys, secretKeyRefs, the Service and container port
        "api", the NetworkPolicy ingress rule for it, the migration Job's
        partitioning vars.
    k8s_checks.py api-deployment CHART_VALUES.yaml RENDERED.yaml [VALUES.yaml...]
        With api.deployment.enabled: the API pods' Deployment runs `api` with
        API_PORT=api.port (the consumer's ConfigMap says 0), ports api and
        metrics, readiness on /readyz, api.deployment.resources, the read-only
        URL (and DATABASE_URL only when there is no chart-Secret read-only URL),
        the token; its Service, PDB, CPU HPA (or fixed replicas) and
        NetworkPolicy (no Kafka egress) select exactly the API pods, and no
        consumer selector matches them. Without it: none of these objects.
    k8s_checks.py binary-config BIN RENDERED.yaml...
        Start `BIN migrate` with the environment of every rendered consumer
        Deployment, migration Job and operator Deployment (which loads the same
        Settings) (ConfigMap and literal values as rendered,
        Secret references replaced by placeholders, PostgreSQL unreachable): the
        binary must accept the configuration (exit 1 on the connection, never 2,
        its configuration-error exit code).
"""
from __future__ import annotations

import json
import re
import sys

import yaml


def verdict(problems, ok, prefix=""):
    """Prints each problem as a FAIL line, or the `ok` line when there is none; the exit code."""
    for p in problems:
        print(f"FAIL {prefix}{p}")
    if problems:
        return 1
    print(f"ok   {ok}")
    return 0

OUR_NAME = "nexus-analytics"
OUR_COMPONENTS = {"consumer", "migrations", "operator", "api"}
ALWAYS_ALLOWED_PREFIXES = ("KAFKA_PROPERTY_",)
# Variables a component reads outside the Settings that `env-vars` lists. PGSSL*: sqlx's
# PgConnectOptions reads them before the URL's query parameters (sqlx-postgres 0.9
# src/options/mod.rs, new_without_pgpass); the chart sets them for database.tls.
PG_TLS_VARS = {"PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLMODE"}
EXTRA_ALLOWED = {"operator": {"POD_NAME", "POD_NAMESPACE"}, "consumer": PG_TLS_VARS, "migrations": PG_TLS_VARS}


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
    bad, seen, problems, external = {}, set(), [], set()
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
            for i, src in enumerate(c.get("envFrom") or []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src:
                        ref = maps.get((kind, src[key]["name"]))
                        if ref is None and (i > 0 or labels.get("app.kubernetes.io/component") == "migrations"):
                            # extraEnvFrom: the user's own object, not rendered here.
                            external.add(f"{kind}/{src[key]['name']}")
                            continue
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
          + (f"; binary also reads (not set by the chart): {' '.join(unused)}" if unused else "")
          + (f"; not checkable (extraEnvFrom, outside the chart): {' '.join(sorted(external))}" if external else ""))
    return 0


# ---------------------------------------------------------------- operator RBAC

def _operator_parts(path):
    """Operator objects by kind; the leader-election Role/RoleBinding (`*-lease`) under
    "LeaseRole"/"LeaseRoleBinding"."""
    docs = load_docs([path])
    comp = lambda d: ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
    ops = [d for d in docs if comp(d) == "operator"]
    by_kind = {}
    for d in ops:
        kind = d["kind"]
        if kind in ("Role", "RoleBinding") and d["metadata"]["name"].endswith("-lease"):
            kind = "Lease" + kind
        by_kind.setdefault(kind, []).append(d)
    return by_kind


def _lease_problems(where, parts, sa, args):
    """The Lease Role: only create, and get/patch of the one Lease the operator is told to use,
    in the ServiceAccount's namespace, bound to it."""
    problems = []
    role, binding = parts["LeaseRole"][0], parts["LeaseRoleBinding"][0]
    lease = args[args.index("--lease-name") + 1] if "--lease-name" in args else None
    want = _norm_rules([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "patch"],
         "resourceNames": [lease]},
    ])
    if _norm_rules(role.get("rules") or []) != want:
        problems.append(f"{where}: lease Role rules {role.get('rules')}, want create + get/patch of {lease!r}")
    for obj in (role, binding):
        if obj["metadata"].get("namespace") != sa["metadata"]["namespace"]:
            problems.append(f"{where}: {obj['metadata']['name']} not in the operator's namespace")
    subj = {(x["kind"], x["name"], x.get("namespace")) for x in binding.get("subjects") or []}
    if subj != {("ServiceAccount", sa["metadata"]["name"], sa["metadata"]["namespace"])}:
        problems.append(f"{where}: lease RoleBinding subjects {subj}")
    if binding["roleRef"]["name"] != role["metadata"]["name"]:
        problems.append(f"{where}: lease RoleBinding refers to {binding['roleRef']['name']}")
    return problems


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
        want = {"ServiceAccount": 1, "Deployment": 1, role_kind: 1, binding_kind: 1,
                "LeaseRole": 1, "LeaseRoleBinding": 1}
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
        args = pod["containers"][0].get("args") or []
        if args[:3] != ["operator", "--port", "8080"]:
            problems.append(f"{where}: operator args {args}")
        # Replicas beyond one are standbys: only the Lease holder reconciles.
        if "--leader-elect" not in args or "--lease-name" not in args:
            problems.append(f"{where}: operator args {args} lack --leader-elect/--lease-name")
        if (spec.get("strategy") or {}).get("type") != "RollingUpdate":
            problems.append(f"{where}: operator Deployment strategy {spec.get('strategy')}, want RollingUpdate")
        env = {e["name"]: e for e in pod["containers"][0].get("env") or []}
        if (env.get("POD_NAMESPACE", {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "metadata.namespace":
            problems.append(f"{where}: operator container lacks POD_NAMESPACE from metadata.namespace")
        problems += _lease_problems(where, parts, sa, args)
        if ns:
            has_ns = "--namespace" in args and args[args.index("--namespace") + 1] == ns
        else:
            has_ns = "--namespace" in args
        if (ns is not None) != has_ns:
            problems.append(f"{where}: operator args {args} (namespace scoping {ns!r})")
    if len(rules) == 2 and rules["ClusterRole"] != rules["Role"]:
        problems.append("ClusterRole and Role rules differ")
    n = len(rules.get("Role", []))
    return verdict(problems, f"{n} rules, identical in the ClusterRole and the Role in {watch_ns}, no wildcard, bound to the operator's ServiceAccount; leader election on by default with a Lease Role for that one Lease")


def cmd_operator_knobs(sa_render, norbac_render):
    problems = []
    parts = _operator_parts(sa_render)
    dep = parts["Deployment"][0]
    if dep["spec"].get("replicas") != 3:
        problems.append(f"operator.replicas=3 rendered replicas {dep['spec'].get('replicas')}")
    sas = parts.get("ServiceAccount") or []
    if [s["metadata"]["name"] for s in sas] != ["pipelines-operator"]:
        problems.append(f"ServiceAccounts {[s['metadata']['name'] for s in sas]}, want pipelines-operator")
    elif (sas[0]["metadata"].get("annotations") or {}).get("team") != "analytics":
        problems.append("operator.serviceAccount.annotations not on the ServiceAccount")
    if dep["spec"]["template"]["spec"].get("serviceAccountName") != "pipelines-operator":
        problems.append("the Deployment does not run as operator.serviceAccount.name")
    bindings = (parts.get("ClusterRoleBinding") or []) + (parts.get("LeaseRoleBinding") or [])
    if len(bindings) != 2:
        problems.append(f"{len(bindings)} operator bindings, want the ClusterRoleBinding and the lease RoleBinding")
    for b in bindings:
        names = {x["name"] for x in b.get("subjects") or []}
        if names != {"pipelines-operator"}:
            problems.append(f"{b['kind']}/{b['metadata']['name']} binds {names}")
    parts = _operator_parts(norbac_render)
    extra = sorted(k for k in parts if k != "Deployment")
    if extra:
        problems.append(f"serviceAccount.create=false + rbac.create=false still renders {extra}")
    run_as = parts["Deployment"][0]["spec"]["template"]["spec"].get("serviceAccountName")
    if run_as != "existing-sa":
        problems.append(f"with serviceAccount.create=false the Deployment runs as {run_as!r}, want existing-sa")
    return verdict(problems, "operator.replicas, serviceAccount.{create,name,annotations} and rbac.create render as documented")


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
    return verdict(problems, f"{len(docs)} documented values, all leaves covered, all in {readme_path}")


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


def cmd_operator_scaling(rendered, adapter_values):
    with open(rendered) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    with open(adapter_values) as fh:
        adapter = yaml.safe_load(fh)
    served = [((r.get("name") or {}).get("as")) for r in adapter["rules"]["external"]]
    by_kind = {d["kind"]: d for d in docs}
    problems = []
    hpa, sm, dep = by_kind.get("HorizontalPodAutoscaler"), by_kind.get("ServiceMonitor"), by_kind.get("Deployment")
    if not (hpa and sm and dep):
        print(f"FAIL expected an HPA, a ServiceMonitor and a Deployment, got {sorted(by_kind)}")
        return 1
    env = {e["name"]: e.get("value") for c in dep["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    group = env.get("KAFKA_GROUP_ID")
    ext = hpa["spec"]["metrics"][0].get("external") or {}
    name = (ext.get("metric") or {}).get("name")
    selected = ((ext.get("metric") or {}).get("selector") or {}).get("matchLabels", {}).get("consumer_group")
    if name not in served:
        problems.append(f"the HPA asks for External metric {name!r}; prometheus-adapter serves {served}")
    if selected != group:
        problems.append(f"the HPA selects consumer_group={selected!r}, the consumers' KAFKA_GROUP_ID is {group!r}")
    relabels = [r for e in sm["spec"]["endpoints"] for r in e.get("relabelings", [])
                if r.get("targetLabel") == "consumer_group"]
    if not relabels or relabels[0].get("replacement") != group:
        problems.append(f"the ServiceMonitor does not set consumer_group={group!r}: {relabels}")
    return verdict(problems, f"operator HPA scales on {name}{{consumer_group={group}}}, served by the adapter and labelled by its ServiceMonitor")


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
    return verdict(problems, f"{checked} file references in {path} resolve")


# ---------------------------------------------------------------- grafana dashboard

DS_VARS = {"${DS_PROMETHEUS}": "prometheus", "${DS_POSTGRES}": "grafana-postgresql-datasource"}
GRAFANA_RANGE_VARS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}")
GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
RELATION_DDL = re.compile(
    r"\b(CREATE|DROP)\s+(?:OR\s+REPLACE\s+)?(?:UNLOGGED\s+)?(TABLE|VIEW|MATERIALIZED\s+VIEW)\s+"
    r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?analytics\.\"?(\w+)\"?", re.IGNORECASE)
SQL_RELATION = re.compile(r"\b(?:FROM|JOIN)\s+(\"?[A-Za-z_][\w]*\"?(?:\.\"?[A-Za-z_][\w]*\"?)?)", re.IGNORECASE)


def all_panels(panels):
    for p in panels or []:
        yield p
        yield from all_panels(p.get("panels"))


def exported_metrics(path):
    """Series names in `nexus-analytics metrics` output ("name type help" per line);
    histograms expand to _bucket/_sum/_count."""
    names = set()
    with open(path) as fh:
        for line in fh:
            parts = line.split(maxsplit=2)
            if len(parts) < 2 or not parts[0].startswith("analytics_"):
                continue
            name, kind = parts[0], parts[1]
            if kind == "histogram":
                names.update(f"{name}{suf}" for suf in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
    return names


def migration_relations(mig_dir):
    import glob
    import os
    rels = set()
    for f in sorted(glob.glob(os.path.join(mig_dir, "*.sql"))):
        with open(f) as fh:
            sql = re.sub(r"--[^\n]*", "", fh.read())
        for verb, _, name in RELATION_DDL.findall(sql):
            if verb.upper() == "CREATE":
                rels.add(name.lower())
            else:
                rels.discard(name.lower())
    return rels


def promql_for_promtool(expr):
    out = GRAFANA_RANGE_VARS.sub("5m", expr)
    out = out.replace("$__range_s", "300").replace("$__interval_ms", "300000")
    leftover = re.findall(r"\$\{?__\w+", out)
    return GRAFANA_VAR.sub(".*", out), leftover


def cmd_dashboard(dash_path, mig_dir, metrics_path, out):
    problems = []
    try:
        with open(dash_path) as fh:
            dash = json.load(fh)
    except (OSError, ValueError) as e:
        print(f"FAIL {dash_path}: {e}")
        return 1
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 39:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r}, want an integer >= 39")
    for key in ("uid", "title"):
        if not dash.get(key):
            problems.append(f"dashboard has no {key}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    for ref, plugin in DS_VARS.items():
        v = variables.get(ref[2:-1])
        if not v or v.get("type") != "datasource" or v.get("query") != plugin:
            problems.append(f"no datasource variable {ref[2:-1]} of type {plugin}")
    metrics = exported_metrics(metrics_path)
    relations = migration_relations(mig_dir)
    if not metrics:
        problems.append(f"no analytics_* metric found in {metrics_path} (nexus-analytics metrics)")
    if not relations:
        problems.append(f"no analytics.* relation found in {mig_dir}")

    def check_metrics(text, where):
        for m in sorted(set(re.findall(r"\banalytics_[a-z0-9_]+", text))):
            if m not in metrics:
                problems.append(f"{where}: metric {m} is not exported (nexus-analytics metrics)")

    for name, v in variables.items():
        if v.get("type") == "query":
            ds = v.get("datasource") or {}
            if ds.get("uid") not in DS_VARS:
                problems.append(f"variable {name}: datasource {ds!r} is not a datasource variable")
            q = v.get("query")
            check_metrics(q.get("query", "") if isinstance(q, dict) else str(q), f"variable {name}")

    ids, rules, sql_count, boxes = {}, [], 0, []
    for p in all_panels(dash.get("panels")):
        pid, title = p.get("id"), p.get("title", "?")
        where = f"panel {pid} ({title!r})"
        if not isinstance(pid, int):
            problems.append(f"{where}: id is not an integer")
        elif pid in ids:
            problems.append(f"{where}: duplicate id (also {ids[pid]!r})")
        else:
            ids[pid] = title
        gp = p.get("gridPos") or {}
        if not all(isinstance(gp.get(k), int) for k in "hwxy") or gp["x"] + gp["w"] > 24:
            problems.append(f"{where}: bad gridPos {gp}")
        else:
            box = (gp["x"], gp["y"], gp["x"] + gp["w"], gp["y"] + gp["h"])
            for other, ob in boxes:
                if box[0] < ob[2] and ob[0] < box[2] and box[1] < ob[3] and ob[1] < box[3]:
                    problems.append(f"{where}: overlaps panel {other}")
            boxes.append((pid, box))
        if p.get("type") == "row":
            continue
        ds = p.get("datasource")
        if not isinstance(ds, dict) or ds.get("uid") not in DS_VARS or ds.get("type") != DS_VARS[ds.get("uid")]:
            problems.append(f"{where}: datasource {ds!r} is not {{type, uid}} of ${{DS_PROMETHEUS}} or ${{DS_POSTGRES}}")
            continue
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        refids = [t.get("refId") for t in targets]
        if len(set(refids)) != len(refids) or not all(refids):
            problems.append(f"{where}: refIds {refids} not unique")
        for t in targets:
            tds = t.get("datasource", ds)
            if tds != ds:
                problems.append(f"{where} {t.get('refId')}: target datasource {tds!r} differs from the panel's")
            twhere = f"{where} {t.get('refId')}"
            if ds["uid"] == "${DS_PROMETHEUS}":
                expr = t.get("expr") or ""
                if not expr.strip():
                    problems.append(f"{twhere}: no expr")
                    continue
                check_metrics(expr, twhere)
                promql, leftover = promql_for_promtool(expr)
                if leftover:
                    problems.append(f"{twhere}: unknown Grafana macros {leftover}")
                rules.append({"record": f"dashboard:panel_{pid}:{t.get('refId')}", "expr": promql})
            else:
                sql = t.get("rawSql") or ""
                if not sql.strip() or not t.get("rawQuery"):
                    problems.append(f"{twhere}: no raw SQL")
                    continue
                sql_count += 1
                if "$__timeFilter(" not in sql:
                    problems.append(f"{twhere}: SQL without $__timeFilter(...) reads the whole table")
                for ref in SQL_RELATION.findall(sql):
                    parts = [x.strip('"') for x in ref.split(".")]
                    if len(parts) != 2 or parts[0] != "analytics":
                        problems.append(f"{twhere}: relation {ref} is not schema-qualified analytics.*")
                    elif parts[1].lower() not in relations:
                        problems.append(f"{twhere}: relation analytics.{parts[1]} is not created by migrations/")
    if not rules:
        problems.append("no PromQL expression found")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    with open(out, "w") as fh:
        yaml.safe_dump({"groups": [{"name": "grafana-dashboard", "rules": rules}]}, fh, sort_keys=False, width=1000)
    print(f"ok   {len(ids)} panels (unique ids), {len(rules)} PromQL expressions -> {out}, "
          f"{sql_count} SQL queries on {len(relations)} known analytics.* relations")
    return 0


def cmd_dashboard_configmap(rendered, dash_path, opts):
    absent, namespace, labels, annotations = False, None, {}, {}
    it = iter(opts)
    for o in it:
        if o == "--absent":
            absent = True
        elif o == "--namespace":
            namespace = next(it)
        elif o in ("--label", "--annotation"):
            k, v = next(it).split("=", 1)
            (labels if o == "--label" else annotations)[k] = v
        else:
            print(f"FAIL unknown option {o}")
            return 1
    with open(dash_path) as fh:
        want = fh.read()
    cms = [d for d in load_docs([rendered]) if d.get("kind") == "ConfigMap"
           and ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") == "dashboard"]
    if absent:
        if cms:
            print(f"FAIL dashboard ConfigMap rendered although disabled: {[c['metadata']['name'] for c in cms]}")
            return 1
        print("ok   no dashboard ConfigMap")
        return 0
    if len(cms) != 1:
        print(f"FAIL {len(cms)} dashboard ConfigMaps rendered, want 1")
        return 1
    cm, problems = cms[0], []
    meta = cm["metadata"]
    data = cm.get("data") or {}
    if list(data) != ["nexus-analytics.json"]:
        problems.append(f"data keys {list(data)}, want ['nexus-analytics.json']")
    elif data["nexus-analytics.json"] != want:
        problems.append(f"data differs from {dash_path} ({len(data['nexus-analytics.json'])} vs {len(want)} characters)")
    for k, v in labels.items():
        if (meta.get("labels") or {}).get(k) != v:
            problems.append(f"label {k}={(meta.get('labels') or {}).get(k)!r}, want {v!r}")
    for k, v in annotations.items():
        if (meta.get("annotations") or {}).get(k) != v:
            problems.append(f"annotation {k}={(meta.get('annotations') or {}).get(k)!r}, want {v!r}")
    if namespace and meta.get("namespace") != namespace:
        problems.append(f"namespace {meta.get('namespace')!r}, want {namespace!r}")
    return verdict(problems, f"ConfigMap {meta.get('namespace')}/{meta['name']} holds {dash_path} unchanged, labels {labels}, annotations {annotations}",
                   prefix=f"ConfigMap {meta['name']}: ")


# ---------------------------------------------------------------- chart features -> env

def deep_merge(base, over):
    out = dict(base)
    for k, v in (over or {}).items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = deep_merge(out[k], v)
        elif v is None and k in out and not (isinstance(out[k], dict)):
            out[k] = None
        else:
            out[k] = v
    return out


def _consumer_parts(docs):
    comp = lambda d: ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
    dep = [d for d in docs if d.get("kind") == "Deployment" and comp(d) == "consumer"]
    job = [d for d in docs if d.get("kind") == "Job" and comp(d) == "migrations"]
    return dep, job


def cmd_chart_features(chart_values, rendered, values_files):
    import base64
    with open(chart_values) as fh:
        v = yaml.safe_load(fh)
    for f in values_files:
        with open(f) as fh:
            v = deep_merge(v, yaml.safe_load(fh) or {})
    docs = load_docs([rendered])
    deps, jobs = _consumer_parts(docs)
    if not v["consumer"]["enabled"]:
        print("ok   no consumer in this combination")
        return 0
    problems = []
    if len(deps) != 1:
        print(f"FAIL {len(deps)} consumer Deployments rendered")
        return 1
    dep = deps[0]
    name = dep["metadata"]["name"]
    by = lambda kind: {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}
    cm = (by("ConfigMap").get(name) or {}).get("data") or {}
    api, part, rules = v["api"], v["partitioning"], v["routing"]["rules"]
    # The consumer pods serve the API unless it has pods of its own.
    api_in = api["enabled"] and not api["deployment"]["enabled"]
    days = (v.get("retention") or {}).get("days")
    want_cm = {
        "API_PORT": str(api["port"]) if api_in else "0",
        "PARTITION_INTERVAL": part["interval"],
        "PARTITIONS_AHEAD": str(part["ahead"]),
        "MAINTENANCE_INTERVAL": str(v["maintenance"]["interval"]),
    }
    for k, want in want_cm.items():
        if cm.get(k) != want:
            problems.append(f"ConfigMap {k}={cm.get(k)!r}, want {want!r}")
    if days is None:
        if "RETENTION_DAYS" in cm:
            problems.append(f"ConfigMap RETENTION_DAYS={cm['RETENTION_DAYS']!r} with retention.days null")
    elif cm.get("RETENTION_DAYS") != str(days):
        problems.append(f"ConfigMap RETENTION_DAYS={cm.get('RETENTION_DAYS')!r}, want {days!r}")
    if not rules:
        if "ROUTING_RULES" in cm:
            problems.append("ConfigMap ROUTING_RULES set with no routing.rules")
    elif "ROUTING_RULES" not in cm or json.loads(cm["ROUTING_RULES"]) != rules:
        problems.append(f"ConfigMap ROUTING_RULES={cm.get('ROUTING_RULES')!r} is not routing.rules as JSON")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p for p in c.get("ports") or []}
    env = {e["name"]: e for e in c.get("env") or []}
    svc = (by("Service").get(name) or {}).get("spec", {}).get("ports") or []
    svc_ports = {p["name"]: p for p in svc}
    secret_name = v["existingSecret"] or name
    sk = v["secretKeys"]
    if api_in:
        if (ports.get("api") or {}).get("containerPort") != api["port"]:
            problems.append(f"container port api {ports.get('api')}, want containerPort {api['port']}")
        if (svc_ports.get("api") or {}).get("port") != api["port"] or svc_ports["api"].get("targetPort") != "api":
            problems.append(f"Service port api {svc_ports.get('api')}, want port {api['port']} -> targetPort api")
    elif "api" in ports or "api" in svc_ports:
        problems.append("api port rendered on the consumer although it does not serve the API")
    want_env = {}
    if api_in and api["requireToken"]:
        want_env["API_TOKEN"] = (sk["apiToken"], False)
    if api_in and (v["existingSecret"] or api["databaseUrl"]):
        want_env["API_DATABASE_URL"] = (sk["apiDatabaseUrl"], bool(v["existingSecret"]))
    for n in ("API_TOKEN", "API_DATABASE_URL"):
        got = env.get(n)
        if n not in want_env:
            if got:
                problems.append(f"env {n} set although not configured")
            continue
        ref = ((got or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        key, optional = want_env[n]
        if (ref.get("name"), ref.get("key"), bool(ref.get("optional"))) != (secret_name, key, optional):
            problems.append(f"env {n} secretKeyRef {ref}, want {secret_name}/{key} optional={optional}")
    # What the Secret must hold: the keys of whichever pods serve the API.
    secret_env = {}
    if api["enabled"] and api["requireToken"]:
        secret_env["API_TOKEN"] = sk["apiToken"]
    if api["enabled"] and api["databaseUrl"]:
        secret_env["API_DATABASE_URL"] = sk["apiDatabaseUrl"]
    if not v["existingSecret"]:
        data = (by("Secret").get(name) or {}).get("data") or {}
        dec = {k: base64.b64decode(x).decode() for k, x in data.items()}
        if "API_TOKEN" in secret_env and dec.get(sk["apiToken"]) != api["token"]:
            problems.append(f"Secret {sk['apiToken']} is not api.token")
        if "API_DATABASE_URL" in secret_env and dec.get(sk["apiDatabaseUrl"]) != api["databaseUrl"]:
            problems.append(f"Secret {sk['apiDatabaseUrl']} is not api.databaseUrl")
        for k in (sk["apiToken"], sk["apiDatabaseUrl"]):
            if k in dec and k not in secret_env.values():
                problems.append(f"Secret holds {k} although it is not used")
    np = by("NetworkPolicy").get(name)
    if np:
        api_rules = [r for r in np["spec"].get("ingress") or [] if any(p.get("port") == "api" for p in r.get("ports") or [])]
        if not api_in and api_rules:
            problems.append("NetworkPolicy admits the api port of consumer pods that do not serve it")
        if api_in:
            want_from = v["networkPolicy"]["apiFrom"] or None
            if len(api_rules) != 1 or api_rules[0].get("from") != want_from:
                problems.append(f"NetworkPolicy api ingress {api_rules}, want one rule from {want_from}")
    for job in jobs:
        jenv = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0].get("env") or []}
        for k in ("PARTITION_INTERVAL", "PARTITIONS_AHEAD"):
            if jenv.get(k) != want_cm[k]:
                problems.append(f"migration Job {k}={jenv.get(k)!r}, want {want_cm[k]!r} (migrate creates the first partitions)")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    where = "own pods" if api["enabled"] and not api_in else "consumer"
    print(f"ok   api={'on:' + str(api['port']) + ' (' + where + ')' if api['enabled'] else 'off'}, partitions {part['interval']}+{part['ahead']}, "
          f"retention {days}, maintenance {v['maintenance']['interval']}, {len(rules)} routing rules; "
          f"{'NetworkPolicy checked, ' if np else ''}{len(jobs)} migration Job(s)")
    return 0


def cmd_api_deployment(chart_values, rendered, values_files):
    with open(chart_values) as fh:
        v = yaml.safe_load(fh)
    for f in values_files:
        with open(f) as fh:
            v = deep_merge(v, yaml.safe_load(fh) or {})
    docs = load_docs([rendered])
    comp = lambda d: ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")
    api_objs = [d for d in docs if comp(d) == "api"]
    api, d = v["api"], v["api"]["deployment"]
    if not (v["consumer"]["enabled"] and api["enabled"] and d["enabled"]):
        return verdict([f"{o['kind']}/{o['metadata']['name']} rendered without api.deployment.enabled" for o in api_objs],
                       "no API pods in this combination")
    problems = []
    by_kind = {}
    for o in api_objs:
        by_kind.setdefault(o["kind"], []).append(o)
    want_kinds = {"Deployment", "Service"}
    if v["serviceMonitor"]["enabled"]:
        want_kinds.add("ServiceMonitor")
    if d["podDisruptionBudget"]["enabled"]:
        want_kinds.add("PodDisruptionBudget")
    if d["autoscaling"]["enabled"]:
        want_kinds.add("HorizontalPodAutoscaler")
    if v["networkPolicy"]["enabled"]:
        want_kinds.add("NetworkPolicy")
    if set(by_kind) != want_kinds or any(len(x) != 1 for x in by_kind.values()):
        problems.append(f"API objects {sorted((k, len(x)) for k, x in by_kind.items())}, want one each of {sorted(want_kinds)}")
        return verdict(problems, "")
    dep = by_kind["Deployment"][0]
    name = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    matches = lambda selector, labels: all(labels.get(k) == x for k, x in (selector or {}).items())
    if not matches(sel, pod_labels):
        problems.append(f"Deployment selector {sel} does not match its pods {pod_labels}")
    c = pod["spec"]["containers"][0]
    if c.get("args") != ["api"]:
        problems.append(f"container args {c.get('args')}, want ['api']")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    if ports != {"api": api["port"], "metrics": v["config"]["metricsPort"]}:
        problems.append(f"container ports {ports}")
    env = {e["name"]: e for e in c.get("env") or []}
    if (env.get("API_PORT") or {}).get("value") != str(api["port"]):
        problems.append(f"env API_PORT {env.get('API_PORT')}, want {api['port']}")
    ro_in_chart_secret = bool(api["databaseUrl"]) and not v["existingSecret"]
    if ro_in_chart_secret == ("DATABASE_URL" in env):
        problems.append("DATABASE_URL " + ("given although the read-only URL is in the chart Secret"
                                           if ro_in_chart_secret else "missing (no read-only URL of its own)"))
    if bool(v["existingSecret"] or api["databaseUrl"]) != ("API_DATABASE_URL" in env):
        problems.append(f"env API_DATABASE_URL present={'API_DATABASE_URL' in env}")
    if api["requireToken"] != ("API_TOKEN" in env):
        problems.append(f"env API_TOKEN present={'API_TOKEN' in env}, api.requireToken={api['requireToken']}")
    if (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("readiness probe is not /readyz")
    if c.get("resources") != d["resources"]:
        problems.append(f"resources {c.get('resources')}, want {d['resources']}")
    if d["autoscaling"]["enabled"]:
        if "replicas" in dep["spec"]:
            problems.append("replicas set although the HPA owns them")
        hpa = by_kind["HorizontalPodAutoscaler"][0]["spec"]
        a = d["autoscaling"]
        metric = (hpa.get("metrics") or [{}])[0]
        if (hpa["scaleTargetRef"]["name"], hpa["minReplicas"], hpa["maxReplicas"]) != (name, a["minReplicas"], a["maxReplicas"]) \
                or metric.get("resource", {}).get("name") != "cpu" \
                or metric["resource"]["target"].get("averageUtilization") != a["targetCPUUtilizationPercentage"]:
            problems.append(f"HPA {hpa}")
    elif dep["spec"].get("replicas") != d["replicaCount"]:
        problems.append(f"replicas {dep['spec'].get('replicas')}, want {d['replicaCount']}")
    svc = by_kind["Service"][0]["spec"]
    if not matches(svc["selector"], pod_labels) or svc["selector"] != sel:
        problems.append(f"Service selector {svc['selector']} is not the API pods' selector")
    if {p["name"]: (p["port"], p["targetPort"]) for p in svc["ports"]} != {"api": (api["port"], "api"), "metrics": (v["service"]["port"], "metrics")}:
        problems.append(f"Service ports {svc['ports']}")
    if "ServiceMonitor" in by_kind:
        # Its own job (the API Service), so consumer alerts (job=<fullname>) never see API pods.
        sm = by_kind["ServiceMonitor"][0]["spec"]
        svc_labels = by_kind["Service"][0]["metadata"]["labels"]
        if not matches(sm["selector"]["matchLabels"], svc_labels):
            problems.append(f"API ServiceMonitor selects {sm['selector']}, not the API Service {svc_labels}")
        consumer_svcs = [o for o in docs if o["kind"] == "Service" and comp(o) == "consumer"]
        if any(matches(sm["selector"]["matchLabels"], o["metadata"]["labels"]) for o in consumer_svcs):
            problems.append("API ServiceMonitor also selects the consumer Service")
        if [e["port"] for e in sm["endpoints"]] != ["metrics"]:
            problems.append(f"API ServiceMonitor endpoints {sm['endpoints']}")
        if any(r.get("targetLabel") == "consumer_group" for e in sm["endpoints"] for r in e.get("relabelings") or []):
            problems.append("API ServiceMonitor labels consumer_group: API pods are not group members")
    if "PodDisruptionBudget" in by_kind:
        pdb = by_kind["PodDisruptionBudget"][0]["spec"]
        if pdb["selector"]["matchLabels"] != sel or pdb["maxUnavailable"] != d["podDisruptionBudget"]["maxUnavailable"]:
            problems.append(f"PDB {pdb}")
    if "NetworkPolicy" in by_kind:
        np = by_kind["NetworkPolicy"][0]["spec"]
        if np["podSelector"]["matchLabels"] != sel:
            problems.append(f"NetworkPolicy selects {np['podSelector']}")
        ing = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in np.get("ingress") or []}
        if ing != {("api",): v["networkPolicy"]["apiFrom"] or None, ("metrics",): v["networkPolicy"]["metricsFrom"] or None}:
            problems.append(f"NetworkPolicy ingress {ing}")
        egress_ports = {p["port"] for r in np.get("egress") or [] for p in r.get("ports") or []}
        if egress_ports & set(v["networkPolicy"]["kafkaPorts"]) - set(v["networkPolicy"]["postgresPorts"]):
            problems.append(f"NetworkPolicy lets the API pods reach Kafka ports {sorted(egress_ports)}")
    # The consumer does not serve the API and no consumer object selects the API pods.
    for o in docs:
        if comp(o) == "api" or o.get("kind") not in ("Service", "PodDisruptionBudget", "NetworkPolicy", "Deployment"):
            continue
        spec = o.get("spec") or {}
        s2 = spec.get("selector") if o["kind"] == "Service" else (spec.get("selector") or spec.get("podSelector") or {}).get("matchLabels")
        if s2 and matches(s2, pod_labels):
            problems.append(f"{o['kind']}/{o['metadata']['name']} also selects the API pods")
    cm = next((o for o in docs if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == pod["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]), None)
    if not cm or cm["data"].get("API_PORT") != "0":
        problems.append("the consumer's ConfigMap does not turn its API off (API_PORT=0)")
    for k, want in (("API_MAX_PAGE_BYTES", api["maxPageBytes"]), ("API_MAX_CONCURRENT_REQUESTS", api["maxConcurrentRequests"])):
        if (cm or {}).get("data", {}).get(k) != str(want):
            problems.append(f"ConfigMap {k}={(cm or {}).get('data', {}).get(k)!r}, want {want}")
    return verdict(problems, f"API pods {name}: args [api], API_PORT={api['port']}, "
                             f"{'HPA on CPU' if d['autoscaling']['enabled'] else str(d['replicaCount']) + ' replicas'}, "
                             f"{sorted(want_kinds)}; consumer API_PORT=0; no consumer selector matches them")


def cmd_binary_config(binary, rendered):
    import os
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    binary = os.path.abspath(binary)
    runs = []
    for path in rendered:
        docs = load_docs([path])
        maps = {(d["kind"], d["metadata"]["name"]): d for d in docs if d.get("kind") in ("ConfigMap", "Secret")}
        deps, jobs = _consumer_parts(docs)
        ops = [d for d in docs if d.get("kind") == "Deployment"
               and ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") in ("operator", "api")]
        for w in deps + jobs + ops:
            c = w["spec"]["template"]["spec"]["containers"][0]
            env = {}
            for src in c.get("envFrom") or []:
                ref = maps.get(("ConfigMap", (src.get("configMapRef") or {}).get("name")))
                env.update((ref or {}).get("data") or {})
            for e in c.get("env") or []:
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "URL" in e["name"]:
                    env[e["name"]] = "postgres://check:check@127.0.0.1:1/check"
                else:
                    env[e["name"]] = "placeholder-secret"
            # The operator loads the same Settings; `migrate` needs a database URL.
            env.setdefault("DATABASE_URL", "postgres://check:check@127.0.0.1:1/check")
            # fail fast on the (unreachable) database; 1 stays below any LIVENESS_STALL_SECS
            env["DATABASE_WRITE_TIMEOUT_SECS"] = "1"
            env["PATH"] = "/usr/bin:/bin"
            runs.append((f"{path.rsplit('/', 1)[-1]} {w['kind']}/{w['metadata']['name']}", env))
    if not runs:
        print("FAIL no consumer Deployment or migration Job rendered")
        return 1

    def one(run):
        where, env = run
        with tempfile.TemporaryDirectory() as cwd:  # no .env from the work tree
            try:
                r = subprocess.run([binary, "migrate"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                return f"{where}: `migrate` did not stop within 60 s"
        if r.returncode == 2 or "invalid setting" in r.stderr or "missing setting" in r.stderr:
            return f"{where}: configuration rejected (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
        if r.returncode != 1:
            return f"{where}: exit {r.returncode}, want 1 (database unreachable): {r.stderr.strip()[-300:]}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(one, runs) if p]
    return verdict(problems, f"{binary} accepts the rendered configuration of {len(runs)} workloads")


def main(argv):
    cmds = {
        "env-drift": (lambda a: cmd_env_drift(a[0], a[1:]), 2),
        "values-table": (lambda a: cmd_values_table(a[0]), 1),
        "values-doc": (lambda a: cmd_values_doc(a[0], a[1]), 2),
        "extract-rules": (lambda a: cmd_extract_rules(a[0], a[1]), 2),
        "adapter-rules": (lambda a: cmd_adapter_rules(a[0], a[1], a[2]), 3),
        "operator-scaling": (lambda a: cmd_operator_scaling(a[0], a[1]), 2),
        "skaffold-refs": (lambda a: cmd_skaffold_refs(a[0]), 1),
        "operator-rbac": (lambda a: cmd_operator_rbac(a[0], a[1], a[2]), 3),
        "operator-knobs": (lambda a: cmd_operator_knobs(a[0], a[1]), 2),
        "dashboard": (lambda a: cmd_dashboard(a[0], a[1], a[2], a[3]), 4),
        "dashboard-configmap": (lambda a: cmd_dashboard_configmap(a[0], a[1], a[2:]), 2),
        "chart-features": (lambda a: cmd_chart_features(a[0], a[1], a[2:]), 2),
        "binary-config": (lambda a: cmd_binary_config(a[0], a[1:]), 2),
        "api-deployment": (lambda a: cmd_api_deployment(a[0], a[1], a[2:]), 2),
    }
    if not argv or argv[0] not in cmds or len(argv) - 1 < cmds[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    return cmds[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
