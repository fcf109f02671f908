//! The OpenAPI document, generated from the handlers' annotations, and its route.

use axum::extract::State;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::ApiState;
use super::counts::{self, Bucket, GroupBy};
use super::errors::{ErrorBody, ErrorCode, ErrorDetail};
use super::events::{self, JsonBytes, Truncated};

/// The OpenAPI document of this API, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nexus-analytics query API",
        description = "Read-only access to the events nexus-analytics stored.\n\n\
            Every error has the shape `{\"error\": {\"code\", \"message\", \"parameter\"?}}`; \
            `parameter` names the query or path parameter at fault. Unknown and repeated query \
            parameters are refused (400), and so are empty values (`?event_type=`): leave the \
            parameter out instead. Times are RFC 3339 (`2026-03-01T12:00:00Z`); ranges include \
            `from` and exclude `to`.\n\n\
            Event pages are bounded twice: by `limit` (events) and by the service's byte budget \
            (`API_MAX_PAGE_BYTES`, 4 MiB by default). A page cut short by the budget says \
            `\"truncated\": \"byte_budget\"` and carries `next_cursor`; an event larger than \
            the budget is returned alone on its page. Follow `next_cursor` until it is null: \
            no event is skipped or repeated.\n\n\
            The service answers at most `API_MAX_CONCURRENT_REQUESTS` requests at once; beyond \
            that it answers 503 with code `overloaded` and a `Retry-After` header at once \
            (never queued).\n\n\
            When the service has `API_TOKEN` set, every operation except this document needs \
            `Authorization: Bearer <token>`."
    ),
    paths(events::list_events, counts::event_counts, events::user_timeline, openapi_json),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, Bucket, GroupBy, Truncated)),
    modifiers(&BearerScheme),
    tags(
        (name = "events", description = "Stored events"),
        (name = "stats", description = "Aggregated counts"),
        (name = "meta", description = "This document")
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Required when the service has API_TOKEN set: `Authorization: Bearer <API_TOKEN>`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// This OpenAPI document. Never needs a token.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
    security(())
)]
pub(super) async fn openapi_json(State(state): State<ApiState>) -> JsonBytes {
    JsonBytes(state.inner.openapi_json.clone().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_lists_every_route() {
        let doc = serde_json::to_value(openapi()).unwrap();
        for path in [
            "/api/v1/events",
            "/api/v1/stats/counts",
            "/api/v1/users/{user_id}/timeline",
            "/api/v1/openapi.json",
        ] {
            assert!(doc["paths"][path]["get"].is_object(), "{path} missing");
        }
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(
            doc["components"]["schemas"]["Truncated"]["enum"],
            serde_json::json!(["byte_budget"])
        );
        for path in ["/api/v1/events", "/api/v1/stats/counts", "/api/v1/users/{user_id}/timeline"] {
            let responses = &doc["paths"][path]["get"]["responses"];
            for code in ["200", "400", "401", "500", "503"] {
                assert!(responses[code]["description"].is_string(), "{path} {code}: {responses}");
            }
            let error = &responses["401"]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(error, "#/components/schemas/ErrorBody", "{path}");
            let overload = &responses["503"];
            assert!(overload["headers"]["Retry-After"].is_object(), "{path}: {overload}");
        }
    }
}
