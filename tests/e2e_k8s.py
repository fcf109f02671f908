"""End-to-end tests against a real Kubernetes control plane (scripts/cluster up).

Run through `scripts/e2e-k8s`, which brings the cluster up, builds the binary and sets:
  KUBECONFIG           admin kubeconfig of the local cluster
  K8S_TOOLS_BIN        directory with helm and kubectl
  NEXUS_ANALYTICS_BIN  the debug binary (`nexus-analytics operator`)
  SCHEMAS_DIR          ../shared/schemas (Prometheus Operator and KEDA CRDs)
  TEST_KAFKA_BROKERS   optional: a real broker for the replay test (skipped without one)
  E2E_PYTHON           optional: a Python with confluent-kafka (replay test)

Every assertion reads what the API server (or Helm, from it) returns. Each test class uses
namespaces of its own and deletes them at the end; the cluster itself is shared.
Only the kubelet and the container runtime are simulated (kwok): Pods become Running,
Job Pods Succeeded, and nothing runs inside them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "lib"))
from waiting import free_port, wait_for  # noqa: E402  (scripts/lib/waiting.py)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "nexus-analytics"
TOOLS = Path(os.environ.get("K8S_TOOLS_BIN", ROOT / ".tools" / "bin"))
HELM = str(TOOLS / "helm")
KUBECTL = str(TOOLS / "kubectl")
BIN = os.environ.get("NEXUS_ANALYTICS_BIN", str(ROOT / "target" / "debug" / "nexus-analytics"))
SCHEMAS = Path(os.environ.get("SCHEMAS_DIR", ROOT.parent / "shared" / "schemas"))
KAFKA = os.environ.get("TEST_KAFKA_BROKERS", "")
GROUP = "analytics.nexuscore.io"
FIELD_MANAGER = "nexus-analytics-operator"
# Values every plain install needs (the database is never reached: nothing runs in the Pods).
PLAIN = ["--set", "database.url=postgres://nexus:secret@postgres:5432/nexus_analytics"]


def suffix() -> str:
    return uuid.uuid4().hex[:6]


def run(*args: str, check: bool = True, stdin: str | None = None, env=None, timeout=300):
    """Runs a command; on failure (check) the assertion message carries its output."""
    p = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def kubectl(*args: str, check: bool = True, stdin: str | None = None, kubeconfig=None):
    env = None
    if kubeconfig:
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    return run(KUBECTL, *args, check=check, stdin=stdin, env=env)


def kjson(*args: str, kubeconfig=None):
    extra = ["--show-managed-fields"] if args[0] == "get" else []
    return json.loads(kubectl(*args, "-o", "json", *extra, kubeconfig=kubeconfig).stdout)


def helm(*args: str, check: bool = True):
    return run(HELM, *args, check=check, timeout=600)


def exists(kind: str, name: str, ns: str) -> bool:
    return kubectl("get", kind, name, "-n", ns, "--ignore-not-found", "-o", "name").stdout != ""


# Polls fn until it returns a truthy value (returned); fails naming what was awaited.
wait_until = wait_for


def apply_yaml(doc: str, *extra: str):
    return kubectl("apply", "--server-side", "--field-manager=e2e", *extra, "-f", "-", stdin=doc)


def pipeline_yaml(name: str, ns: str, brokers: str, topic: str, group: str, **spec) -> str:
    body = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "AnalyticsPipeline",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "kafka": {"brokers": brokers, "topics": [topic], "groupId": group},
            "database": {"secretRef": {"name": "analytics-db"}},
            "image": "nexus-analytics:0.1.0",
            "replicas": {"min": 1, "max": 3},
            **spec,
        },
    }
    return json.dumps(body)


def replicas_managers(dep: dict) -> list[str]:
    """Field managers owning a Deployment's spec.replicas (from managedFields)."""
    return [m["manager"] for m in dep["metadata"].get("managedFields", [])
            if "f:replicas" in (m.get("fieldsV1", {}).get("f:spec") or {})]


def events_for(ns: str, kind: str, name: str | None = None) -> list[dict]:
    sel = f"involvedObject.kind={kind}" + (f",involvedObject.name={name}" if name else "")
    return kjson("get", "events", "-n", ns, "--field-selector", sel)["items"]


def event_time(e: dict) -> str:
    return e.get("eventTime") or e.get("lastTimestamp") or e.get("firstTimestamp") or ""


def namespaced_objects(ns: str, selector: str) -> list[str]:
    """Every namespaced object (all listable kinds) in ns matching the label selector."""
    kinds = kubectl(
        "api-resources", "--namespaced=true", "--verbs=list", "-o", "name"
    ).stdout.split()
    skip = {"events", "events.events.k8s.io"}
    kinds = ",".join(k for k in kinds if k not in skip)
    out = kubectl("get", kinds, "-n", ns, "-l", selector, "-o", "name", "--ignore-not-found")
    return [line for line in out.stdout.splitlines() if line]


def create_namespace(prefix: str) -> str:
    ns = f"{prefix}-{suffix()}"
    kubectl("create", "namespace", ns)
    # The ServiceAccount controller creates `default`; Pods (and Helm hooks) need it.
    wait_until(f"ServiceAccount default in {ns}", lambda: exists("serviceaccount", "default", ns))
    return ns


def delete_namespace(ns: str):
    if os.environ.get("E2E_KEEP"):
        print(f"E2E_KEEP: leaving namespace {ns}", file=sys.stderr)
        return
    kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def setUpModule():
    assert Path(HELM).exists() and Path(KUBECTL).exists(), f"helm/kubectl missing in {TOOLS}"
    kubectl("version")
    # The chart's CRD as `helm install` would create it (T2's dry runs need the kind).
    kubectl("apply", "--server-side", "--force-conflicts", "-f",
            str(CHART / "crds" / "analyticspipelines.yaml"))
    # The real Prometheus Operator and KEDA CRDs (../shared/schemas/SOURCES.md), as a
    # cluster with both installed has them.
    for f in sorted(SCHEMAS.glob("prometheus-operator/*.yaml")) + sorted(
        SCHEMAS.glob("keda/*.yaml")
    ):
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def rolled_out(name: str, ns: str) -> dict | None:
    """The Deployment once every replica of its current template is ready (else None)."""
    d = kjson("get", "deployment", name, "-n", ns)
    st = d.get("status", {})
    want = d["spec"]["replicas"]
    if (st.get("observedGeneration") == d["metadata"]["generation"]
            and st.get("updatedReplicas") == want and st.get("readyReplicas") == want
            and st.get("replicas") == want):
        return d
    return None


# ------------------------------------------------------------------------ chart, plain mode
class T1ChartPlain(unittest.TestCase):
    """helm install/upgrade/rollback/test/uninstall of the plain chart on the real server."""

    @classmethod
    def setUpClass(cls):
        cls.ns = create_namespace("e2e-plain")
        cls.rel = "plain"
        cls.full = "plain-nexus-analytics"

    @classmethod
    def tearDownClass(cls):
        delete_namespace(cls.ns)

    def deployment(self):
        return kjson("get", "deployment", self.full, "-n", self.ns)

    def replicasets(self):
        sel = "app.kubernetes.io/instance=plain,app.kubernetes.io/component=consumer"
        return kjson("get", "replicasets", "-n", self.ns, "-l", sel)["items"]

    def test_1_install_every_object_accepted_migration_first(self):
        values = ["-f", str(CHART / "ci" / "hpa-servicemonitor-values.yaml")]
        helm("install", self.rel, str(CHART), "-n", self.ns, *values, "--wait", "--timeout", "3m")
        # Every object of the release exists on the server as rendered (nothing dropped by
        # validation or pruned): compare `helm get manifest` kinds/names with the server.
        manifest = helm("get", "manifest", self.rel, "-n", self.ns).stdout
        objs = re.findall(r"^kind: (\w+)\nmetadata:\n  name: (\S+)", manifest, re.M)
        self.assertGreaterEqual(len(objs), 8, manifest)
        kinds = {k for k, _ in objs}
        for needed in ("Deployment", "ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler"):
            self.assertIn(needed, kinds)
        for kind, name in objs:
            self.assertTrue(
                kubectl("get", kind, name, "-n", self.ns, "-o", "name", check=False).returncode
                == 0,
                f"{kind}/{name} from the manifest is not on the server",
            )
        # The migration hook Job ran to completion (its Pod Succeeded through kwok) and
        # finished before the Deployment existed; the Job itself is deleted on success.
        done = [
            e for e in events_for(self.ns, "Job", f"{self.full}-migrate") if e["reason"] == "Completed"
        ]
        self.assertTrue(done, "no Completed event of the migration Job")
        dep = self.deployment()
        self.assertLessEqual(event_time(done[0])[:19], dep["metadata"]["creationTimestamp"][:19])
        self.assertFalse(exists("job", f"{self.full}-migrate", self.ns), "hook Job not deleted")
        wait_until("Deployment rolled out", lambda: rolled_out(self.full, self.ns))
        # The HPA the chart ships reads its metric through the real HPA controller, which
        # reports that no external metrics API serves it (there is no adapter here).
        active = wait_until(
            "the HPA controller's ScalingActive condition",
            lambda: [c for c in kjson("get", "hpa", self.full, "-n", self.ns)["status"]
                     .get("conditions", []) if c["type"] == "ScalingActive"],
        )
        self.assertEqual(active[0]["status"], "False", active)
        self.assertEqual(active[0]["reason"], "FailedGetExternalMetric", active)

    def test_2_upgrade_changed_setting_rolls_pods(self):
        before = self.deployment()
        old_sum = before["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        old_rs = {rs["metadata"]["name"] for rs in self.replicasets()}
        helm(
            "upgrade", self.rel, str(CHART), "-n", self.ns, "--reuse-values",
            "--set", "config.logLevel=debug", "--wait", "--timeout", "3m",
        )
        after = wait_until("new template rolled out", lambda: rolled_out(self.full, self.ns))
        new_sum = after["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        self.assertNotEqual(old_sum, new_sum, "checksum/config did not change")
        self.assertGreater(after["metadata"]["generation"], before["metadata"]["generation"])
        rs = self.replicasets()
        new = [r for r in rs if r["metadata"]["name"] not in old_rs]
        self.assertEqual(len(new), 1, f"expected one new ReplicaSet, got {rs}")
        self.assertEqual(new[0]["status"].get("readyReplicas"), after["spec"]["replicas"])
        self.assertEqual(
            new[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"], new_sum
        )
        for r in rs:
            if r["metadata"]["name"] in old_rs:
                self.assertEqual(r["spec"]["replicas"], 0, "old ReplicaSet not scaled down")
        cm = kjson("get", "configmap", self.full, "-n", self.ns)
        self.assertEqual(cm["data"].get("LOG_LEVEL"), "debug", cm["data"])

    def test_3_rollback_restores_revision_1(self):
        rev1 = helm("get", "manifest", self.rel, "-n", self.ns, "--revision", "1").stdout
        sum1 = re.search(r"checksum/config: (\S+)", rev1).group(1)
        helm("rollback", self.rel, "1", "-n", self.ns, "--wait", "--timeout", "3m")
        dep = wait_until("revision 1 rolled out", lambda: rolled_out(self.full, self.ns))
        self.assertEqual(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"], sum1)
        hist = json.loads(helm("history", self.rel, "-n", self.ns, "-o", "json").stdout)
        self.assertEqual(hist[-1]["revision"], 3)
        self.assertIn("Rollback to 1", hist[-1]["description"])

    def test_4_helm_test_runs_its_pod(self):
        out = helm("test", self.rel, "-n", self.ns, "--timeout", "2m").stdout
        self.assertRegex(out, r"TEST SUITE:\s+plain-nexus-analytics-test-readyz")
        self.assertRegex(out, r"Phase:\s+Succeeded")
        started = [e for e in events_for(self.ns, "Pod", f"{self.full}-test-readyz")
                   if e["reason"] == "Scheduled"]
        self.assertTrue(started, "the test Pod was never scheduled")

    def test_5_uninstall_leaves_only_crds(self):
        sel = "app.kubernetes.io/instance=plain"
        self.assertTrue(namespaced_objects(self.ns, sel))
        helm("uninstall", self.rel, "-n", self.ns, "--wait", "--timeout", "2m")
        left = wait_until(
            "release objects gone (GC of ReplicaSets and Pods included)",
            lambda: namespaced_objects(self.ns, sel) == [] or None,
            timeout=90,
        )
        self.assertTrue(left)
        cluster = kubectl("get", "clusterroles,clusterrolebindings", "-l", sel, "-o", "name").stdout
        self.assertEqual(cluster, "")
        # What Helm documents it keeps: the CRD from crds/.
        self.assertTrue(exists("crd", f"analyticspipelines.{GROUP}", "default"))

    def test_6_failed_migration_stops_install_before_any_deployment(self):
        rel = "failing"
        p = helm(
            "install", rel, str(CHART), "-n", self.ns, *PLAIN,
            "--set", "image.repository=e2e.local/nexus-analytics",
            "--set", "image.tag=migration-fails", "--set", "migrations.backoffLimit=0",
            "--wait", "--timeout", "2m", check=False,
        )
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("failed pre-install", p.stderr + p.stdout)
        self.assertFalse(exists("deployment", f"{rel}-nexus-analytics", self.ns))
        job = kjson("get", "job", f"{rel}-nexus-analytics-migrate", "-n", self.ns)
        failed = [c for c in job["status"].get("conditions", []) if c["type"] == "Failed"]
        self.assertEqual(failed[0]["status"], "True", job["status"])
        helm("uninstall", rel, "-n", self.ns, check=False)


# ------------------------------------------------------------------------ every ci values file
class T2ChartServerValidation(unittest.TestCase):
    """Each charts/nexus-analytics/ci/*-values.yaml passes the real server's validation and
    admission (helm install --dry-run=server: sent to the API server, not persisted)."""

    @classmethod
    def setUpClass(cls):
        cls.ns = create_namespace("e2e-dry")

    @classmethod
    def tearDownClass(cls):
        delete_namespace(cls.ns)

    def test_ci_values_accepted_by_server(self):
        files = sorted((CHART / "ci").glob("*-values.yaml"))
        self.assertTrue(files)
        for f in files:
            with self.subTest(values=f.name):
                p = helm(
                    "install", "dry", str(CHART), "-n", self.ns, "-f", str(f),
                    "--dry-run=server", check=False,
                )
                self.assertEqual(p.returncode, 0, p.stderr)

    def test_values_schema_refusal_is_readable(self):
        p = helm(
            "install", "bad", str(CHART), "-n", self.ns, *PLAIN,
            "--set", "replicaCount=-1", check=False,
        )
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("values don't meet the specifications of the schema", p.stderr)
        self.assertIn("replicaCount", p.stderr)
        self.assertFalse(
            kubectl("get", "all", "-n", self.ns, "-o", "name").stdout.strip(), "objects created"
        )

    def test_kube_version_refusal(self):
        # The real server (v1.35) satisfies kubeVersion (every install here proves it); an
        # older target is refused with Helm's message (helm 4 takes --kube-version only in
        # `template`: an install always asks the server).
        ver = kjson("version")["serverVersion"]["gitVersion"]
        self.assertTrue(ver.startswith("v1.35."), ver)
        p = helm("template", "old", str(CHART), *PLAIN, "--kube-version", "1.26.0", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertRegex(p.stderr, r"chart requires kubeVersion: >=1\.27\.0-0 which is incompatible with Kubernetes v1\.26\.0")


# ------------------------------------------------------------------------ the CRD as served
class T3CrdAsServed(unittest.TestCase):
    """The AnalyticsPipeline CRD (installed by the chart's crds/ in T1, else here)."""

    @classmethod
    def setUpClass(cls):
        cls.ns = create_namespace("e2e-crd")
        crd = CHART / "crds" / "analyticspipelines.yaml"
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        kubectl("wait", "--for=condition=Established", "--timeout=60s",
                f"crd/analyticspipelines.{GROUP}")

    @classmethod
    def tearDownClass(cls):
        delete_namespace(cls.ns)

    def test_structural_schema_accepted(self):
        crd = kjson("get", "crd", f"analyticspipelines.{GROUP}")
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        self.assertEqual(conds.get("Established"), "True", conds)
        self.assertEqual(conds.get("NamesAccepted"), "True", conds)
        self.assertNotIn("NonStructuralSchema", conds)
        self.assertEqual(crd["status"]["acceptedNames"]["shortNames"], ["ap"])

    def test_defaults_applied_by_server(self):
        doc = json.loads(pipeline_yaml("defaults", self.ns, "kafka:9092", "t", "g"))
        del doc["spec"]["replicas"]
        del doc["spec"]["database"]["secretRef"]
        doc["spec"]["database"]["secretRef"] = {"name": "db"}
        kubectl("create", "-f", "-", stdin=json.dumps(doc))
        spec = kjson("get", "analyticspipeline", "defaults", "-n", self.ns)["spec"]
        self.assertEqual(spec["replicas"], {"min": 1, "max": 6})
        self.assertEqual(spec["autoscaling"], {"kind": "hpa", "lagPerReplica": 1000})
        self.assertEqual(spec["database"]["secretRef"]["key"], "DATABASE_URL")
        self.assertIs(spec["paused"], False)
        self.assertIs(spec["serviceMonitor"], False)

    def test_invalid_pipelines_rejected_with_readable_messages(self):
        cases = {
            "min0": ({"replicas": {"min": 0, "max": 3}}, "spec.replicas.min"),
            "notopics": ({"kafka": {"brokers": "k:9092", "topics": [], "groupId": "g"}},
                         "spec.kafka.topics"),
            "badkind": ({"autoscaling": {"kind": "vpa"}}, 'Unsupported value: "vpa"'),
            "badreplay": ({"replay": {"id": "", "from": "earliest"}}, "spec.replay.id"),
        }
        for name, (patch, expect) in cases.items():
            with self.subTest(case=name):
                doc = json.loads(pipeline_yaml(name, self.ns, "kafka:9092", "t", "g"))
                doc["spec"].update(patch)
                p = kubectl("create", "-f", "-", stdin=json.dumps(doc), check=False)
                self.assertNotEqual(p.returncode, 0, f"{name} was accepted")
                self.assertIn("is invalid", p.stderr)
                self.assertIn(expect, p.stderr)
                self.assertFalse(exists("analyticspipeline", name, self.ns))
        doc = json.loads(pipeline_yaml("noimage", self.ns, "kafka:9092", "t", "g"))
        del doc["spec"]["image"]
        p = kubectl("create", "-f", "-", stdin=json.dumps(doc), check=False)
        self.assertIn("spec.image: Required value", p.stderr)

    def test_printer_columns(self):
        apply_yaml(pipeline_yaml("columns", self.ns, "kafka:9092", "t", "g"))
        table = kubectl("get", "ap", "columns", "-n", self.ns).stdout.splitlines()
        self.assertEqual(
            table[0].split(), ["NAME", "READY", "PARTITIONS", "REPLICAS", "LAG", "REPLAY", "AGE"]
        )
        status = {"status": {"partitionCount": 6, "readyReplicas": 2, "currentLag": 42,
                             "conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                                             "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                             "lastReplay": {"id": "r", "state": "Done"}}}
        kubectl("patch", "ap", "columns", "-n", self.ns, "--subresource=status", "--type=merge",
                "-p", json.dumps(status))
        row = kubectl("get", "ap", "columns", "-n", self.ns, "--no-headers").stdout.split()
        self.assertEqual(row[:6], ["columns", "True", "6", "2", "42", "Done"])


# ------------------------------------------------------------------------ the operator
def sa_kubeconfig(ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig holding a TokenRequest token of ServiceAccount ns/sa (1 h)."""
    token = kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    admin = kjson("config", "view", "--raw", "--minify")
    cluster = admin["clusters"][0]["cluster"]
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa}}],
        "current-context": "sa",
    }
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


class Operator:
    """`nexus-analytics operator` as a local process with the given kubeconfig."""

    def __init__(self, kubeconfig: Path, name: str, logdir: Path, *extra: str):
        self.port = free_port()
        self.name = name
        self.log = logdir / f"operator-{name}.log"
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), POD_NAME=name,
                   LOG_LEVEL="info,nexus_analytics=debug", LOG_FORMAT="text")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [BIN, "operator", "--port", str(self.port), "--recheck-secs", "5", *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def reconciles(self) -> int:
        _, body = self.get("/metrics")
        m = re.search(r"^nexus_operator_reconciles_total (\d+)$", body, re.M)
        return int(m.group(1)) if m else -1

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 60):
        def ready():
            if not self.alive():
                raise RuntimeError(f"operator {self.name} exited:\n{self.tail()}")
            return self.get("/readyz")[0] == 200

        wait_until(f"operator {self.name} /readyz", ready, timeout=timeout)

    def stop(self, sig=signal.SIGTERM):
        """Signals the operator and waits; a graceful stop finishes the reconcile in flight,
        which with an unreachable broker means two 10 s Kafka timeouts."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""


class T4Operator(unittest.TestCase):
    """The chart with operator.enabled, and the operator authenticated as its ServiceAccount."""

    @classmethod
    def setUpClass(cls):
        cls.ns = create_namespace("e2e-op")
        cls.other = create_namespace("e2e-other")
        cls.tmp = Path(tempfile.mkdtemp(prefix="e2e-op-"))
        helm(
            "install", "op", str(CHART), "-n", cls.ns, "--set", "consumer.enabled=false",
            "--set", "operator.enabled=true", "--set", "operator.replicas=2",
            "--wait", "--timeout", "3m",
        )
        cls.sa = "op-nexus-analytics-operator"
        cls.kc = sa_kubeconfig(cls.ns, cls.sa, cls.tmp / "operator.kubeconfig")
        kubectl("create", "secret", "generic", "analytics-db", "-n", cls.ns,
                "--from-literal=DATABASE_URL=postgres://u:p@db:5432/x")
        cls.op = Operator(cls.kc, "op-a", cls.tmp)
        cls.op.wait_ready()

    @classmethod
    def tearDownClass(cls):
        cls.op.stop()
        if os.environ.get("E2E_KEEP"):
            print(f"operator log: {cls.op.log}", file=sys.stderr)
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)
        helm("uninstall", "op", "-n", cls.ns, "--wait", check=False)
        delete_namespace(cls.ns)
        delete_namespace(cls.other)

    def pipeline(self, name: str):
        return kjson("get", "analyticspipeline", name, "-n", self.ns)

    def children(self, name: str) -> dict[str, dict]:
        out = {}
        for kind in ("job", "deployment", "service", "hpa", "pdb"):
            sel = f"app.kubernetes.io/managed-by={FIELD_MANAGER}"
            for o in kjson("get", kind, "-n", self.ns, "-l", sel)["items"]:
                for ref in o["metadata"].get("ownerReferences", []):
                    if ref["kind"] == "AnalyticsPipeline" and ref["name"] == name:
                        out[f"{o['kind']}/{o['metadata']['name']}"] = o
        return out

    def test_1_rbac_grants_and_refusals(self):
        who = f"system:serviceaccount:{self.ns}:{self.sa}"

        def can(*a: str) -> bool:
            return kubectl("auth", "can-i", "--as", who, *a, check=False).stdout.strip() == "yes"

        granted = [
            ("watch", "analyticspipelines"), ("patch", "analyticspipelines", "--subresource=status"),
            ("patch", "deployments"), ("create", "jobs"), ("delete", "horizontalpodautoscalers"),
            ("create", "events.events.k8s.io"), ("get", "secrets"), ("list", "pods"),
            ("patch", "scaledobjects.keda.sh"), ("delete", "triggerauthentications.keda.sh"),
        ]
        for verb, *res in granted:
            self.assertTrue(can(verb, *res, "-n", self.other), f"{verb} {res} refused")
        refused = [
            ("list", "secrets"), ("watch", "secrets"), ("delete", "namespaces"),
            ("create", "clusterroles"), ("patch", "nodes"), ("create", "pods"),
            ("delete", "analyticspipelines"), ("patch", "analyticspipelines"),
            ("create", "rolebindings"), ("update", "customresourcedefinitions"),
            ("delete", "leases.coordination.k8s.io"),
        ]
        for verb, res in refused:
            self.assertFalse(can(verb, res, "-n", self.other), f"{verb} {res} granted")
        # The Lease: only its own, only in the release namespace.
        lease = "leases.coordination.k8s.io/op-nexus-analytics-operator"
        self.assertTrue(can("patch", lease, "-n", self.ns))
        self.assertFalse(can("patch", "leases.coordination.k8s.io/other", "-n", self.ns))
        self.assertFalse(can("patch", lease, "-n", self.other))
        # A real request with the operator's token, refused by RBAC on the server.
        p = kubectl("get", "secrets", "-n", self.other, kubeconfig=self.kc, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Forbidden", p.stderr)
        self.assertIn(f'User "{who}" cannot list resource "secrets"', p.stderr)
        p = kubectl("delete", "namespace", self.other, "--dry-run=server", kubeconfig=self.kc,
                    check=False)
        self.assertIn("Forbidden", p.stderr)

    def test_2_reconciles_children_with_owner_refs_and_status(self):
        apply_yaml(pipeline_yaml("orders", self.ns, KAFKA or "127.0.0.1:1", "orders", "g-orders"))
        uid = self.pipeline("orders")["metadata"]["uid"]
        kids = wait_until(
            "Job, Deployment, Service, HPA, PDB of the pipeline",
            lambda: (k := self.children("orders")) and len(k) == 5 and k,
            timeout=90,
        )
        self.assertEqual(
            sorted(k.split("/")[0] for k in kids),
            ["Deployment", "HorizontalPodAutoscaler", "Job", "PodDisruptionBudget", "Service"],
        )
        for key, o in kids.items():
            refs = o["metadata"]["ownerReferences"]
            self.assertEqual(len(refs), 1, key)
            self.assertEqual(refs[0]["uid"], uid, key)
            self.assertIs(refs[0]["controller"], True, key)
            managers = {m["manager"] for m in o["metadata"]["managedFields"]
                        if m["operation"] == "Apply"}
            self.assertIn(FIELD_MANAGER, managers, key)
        st = wait_until(
            "status with Ready=True for generation 1",
            lambda: (s := self.pipeline("orders").get("status", {})).get("observedGeneration") == 1
            and any(c["type"] == "Ready" and c["status"] == "True" for c in s["conditions"]) and s,
            timeout=90,
        )
        types = {c["type"] for c in st["conditions"]}
        self.assertEqual(types, {"Ready", "Progressing", "Degraded"})
        for c in st["conditions"]:
            self.assertEqual(c["observedGeneration"], 1)
        self.assertEqual(st["readyReplicas"], 1)
        # The HPA and the migration Job as the operator built them.
        hpa = kids["HorizontalPodAutoscaler/orders"]
        self.assertEqual((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]), (1, 3))

    def test_3_spec_edit_updates_children_and_reclaims_fields(self):
        gen0 = self.pipeline("orders")["metadata"]["generation"]
        kubectl("patch", "ap", "orders", "-n", self.ns, "--type=merge",
                "-p", '{"spec":{"replicas":{"min":2,"max":5}}}')
        hpa = wait_until(
            "HPA bounds 2..5",
            lambda: (h := kjson("get", "hpa", "orders", "-n", self.ns))["spec"]["maxReplicas"] == 5
            and h,
            timeout=60,
        )
        self.assertEqual(hpa["spec"]["minReplicas"], 2)
        # The operator leaves spec.replicas to the autoscaler: the real HPA controller raises
        # the Deployment to the new minimum through the scale subresource (no metrics needed).
        dep = wait_until(
            "the HPA controller scales the Deployment to 2",
            lambda: (d := kjson("get", "deployment", "orders", "-n", self.ns))["spec"]["replicas"]
            == 2 and d,
            timeout=60,
        )
        self.assertNotIn(FIELD_MANAGER, replicas_managers(dep))
        wait_until(
            "observedGeneration follows the edit",
            lambda: self.pipeline("orders")["status"].get("observedGeneration") == gen0 + 1,
            timeout=60,
        )
        # Someone else changes a field the operator owns: its next apply (forced) takes it back,
        # and the field stays owned by the operator's field manager.
        kubectl("patch", "hpa", "orders", "-n", self.ns, "--type=merge",
                "-p", '{"spec":{"maxReplicas":9}}', "--field-manager=intruder")
        hpa = wait_until(
            "operator restores maxReplicas 5",
            lambda: (h := kjson("get", "hpa", "orders", "-n", self.ns))["spec"]["maxReplicas"] == 5
            and h,
            timeout=60,
        )
        owner = [m for m in hpa["metadata"]["managedFields"]
                 if "f:maxReplicas" in json.dumps(m.get("fieldsV1", {}))]
        self.assertEqual([m["manager"] for m in owner], [FIELD_MANAGER])

    def test_4_delete_pipeline_garbage_collects_children(self):
        self.assertTrue(self.children("orders"))
        sel = "app.kubernetes.io/instance=orders"
        kubectl("delete", "ap", "orders", "-n", self.ns, "--wait=true", "--timeout=60s")
        wait_until(
            "every child (and its ReplicaSets/Pods) deleted by the garbage collector",
            lambda: not self.children("orders") and namespaced_objects(self.ns, sel) == [],
            timeout=90,
        )

    def test_5_replay_scales_to_zero_resets_offsets_restores(self):
        if not KAFKA:
            self.skipTest("TEST_KAFKA_BROKERS unset: no real Kafka broker for the replay")
        py = os.environ.get("E2E_PYTHON", str(ROOT / ".tools" / "venv" / "bin" / "python"))
        if run(py, "-c", "import confluent_kafka", check=False).returncode != 0:
            self.skipTest(f"{py} has no confluent_kafka (scripts/install-tools python)")
        topic, group = f"e2e-replay-{suffix()}", f"e2e-replay-{suffix()}"
        helper = ROOT / "tests" / "e2e_kafka_helper.py"
        run(py, str(helper), "prepare", KAFKA, topic, group, "3", "30")
        committed = json.loads(run(py, str(helper), "committed", KAFKA, topic, group).stdout)
        self.assertEqual(sum(committed.values()), 30)
        apply_yaml(pipeline_yaml("replayed", self.ns, KAFKA, topic, group))
        wait_until("pipeline Ready", lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in self.pipeline("replayed").get("status", {}).get("conditions", [])),
            timeout=120)
        kubectl("patch", "ap", "replayed", "-n", self.ns, "--type=merge",
                "-p", '{"spec":{"replay":{"id":"r1","from":"earliest"}}}')
        saw_zero = wait_until(
            "Deployment scaled to 0 during the replay",
            lambda: kjson("get", "deployment", "replayed", "-n", self.ns)["spec"]["replicas"] == 0,
            timeout=60, interval=0.2,
        )
        self.assertTrue(saw_zero)
        st = wait_until(
            "replay Done",
            lambda: (r := self.pipeline("replayed")["status"].get("lastReplay", {}))
            .get("state") in ("Done", "Failed") and r,
            timeout=120,
        )
        self.assertEqual(st["state"], "Done", st)
        committed = json.loads(run(py, str(helper), "committed", KAFKA, topic, group).stdout)
        self.assertEqual(set(committed.values()), {0}, committed)
        reasons = [e["reason"] for e in events_for(self.ns, "AnalyticsPipeline", "replayed")]
        for r in ("ReplayStarted", "OffsetsReset", "ReplayFinished"):
            self.assertIn(r, reasons)
        self.assertTrue(exists("hpa", "replayed", self.ns), "HPA not restored")
        # Handed back: the operator set spec.replicas to 0 during the replay and gives the field
        # up when it restores; the recreated HPA's controller scales back to the minimum.
        dep = wait_until(
            "the restored HPA scales the Deployment back to 1",
            lambda: (d := kjson("get", "deployment", "replayed", "-n", self.ns))["spec"]
            ["replicas"] >= 1 and d,
            timeout=60,
        )
        self.assertNotIn(FIELD_MANAGER, replicas_managers(dep))
        kubectl("delete", "ap", "replayed", "-n", self.ns, "--wait=false")


# ------------------------------------------------------------------------ leader election
def skaffold_binary() -> Path | None:
    """skaffold v2.24.0 as scripts/install-tools autoscale-tools builds it (not part of
    scripts/test: without it the skaffold test is skipped)."""
    cache = Path(os.environ.get("NEXUS_CACHE_DIR", Path.home() / ".cache" / "nexus-analytics"))
    for candidate in (TOOLS / "skaffold", cache / "autoscale" / "bin" / "skaffold"):
        if candidate.exists():
            return candidate
    return None


class T6Skaffold(unittest.TestCase):
    """skaffold's own binary deploys skaffold.yaml to the real API server with the image
    given (no container engine or registry needed for `deploy`): both modules, the chart's
    migration hook, the status check; `-p keda` turns the HPA into the chart's ScaledObject
    and the Deployment renders no replicas to fight over."""

    IMAGE = "e2e.local/nexus-analytics:e2e@sha256:" + "0123456789abcdef" * 4

    @classmethod
    def setUpClass(cls):
        cls.skaffold = skaffold_binary()
        if cls.skaffold is None:
            raise unittest.SkipTest("skaffold not built (scripts/install-tools autoscale-tools)")
        cls.ns = create_namespace("e2e-skaffold")
        cls.env = dict(os.environ, PATH=f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}",
                       SKAFFOLD_UPDATE_CHECK="false")

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "ns", None):
            helm("uninstall", "nexus-analytics", "-n", cls.ns, check=False)
            delete_namespace(cls.ns)

    def skaffold_run(self, *args: str):
        return run(str(self.skaffold), *args, env=self.env, timeout=600)

    def render(self, profile: str, *extra: str) -> list[dict]:
        """`skaffold render` of a profile, the objects only (skaffold's notices go to stdout, the
        manifests to --output)."""
        import yaml

        with tempfile.NamedTemporaryFile("r", suffix=".yaml") as out:
            self.skaffold_run("render", "-p", profile, *extra, "--images",
                              f"nexus-analytics={self.IMAGE}", "--digest-source=none",
                              "--offline=true", "-n", self.ns, f"--output={out.name}")
            return [d for d in yaml.safe_load_all(out.read()) if isinstance(d, dict)]

    def test_1_deploy_with_the_image_given(self):
        self.skaffold_run("deploy", "--images", f"nexus-analytics={self.IMAGE}", "-n", self.ns,
                          "--status-check=true")
        dep = kjson("get", "deployment", "nexus-analytics", "-n", self.ns)
        self.assertEqual(dep["spec"]["template"]["spec"]["containers"][0]["image"], self.IMAGE)
        for dev_dep in ("kafka", "postgres"):  # module dev-deps, deployed first
            self.assertTrue(exists("deployment", dev_dep, self.ns), dev_dep)
        status = json.loads(helm("status", "nexus-analytics", "-n", self.ns, "-o", "json").stdout)
        self.assertEqual(status["info"]["status"], "deployed")

    def test_2_keda_profile_hands_replicas_to_the_scaled_object(self):
        self.skaffold_run("deploy", "-p", "keda", "--images", f"nexus-analytics={self.IMAGE}",
                          "-n", self.ns, "--status-check=true")
        so = kjson("get", "scaledobject", "nexus-analytics", "-n", self.ns)
        self.assertEqual(so["spec"]["scaleTargetRef"]["name"], "nexus-analytics")
        docs = self.render("keda", "-m", "nexus-analytics")
        deployment = next(d for d in docs if d["kind"] == "Deployment"
                          and d["metadata"]["name"] == "nexus-analytics")
        self.assertNotIn("replicas", deployment["spec"])
        self.assertIn("ScaledObject", [d["kind"] for d in docs])
        self.assertNotIn("HorizontalPodAutoscaler", [d["kind"] for d in docs])

    def test_3_every_profile_renders_what_the_server_accepts(self):
        for profile in ("dev", "keda", "prod"):
            with self.subTest(profile=profile):
                docs = self.render(profile)
                kinds = [d["kind"] for d in docs]
                self.assertIn("Deployment", kinds, profile)
                # prod never deploys the dev broker and database.
                self.assertEqual("kafka" in [d["metadata"]["name"] for d in docs], profile != "prod")
                kubectl("apply", "--dry-run=server", "-n", self.ns, "-f", "-",
                        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))


class T5LeaderElection(unittest.TestCase):
    """Two operators with --leader-elect: only the Lease holder reconciles."""

    @classmethod
    def setUpClass(cls):
        cls.ns = create_namespace("e2e-lease")
        cls.tmp = Path(tempfile.mkdtemp(prefix="e2e-lease-"))
        helm(
            "install", "le", str(CHART), "-n", cls.ns, "--set", "consumer.enabled=false",
            "--set", "operator.enabled=true", "--set", "operator.replicas=2",
            "--set", f"operator.watchNamespace={cls.ns}", "--wait", "--timeout", "3m",
        )
        cls.kc = sa_kubeconfig(cls.ns, "le-nexus-analytics-operator", cls.tmp / "kc")
        kubectl("create", "secret", "generic", "analytics-db", "-n", cls.ns,
                "--from-literal=DATABASE_URL=postgres://u:p@db:5432/x")
        common = ["--namespace", cls.ns, "--leader-elect", "--lease-name",
                  "le-nexus-analytics-operator", "--lease-namespace", cls.ns,
                  "--lease-duration-secs", "8"]
        cls.a = Operator(cls.kc, "le-a", cls.tmp, *common)
        time.sleep(3)
        cls.b = Operator(cls.kc, "le-b", cls.tmp, *common)

    @classmethod
    def tearDownClass(cls):
        cls.a.stop()
        cls.b.stop()
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(cls.tmp, ignore_errors=True)
        helm("uninstall", "le", "-n", cls.ns, "--wait", check=False)
        delete_namespace(cls.ns)

    def lease(self):
        return kjson("get", "lease", "le-nexus-analytics-operator", "-n", self.ns)["spec"]

    def test_only_the_holder_reconciles_and_the_other_takes_over(self):
        holder = wait_until("a Lease holder", lambda: self.lease().get("holderIdentity"))
        self.assertEqual(holder, "le-a", "the first operator should hold the Lease")
        apply_yaml(pipeline_yaml("p1", self.ns, "127.0.0.1:1", "t", "g"))
        wait_until("p1 reconciled", lambda: kjson("get", "ap", "p1", "-n", self.ns)
                   .get("status", {}).get("observedGeneration") == 1, timeout=90)
        self.assertGreater(self.a.reconciles(), 0)
        self.assertEqual(self.b.reconciles(), 0, "the standby reconciled")
        for e in events_for(self.ns, "AnalyticsPipeline", "p1"):
            self.assertEqual(e.get("reportingInstance"), "le-a", e)
        # The holder dies without releasing the Lease: the other takes over once it expires.
        killed = time.monotonic()
        self.a.stop(signal.SIGKILL)
        duration = self.lease()["leaseDurationSeconds"]
        wait_until("le-b holds the Lease", lambda: self.lease().get("holderIdentity") == "le-b",
                   timeout=duration + 15)
        took = time.monotonic() - killed
        print(f"\nleader takeover after SIGKILL: {took:.1f}s (lease {duration}s)", file=sys.stderr)
        self.assertLessEqual(took, duration + 10)
        kubectl("patch", "ap", "p1", "-n", self.ns, "--type=merge",
                "-p", '{"spec":{"replicas":{"min":1,"max":2}}}')
        wait_until("le-b reconciles generation 2", lambda: kjson("get", "ap", "p1", "-n", self.ns)
                   ["status"].get("observedGeneration") == 2, timeout=60)
        self.assertGreater(self.b.reconciles(), 0)
        # SIGTERM releases the Lease at once (holder cleared) instead of letting it expire.
        self.b.stop()
        self.assertEqual(self.b.proc.returncode, 0, self.b.tail())
        wait_until("Lease released", lambda: not self.lease().get("holderIdentity"), timeout=10)


if __name__ == "__main__":
    unittest.main(verbosity=2)
