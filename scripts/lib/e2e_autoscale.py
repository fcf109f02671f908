#!/usr/bin/env python3
"""Autoscaling on consumer lag, end to end (issue 12); run by scripts/e2e-autoscale.

On the local control plane (scripts/cluster up) and real Kafka/PostgreSQL:

1. the chart (autoscaling.kind=hpa, ServiceMonitor + PrometheusRule, shortened HPA
   windows) in a namespace of its own; scripts/lib/pod_runner.py --netns plays the
   kubelet: one `nexus-analytics run` per Running Pod, in a network namespace holding
   the Pod IP kwok assigned;
2. the real prometheus-operator generates the scrape config and rule files from the
   chart's ServiceMonitor/PrometheusRule (tests/autoscale/prometheus.yaml), and the real
   Prometheus runs with them: targets = the Pod IPs with namespace/pod/service labels,
   up == 1, the original four metric names, the chart's rules evaluated;
3. the real prometheus-adapter with the rule of k8s/prometheus-adapter/values.yaml runs
   in a namespace of its own (10.245.0.2), registered as v1beta1.external.metrics.k8s.io
   through a Service + Endpoints, so the real HPA controller reads the External metric;
4. scenario: 1 replica, a backlog produced faster than one replica drains it; the HPA
   must scale up (<= partitions), lag drain, replicas return to minReplicas; the
   timeline is printed, plotted to target/autoscale/, and the last line is
   `AUTOSCALE kind=hpa ...`. rows (COUNT(*) in PostgreSQL) must equal produced.

With --kind keda, steps 2 and 3 are KEDA's instead: the chart renders a ScaledObject (one
Kafka trigger per topic); the real keda-operator (on the host, reading lag straight from
the broker) and the real keda-adapter (its metrics server, in the network namespace, mTLS
to the operator's gRPC service through the bridge) serve v1beta1.external.metrics.k8s.io,
and the HPA KEDA creates (keda-hpa-<name>) scales the Deployment. Same scenario, same line.

Environment (set by the wrapper): KUBECONFIG, K8S_STATE (.tools/run/k8s), TOOLS_BIN,
NEXUS_ANALYTICS_BIN, PROM_OPERATOR_CRDS, KEDA_CRDS, SCHEMAS_DIR, KAFKA_BROKERS, DATABASE_URL (the dev database,
used to create the test's own), E2E_KEEP=1 keeps namespaces, topic and database.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns  # noqa: E402
from waiting import NOT_YET, free_port, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "nexus-analytics"
TOOLS = Path(os.environ.get("TOOLS_BIN", ROOT / ".tools" / "bin"))
KUBECTL = str(TOOLS / "kubectl")
HELM = str(TOOLS / "helm")
BIN = os.environ.get("NEXUS_ANALYTICS_BIN", str(ROOT / "target" / "debug" / "nexus-analytics"))
K8S_STATE = Path(os.environ.get("K8S_STATE", ROOT / ".tools" / "run" / "k8s"))
PKI = K8S_STATE / "pki"
KAFKA = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
DEV_DB = os.environ.get("DATABASE_URL", "postgres://nexus:nexus@127.0.0.1:5432/nexus_analytics")
SCHEMAS = Path(os.environ.get("SCHEMAS_DIR", ROOT.parent / "shared" / "schemas"))
ADAPTER_IP = "10.245.0.2"
RELEASE = "nexus"
SEED_METRICS = [
    "analytics_events_processed_total",
    "analytics_events_processing_duration_seconds",
    "analytics_events_processing_errors_total",
    "analytics_events_stored_total",
]
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[e2e-autoscale {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def run(*args: str, check: bool = True, stdin: str | None = None, env=None, timeout=300):
    p = subprocess.run(list(args), input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise Failed(f"{' '.join(args)} exited {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
    return p


def kubectl(*args: str, check: bool = True, stdin: str | None = None):
    return run(KUBECTL, *args, check=check, stdin=stdin)


def kjson(*args: str):
    return json.loads(kubectl(*args, "-o", "json").stdout)


def apply(doc: str | dict, *extra: str):
    if isinstance(doc, dict):
        doc = json.dumps(doc)
    return kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=e2e-autoscale", *extra,
                   "-f", "-", stdin=doc)


def wait_until(what: str, fn, timeout: float = 60, interval: float = 1.0):
    return wait_for(what, fn, timeout, interval, error=Failed, tolerate=NOT_YET + (Failed,))


def quantity(q: str | None) -> float | None:
    """A Kubernetes quantity ("2500", "25k", "1500m") as a number."""
    if not q:
        return None
    mult = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    return float(q[:-1]) * mult[q[-1]] if q[-1] in mult else float(q)


def http_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Scenario:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        sfx = uuid.uuid4().hex[:6]
        self.ns = f"autoscale-{sfx}"
        self.topic = f"autoscale-{sfx}"
        self.group = f"autoscale-{sfx}"
        self.db = f"autoscale_{sfx}"
        self.db_url = DEV_DB.rsplit("/", 1)[0] + "/" + self.db
        self.run_dir = ROOT / "target" / "autoscale" / sfx
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.adapter_net: netns.PodNet | None = None
        self.bridge: netns.Bridge | None = None
        self.apiserver_port = int(
            dict(line.split("=", 1) for line in (K8S_STATE / "ports.env").read_text().split())["APISERVER_PORT"]
        )
        self.prom_port = free_port()
        self.prom = f"http://127.0.0.1:{self.prom_port}"
        self.fullname = f"{RELEASE}-nexus-analytics"
        self.kind = args.kind
        # The HPA the scenario watches: the chart's, or the one KEDA creates for the ScaledObject.
        self.hpa_name = self.fullname if self.kind == "hpa" else f"keda-hpa-{self.fullname}"
        self.grpc_port = free_port()
        self.timeline: list[dict] = []
        self.result: dict = {}
        self.proofs: list[str] = []

    # ------------------------------------------------------------ processes
    def spawn(self, name: str, argv: list[str], env=None) -> subprocess.Popen:
        tool = next((a for a in argv if a.startswith(str(TOOLS))), None)
        if tool and not os.path.exists(tool):
            raise Failed(f"{tool} missing: scripts/install-tools autoscale-tools")
        out = open(self.run_dir / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = p
        log(f"started {name} (pid {p.pid}, log {(self.run_dir / f'{name}.log').relative_to(ROOT)})")
        return p

    def check_alive(self, *names: str) -> None:
        for n in names:
            p = self.procs.get(n)
            if p is not None and p.poll() is not None:
                tail = (self.run_dir / f"{n}.log").read_text(errors="replace")[-3000:]
                raise Failed(f"{n} exited {p.returncode}:\n{tail}")

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not exit after SIGTERM: SIGKILL")
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # ------------------------------------------------------------ kafka / postgres
    def kafka_admin(self):
        # One client for the run: a dropped handle fails its pending futures (_DESTROY).
        if getattr(self, "_admin", None) is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": KAFKA})
        return self._admin

    def create_topic(self) -> None:
        from confluent_kafka.admin import NewTopic

        futs = self.kafka_admin().create_topics(
            [NewTopic(self.topic, self.args.partitions, 1), NewTopic(self.topic + ".dlq", 1, 1)]
        )
        for f in futs.values():
            f.result(30)
        log(f"topic {self.topic} ({self.args.partitions} partitions) and {self.topic}.dlq created")

    def lag(self) -> tuple[int, int]:
        """(exact committed lag of the group, sum of high watermarks)."""
        from confluent_kafka import TopicPartition

        c = self._lag_consumer
        tps = [TopicPartition(self.topic, p) for p in range(self.args.partitions)]
        committed = c.committed(tps, timeout=10)
        lag = high_sum = 0
        for tp in committed:
            _low, high = c.get_watermark_offsets(TopicPartition(self.topic, tp.partition), timeout=10)
            high_sum += high
            lag += high - (tp.offset if tp.offset >= 0 else 0)
        return lag, high_sum

    def sql(self, query: str, url: str | None = None, autocommit: bool = False):
        import psycopg

        with psycopg.connect(url or self.db_url, autocommit=autocommit, connect_timeout=10) as conn:
            cur = conn.execute(query)
            return cur.fetchone() if cur.description else None

    def create_database(self) -> None:
        self.sql(f"CREATE DATABASE {self.db}", url=DEV_DB, autocommit=True)
        env = dict(os.environ, DATABASE_URL=self.db_url, KAFKA_BROKERS=KAFKA)
        run(BIN, "migrate", env=env, timeout=120)
        log(f"database {self.db} created and migrated (nexus-analytics migrate)")

    def rows(self) -> int:
        return int(self.sql("SELECT count(*) FROM analytics.events")[0])

    # ------------------------------------------------------------ chart + pods
    def values(self) -> dict:
        a = self.args
        autoscaling = {
            "enabled": True, "kind": self.kind, "minReplicas": 1, "maxReplicas": a.partitions,
            "lagPerReplica": a.lag_per_replica,
            # The chart's behaviour with shortened windows and periods.
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Min",
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 15},
                                         {"type": "Percent", "value": 100, "periodSeconds": 15}]},
                "scaleDown": {"stabilizationWindowSeconds": a.scale_down_window, "selectPolicy": "Min",
                              "policies": [{"type": "Pods", "value": 2, "periodSeconds": 15}]},
            },
        }
        if self.kind == "keda":
            autoscaling["keda"] = {"pollingInterval": 5, "cooldownPeriod": 30}
        return {
            "image": {"tag": "e2e"},
            "kafka": {"brokers": KAFKA, "topics": [self.topic], "groupId": self.group,
                      "dlqTopic": self.topic + ".dlq", "topicPartitions": a.partitions},
            "database": {"url": self.db_url, "poolSize": 2},
            "migrations": {"enabled": False},  # kwok runs no Job; `nexus-analytics migrate` ran above
            "config": {"batchMaxEvents": a.batch_max_events, "batchMaxInFlight": 1,
                       "lagRefreshSecs": 2, "logFormat": "text"},
            "terminationGracePeriodSeconds": 40,
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                               "interval": "5s", "scrapeTimeout": "4s"},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "podDisruptionBudget": {"enabled": False},
            "autoscaling": autoscaling,
        }

    def install_chart(self) -> None:
        vf = self.run_dir / "values.json"
        vf.write_text(json.dumps(self.values(), indent=2))
        run(HELM, "install", RELEASE, str(CHART), "-n", self.ns, "-f", str(vf), "--timeout", "3m", timeout=300)
        log(f"helm install {RELEASE} (values {vf.relative_to(ROOT)})")

    def start_pod_runner(self) -> None:
        selector = (f"app.kubernetes.io/name=nexus-analytics,app.kubernetes.io/instance={RELEASE},"
                    "app.kubernetes.io/component=consumer")
        pods_dir = self.run_dir / "pods"
        pods_dir.mkdir(exist_ok=True)
        pg_port = urllib.parse.urlsplit(self.db_url).port or 5432
        kafka_port = int(KAFKA.rsplit(":", 1)[1])
        self.spawn("pod-runner", [sys.executable, "-u", str(ROOT / "scripts/lib/pod_runner.py"),
                                  "--namespace", self.ns, "--selector", selector, "--binary", BIN,
                                  "--netns", "--bridge-port", str(kafka_port), "--bridge-port", str(pg_port),
                                  "--log-dir", str(pods_dir)])

    # ------------------------------------------------------------ prometheus
    def start_operator(self) -> None:
        crds = os.environ["PROM_OPERATOR_CRDS"]
        for f in sorted(Path(crds).glob("*.yaml")):
            kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        self.spawn("prometheus-operator", [
            str(TOOLS / "prometheus-operator"),
            f"--apiserver=https://127.0.0.1:{self.apiserver_port}",
            f"--ca-file={PKI / 'ca.crt'}", f"--cert-file={PKI / 'admin.crt'}", f"--key-file={PKI / 'admin.key'}",
            f"--namespaces={self.ns}", f"--web.listen-address=127.0.0.1:{free_port()}",
            "--kubelet-service=", "--log-level=info",
        ])

    def apply_prometheus_resource(self) -> None:
        doc = (ROOT / "tests/autoscale/prometheus.yaml").read_text()
        kubectl("apply", "-n", self.ns, "--server-side", "--field-manager=e2e-autoscale", "-f", "-", stdin=doc)
        # Service discovery talks to the local API server (no in-cluster token here).
        patch = {"spec": {"apiserverConfig": {
            "host": f"https://127.0.0.1:{self.apiserver_port}",
            "tlsConfig": {"caFile": str(PKI / "ca.crt"), "certFile": str(PKI / "admin.crt"),
                          "keyFile": str(PKI / "admin.key")}}}}
        kubectl("patch", "prometheus", "nexus", "-n", self.ns, "--type=merge", "-p", json.dumps(patch))

    def generated_config(self) -> str:
        def ready():
            s = kjson("get", "secret", "prometheus-nexus", "-n", self.ns)
            cfg = gzip.decompress(base64.b64decode(s["data"]["prometheus.yaml.gz"])).decode()
            return cfg if f"serviceMonitor/{self.ns}/{self.fullname}/0" in cfg and "api_server" in cfg else None

        return wait_until("the operator's Secret prometheus-nexus with the ServiceMonitor's job", ready, 120, 2)

    def start_prometheus(self) -> None:
        cfg = self.generated_config()
        rules_dir = self.run_dir / "rules"
        rules_dir.mkdir(exist_ok=True)
        cms = [cm for cm in kjson("get", "configmap", "-n", self.ns)["items"]
               if cm["metadata"]["name"].startswith("prometheus-nexus-rulefiles-")]
        nrules = 0
        for cm in cms:
            d = rules_dir / cm["metadata"]["name"]
            d.mkdir(exist_ok=True)
            for k, v in cm.get("data", {}).items():
                (d / k).write_text(v)
                nrules += 1
        cfg = cfg.replace("/etc/prometheus/rules/", f"{rules_dir}/")
        # What prometheus-config-reloader does in the Pod (--config-envsubst-file): expand
        # $(VAR) from the container's env. Left literal, $(SHARD) fails the sharding `keep`
        # relabel and every target is dropped.
        for var, value in {"SHARD": "0", "POD_NAME": "prometheus-nexus-0"}.items():
            cfg = cfg.replace(f"$({var})", value)
        if "$(" in cfg:
            raise Failed(f"unexpanded $(VAR) left in the operator's config: "
                         f"{sorted(set(re.findall(r'[$][(]([A-Z_]+)[)]', cfg)))}")
        (self.run_dir / "prometheus.yaml").write_text(cfg)
        log(f"operator config: {len(cfg)} bytes, {nrules} rule file(s) -> {self.run_dir.relative_to(ROOT)}")
        self.spawn("prometheus", [
            str(TOOLS / "prometheus"), f"--config.file={self.run_dir / 'prometheus.yaml'}",
            f"--storage.tsdb.path={self.run_dir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.prom_port}",
            "--storage.tsdb.retention.time=2h",
        ])
        wait_until("Prometheus /-/ready", lambda: urllib.request.urlopen(f"{self.prom}/-/ready", timeout=2).status == 200,
                   60)

    def query(self, q: str) -> list:
        r = http_json(f"{self.prom}/api/v1/query?" + urllib.parse.urlencode({"query": q}))
        return r["data"]["result"]

    def prove_prometheus(self) -> None:
        def targets():
            ts = http_json(f"{self.prom}/api/v1/targets?state=active")["data"]["activeTargets"]
            mine = [t for t in ts if t["labels"].get("namespace") == self.ns]
            return mine if mine and all(t["health"] == "up" for t in mine) else None

        ts = wait_until("an active target per consumer Pod, health up", targets, 120, 2)
        pods = {p["metadata"]["name"]: p["status"].get("podIP")
                for p in kjson("get", "pods", "-n", self.ns, "-l", "app.kubernetes.io/component=consumer")["items"]}
        for t in ts:
            lb = t["labels"]
            if lb.get("pod") not in pods or lb.get("service") != self.fullname:
                raise Failed(f"target labels {lb} do not name a consumer Pod {list(pods)} and Service {self.fullname}")
            host = urllib.parse.urlsplit(t["scrapeUrl"]).hostname
            if host != pods[lb["pod"]]:
                raise Failed(f"target {t['scrapeUrl']} is not the Pod IP {pods[lb['pod']]}")
        up = self.query(f'up{{namespace="{self.ns}"}}')
        if not up or any(s["value"][1] != "1" for s in up):
            raise Failed(f"up != 1: {up}")
        t = ts[0]
        self.proofs.append(f"targets={len(ts)} scrape={t['scrapeUrl']} labels=namespace,pod,service,"
                           f"consumer_group job={t['labels'].get('job')} up=1")
        log(f"PROOF prometheus: {self.proofs[-1]}")

    def prove_metrics_and_rules(self) -> None:
        names = set(http_json(f"{self.prom}/api/v1/label/__name__/values")["data"])
        found = {m: any(n == m or n.startswith(m + "_") for n in names) for m in SEED_METRICS}
        missing = [m for m, ok in found.items() if not ok]
        if missing:
            raise Failed(f"seed metrics not queryable: {missing}")
        stored = self.query(f'sum(analytics_events_stored_total{{namespace="{self.ns}"}})')
        groups = http_json(f"{self.prom}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if not rules:
            raise Failed("no rule loaded from the chart's PrometheusRule")
        bad = [r["name"] for r in rules if r.get("health") != "ok" or r.get("lastEvaluation", "").startswith("0001")]
        if bad:
            raise Failed(f"rules not evaluated ok: {bad}")
        alerts = [r for r in rules if r.get("type") == "alerting"]
        states = {}
        for r in alerts:
            states[r["state"]] = states.get(r["state"], 0) + 1
        self.proofs.append(f"seed_metrics=4/4 stored_total={stored[0]['value'][1] if stored else '?'} "
                           f"rule_groups={len(groups)} rules={len(rules)} alerting={len(alerts)} "
                           f"health=ok states={states}")
        log(f"PROOF metrics+rules: {self.proofs[-1]}")

    # ------------------------------------------------------------ adapter
    def adapter_certs(self, service: str = "prometheus-adapter", extra_dns: tuple[str, ...] = (),
                      client: bool = False) -> tuple[Path, Path]:
        """A serving certificate for `service` signed by the cluster CA (the APIService's
        caBundle); `client` adds clientAuth (KEDA's mTLS between adapter and operator)."""
        d = self.run_dir / f"{service}-pki"
        d.mkdir(exist_ok=True)
        key, csr, crt, ext = d / "tls.key", d / "tls.csr", d / "tls.crt", d / "ext.cnf"
        svc = f"{service}.{self.ns}.svc"
        dns = ",".join(f"DNS:{n}" for n in (svc, f"{service}.{self.ns}", *extra_dns))
        ext.write_text(f"subjectAltName={dns},IP:{ADAPTER_IP},IP:127.0.0.1\n"
                       f"extendedKeyUsage=serverAuth{',clientAuth' if client else ''}\n")
        run("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-subj",
            f"/CN={svc}", "-out", str(csr))
        run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(PKI / "ca.crt"), "-CAkey", str(PKI / "ca.key"),
            "-CAcreateserial", "-CAserial", str(d / "ca.srl"), "-days", "2", "-sha256", "-extfile", str(ext),
            "-out", str(crt))
        return crt, key

    def start_adapter(self) -> None:
        import yaml

        values = yaml.safe_load((ROOT / "k8s/prometheus-adapter/values.yaml").read_text())
        cfg = self.run_dir / "adapter-config.yaml"
        # What the prometheus-adapter Helm chart writes from rules.external.
        cfg.write_text(yaml.safe_dump({"externalRules": values["rules"]["external"]}))
        crt, key = self.adapter_certs()
        self.adapter_net = netns.PodNet("prometheus-adapter", ADAPTER_IP).up()
        self.bridge = netns.Bridge()
        self.bridge.add(self.adapter_net.ns, self.apiserver_port)
        self.bridge.add(self.adapter_net.ns, self.prom_port)
        kubeconfig = os.environ["KUBECONFIG"]
        self.spawn("prometheus-adapter", self.adapter_net.exec_argv([
            str(TOOLS / "prometheus-adapter"),
            "--secure-port=6443", f"--bind-address={ADAPTER_IP}",
            f"--tls-cert-file={crt}", f"--tls-private-key-file={key}",
            f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--prometheus-url=http://127.0.0.1:{self.prom_port}/", "--metrics-relist-interval=10s",
            f"--config={cfg}", "--v=2",
        ]))
        self.register_external_metrics("prometheus-adapter")
        items = self.external_metric("nexus_analytics_consumer_lag", {"consumer_group": self.group})
        self.proofs.append(f"apiservice=Available endpoint={ADAPTER_IP}:6443 external_metric={items[0]['value']}")
        log(f"PROOF adapter: {self.proofs[-1]}")

    def external_metric(self, metric: str, labels: dict) -> list:
        """The External metric's items as the HPA controller reads them: through the aggregator
        to whichever adapter is registered; waits until there is one."""
        selector = urllib.parse.quote(",".join(f"{k}={v}" for k, v in labels.items()))
        path = f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{self.ns}/{metric}?labelSelector={selector}"

        def items():
            return json.loads(kubectl("get", "--raw", path).stdout)["items"] or None

        return wait_until(f"the External metric {metric} through the aggregator", items, 120, 3)

    def register_external_metrics(self, service: str) -> None:
        """`service` (listening on ADAPTER_IP:6443 in its network namespace) becomes
        v1beta1.external.metrics.k8s.io: a Service without selector, Endpoints at the
        namespace's address, the APIService with the cluster CA; waits until Available."""
        ca = base64.b64encode((PKI / "ca.crt").read_bytes()).decode()
        apply({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": service, "namespace": self.ns},
               "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 6443}]}})
        apply({"apiVersion": "v1", "kind": "Endpoints",
               "metadata": {"name": service, "namespace": self.ns},
               "subsets": [{"addresses": [{"ip": ADAPTER_IP}], "ports": [{"name": "https", "port": 6443}]}]})
        apply({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
               "metadata": {"name": "v1beta1.external.metrics.k8s.io"},
               "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1", "groupPriorityMinimum": 100,
                        "versionPriority": 100, "caBundle": ca,
                        "service": {"name": service, "namespace": self.ns, "port": 443}}})

        def available():
            self.check_alive(service)
            s = kjson("get", "apiservice", "v1beta1.external.metrics.k8s.io")
            c = {x["type"]: x for x in s.get("status", {}).get("conditions", [])}
            return c.get("Available", {}).get("status") == "True"

        wait_until("APIService v1beta1.external.metrics.k8s.io Available", available, 120, 2)

    # ------------------------------------------------------------ keda
    def apply_keda_crds(self) -> None:
        """KEDA's own CRDs at the pinned version (the chart's ScaledObject needs them first);
        without the built tools (--until pods) the two of ../shared/schemas/keda."""
        built = os.environ.get("KEDA_CRDS")
        crds = Path(built) if built and Path(built).is_dir() else SCHEMAS / "keda"
        for f in sorted(crds.glob("*.yaml")):
            kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))

    def start_keda(self) -> None:
        """KEDA's CRDs, its operator on the host (Kafka lag straight from the broker, the
        gRPC metrics service on 127.0.0.1) and its metrics server in the network namespace,
        mTLS between the two with one certificate signed by the cluster CA."""
        crt, key = self.adapter_certs("keda-metrics-apiserver", (f"keda-operator.{self.ns}.svc",), client=True)
        certs = crt.parent
        (certs / "ca.crt").write_bytes((PKI / "ca.crt").read_bytes())
        kubeconfig = os.environ["KUBECONFIG"]
        env = dict(os.environ, KUBECONFIG=kubeconfig, WATCH_NAMESPACE=self.ns, POD_NAMESPACE=self.ns,
                   KEDA_CLUSTER_OBJECT_NAMESPACE=self.ns)
        self.spawn("keda-operator", [
            str(TOOLS / "keda-operator"), "--leader-elect=false", "--enable-cert-rotation=false",
            f"--cert-dir={certs}",
            f"--metrics-service-bind-address=127.0.0.1:{self.grpc_port}",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{free_port()}", "--zap-log-level=info",
        ], env=env)
        self.adapter_net = netns.PodNet("keda-metrics-apiserver", ADAPTER_IP).up()
        self.bridge = netns.Bridge()
        self.bridge.add(self.adapter_net.ns, self.apiserver_port)
        self.bridge.add(self.adapter_net.ns, self.grpc_port)
        self.spawn("keda-metrics-apiserver", self.adapter_net.exec_argv([
            "env", f"KUBECONFIG={kubeconfig}", f"WATCH_NAMESPACE={self.ns}", f"POD_NAMESPACE={self.ns}",
            f"KEDA_CLUSTER_OBJECT_NAMESPACE={self.ns}",
            str(TOOLS / "keda-adapter"),
            "--secure-port=6443", f"--bind-address={ADAPTER_IP}", f"--cert-dir={certs}",
            f"--tls-cert-file={crt}", f"--tls-private-key-file={key}",
            f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--metrics-service-address=127.0.0.1:{self.grpc_port}",
            f"--metrics-service-grpc-authority=keda-operator.{self.ns}.svc",
            "--port=8080", "--zap-log-level=info",
        ]))
        self.register_external_metrics("keda-metrics-apiserver")

        def keda_hpa():
            self.check_alive("keda-operator", "keda-metrics-apiserver")
            h = kjson("get", "hpa", self.hpa_name, "-n", self.ns)
            ext = h["spec"]["metrics"][0]["external"]["metric"]
            return ext["name"], ext.get("selector", {}).get("matchLabels", {})

        name, labels = wait_until(f"KEDA's HPA {self.hpa_name} for the ScaledObject", keda_hpa, 120, 2)
        items = self.external_metric(name, labels)
        so = kjson("get", "scaledobject", self.fullname, "-n", self.ns)
        conds = {c["type"]: c["status"] for c in so.get("status", {}).get("conditions", [])}
        self.proofs.append(f"keda apiservice=Available endpoint={ADAPTER_IP}:6443 hpa={self.hpa_name} "
                           f"external_metric={name}={items[0]['value']} scaledobject_ready={conds.get('Ready')}")
        log(f"PROOF keda: {self.proofs[-1]}")

    # ------------------------------------------------------------ scenario
    def hpa(self) -> dict:
        return kjson("get", "hpa", self.hpa_name, "-n", self.ns)

    def sample(self, t0: float, producing: bool) -> dict:
        h = self.hpa()
        st = h.get("status", {})
        metric = None
        for m in st.get("currentMetrics") or []:
            ext = m.get("external", {}).get("current", {})
            metric = ext.get("averageValue") or ext.get("value")
        dep = kjson("get", "deployment", self.fullname, "-n", self.ns)
        lag, high = self.lag()
        s = {"t": round(time.monotonic() - t0, 1), "lag": lag, "produced": high,
             "hpa_metric": metric, "desired": st.get("desiredReplicas"), "current": st.get("currentReplicas"),
             "spec": dep["spec"].get("replicas"), "ready": dep.get("status", {}).get("readyReplicas", 0),
             "rows": self.rows(), "producing": producing}
        self.timeline.append(s)
        return s

    def scenario(self) -> None:
        a = self.args
        from confluent_kafka import Consumer

        self._lag_consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": self.group,
                                       "enable.auto.commit": False})

        def one_replica():
            h = self.hpa().get("status", {})
            return h.get("currentReplicas") == 1 and any(
                c["type"] == "ScalingActive" and c["status"] == "True" for c in h.get("conditions", []))

        wait_until("HPA at 1 replica reading its metric (ScalingActive)", one_replica, 120, 2)
        env = dict(os.environ, KAFKA_BROKERS=KAFKA, KAFKA_TOPICS=self.topic, DATABASE_URL=self.db_url)
        log(f"scenario: producing {a.backlog} events at {a.rate}/s to {self.topic}")
        t0 = time.monotonic()
        prod = self.spawn("producer", [BIN, "produce", "--count", str(a.backlog), "--rate", str(a.rate),
                                       "--topic", self.topic], env=env)
        header = f"{'t_s':>6} {'lag':>7} {'produced':>8} {'rows':>8} {'hpa_metric':>10} {'desired':>7} {'spec':>4} {'current':>7}"
        print(header, flush=True)
        first_up = drained = scaled_down = None
        peak = 1
        deadline = t0 + a.timeout
        while time.monotonic() < deadline:
            self.check_alive("pod-runner", "prometheus", "prometheus-adapter", "keda-operator",
                             "keda-metrics-apiserver")
            producing = prod.poll() is None
            s = self.sample(t0, producing)
            print(f"{s['t']:6.1f} {s['lag']:7d} {s['produced']:8d} {s['rows']:8d} {str(s['hpa_metric']):>10} "
                  f"{str(s['desired']):>7} {str(s['spec']):>4} {str(s['current']):>7}", flush=True)
            spec = s["spec"] or 0
            peak = max(peak, spec)
            if first_up is None and spec > 1:
                first_up = s["t"]
            if not producing and prod.returncode != 0:
                raise Failed(f"producer exited {prod.returncode}")
            if drained is None and not producing and s["lag"] == 0 and s["produced"] >= a.backlog:
                drained = s["t"]
            if drained is not None and first_up is not None and spec == 1 and (s["current"] or 0) == 1:
                scaled_down = s["t"]
                break
            time.sleep(a.sample_interval)
        final = self.hpa().get("status", {}).get("currentReplicas")
        lag, produced = self.lag()
        rows = self.rows()
        self.result = dict(kind=self.kind, partitions=a.partitions, backlog=a.backlog, first_scale_up_s=first_up,
                           peak_replicas=peak, lag_drained_s=drained, scaled_down_s=scaled_down,
                           final_replicas=final, rows=rows, produced=produced)
        self.plot()
        errors = []
        if first_up is None:
            errors.append("the HPA never scaled up")
        if peak > a.partitions:
            errors.append(f"peak {peak} replicas > {a.partitions} partitions")
        if drained is None:
            errors.append("lag never drained")
        if scaled_down is None:
            errors.append("replicas did not return to 1")
        if rows != produced or produced != a.backlog:
            errors.append(f"rows {rows} != produced {produced} (backlog {a.backlog})")
        if errors:
            raise Failed("; ".join(errors))

    def plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log("matplotlib missing: no plot")
            return
        tl = self.timeline
        t = [s["t"] for s in tl]
        fig, ax = plt.subplots(figsize=(10, 5))
        ax.plot(t, [s["lag"] for s in tl], color="tab:red", label="group lag (committed, exact)")
        hm = [quantity(s["hpa_metric"]) for s in tl]
        ax.plot(t, [h if h is not None else float("nan") for h in hm], color="tab:orange", linestyle=":",
                label="External metric / replica (HPA)")
        ax.set_xlabel("seconds since the backlog started")
        ax.set_ylabel("messages")
        ax2 = ax.twinx()
        ax2.step(t, [s["desired"] or 0 for s in tl], where="post", color="tab:blue", label="desired replicas")
        ax2.step(t, [s["current"] or 0 for s in tl], where="post", color="tab:green", linestyle="--",
                 label="current replicas")
        ax2.set_ylabel("replicas")
        ax2.set_ylim(0, self.args.partitions + 1)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(lines, labels, loc="upper right")
        ax.set_title(f"{'KEDA' if self.kind == 'keda' else 'HPA'} on consumer lag: {self.args.backlog} events at {self.args.rate}/s, "
                     f"{self.args.partitions} partitions, lagPerReplica {self.args.lag_per_replica}")
        out = ROOT / "target" / "autoscale" / f"{self.kind}-timeline.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        (ROOT / "target" / "autoscale" / f"{self.kind}-timeline.json").write_text(json.dumps(self.timeline))
        self.result["plot"] = str(out.relative_to(ROOT))
        log(f"plot: {out.relative_to(ROOT)}")

    # ------------------------------------------------------------ setup/teardown
    def prove_pods(self) -> None:
        """Endpoints are the Pod IPs kwok assigned, and /metrics answers there."""
        def endpoints():
            ep = kjson("get", "endpoints", self.fullname, "-n", self.ns)
            ips = [a["ip"] for ss in ep.get("subsets", []) for a in ss.get("addresses", [])]
            return ips or None

        ips = wait_until("the Service's Endpoints", endpoints, 60, 1)
        port = 9090

        def scraped():
            self.check_alive("pod-runner")
            with urllib.request.urlopen(f"http://{ips[0]}:{port}/metrics", timeout=3) as r:
                return "analytics_" in r.read().decode()

        wait_until(f"/metrics on the Pod IP {ips[0]}:{port}", scraped, 90, 2)
        self.proofs.append(f"endpoints={ips} metrics_on_pod_ip=yes")
        log(f"PROOF pods: {self.proofs[-1]}")

    def setup(self, until: str) -> bool:
        """Brings the stack up to `until`; True when the scenario should run."""
        kubectl("create", "namespace", self.ns)
        self.create_topic()
        self.create_database()
        if until == "pods" or self.kind == "keda":
            for f in ("servicemonitors", "prometheusrules"):
                kubectl("apply", "--server-side", "-f",
                        str(SCHEMAS / "prometheus-operator" / f"monitoring.coreos.com_{f}.yaml"))
        else:
            self.start_operator()
        if self.kind == "keda":
            self.apply_keda_crds()
        self.install_chart()
        self.start_pod_runner()
        self.prove_pods()
        if until == "pods":
            return False
        if self.kind == "keda":
            self.start_keda()
            return until == "scenario"
        self.apply_prometheus_resource()
        if until == "operator":
            cfg = self.generated_config()
            (self.run_dir / "prometheus.yaml").write_text(cfg)
            jobs = [ln.split(":", 1)[1].strip() for ln in cfg.splitlines() if ln.strip().startswith("- job_name:")]
            self.proofs.append(f"operator_config jobs={jobs} api_server=yes ({self.run_dir.relative_to(ROOT)}/prometheus.yaml)")
            log(f"PROOF operator: {self.proofs[-1]}")
            return False
        self.start_prometheus()
        self.prove_prometheus()
        if until == "prometheus":
            return False
        self.start_adapter()
        return until == "scenario"

    def teardown(self) -> None:
        keep = os.environ.get("E2E_KEEP") == "1"
        kubectl("delete", "apiservice", "v1beta1.external.metrics.k8s.io", "--ignore-not-found", check=False)
        if not keep:
            kubectl("delete", "scaledobject", "--all", "-n", self.ns, "--ignore-not-found", "--wait=false",
                    check=False)
            kubectl("delete", "hpa", "--all", "-n", self.ns, "--ignore-not-found", "--wait=false", check=False)
            kubectl("scale", "deployment", self.fullname, "-n", self.ns, "--replicas=0", check=False)
        # The pod runner drains its processes (SIGTERM, exit 0 expected) before the rest stops.
        p = self.procs.get("pod-runner")
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(90)
            except subprocess.TimeoutExpired:
                pass
        self.stop_all()
        if self.bridge is not None and self.adapter_net is not None:
            self.bridge.remove(self.adapter_net.ns)
        if self.adapter_net is not None:
            self.adapter_net.down()
        netns.cleanup()
        if keep:
            log(f"E2E_KEEP=1: kept namespace {self.ns}, topic {self.topic}, database {self.db}")
            return
        kubectl("delete", "namespace", self.ns, "--wait=false", check=False)
        try:
            for f in self.kafka_admin().delete_topics([self.topic, self.topic + ".dlq"]).values():
                f.result(30)
        except Exception as e:  # noqa: BLE001 (best effort)
            log(f"topic deletion: {e}")
        try:
            self.sql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)", url=DEV_DB, autocommit=True)
        except Exception as e:  # noqa: BLE001
            log(f"database drop: {e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["hpa", "keda"], default="hpa")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--backlog", type=int, default=120000, help="events produced")
    p.add_argument("--rate", type=int, default=3000, help="events/s while producing")
    p.add_argument("--lag-per-replica", type=int, default=5000)
    p.add_argument("--batch-max-events", type=int, default=5,
                   help="BATCH_MAX_EVENTS of the pods (small: one replica drains slower than the producer)")
    p.add_argument("--scale-down-window", type=int, default=30, help="scaleDown stabilizationWindowSeconds")
    p.add_argument("--sample-interval", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=1200, help="seconds for the whole scenario")
    p.add_argument("--until", choices=["pods", "operator", "prometheus", "adapter", "keda", "scenario"],
                   default="scenario", help="stop after this stage (pods: no autoscale tool needed; "
                   "operator/prometheus/adapter for --kind hpa, keda for --kind keda)")
    args = p.parse_args()
    sc = Scenario(args)
    rc = 0
    errors = []
    try:
        if sc.setup(args.until):
            try:
                sc.scenario()
            except Failed as e:
                errors.append(f"scenario: {e}")
        if "prometheus" in sc.procs and sc.procs["prometheus"].poll() is None:
            if not sc.timeline:  # the processed/duration series need processed events
                env = dict(os.environ, KAFKA_BROKERS=KAFKA, KAFKA_TOPICS=sc.topic)
                run(BIN, "produce", "--count", "1000", "--rate", "0", "--topic", sc.topic, env=env)
                time.sleep(15)
            sc.prove_metrics_and_rules()
    except Exception as e:  # noqa: BLE001 (reported, then torn down)
        errors.append(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        sc.teardown()
    for e in errors:
        log(f"FAILED: {e}")
        rc = 1
    for proof in sc.proofs:
        print(f"PROOF {proof}")
    if sc.result:
        r = sc.result
        print("AUTOSCALE " + " ".join(f"{k}={r[k]}" for k in (
            "kind", "partitions", "backlog", "first_scale_up_s", "peak_replicas", "lag_drained_s", "scaled_down_s",
            "final_replicas", "rows", "produced")), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
