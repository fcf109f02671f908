#!/usr/bin/env python3
"""Render checks of the chart's production-platform values (issue 15), used by scripts/validate-k8s.

    k8s_platform_checks.py platform CHART_DIR RENDERED.yaml [HELM_ARGS...]
        What the values (chart defaults merged with the -f files and --set pairs of
        HELM_ARGS) promise, in the rendered manifests:
        - TLS files: every KAFKA_PROPERTY_SSL_*_LOCATION and PGSSL{ROOTCERT,CERT,KEY}
          path the consumer (and, for PostgreSQL, the migration Job) gets is a file
          that a read-only Secret volume provides, from the configured Secret and key;
          the key passphrase and PGSSLMODE come from the configured places; the Job
          gets no Kafka material;
        - extraEnv, extraEnvFrom (after the chart's ConfigMap), extraVolumes and
          extraVolumeMounts in the consumer and the migration Job;
        - KEDA: trigger `tls: enable` exactly with an SSL protocol, and the
          TriggerAuthentication's secretTargetRef parameters (username, password,
          ca, cert, key, keyPassword) map to the configured Secrets and keys;
        - the migration Job: pod annotations/labels, priorityClassName, affinity,
          tolerations/nodeSelector (falling back to the consumer's), ttl, resources;
          with networkPolicy.enabled its hook NetworkPolicy (same hooks, lower weight,
          selects the Job's pod, egress DNS + PostgreSQL only);
        - the test pod: image (registry, digest), pull secrets, resources, annotations,
          labels; with networkPolicy.enabled its hook NetworkPolicy and the consumer
          policy admitting it;
        - global.imageRegistry on every image; ephemeral-storage requests and limits on
          the consumer, migration and test containers;
        - ServiceMonitor honorLabels, sampleLimit, targetLabels, podTargetLabels,
          namespaceSelector; PrometheusRule alerts (per-alert enable, labels,
          annotations, runbook_url).
    k8s_platform_checks.py runbooks RULES.yaml RUNBOOK_DIR TESTS.yaml CHART_DIR
        Every alert has RUNBOOK_DIR/<alert>.md with the three sections and a row in
        RUNBOOK_DIR/README.md, every page names an alert, the promtool tests make
        every alert fire, prometheusRule.alerts lists exactly the alerts, and the
        default runbookBaseUrl is the docs/runbooks/ folder of Chart.yaml's home.
    k8s_platform_checks.py metadata CHART_DIR DOCKERFILE DOCKERIGNORE CARGO_TOML OUT_EXAMPLES.yaml
        Publishable metadata: Chart.yaml home/sources/icon/maintainers, Artifact Hub
        annotations (license = Cargo.toml's, images = appVersion and tests.image.tag,
        crds = crds/, changes kinds), the icon file exists; the Dockerfile's OCI labels
        from build args (version = Cargo.toml's, source = Chart.yaml's home), base
        images as ARG tag + optional digest, no stale .sqlx comment; .dockerignore
        excludes .env*. Writes artifacthub.io/crdsExamples to OUT_EXAMPLES.yaml for the
        CR validator.
    k8s_platform_checks.py checkov CHECKOV.json DOCS.md
        Every check checkov failed on the rendered chart is listed, with its reason, in
        the table of DOCS.md's "checkov" section, and every listed check still fails
        (no stale entries).
"""
from __future__ import annotations

import json
import os
import re
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from k8s_checks import deep_merge, load_docs, verdict  # noqa: E402

CERT_DIRS = {
    "kafka-ca": "/etc/nexus-analytics/kafka-ca",
    "kafka-client": "/etc/nexus-analytics/kafka-client",
    "postgres-tls": "/etc/nexus-analytics/postgres-tls",
}
ALERTS = ["NexusAnalyticsConsumerLagGrowing", "NexusAnalyticsHighErrorRate", "NexusAnalyticsDeadLetters",
          "NexusAnalyticsNotReady", "NexusAnalyticsNoConsumption", "NexusAnalyticsRebalanceStorm",
          "NexusAnalyticsDeadLetterTopicUnwritable", "NexusAnalyticsConsumeErrors"]
SEVERITY = {"NexusAnalyticsConsumerLagGrowing": "warning", "NexusAnalyticsHighErrorRate": "critical",
            "NexusAnalyticsDeadLetters": "warning", "NexusAnalyticsNotReady": "critical",
            "NexusAnalyticsNoConsumption": "critical", "NexusAnalyticsRebalanceStorm": "warning",
            "NexusAnalyticsDeadLetterTopicUnwritable": "critical", "NexusAnalyticsConsumeErrors": "critical"}


# ---------------------------------------------------------------- values

def set_path(d, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def merged_values(chart_dir, helm_args):
    """Chart defaults < -f files < --set pairs (plain dotted keys; values as YAML scalars)."""
    with open(os.path.join(chart_dir, "values.yaml")) as fh:
        v = yaml.safe_load(fh)
    sets = {}
    it = iter(helm_args)
    for a in it:
        if a == "-f":
            with open(next(it)) as fh:
                v = deep_merge(v, yaml.safe_load(fh) or {})
        elif a in ("--set", "--set-string"):
            k, val = next(it).split("=", 1)
            set_path(sets, k, val if a == "--set-string" else yaml.safe_load(val))
    return deep_merge(v, sets)


def image_ref(registry, image, default_tag):
    repo = image["repository"]
    if registry:
        repo = registry.rstrip("/") + "/" + repo
    if image.get("digest"):
        return f"{repo}@{image['digest']}"
    return f"{repo}:{image.get('tag') or default_tag}"


# ---------------------------------------------------------------- rendered objects

def comp(d):
    return ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")


def hook(d):
    a = (d.get("metadata") or {}).get("annotations") or {}
    if "helm.sh/hook" not in a:
        return None
    return (set(a["helm.sh/hook"].split(",")), int(a.get("helm.sh/hook-weight", "0")),
            set((a.get("helm.sh/hook-delete-policy") or "").split(",")))


def env_of(container, configmaps):
    """name -> ('value', v) | ('secret', name, key) | ('configmap', v) for literal env and envFrom ConfigMaps."""
    out = {}
    for src in container.get("envFrom") or []:
        cm = configmaps.get((src.get("configMapRef") or {}).get("name"))
        for k, val in ((cm or {}).get("data") or {}).items():
            out[k] = ("value", val)
    for e in container.get("env") or []:
        if "value" in e:
            out[e["name"]] = ("value", e["value"])
        else:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
            out[e["name"]] = ("secret", ref.get("name"), ref.get("key"))
    return out


def secret_files(pod, container):
    """path -> (secretName, key) for every file a Secret volume mounts read-only."""
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    files = {}
    for m in container.get("volumeMounts") or []:
        sec = (vols.get(m["name"]) or {}).get("secret")
        if not sec or not m.get("readOnly"):
            continue
        for item in sec.get("items") or []:
            files[f"{m['mountPath'].rstrip('/')}/{item['path']}"] = (sec["secretName"], item["key"])
    return files


def check_tls(v, where, pod, container, env, problems, kafka):
    """The file paths in env point at the configured Secret keys, and nothing else is mounted."""
    files = secret_files(pod, container)
    k, p = v["kafka"]["tls"], v["database"]["tls"]
    want = {}
    if kafka:
        if k["caSecret"]:
            want["KAFKA_PROPERTY_SSL_CA_LOCATION"] = (k["caSecret"], k["caKey"])
        if k["clientSecret"]:
            want["KAFKA_PROPERTY_SSL_CERTIFICATE_LOCATION"] = (k["clientSecret"], k["certKey"])
            want["KAFKA_PROPERTY_SSL_KEY_LOCATION"] = (k["clientSecret"], k["keyKey"])
    if p["secret"]:
        if p["caKey"]:
            want["PGSSLROOTCERT"] = (p["secret"], p["caKey"])
        if p["certKey"]:
            want["PGSSLCERT"] = (p["secret"], p["certKey"])
            want["PGSSLKEY"] = (p["secret"], p["keyKey"])
    file_vars = ("KAFKA_PROPERTY_SSL_CA_LOCATION", "KAFKA_PROPERTY_SSL_CERTIFICATE_LOCATION",
                 "KAFKA_PROPERTY_SSL_KEY_LOCATION", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY")
    for var in file_vars:
        got = env.get(var)
        if var not in want:
            if got and not (v.get("extraEnv") or v["kafka"].get("properties")):
                problems.append(f"{where}: {var} set although not configured: {got}")
            continue
        if not got or got[0] != "value":
            problems.append(f"{where}: {var} missing (want the file of {want[var]})")
            continue
        src = files.get(got[1])
        if src != want[var]:
            problems.append(f"{where}: {var}={got[1]} is {'not a mounted Secret file' if src is None else f'from {src}'}, want {want[var]}")
    for name, d in CERT_DIRS.items():
        mounted = any(m["name"] == name for m in container.get("volumeMounts") or [])
        needed = (name == "kafka-ca" and kafka and bool(k["caSecret"])) or \
                 (name == "kafka-client" and kafka and bool(k["clientSecret"])) or \
                 (name == "postgres-tls" and bool(p["secret"]))
        if mounted != needed:
            problems.append(f"{where}: volume {name} {'mounted' if mounted else 'missing'} ({'needed' if needed else 'not configured'})")
    want_pw = ("secret", k["clientSecret"], k["keyPasswordKey"]) if kafka and k["keyPasswordKey"] else None
    if env.get("KAFKA_PROPERTY_SSL_KEY_PASSWORD") != want_pw:
        problems.append(f"{where}: KAFKA_PROPERTY_SSL_KEY_PASSWORD {env.get('KAFKA_PROPERTY_SSL_KEY_PASSWORD')}, want {want_pw}")
    want_mode = ("value", p["sslMode"]) if p["sslMode"] else None
    if env.get("PGSSLMODE") != want_mode:
        problems.append(f"{where}: PGSSLMODE {env.get('PGSSLMODE')}, want {want_mode}")
    return len(want)


def check_extras(v, where, pod, container, problems, chart_cm):
    env_names = [e["name"] for e in container.get("env") or []]
    for e in v.get("extraEnv") or []:
        if e not in (container.get("env") or []):
            problems.append(f"{where}: extraEnv {e['name']} missing")
    if len(env_names) != len(set(env_names)):
        problems.append(f"{where}: duplicate env names {sorted(n for n in env_names if env_names.count(n) > 1)}")
    want_from = ([{"configMapRef": {"name": chart_cm}}] if chart_cm else []) + list(v.get("extraEnvFrom") or [])
    if (container.get("envFrom") or []) != want_from:
        problems.append(f"{where}: envFrom {container.get('envFrom')}, want {want_from} (chart ConfigMap first, extraEnvFrom after)")
    for vol in v.get("extraVolumes") or []:
        if vol not in (pod.get("volumes") or []):
            problems.append(f"{where}: extraVolume {vol.get('name')} missing")
    for m in v.get("extraVolumeMounts") or []:
        if m not in (container.get("volumeMounts") or []):
            problems.append(f"{where}: extraVolumeMount {m.get('name')} missing")
    names = [x["name"] for x in pod.get("volumes") or []]
    if len(names) != len(set(names)):
        problems.append(f"{where}: duplicate volume names {names}")


def check_ephemeral(where, container, problems):
    res = container.get("resources") or {}
    for part in ("requests", "limits"):
        if "ephemeral-storage" not in (res.get(part) or {}):
            problems.append(f"{where}: no ephemeral-storage in resources.{part}")


def matches(selector, labels):
    return all(labels.get(k) == val for k, val in (selector.get("matchLabels") or {}).items())


def egress_ports(np):
    ports = set()
    for rule in np["spec"].get("egress") or []:
        for p in rule.get("ports") or []:
            ports.add((p.get("port"), p.get("protocol", "TCP")))
    return ports


def check_hook_policy(where, np, owner, pod_labels, problems):
    """A hook NetworkPolicy: the owner's hooks, a lower weight, selects the owner's pod."""
    h_np, h_own = hook(np), hook(owner)
    if not h_np or not h_own:
        problems.append(f"{where}: NetworkPolicy or its workload is not a Helm hook")
        return
    if h_np[0] != h_own[0]:
        problems.append(f"{where}: NetworkPolicy hooks {sorted(h_np[0])} differ from the workload's {sorted(h_own[0])}")
    if not h_np[1] < h_own[1]:
        problems.append(f"{where}: NetworkPolicy hook weight {h_np[1]} is not below the workload's {h_own[1]} (it must exist before the pod)")
    if "before-hook-creation" not in h_np[2]:
        problems.append(f"{where}: NetworkPolicy hook-delete-policy {sorted(h_np[2])} lacks before-hook-creation")
    if not matches(np["spec"]["podSelector"], pod_labels):
        problems.append(f"{where}: NetworkPolicy podSelector {np['spec']['podSelector']} does not select the pod {pod_labels}")
    if set(np["spec"].get("policyTypes") or []) != {"Ingress", "Egress"} or np["spec"].get("ingress"):
        problems.append(f"{where}: NetworkPolicy must deny all ingress and restrict egress: {np['spec'].get('policyTypes')}")


def cmd_platform(chart_dir, rendered, helm_args):
    v = merged_values(chart_dir, helm_args)
    with open(os.path.join(chart_dir, "Chart.yaml")) as fh:
        chart = yaml.safe_load(fh)
    if not v["consumer"]["enabled"]:
        print("ok   no consumer in this combination")
        return 0
    docs = load_docs([rendered])
    problems, notes = [], []
    by = lambda kind: [d for d in docs if d.get("kind") == kind]
    cms = {d["metadata"]["name"]: d for d in by("ConfigMap")}
    deps = [d for d in by("Deployment") if comp(d) == "consumer"]
    if len(deps) != 1:
        print(f"FAIL {len(deps)} consumer Deployments")
        return 1
    dep = deps[0]
    name, ns = dep["metadata"]["name"], dep["metadata"]["namespace"]
    reg = (v.get("global") or {}).get("imageRegistry") or ""
    app_image = image_ref(reg, v["image"], chart["appVersion"])
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    n_files = check_tls(v, "Deployment", pod, c, env_of(c, cms), problems, kafka=True)
    check_extras(v, "Deployment", pod, c, problems, name)
    check_ephemeral("Deployment", c, problems)
    if c["image"] != app_image:
        problems.append(f"Deployment image {c['image']}, want {app_image}")

    # ---- migration Job
    jobs = [d for d in by("Job") if comp(d) == "migrations"]
    if v["migrations"]["enabled"] != bool(jobs):
        problems.append(f"{len(jobs)} migration Jobs with migrations.enabled={v['migrations']['enabled']}")
    m = v["migrations"]
    for job in jobs:
        jpod = job["spec"]["template"]["spec"]
        jc = jpod["containers"][0]
        jmeta = job["spec"]["template"]["metadata"]
        check_tls(v, "Job", jpod, jc, env_of(jc, {}), problems, kafka=False)
        check_extras(v, "Job", jpod, jc, problems, None)
        check_ephemeral("Job", jc, problems)
        if jc["image"] != app_image:
            problems.append(f"Job image {jc['image']}, want {app_image}")
        for k, val in (m.get("podAnnotations") or {}).items():
            if (jmeta.get("annotations") or {}).get(k) != val:
                problems.append(f"Job pod annotation {k} missing")
        for k, val in (m.get("podLabels") or {}).items():
            if (jmeta.get("labels") or {}).get(k) != val:
                problems.append(f"Job pod label {k} missing")
        want = {
            "priorityClassName": m["priorityClassName"] or None,
            "affinity": m["affinity"] or None,
            "tolerations": m["tolerations"] or v["tolerations"] or None,
            "nodeSelector": m["nodeSelector"] or v["nodeSelector"] or None,
        }
        for k, val in want.items():
            if jpod.get(k) != val:
                problems.append(f"Job pod {k} {jpod.get(k)!r}, want {val!r}")
        if job["spec"].get("ttlSecondsAfterFinished") != m["ttlSecondsAfterFinished"]:
            problems.append(f"Job ttlSecondsAfterFinished {job['spec'].get('ttlSecondsAfterFinished')}, want {m['ttlSecondsAfterFinished']}")
        if jc.get("resources") != m["resources"]:
            problems.append(f"Job resources {jc.get('resources')}, want migrations.resources")
        nps = [d for d in by("NetworkPolicy") if comp(d) == "migrations"]
        if v["networkPolicy"]["enabled"] != bool(nps):
            problems.append(f"{len(nps)} migration NetworkPolicies with networkPolicy.enabled={v['networkPolicy']['enabled']}")
        for np in nps:
            check_hook_policy("migration Job", np, job, jmeta.get("labels") or {}, problems)
            want_ports = {(53, "UDP"), (53, "TCP")} | {(p, "TCP") for p in v["networkPolicy"]["postgresPorts"]}
            extra = v["networkPolicy"]["extraEgress"] or []
            got = egress_ports(np)
            extra_ports = {(p.get("port"), p.get("protocol", "TCP")) for r in extra for p in r.get("ports") or []}
            if got - extra_ports != want_ports:
                problems.append(f"migration NetworkPolicy egress ports {sorted(got, key=str)}, want DNS + PostgreSQL {sorted(want_ports, key=str)}")
            pg_rules = [r for r in np["spec"]["egress"] if any(p.get("port") == v["networkPolicy"]["postgresPorts"][0] for p in r.get("ports") or [])]
            if pg_rules and pg_rules[0].get("to") != (v["networkPolicy"]["egressTo"] or None):
                problems.append(f"migration NetworkPolicy PostgreSQL peers {pg_rules[0].get('to')}, want networkPolicy.egressTo")

    # ---- test pod
    t = v["tests"]
    tests = [d for d in by("Pod") if comp(d) == "test"]
    if len(tests) != 1:
        problems.append(f"{len(tests)} test pods")
    for tp in tests:
        tc = tp["spec"]["containers"][0]
        want_img = image_ref(reg, t["image"], "latest")
        if tc["image"] != want_img:
            problems.append(f"test pod image {tc['image']}, want {want_img}")
        want_ps = t["imagePullSecrets"] or v["imagePullSecrets"] or None
        if tp["spec"].get("imagePullSecrets") != want_ps:
            problems.append(f"test pod imagePullSecrets {tp['spec'].get('imagePullSecrets')}, want {want_ps}")
        if tc.get("resources") != t["resources"]:
            problems.append(f"test pod resources {tc.get('resources')}, want tests.resources")
        check_ephemeral("test pod", tc, problems)
        for k, val in (t.get("podAnnotations") or {}).items():
            if (tp["metadata"].get("annotations") or {}).get(k) != val:
                problems.append(f"test pod annotation {k} missing")
        for k, val in (t.get("podLabels") or {}).items():
            if (tp["metadata"].get("labels") or {}).get(k) != val:
                problems.append(f"test pod label {k} missing")
        tnps = [d for d in by("NetworkPolicy") if comp(d) == "test"]
        if v["networkPolicy"]["enabled"] != bool(tnps):
            problems.append(f"{len(tnps)} test NetworkPolicies with networkPolicy.enabled={v['networkPolicy']['enabled']}")
        for np in tnps:
            check_hook_policy("test pod", np, tp, tp["metadata"].get("labels") or {}, problems)
            want_ports = {(53, "UDP"), (53, "TCP"), (v["config"]["metricsPort"], "TCP")}
            if egress_ports(np) != want_ports:
                problems.append(f"test NetworkPolicy egress ports {egress_ports(np)}, want {want_ports}")
            consumer_labels = dep["spec"]["template"]["metadata"]["labels"]
            to = [peer for r in np["spec"]["egress"] for peer in r.get("to") or []]
            if not any(matches(peer.get("podSelector") or {}, consumer_labels) for peer in to):
                problems.append("test NetworkPolicy does not reach the consumer pods")
            cnp = next((d for d in by("NetworkPolicy") if d["metadata"]["name"] == name), None)
            if cnp:
                rules = [r for r in cnp["spec"].get("ingress") or [] if any(p.get("port") == "metrics" for p in r.get("ports") or [])]
                if not any(r.get("from") is None or any(matches(peer.get("podSelector") or {}, tp["metadata"]["labels"])
                                                        and "namespaceSelector" not in peer for peer in r["from"]) for r in rules):
                    problems.append("the consumer NetworkPolicy does not admit the test pod on the metrics port")

    # ---- KEDA
    so = next((d for d in by("ScaledObject")), None)
    ta = next((d for d in by("TriggerAuthentication")), None)
    if so:
        k = v["kafka"]
        meta = so["spec"]["triggers"][0]["metadata"]
        want_tls = "enable" if k["securityProtocol"] in ("SSL", "SASL_SSL") else None
        if meta.get("tls") != want_tls:
            problems.append(f"ScaledObject tls {meta.get('tls')!r}, want {want_tls!r}")
        sk, secret = v["secretKeys"], v["existingSecret"] or name
        want = {}
        if k["sasl"]["enabled"]:
            want["username"] = (secret, sk["kafkaSaslUsername"])
            want["password"] = (secret, sk["kafkaSaslPassword"])
        if k["tls"]["caSecret"]:
            want["ca"] = (k["tls"]["caSecret"], k["tls"]["caKey"])
        if k["tls"]["clientSecret"]:
            want["cert"] = (k["tls"]["clientSecret"], k["tls"]["certKey"])
            want["key"] = (k["tls"]["clientSecret"], k["tls"]["keyKey"])
            if k["tls"]["keyPasswordKey"]:
                want["keyPassword"] = (k["tls"]["clientSecret"], k["tls"]["keyPasswordKey"])
        got = {r["parameter"]: (r["name"], r["key"]) for r in ((ta or {}).get("spec") or {}).get("secretTargetRef") or []}
        if got != want:
            problems.append(f"TriggerAuthentication secretTargetRef {got}, want {want}")
        ref = (so["spec"]["triggers"][0].get("authenticationRef") or {}).get("name")
        if bool(want) != bool(ref) or (ta and ref != ta["metadata"]["name"]):
            problems.append(f"ScaledObject authenticationRef {ref!r} with TriggerAuthentication {ta and ta['metadata']['name']!r}")
        notes.append(f"KEDA auth {sorted(want)}")

    # ---- operator image (global.imageRegistry reaches it through the shared helper)
    for op in (d for d in by("Deployment") if comp(d) == "operator"):
        if op["spec"]["template"]["spec"]["containers"][0]["image"] != app_image:
            problems.append(f"operator image {op['spec']['template']['spec']['containers'][0]['image']}, want {app_image}")

    # ---- ServiceMonitor
    sm_v = v["serviceMonitor"]
    for sm in by("ServiceMonitor"):
        spec, ep = sm["spec"], sm["spec"]["endpoints"][0]
        checks = {
            "honorLabels": (ep.get("honorLabels"), sm_v["honorLabels"]),
            "sampleLimit": (spec.get("sampleLimit"), sm_v["sampleLimit"] or None),
            "targetLabels": (spec.get("targetLabels"), sm_v["targetLabels"] or None),
            "podTargetLabels": (spec.get("podTargetLabels"), sm_v["podTargetLabels"] or None),
            "namespaceSelector": (spec.get("namespaceSelector"), sm_v["namespaceSelector"] or {"matchNames": [ns]}),
            "scrapeTimeout": (ep.get("scrapeTimeout"), sm_v["scrapeTimeout"]),
        }
        for k, (got, want) in checks.items():
            if got != want:
                problems.append(f"ServiceMonitor {k} {got!r}, want {want!r}")
        for k, val in (sm_v.get("labels") or {}).items():
            if sm["metadata"]["labels"].get(k) != val:
                problems.append(f"ServiceMonitor label {k} missing (the Prometheus selector would miss it)")
        notes.append("ServiceMonitor")

    # ---- PrometheusRule
    r = v["prometheusRule"]
    for pr in by("PrometheusRule"):
        rules = {x["alert"]: x for g in pr["spec"]["groups"] for x in g.get("rules") or [] if "alert" in x}
        enabled = [a for a in ALERTS if (r["alerts"].get(a) or {}).get("enabled", True)]
        if sorted(a for a in rules if a in ALERTS) != sorted(enabled):
            problems.append(f"PrometheusRule alerts {sorted(rules)}, want {sorted(enabled)}")
        for a in enabled:
            x = rules.get(a)
            if not x:
                continue
            over = r["alerts"].get(a) or {}
            want_labels = {"severity": SEVERITY[a], **(r["additionalAlertLabels"] or {}), **(over.get("labels") or {})}
            if x.get("labels") != want_labels:
                problems.append(f"{a} labels {x.get('labels')}, want {want_labels}")
            ann = x.get("annotations") or {}
            want_ann = {**(r["additionalAlertAnnotations"] or {}), **(over.get("annotations") or {})}
            if r["runbookBaseUrl"] and "runbook_url" not in (over.get("annotations") or {}):
                want_ann["runbook_url"] = f"{r['runbookBaseUrl'].rstrip('/')}/{a}.md"
            for k, val in want_ann.items():
                if ann.get(k) != val:
                    problems.append(f"{a} annotation {k}={ann.get(k)!r}, want {val!r}")
            if not r["runbookBaseUrl"] and "runbook_url" in ann and "runbook_url" not in want_ann:
                problems.append(f"{a} has runbook_url although runbookBaseUrl is empty")
            for k in ("summary", "description"):
                if not ann.get(k):
                    problems.append(f"{a} has no {k}")
        notes.append(f"{len(enabled)} alerts")
    return verdict(problems, f"{n_files} TLS files from Secrets, extras, migration Job{' + hook NetworkPolicy' if v['networkPolicy']['enabled'] else ''}, "
                   f"test pod, images, ephemeral-storage" + (", " + ", ".join(notes) if notes else ""))


# ---------------------------------------------------------------- runbooks

def cmd_runbooks(rules_path, runbook_dir, tests_path, chart_dir):
    with open(rules_path) as fh:
        alerts = [x["alert"] for g in yaml.safe_load(fh)["groups"] for x in g["rules"] if "alert" in x]
    with open(tests_path) as fh:
        tests = yaml.safe_load(fh)
    with open(os.path.join(chart_dir, "values.yaml")) as fh:
        values = yaml.safe_load(fh)
    with open(os.path.join(chart_dir, "Chart.yaml")) as fh:
        chart = yaml.safe_load(fh)
    problems = []
    with open(os.path.join(runbook_dir, "README.md")) as fh:
        index = fh.read()
    pages = {f[:-3] for f in os.listdir(runbook_dir) if f.endswith(".md") and f != "README.md"}
    for a in alerts:
        if a not in pages:
            problems.append(f"alert {a} has no runbook {runbook_dir}/{a}.md")
            continue
        with open(os.path.join(runbook_dir, f"{a}.md")) as fh:
            text = fh.read()
        if not text.startswith(f"# {a}\n"):
            problems.append(f"{a}.md does not start with '# {a}'")
        for section in ("## What it means", "## Confirm", "## What to do"):
            if section not in text:
                problems.append(f"{a}.md has no '{section}' section")
        if "```promql" not in text:
            problems.append(f"{a}.md shows no PromQL to confirm the alert")
        if f"({a}.md)" not in index:
            problems.append(f"{runbook_dir}/README.md does not link {a}.md")
    for p in sorted(pages - set(alerts)):
        problems.append(f"runbook {p}.md names no alert of the PrometheusRule")
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test") or [] if t.get("exp_alerts")}
    for a in alerts:
        if a not in fired:
            problems.append(f"no promtool test makes {a} fire ({tests_path})")
    listed = set((values["prometheusRule"].get("alerts") or {}).keys())
    if listed != set(alerts):
        problems.append(f"prometheusRule.alerts lists {sorted(listed)}, the chart renders {sorted(alerts)}")
    want_base = chart["home"].rstrip("/") + "/blob/main/docs/runbooks"
    if values["prometheusRule"]["runbookBaseUrl"] != want_base:
        problems.append(f"prometheusRule.runbookBaseUrl {values['prometheusRule']['runbookBaseUrl']!r}, want {want_base!r} (Chart.yaml home)")
    return verdict(problems, f"{len(alerts)} alerts, each with a runbook (meaning, PromQL confirmation, actions) and a firing promtool test")


# ---------------------------------------------------------------- publishable metadata

def cmd_metadata(chart_dir, dockerfile, dockerignore, cargo_toml, out_examples):
    problems = []
    with open(os.path.join(chart_dir, "Chart.yaml")) as fh:
        chart = yaml.safe_load(fh)
    with open(os.path.join(chart_dir, "values.yaml")) as fh:
        values = yaml.safe_load(fh)
    with open(cargo_toml) as fh:
        cargo = fh.read()
    cargo_version = re.search(r'^version\s*=\s*"([^"]+)"', cargo, re.M).group(1)
    cargo_license = re.search(r'^license\s*=\s*"([^"]+)"', cargo, re.M).group(1)
    home = chart.get("home") or ""
    if not home.startswith("https://"):
        problems.append(f"Chart.yaml home {home!r} is not an https URL")
    if home not in (chart.get("sources") or []):
        problems.append("Chart.yaml sources does not list home")
    icon = chart.get("icon") or ""
    m = re.match(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)$", icon)
    repo_root = os.path.dirname(os.path.abspath(cargo_toml))
    if not m or not os.path.isfile(os.path.join(repo_root, m.group(1))):
        problems.append(f"Chart.yaml icon {icon!r} is not a raw URL of a file in the repository")
    if not all(x.get("name") for x in chart.get("maintainers") or [{}]):
        problems.append("Chart.yaml maintainers missing or unnamed")
    if chart.get("appVersion") != cargo_version:
        problems.append(f"appVersion {chart.get('appVersion')} != Cargo.toml version {cargo_version}")
    ann = chart.get("annotations") or {}
    if ann.get("artifacthub.io/license") != cargo_license:
        problems.append(f"artifacthub.io/license {ann.get('artifacthub.io/license')!r} != Cargo.toml license {cargo_license!r}")
    parsed = {}
    for key in ("artifacthub.io/images", "artifacthub.io/crds", "artifacthub.io/crdsExamples", "artifacthub.io/changes"):
        try:
            parsed[key] = yaml.safe_load(ann.get(key, ""))
        except yaml.YAMLError as e:
            problems.append(f"{key} is not YAML: {e}")
        if not isinstance(parsed.get(key), list) or not parsed[key]:
            problems.append(f"{key} missing or not a list")
            parsed[key] = []
    imgs = {i.get("name"): i.get("image", "") for i in parsed["artifacthub.io/images"]}
    want_tags = {"nexus-analytics": chart.get("appVersion"), "busybox": values["tests"]["image"]["tag"]}
    for n, tag in want_tags.items():
        if not imgs.get(n, "").endswith(f":{tag}"):
            problems.append(f"artifacthub.io/images {n}: {imgs.get(n)!r}, want tag {tag}")
    crds = load_docs([os.path.join(chart_dir, "crds", f) for f in sorted(os.listdir(os.path.join(chart_dir, "crds")))])
    have = {(d["spec"]["names"]["kind"], d["metadata"]["name"], v["name"]) for d in crds for v in d["spec"]["versions"]}
    listed = {(c.get("kind"), c.get("name"), c.get("version")) for c in parsed["artifacthub.io/crds"]}
    if have != listed:
        problems.append(f"artifacthub.io/crds {sorted(listed)} != crds/ {sorted(have)}")
    for c in parsed["artifacthub.io/changes"]:
        if c.get("kind") not in ("added", "changed", "deprecated", "removed", "fixed", "security") or not c.get("description"):
            problems.append(f"artifacthub.io/changes entry {c}")
    with open(out_examples, "w") as fh:
        yaml.safe_dump_all(parsed["artifacthub.io/crdsExamples"], fh)

    with open(dockerfile) as fh:
        df = fh.read()
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', df))
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", df, re.M))
    for label, arg in (("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION"), ("created", "CREATED")):
        if labels.get(f"org.opencontainers.image.{label}") != f"${{{arg}}}":
            problems.append(f"Dockerfile label org.opencontainers.image.{label} is not set from ARG {arg}")
    if labels.get("org.opencontainers.image.licenses") != cargo_license:
        problems.append(f"Dockerfile licenses label {labels.get('org.opencontainers.image.licenses')!r} != {cargo_license!r}")
    if args.get("VERSION") != cargo_version:
        problems.append(f"Dockerfile ARG VERSION={args.get('VERSION')} != Cargo.toml version {cargo_version}")
    if args.get("SOURCE") != home:
        problems.append(f"Dockerfile ARG SOURCE={args.get('SOURCE')} != Chart.yaml home {home}")
    froms = re.findall(r"^FROM (\S+)", df, re.M)
    external = [f for f in froms if f.startswith("${")]
    for f in external:
        # One plain ${X_IMAGE}: skaffold parses FROM itself and leaves ${X:+...} literal.
        mm = re.fullmatch(r"\$\{(\w+)_IMAGE\}", f)
        if not mm:
            problems.append(f"Dockerfile FROM {f}: want ${{X_IMAGE}} (tag, or tag@sha256:... to pin)")
        elif ":" not in args.get(f"{mm.group(1)}_IMAGE", ""):
            problems.append(f"Dockerfile ARG {mm.group(1)}_IMAGE has no tag")
    if len(external) != 2 or any(not (f.startswith("${") or f in ("chef",)) for f in froms):
        problems.append(f"Dockerfile FROM lines {froms}: the two base images must come from the *_IMAGE args")
    if ".sqlx" in df:
        problems.append("Dockerfile still mentions .sqlx (the crate has no committed .sqlx data)")
    with open(dockerignore) as fh:
        ign = [x.strip() for x in fh if x.strip() and not x.startswith("#")]
    if ".env*" not in ign:
        problems.append(".dockerignore does not exclude .env*")
    return verdict(problems, f"Chart.yaml home/sources/icon/maintainers and Artifact Hub annotations ({len(imgs)} images, "
                   f"{len(listed)} CRD, {len(parsed['artifacthub.io/changes'])} changes); Dockerfile OCI labels and "
                   f"digest-ready base images; .dockerignore excludes .env*")


# ---------------------------------------------------------------- checkov

def cmd_checkov(report, docs):
    with open(report) as fh:
        data = json.load(fh)
    runs = data if isinstance(data, list) else [data]
    failed = {}
    for run in runs:
        for f in (run.get("results") or {}).get("failed_checks") or []:
            failed.setdefault(f["check_id"], set()).add(f.get("resource", "?"))
    with open(docs) as fh:
        text = fh.read()
    section = text.split("### checkov", 1)[1] if "### checkov" in text else ""
    section = section.split("\n### ", 1)[0]
    accepted = {}
    for line in section.splitlines():
        mm = re.match(r"^\|\s*`?(CKV2?_K8S_\d+)`?\s*\|(.+)\|\s*$", line)
        if mm:
            accepted[mm.group(1)] = mm.group(2)
    problems = []
    for cid, res in sorted(failed.items()):
        if cid not in accepted:
            problems.append(f"checkov {cid} fails on {', '.join(sorted(res)[:4])} and is not listed with a reason in {docs} (### checkov)")
    for cid in sorted(set(accepted) - set(failed)):
        problems.append(f"{docs} lists {cid} as accepted, but checkov no longer reports it: drop the row")
    if not accepted:
        problems.append(f"no accepted-findings table under '### checkov' in {docs}")
    passed = sum(len((r.get("results") or {}).get("passed_checks") or []) for r in runs)
    return verdict(problems, f"checkov: {passed} checks passed; the {len(failed)} failing check ids are the ones {docs} accepts")


def main(argv):
    cmds = {
        "platform": (lambda a: cmd_platform(a[0], a[1], a[2:]), 2),
        "runbooks": (lambda a: cmd_runbooks(a[0], a[1], a[2], a[3]), 4),
        "metadata": (lambda a: cmd_metadata(a[0], a[1], a[2], a[3], a[4]), 5),
        "checkov": (lambda a: cmd_checkov(a[0], a[1]), 2),
    }
    if not argv or argv[0] not in cmds or len(argv) - 1 < cmds[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    return cmds[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
