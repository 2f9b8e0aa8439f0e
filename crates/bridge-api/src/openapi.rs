//! The OpenAPI document, generated from the handlers' annotations and served
//! at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::responses::Problem;

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
        crate::admin::audit_log,
        crate::admin::set_investor_attributes,
        crate::bank_access::put,
        crate::bank_access::get,
        crate::bank_access::revoke,
        crate::transfers::investor_history,
        crate::transfers::fund_history,
        crate::reviews::list,
        crate::reviews::show,
        crate::reviews::resolve,
        crate::reviews::approve,
        crate::reviews::reject,
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
