//! The generated CRD: its shipped copy is current, and the example resource validates against
//! its openAPIV3Schema (what the API server would check on `kubectl apply`).

use kube::CustomResourceExt;
use nexus_analytics::operator::{AnalyticsPipeline, crd_yaml};
use serde_json::Value;

const EXAMPLE: &str = include_str!("../../k8s/operator/example-pipeline.yaml");

fn validator() -> jsonschema::Validator {
    let crd = AnalyticsPipeline::crd();
    let version = crd.spec.versions.first().expect("one version");
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("openAPIV3Schema");
    let schema = serde_json::to_value(schema).expect("schema json");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn example() -> Value {
    serde_saphyr::from_str(EXAMPLE).expect("example parses")
}

/// Set UPDATE_CRD=1 to rewrite the shipped copy.
#[test]
fn shipped_crd_matches_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/operator/crd.yaml");
    if std::env::var_os("UPDATE_CRD").is_some() {
        std::fs::write(path, crd_yaml()).expect("write crd.yaml");
    }
    let shipped = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        shipped,
        crd_yaml(),
        "k8s/operator/crd.yaml is stale: rerun this test with UPDATE_CRD=1 (or `nexus-analytics crd`)"
    );
}

#[test]
fn example_resource_validates_against_the_crd_schema() {
    let v = validator();
    let ex = example();
    let errors: Vec<String> = v.iter_errors(&ex).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // And it deserializes into the Rust type the controller uses.
    let p: AnalyticsPipeline = serde_json::from_value(ex).expect("typed");
    assert_eq!(p.spec.replicas.max, 12);
}

#[test]
fn schema_rejects_bad_resources() {
    let v = validator();
    let mut bad = example();
    bad["spec"]["autoscaling"]["kind"] = "vpa".into();
    assert!(!v.is_valid(&bad), "unknown autoscaler kind");
    let mut bad = example();
    bad["spec"]["kafka"].as_object_mut().expect("kafka").remove("groupId");
    assert!(!v.is_valid(&bad), "groupId is required");
    let mut bad = example();
    bad["spec"]["replicas"]["min"] = 0.into();
    assert!(!v.is_valid(&bad), "min >= 1");
}
