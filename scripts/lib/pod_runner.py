#!/usr/bin/env python3
"""Give kwok's fake Pods real processes: one `nexus-analytics run` per Running Pod.

kwok simulates the kubelet, so a Deployment's Pods are Running with no process behind
them. For the autoscaling end-to-end test this harness plays the kubelet for one
Deployment: it watches the Pods matching a label selector, starts exactly one process
per Pod kwok reports Running (env from the Pod spec, ConfigMap and Secret references
resolved through the API), gives each its own METRICS_PORT, and sends SIGTERM when the
Pod goes away or starts terminating (SIGKILL after the Pod's grace period).

    pod_runner.py --namespace NS --selector app.kubernetes.io/name=nexus-analytics \\
        --binary target/debug/nexus-analytics [--netns --bridge-port 9092 --bridge-port 5432]

--netns (root): each process runs in a network namespace of its own holding the Pod IP
kwok assigned (scripts/lib/netns.py), so the Service's Endpoints (the Pod IPs) are
where Prometheus really scrapes it, on the container's own METRICS_PORT; each
--bridge-port is forwarded from 127.0.0.1 inside to 127.0.0.1 of the host (Kafka,
PostgreSQL). The namespace is deleted when the process exits. Without --netns every
process shares the host's loopback with its own METRICS_PORT from --metrics-port-base.

Talks to the API with kubectl (KUBECONFIG from the environment). One line per event
on stdout: `POD start|stop|exit name=... pid=... ip=... port=...`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns  # noqa: E402


class EnvError(Exception):
    """A reference in the Pod spec that the API cannot resolve (the kubelet would not start it)."""


def resolve_env(container: dict, pod: dict, configmaps: dict, secrets: dict) -> dict[str, str]:
    """The environment the kubelet would give `container`: envFrom first, then env.

    `configmaps`/`secrets` map names to their `data` (Secret values still base64).
    Pure: unit-testable without a cluster.
    """
    out: dict[str, str] = {}
    for src in container.get("envFrom", []):
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            data = configmaps.get(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f"ConfigMap {ref['name']} not found")
            out.update({prefix + k: v for k, v in data.items()})
        elif "secretRef" in src:
            ref = src["secretRef"]
            data = secrets.get(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f"Secret {ref['name']} not found")
            out.update({prefix + k: base64.b64decode(v).decode() for k, v in data.items()})
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            out[name] = var["value"]
            continue
        vf = var.get("valueFrom", {})
        if "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            value = configmaps.get(ref["name"], {}).get(ref["key"])
        elif "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            raw = secrets.get(ref["name"], {}).get(ref["key"])
            value = None if raw is None else base64.b64decode(raw).decode()
        elif "fieldRef" in vf:
            ref = vf["fieldRef"]
            value = _field(pod, ref["fieldPath"])
        else:
            ref, value = {}, ""
        if value is None:
            if ref.get("optional"):
                continue
            raise EnvError(f"env {name}: {ref.get('name')}/{ref.get('key', ref.get('fieldPath'))} not found")
        out[name] = value
    return out


def _field(pod: dict, path: str) -> str | None:
    meta, status, spec = pod.get("metadata", {}), pod.get("status", {}), pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    return simple.get(path)


def wants_process(pod: dict) -> bool:
    """Running per kwok and not terminating."""
    return pod.get("status", {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


@dataclass
class Proc:
    pod: str
    popen: subprocess.Popen
    port: int
    grace: int
    stop_sent: float | None = None
    log: object = field(default=None, repr=False)
    net: "netns.PodNet | None" = None


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: dict[str, Proc] = {}
        self.next_port = args.metrics_port_base
        self.stopping = False
        self.bridge = netns.Bridge() if args.netns else None

    def kubectl_json(self, *what: str) -> dict:
        out = subprocess.run(
            ["kubectl", "-n", self.args.namespace, "get", *what, "-o", "json"],
            check=True, capture_output=True, text=True,
        ).stdout
        return json.loads(out)

    def objects(self, kind: str) -> dict[str, dict]:
        return {o["metadata"]["name"]: o.get("data", {}) for o in self.kubectl_json(kind)["items"]}

    def start(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        try:
            env = resolve_env(container, pod, self.objects("configmaps"), self.objects("secrets"))
        except EnvError as e:
            print(f"POD skip name={name} reason={e!s}", flush=True)
            return
        argv = [self.args.binary, *container.get("args", ["run"])]
        net = None
        if self.bridge is not None:
            pod_ip = pod.get("status", {}).get("podIP")
            if not pod_ip:
                return  # kwok sets it with Running; next sync
            port = int(env.get("METRICS_PORT", "9090"))
            try:
                net = netns.PodNet(name, pod_ip).up()
                for bport in self.args.bridge_port:
                    self.bridge.add(net.ns, bport)
            except (RuntimeError, OSError) as e:
                print(f"POD skip name={name} reason=netns: {e!s}", flush=True)
                if net is not None:
                    self.bridge.remove(net.ns)
                    net.down()
                return
            argv = net.exec_argv(argv)
        else:
            pod_ip = "127.0.0.1"
            port = self.next_port
            self.next_port += 1
            env["METRICS_PORT"] = str(port)
            # Every process shares loopback: no query API (API_PORT unset).
            env.pop("API_PORT", None)
        full_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        full_env.update(env)
        log = open(os.path.join(self.args.log_dir, f"{name}.log"), "ab")
        popen = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.procs[name] = Proc(name, popen, port, grace, log=log, net=net)
        print(f"POD start name={name} pid={popen.pid} ip={pod_ip} port={port}", flush=True)

    def stop(self, proc: Proc) -> None:
        if proc.stop_sent is None and proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            proc.stop_sent = time.monotonic()
            print(f"POD stop name={proc.pod} pid={proc.popen.pid}", flush=True)

    def reap(self) -> None:
        for name, proc in list(self.procs.items()):
            rc = proc.popen.poll()
            if rc is None:
                if proc.stop_sent is not None and time.monotonic() - proc.stop_sent > proc.grace:
                    proc.popen.kill()
                continue
            print(f"POD exit name={name} pid={proc.popen.pid} rc={rc}", flush=True)
            proc.log.close()
            if proc.net is not None:
                self.bridge.remove(proc.net.ns)
                proc.net.down()
            del self.procs[name]

    def sync(self) -> None:
        pods = self.kubectl_json("pods", "-l", self.args.selector)["items"]
        wanted = {p["metadata"]["name"]: p for p in pods if wants_process(p)}
        for name, proc in self.procs.items():
            if name not in wanted:
                self.stop(proc)
        for name, pod in wanted.items():
            if name not in self.procs:
                self.start(pod)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        while not self.stopping:
            try:
                self.sync()
            except subprocess.CalledProcessError as e:
                print(f"POD api-error {e.stderr.strip()!r}", file=sys.stderr, flush=True)
            self.reap()
            time.sleep(self.args.interval)
        for proc in self.procs.values():
            self.stop(proc)
        while self.procs:
            self.reap()
            time.sleep(0.2)
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namespace", required=True)
    p.add_argument("--selector", required=True)
    p.add_argument("--binary", required=True)
    p.add_argument("--metrics-port-base", type=int, default=19100)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--log-dir", default=".")
    p.add_argument("--netns", action="store_true", help="one network namespace per Pod, holding its Pod IP")
    p.add_argument("--bridge-port", type=int, action="append", default=[],
                   help="with --netns: forward 127.0.0.1:PORT inside to the host's (repeatable)")
    return Runner(p.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
