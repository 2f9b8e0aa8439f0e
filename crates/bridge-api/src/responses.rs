//! The answers the endpoints share, as the OpenAPI document describes them:
//! the problem body and the refusals every guarded endpoint may give.

use serde::Serialize;
use utoipa::ToSchema;

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
    #[response(
        status = 415,
        description = "A body that is not declared JSON",
        content_type = "application/problem+json"
    )]
    UnsupportedMediaType(Problem),
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
    #[response(
        status = 415,
        description = "A body that is not declared JSON",
        content_type = "application/problem+json"
    )]
    UnsupportedMediaType(Problem),
    #[response(status = 429, description = "Rate limited", content_type = "application/problem+json")]
    RateLimited(Problem),
    #[response(status = 503, description = "Try again later", content_type = "application/problem+json")]
    Unavailable(Problem),
}
