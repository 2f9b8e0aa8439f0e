//! The OpenAPI document, generated from the handlers' annotations and served
//! at `/openapi.json`.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// RFC 9457 problem details.
#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

/// The answers every endpoint behind an API key may give besides its own:
/// listed once here and named in each endpoint's `responses`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its description of responses is used
pub enum Guarded {
    #[response(status = 401, description = "No valid credentials", content_type = "application/problem+json")]
    Unauthorized(Problem),
    #[response(status = 403, description = "Missing scope", content_type = "application/problem+json")]
    Forbidden(Problem),
    #[response(status = 429, description = "Rate limited", content_type = "application/problem+json")]
    RateLimited(Problem),
    #[response(status = 503, description = "Try again later", content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// [`Guarded`], for endpoints that read one investor's data: a key bound to
/// another investor is refused too.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its description of responses is used
pub enum GuardedInvestor {
    #[response(status = 401, description = "No valid credentials", content_type = "application/problem+json")]
    Unauthorized(Problem),
    #[response(
        status = 403,
        description = "Missing scope or another investor's",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
    #[response(status = 429, description = "Rate limited", content_type = "application/problem+json")]
    RateLimited(Problem),
    #[response(status = 503, description = "Try again later", content_type = "application/problem+json")]
    Unavailable(Problem),
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key (brk_...) or, where configured, a JWT"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bridge API", description = "Transfers from investors' bank accounts into funds."),
    paths(
        crate::transfers::create,
        crate::transfers::get,
        crate::transfers::history,
        crate::transfers::list,
        crate::transfers::balance,
        crate::transfers::fund,
        crate::callback,
        crate::admin::dead_letter_topics,
        crate::admin::dead_letters_in,
        crate::admin::redrive_dead_letters,
        crate::admin::subscriptions,
        crate::admin::subscribe,
        crate::admin::enable,
        crate::admin::disable,
        crate::admin::redrive_notifications,
        crate::metrics,
        crate::openapi_document,
        crate::healthz,
        crate::ready,
    ),
    components(schemas(Problem)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
