//! Reconciler tests against a mocked API server (tower-test): every request the reconciler makes
//! is checked in order (method, path and query, body fields) and answered from a script.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use super::crd::{AnalyticsPipeline, ReplayPhase, ReplaySpec};
use super::metrics::OperatorMetrics;
use super::reconcile::{self, Context, KafkaConnection, OffsetResetter, PartitionSource};
use super::resources::tests::pipeline;
use crate::kafka::admin::{KafkaAdminError, PartitionChange, ResetTarget};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "analytics";
const Q: &str = "?&force=true&fieldManager=nexus-analytics-operator";
const PIPE: &str =
    "/apis/analytics.nexuscore.io/v1alpha1/namespaces/analytics/analyticspipelines/events";

/// Answers a request body with a status code and a JSON body.
type Responder = Box<dyn Fn(&Value) -> (u16, Value) + Send>;

/// One expected request and the answer to it.
struct Exchange {
    method: Method,
    path: String,
    check: Box<dyn Fn(&Value) + Send>,
    respond: Responder,
}

fn ex(
    method: Method,
    path: impl Into<String>,
    check: impl Fn(&Value) + Send + 'static,
    respond: impl Fn(&Value) -> (u16, Value) + Send + 'static,
) -> Exchange {
    Exchange { method, path: path.into(), check: Box::new(check), respond: Box::new(respond) }
}

/// Server-side apply of `resource` at `path`, answered with the applied body plus `status`.
fn apply(path: &str, check: impl Fn(&Value) + Send + 'static, status: Value) -> Exchange {
    ex(Method::PATCH, format!("{path}{Q}"), check, move |body| {
        let mut b = body.clone();
        if !status.is_null() {
            b["status"] = status.clone();
        }
        (200, b)
    })
}

fn event(reason: &'static str) -> Exchange {
    ex(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/analytics/events?",
        move |b| assert_eq!(b["reason"], reason, "event body {b}"),
        |b| (201, b.clone()),
    )
}

fn status_patch(check: impl Fn(&Value) + Send + 'static) -> Exchange {
    ex(Method::PATCH, format!("{PIPE}/status{Q}"), check, |b| {
        let mut obj = serde_json::to_value(pipeline()).expect("json");
        obj["status"] = b["status"].clone();
        (200, obj)
    })
}

fn deployment_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/events")
}

/// Drives the script; returns the trace of "METHOD path" lines. Fails on a missing, unexpected or
/// extra request.
async fn verify(mut handle: Handle, script: Vec<Exchange>) -> Vec<String> {
    let mut trace = Vec::new();
    for e in script {
        let Some((req, send)) = handle.next_request().await else {
            panic!(
                "expected {} {} but the client stopped; trace so far: {trace:#?}",
                e.method, e.path
            )
        };
        let (method, uri) = (req.method().clone(), req.uri().to_string());
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json body")
        };
        assert_eq!(
            (&method, uri.as_str()),
            (&e.method, e.path.as_str()),
            "request #{} differs; trace so far: {trace:#?}",
            trace.len() + 1
        );
        (e.check)(&body);
        let (code, answer) = (e.respond)(&body);
        trace.push(format!("{method} {uri}"));
        let resp = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&answer).expect("json")))
            .expect("response");
        send.send_response(resp);
    }
    if let Some((req, _)) = handle.next_request().await {
        panic!("unexpected extra request {} {}; trace: {trace:#?}", req.method(), req.uri());
    }
    trace
}

struct FakePartitions(Result<i32, ()>);

impl PartitionSource for FakePartitions {
    fn partition_count<'a>(
        &'a self,
        _: &'a KafkaConnection,
        _: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<i32, KafkaAdminError>> {
        let r = self.0.map_err(|()| KafkaAdminError::UnknownTopic("user-events".into()));
        Box::pin(async move { r })
    }

    /// Kafka that answers partition counts answers lag too (`FAKE_LAG`).
    fn group_lag<'a>(
        &'a self,
        _: &'a KafkaConnection,
        _: &'a str,
        _: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<i64, KafkaAdminError>> {
        let r = self
            .0
            .map(|_| FAKE_LAG)
            .map_err(|()| KafkaAdminError::UnknownTopic("user-events".into()));
        Box::pin(async move { r })
    }
}

const FAKE_LAG: i64 = 1234;

/// Records each reset; answers from a queue (default: one changed partition).
#[derive(Default)]
struct FakeResetter {
    calls: Mutex<Vec<(String, Vec<String>, ResetTarget)>>,
    answers: Mutex<VecDeque<Result<Vec<PartitionChange>, KafkaAdminError>>>,
}

impl OffsetResetter for FakeResetter {
    fn reset<'a>(
        &'a self,
        _: &'a KafkaConnection,
        group: &'a str,
        topics: &'a [String],
        target: ResetTarget,
    ) -> futures::future::BoxFuture<'a, Result<Vec<PartitionChange>, KafkaAdminError>> {
        if let Ok(mut c) = self.calls.lock() {
            c.push((group.to_owned(), topics.to_vec(), target));
        }
        let answer =
            self.answers.lock().ok().and_then(|mut a| a.pop_front()).unwrap_or_else(|| {
                Ok(vec![PartitionChange {
                    topic: "user-events".into(),
                    partition: 0,
                    old: Some(10),
                    new: 5,
                }])
            });
        Box::pin(async move { answer })
    }
}

/// A fresh controller context (as after a restart) around a mocked API server.
fn context(partitions: Result<i32, ()>, resetter: Arc<FakeResetter>) -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, NS);
    let reporter =
        Reporter { controller: "nexus-analytics-operator".into(), instance: Some("test".into()) };
    let ctx = Context::new(
        client.clone(),
        Recorder::new(client, reporter),
        Arc::new(FakePartitions(partitions)),
        resetter,
        false,
        Duration::from_secs(300),
        Arc::new(OperatorMetrics::default()),
    );
    (Arc::new(ctx), handle)
}

/// Runs one reconcile against the script; returns its result and the request trace.
async fn run_once(
    p: AnalyticsPipeline,
    partitions: Result<i32, ()>,
    resetter: Arc<FakeResetter>,
    script: Vec<Exchange>,
) -> (Result<Action, reconcile::Error>, Vec<String>) {
    let (ctx, handle) = context(partitions, resetter);
    let server = tokio::spawn(verify(handle, script));
    let res = reconcile::reconcile(Arc::new(p), ctx.clone()).await;
    // Dropping the last client handle lets the verifier see "no more requests".
    drop(ctx);
    let trace = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("verifier timed out")
        .expect("verifier panicked");
    (res, trace)
}

fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

fn job_path() -> String {
    format!(
        "/apis/batch/v1/namespaces/{NS}/jobs/{}",
        super::resources::migration_job_name(&pipeline())
    )
}

#[tokio::test]
async fn new_pipeline_applies_migration_job_and_waits() {
    let script = vec![
        apply(
            &job_path(),
            |b| {
                assert_eq!(b["kind"], "Job");
                assert_eq!(
                    b["spec"]["template"]["spec"]["containers"][0]["args"],
                    json!(["migrate"])
                );
                assert_eq!(b["metadata"]["ownerReferences"][0]["name"], "events");
            },
            json!({"active": 1}),
        ),
        status_patch(|b| {
            let s = &b["status"];
            assert_eq!(cond(s, "Progressing")["status"], "True");
            assert_eq!(cond(s, "Progressing")["reason"], "MigrationRunning");
            assert_eq!(cond(s, "Ready")["status"], "False");
            assert_eq!(s["observedGeneration"], 1);
        }),
    ];
    let (res, trace) = run_once(pipeline(), Ok(6), Arc::default(), script).await;
    assert_eq!(res.expect("reconciles"), Action::requeue(Duration::from_secs(10)));
    println!("{}", trace.join("\n"));
    assert_eq!(trace.len(), 2);
}

fn succeeded_job() -> Exchange {
    apply(
        &job_path(),
        |_| {},
        json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
    )
}

#[tokio::test]
async fn migrated_pipeline_applies_children_with_capped_hpa() {
    let script = vec![
        succeeded_job(),
        apply(
            &deployment_path(),
            |b| {
                assert!(b["spec"].get("replicas").is_none(), "HPA owns replicas");
                assert_eq!(b["spec"]["template"]["spec"]["containers"][0]["args"], json!(["run"]));
            },
            json!({"readyReplicas": 2}),
        ),
        apply(
            &format!("/api/v1/namespaces/{NS}/services/events"),
            |b| assert_eq!(b["kind"], "Service"),
            Value::Null,
        ),
        apply(
            &format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/events"),
            |b| {
                assert_eq!(b["spec"]["maxReplicas"], 6, "capped at 6 partitions, spec says 10");
                assert_eq!(b["spec"]["minReplicas"], 2);
            },
            Value::Null,
        ),
        apply(
            &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/events"),
            |b| assert_eq!(b["spec"]["maxUnavailable"], 1),
            Value::Null,
        ),
        event("MaxReplicasCapped"),
        event("Ready"),
        status_patch(|b| {
            let s = &b["status"];
            assert_eq!(s["partitionCount"], 6);
            assert_eq!(s["currentLag"], FAKE_LAG);
            assert_eq!(s["maxReplicasCapped"], true);
            assert_eq!(s["readyReplicas"], 2);
            assert_eq!(cond(s, "Ready")["status"], "True");
            assert_eq!(cond(s, "Progressing")["status"], "False");
            assert_eq!(cond(s, "Degraded")["status"], "False");
            let msg = cond(s, "Ready")["message"].as_str().unwrap_or_default();
            assert!(msg.contains("capped"), "{msg}");
        }),
    ];
    let (res, trace) = run_once(pipeline(), Ok(6), Arc::default(), script).await;
    assert_eq!(res.expect("reconciles"), Action::requeue(Duration::from_secs(300)));
    println!("{}", trace.join("\n"));
}

#[tokio::test]
async fn kafka_unreachable_keeps_last_count_and_reports_degraded() {
    let mut p = pipeline();
    p.status = Some(
        serde_json::from_value(json!({"partitionCount": 4, "maxReplicasCapped": true}))
            .expect("status"),
    );
    let script = vec![
        succeeded_job(),
        apply(&deployment_path(), |_| {}, json!({"readyReplicas": 2})),
        apply(&format!("/api/v1/namespaces/{NS}/services/events"), |_| {}, Value::Null),
        apply(
            &format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/events"),
            |b| assert_eq!(b["spec"]["maxReplicas"], 4, "last known count"),
            Value::Null,
        ),
        apply(
            &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/events"),
            |_| {},
            Value::Null,
        ),
        event("Ready"),
        status_patch(|b| {
            let d = cond(&b["status"], "Degraded");
            assert_eq!(d["status"], "True");
            assert_eq!(d["reason"], "KafkaUnreachable");
        }),
    ];
    let (res, _) = run_once(p, Err(()), Arc::default(), script).await;
    assert!(res.is_ok());
}

#[tokio::test]
async fn api_error_fails_reconcile_and_backs_off() {
    let script = vec![
        ex(
            Method::PATCH,
            format!("{}{Q}", job_path()),
            |_| {},
            |_| {
                (
                    500,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500}),
                )
            },
        ),
        event("ReconcileFailed"),
    ];
    let (ctx, handle) = context(Ok(6), Arc::default());
    let server = tokio::spawn(verify(handle, script));
    let p = Arc::new(pipeline());
    let err = reconcile::reconcile(p.clone(), ctx.clone()).await.expect_err("API error");
    assert!(err.to_string().contains("request timed out"), "{err}");
    assert_eq!(
        reconcile::error_policy(p.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        reconcile::error_policy(p.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(
        reconcile::error_policy(p.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(20))
    );
    for _ in 0..10 {
        reconcile::error_policy(p.clone(), &err, ctx.clone());
    }
    assert_eq!(
        reconcile::error_policy(p, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(300))
    );
    assert_eq!((ctx.metrics.reconciles(), ctx.metrics.failures()), (1, 1));
    drop(ctx);
    server.await.expect("verifier");
}

fn with_replay(state: Option<ReplayPhase>) -> AnalyticsPipeline {
    let mut p = pipeline();
    p.spec.replay = Some(ReplaySpec { id: "r1".into(), from: "2026-11-26T09:00:00Z".into() });
    let mut status = json!({"partitionCount": 6, "maxReplicasCapped": true,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                        "lastTransitionTime": "2026-11-26T08:00:00Z"}]});
    if let Some(s) = state {
        status["lastReplay"] = json!({"id": "r1", "state": s, "started": "2026-11-26T10:00:00Z"});
    }
    p.status = Some(serde_json::from_value(status).expect("status literal"));
    p
}

fn replay_state(b: &Value) -> (String, String) {
    let r = &b["status"]["lastReplay"];
    (
        r["state"].as_str().unwrap_or_default().to_owned(),
        r["message"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Replay, one reconcile per step, each on a fresh context built only from the persisted status
/// (what a restarted controller sees). The step from ResettingOffsets on runs after a "restart".
#[tokio::test]
async fn replay_walks_step_by_step_and_survives_restart() {
    let resetter = Arc::new(FakeResetter::default());
    let pods = format!(
        "/api/v1/namespaces/{NS}/pods?&labelSelector=app.kubernetes.io%2Fcomponent%3Dconsumer%2Capp.kubernetes.io%2Finstance%3Devents%2Capp.kubernetes.io%2Fname%3Dnexus-analytics"
    );

    // 1. New replay id: autoscaler removed, Deployment to 0, state WaitingForPodsGone.
    let script = vec![
        ex(
            Method::DELETE,
            format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/events?"),
            |_| {},
            |_| {
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
                )
            },
        ),
        apply(&deployment_path(), |b| assert_eq!(b["spec"]["replicas"], 0), Value::Null),
        event("ReplayStarted"),
        status_patch(|b| {
            assert_eq!(replay_state(b).0, "WaitingForPodsGone");
            assert_eq!(cond(&b["status"], "Progressing")["reason"], "Replaying");
            assert_eq!(cond(&b["status"], "Ready")["status"], "False");
        }),
    ];
    let (res, trace) = run_once(with_replay(None), Ok(6), resetter.clone(), script).await;
    assert_eq!(res.expect("step 1"), Action::requeue(Duration::from_secs(1)));
    println!("step 1:\n{}", trace.join("\n"));

    // 2. Two pods still terminating: stay.
    let pod = json!({"metadata": {"name": "events-1"}, "status": {"phase": "Running"}});
    let list =
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod.clone(), pod]});
    let script = vec![
        ex(Method::GET, pods.clone(), |_| {}, move |_| (200, list.clone())),
        status_patch(|b| {
            let (state, msg) = replay_state(b);
            assert_eq!(state, "WaitingForPodsGone");
            assert!(msg.contains("2 consumer pod(s)"), "{msg}");
        }),
    ];
    let (res, _) = run_once(
        with_replay(Some(ReplayPhase::WaitingForPodsGone)),
        Ok(6),
        resetter.clone(),
        script,
    )
    .await;
    assert_eq!(res.expect("step 2"), Action::requeue(Duration::from_secs(5)));

    // 3. Pods gone: state ResettingOffsets (persisted; nothing reset yet).
    let empty = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []});
    let script = vec![
        ex(Method::GET, pods, |_| {}, move |_| (200, empty.clone())),
        status_patch(|b| assert_eq!(replay_state(b).0, "ResettingOffsets")),
    ];
    let (res, _) = run_once(
        with_replay(Some(ReplayPhase::WaitingForPodsGone)),
        Ok(6),
        resetter.clone(),
        script,
    )
    .await;
    assert!(res.is_ok());
    assert!(resetter.calls.lock().expect("lock").is_empty(), "no reset before pods are gone");

    // -- controller restart: a new resetter and context; only the status carries the state. --
    let resetter = Arc::new(FakeResetter::default());
    resetter.answers.lock().expect("lock").push_back(Err(KafkaAdminError::GroupNotEmpty {
        group: "analytics-service".into(),
        members: vec!["rdkafka@/10.0.0.7".into()],
    }));

    // 4a. The group still has a lingering member: stay, warn, retry.
    let script = vec![
        event("OffsetResetRetry"),
        status_patch(|b| {
            let (state, msg) = replay_state(b);
            assert_eq!(state, "ResettingOffsets");
            assert!(msg.contains("active member"), "{msg}");
        }),
    ];
    let (res, _) =
        run_once(with_replay(Some(ReplayPhase::ResettingOffsets)), Ok(6), resetter.clone(), script)
            .await;
    assert_eq!(res.expect("step 4a"), Action::requeue(Duration::from_secs(5)));

    // 4b. Reset succeeds: state Restoring.
    let script = vec![
        event("OffsetsReset"),
        status_patch(|b| {
            let (state, msg) = replay_state(b);
            assert_eq!(state, "Restoring");
            assert!(
                msg.contains(
                    "reset 1 partition(s) of group analytics-service to 2026-11-26T09:00:00Z"
                ),
                "{msg}"
            );
            assert_eq!(
                b["status"]["lastReplay"]["started"], "2026-11-26T10:00:00Z",
                "start time kept"
            );
        }),
    ];
    let (res, _) =
        run_once(with_replay(Some(ReplayPhase::ResettingOffsets)), Ok(6), resetter.clone(), script)
            .await;
    assert!(res.is_ok());
    {
        let calls = resetter.calls.lock().expect("lock");
        assert_eq!(calls.len(), 2);
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-26T09:00:00Z").expect("t").to_utc();
        assert_eq!(
            calls[1],
            ("analytics-service".into(), vec!["user-events".into()], ResetTarget::Time(t))
        );
    }

    // 5. Restore: Done, then the normal objects are applied again (HPA back, no fixed replicas).
    let script = vec![
        event("ReplayFinished"),
        succeeded_job(),
        apply(
            &deployment_path(),
            |b| assert!(b["spec"].get("replicas").is_none()),
            json!({"readyReplicas": 2}),
        ),
        apply(&format!("/api/v1/namespaces/{NS}/services/events"), |_| {}, Value::Null),
        apply(
            &format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/events"),
            |b| assert_eq!(b["spec"]["maxReplicas"], 6),
            Value::Null,
        ),
        apply(
            &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/events"),
            |_| {},
            Value::Null,
        ),
        status_patch(|b| {
            assert_eq!(replay_state(b).0, "Done");
            assert!(b["status"]["lastReplay"]["finished"].is_string());
            assert_eq!(cond(&b["status"], "Ready")["status"], "True");
            assert_eq!(cond(&b["status"], "Ready")["lastTransitionTime"], "2026-11-26T08:00:00Z");
        }),
    ];
    let (res, trace) =
        run_once(with_replay(Some(ReplayPhase::Restoring)), Ok(6), resetter.clone(), script).await;
    assert_eq!(res.expect("step 5"), Action::requeue(Duration::from_secs(300)));
    println!("step 5:\n{}", trace.join("\n"));

    // 6. Done stays done: a plain reconcile, no replay requests.
    let mut done = with_replay(Some(ReplayPhase::Done));
    if let Some(s) = done.status.as_mut() {
        s.max_replicas_capped = true;
    }
    let script = vec![
        succeeded_job(),
        apply(&deployment_path(), |_| {}, json!({"readyReplicas": 2})),
        apply(&format!("/api/v1/namespaces/{NS}/services/events"), |_| {}, Value::Null),
        apply(
            &format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/events"),
            |_| {},
            Value::Null,
        ),
        apply(
            &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/events"),
            |_| {},
            Value::Null,
        ),
        status_patch(|b| assert_eq!(replay_state(b).0, "Done")),
    ];
    let (res, _) = run_once(done, Ok(6), resetter.clone(), script).await;
    assert!(res.is_ok());
    assert_eq!(resetter.calls.lock().expect("lock").len(), 2, "no further reset");
}

#[tokio::test]
async fn paused_pipeline_scales_to_zero() {
    let mut p = pipeline();
    p.spec.paused = true;
    let script = vec![
        ex(
            Method::DELETE,
            format!("/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/events?"),
            |_| {},
            |_| {
                (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                )
            },
        ),
        apply(&deployment_path(), |b| assert_eq!(b["spec"]["replicas"], 0), Value::Null),
        status_patch(|b| assert_eq!(cond(&b["status"], "Ready")["reason"], "Paused")),
    ];
    let (res, _) = run_once(p, Ok(6), Arc::default(), script).await;
    assert!(res.is_ok());
}

#[test]
fn kafka_secret_keys_become_librdkafka_properties() {
    let data = std::collections::BTreeMap::from([
        ("SECURITY_PROTOCOL".to_owned(), "SASL_SSL".to_owned()),
        ("SASL_PASSWORD".to_owned(), "hunter2".to_owned()),
    ]);
    let props = reconcile::props_from_secret(&data);
    assert_eq!(props.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
    assert_eq!(props.get("sasl.password").map(String::as_str), Some("hunter2"));
}

/// With `kafka.secretRef`, the Secret is read first and its properties reach the Kafka seam.
#[tokio::test]
async fn kafka_secret_is_read_before_anything_else() {
    let mut p = pipeline();
    p.spec.kafka.secret_ref = Some(super::crd::SecretRef { name: "kafka-auth".into() });
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kafka-auth"},
                        "data": {"SASL_USERNAME": "dXNlcg=="}});
    let script = vec![
        ex(
            Method::GET,
            format!("/api/v1/namespaces/{NS}/secrets/kafka-auth"),
            |_| {},
            move |_| (200, secret.clone()),
        ),
        apply(&job_path(), |_| {}, json!({"active": 1})),
        status_patch(|_| {}),
    ];
    let (res, _) = run_once(p, Ok(6), Arc::default(), script).await;
    assert!(res.is_ok());
}
