//! The account services over HTTP (`bridge_services::http`), each call
//! counted on the pipeline's metrics.

pub use bridge_services::http::HttpServicesConfig;

use crate::services::Services;

pub struct HttpAccountServices;

impl HttpAccountServices {
    /// Both services over HTTP, every call observed by `metrics`.
    pub fn services(config: HttpServicesConfig) -> anyhow::Result<Services> {
        let observers = bridge_services::http::Observers {
            call: Some(crate::metrics::external_call),
            circuit: Some(crate::metrics::service_circuit),
        };
        Ok(bridge_services::http::HttpAccountServices::services(config, observers)?)
    }
}
