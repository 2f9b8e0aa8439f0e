//! The channels: webhook (Standard Webhooks signatures), Slack incoming
//! webhook, SMS through a Twilio-style HTTP API, and email over SMTP.
//! Each send is bounded by a timeout and its failure classified once:
//! transient (retried) or permanent (dead-lettered at once).

use std::sync::Arc;
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::json;

use bridge_codec::TransferStatusChanged;
use bridge_store::notifications::ClaimedDelivery;
use bridge_webhooks::Secret;

use crate::outbound::{OutboundPolicy, SafeResolver};
use crate::templates;

/// A Twilio-style SMS API: `POST {base_url}/2010-04-01/Accounts/{account}/Messages.json`,
/// form-encoded `To`, `From`, `Body`, HTTP basic auth.
#[derive(Clone)]
pub struct SmsProvider {
    pub base_url: String,
    pub account_sid: String,
    pub auth_token: String,
    pub from: String,
}

impl std::fmt::Debug for SmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsProvider")
            .field("base_url", &self.base_url)
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"[REDACTED]")
            .field("from", &self.from)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct SmtpServer {
    pub host: String,
    pub port: u16,
    /// The sender address, e.g. `Bridge <notifications@example.com>`.
    pub from: String,
}

#[derive(Clone, Debug)]
pub struct ChannelsConfig {
    pub request_timeout_ms: u64,
    pub sms: Option<SmsProvider>,
    pub smtp: Option<SmtpServer>,
    /// Where webhook and Slack targets may be (`outbound.rs`): public
    /// hosts, and the internal ones the operator lists.
    pub outbound: Arc<OutboundPolicy>,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self { request_timeout_ms: 5_000, sms: None, smtp: None, outbound: Arc::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

pub struct Channels {
    config: ChannelsConfig,
    /// For targets someone else chose: resolves through the outbound
    /// policy and follows no redirects.
    http: reqwest::Client,
    /// For the SMS provider, which the operator configured.
    provider_http: reqwest::Client,
    smtp: Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)>,
}

/// E.164: a plus, a non-zero digit, then 6 to 14 more digits.
pub fn valid_phone_number(number: &str) -> bool {
    let digits = number.strip_prefix('+').unwrap_or_default();
    (7..=15).contains(&digits.len()) && digits.bytes().all(|byte| byte.is_ascii_digit()) && !digits.starts_with('0')
}

pub fn valid_email(address: &str) -> bool {
    address.parse::<Mailbox>().is_ok()
}

/// Checks a subscription's target for its channel before it is stored
/// (webhook and Slack targets against `outbound`, as far as can be
/// checked without resolving the host; the sender checks again).
pub fn validate_target(channel: &str, target: &str, outbound: &OutboundPolicy) -> Result<(), String> {
    let ok = match channel {
        "webhook" | "slack" => return outbound.check_url(target).map(|_| ()),
        "sms" => valid_phone_number(target),
        "email" => valid_email(target),
        other => return Err(format!("unknown channel {other:?}; expected webhook, slack, sms or email")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{target:?} is not a valid {channel} target"))
    }
}

fn classify_http(status: reqwest::StatusCode, body: &str) -> Result<(), SendError> {
    let summary: String = body.chars().take(200).collect();
    if status.is_success() {
        Ok(())
    } else if status.is_redirection() {
        // Redirects are not followed (they could lead anywhere): the
        // subscription names the wrong URL, which retrying will not change.
        Err(SendError::Permanent(format!("target answered {status}; redirects are not followed")))
    } else if status == reqwest::StatusCode::GONE {
        // The receiver says this endpoint is gone for good.
        Err(SendError::Permanent(format!("target answered {status}")))
    } else {
        Err(SendError::Transient(format!("target answered {status}: {summary}")))
    }
}

fn transport_error(error: reqwest::Error) -> SendError {
    // reqwest names the URL in its errors; the error is stored with the
    // delivery and shown to operators, and the URL may be a secret.
    let error = error.without_url();
    if error.is_builder() {
        SendError::Permanent(format!("invalid target: {error}"))
    } else {
        SendError::Transient(format!("request failed: {error}"))
    }
}

impl Channels {
    pub fn new(config: ChannelsConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .dns_resolver(Arc::new(SafeResolver { policy: config.outbound.clone() }))
            // A redirect could lead anywhere; receivers are asked for the
            // URL they were given.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let provider_http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        let smtp = match &config.smtp {
            Some(server) => {
                let from: Mailbox = server.from.parse()?;
                // Plain SMTP to a relay the operator runs next to the
                // notifier (the usual setup); the relay handles TLS onwards.
                let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&server.host)
                    .port(server.port)
                    .timeout(Some(timeout))
                    .build();
                Some((transport, from))
            }
            None => None,
        };
        Ok(Self { config, http, provider_http, smtp })
    }

    pub async fn send(&self, delivery: &ClaimedDelivery) -> Result<(), SendError> {
        let event: TransferStatusChanged = serde_json::from_value(delivery.event.clone())
            .map_err(|error| SendError::Permanent(format!("stored event unreadable: {error}")))?;
        match delivery.channel.as_str() {
            "webhook" => self.webhook(delivery, &event).await,
            "slack" => self.slack(delivery, &event).await,
            "sms" => self.sms(delivery, &event).await,
            "email" => self.email(delivery, &event).await,
            other => Err(SendError::Permanent(format!("unknown channel {other}"))),
        }
    }

    async fn webhook(&self, delivery: &ClaimedDelivery, event: &TransferStatusChanged) -> Result<(), SendError> {
        let secrets: Vec<Secret> = delivery
            .secret
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .filter(|secret| !secret.trim().is_empty())
            .map(Secret::parse)
            .collect::<Result<_, _>>()
            .map_err(|error| SendError::Permanent(format!("webhook secret: {error}")))?;
        if secrets.is_empty() {
            return Err(SendError::Permanent("webhook subscription has no signing secret".to_owned()));
        }
        let occurred = chrono::DateTime::from_timestamp_millis(event.occurred_at).unwrap_or_default();
        let body = json!({
            "type": format!("transfer.{}", event.state),
            "timestamp": occurred.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": event,
        })
        .to_string();
        // The status event's id: the same on every retry, so the receiver
        // can drop a repeat.
        let id = delivery.event_id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let signature =
            secrets.iter().map(|secret| secret.sign(&id, timestamp, body.as_bytes())).collect::<Vec<_>>().join(" ");
        let url = self.config.outbound.check_url(&delivery.target).map_err(SendError::Permanent)?;
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header(bridge_webhooks::ID_HEADER, &id)
            .header(bridge_webhooks::TIMESTAMP_HEADER, timestamp.to_string())
            .header(bridge_webhooks::SIGNATURE_HEADER, signature);
        if let Some(traceparent) = &delivery.traceparent {
            request = request.header("traceparent", traceparent);
        }
        let response = request.body(body).send().await.map_err(transport_error)?;
        let status = response.status();
        classify_http(status, &response.text().await.unwrap_or_default())
    }

    async fn slack(&self, delivery: &ClaimedDelivery, event: &TransferStatusChanged) -> Result<(), SendError> {
        let url = self.config.outbound.check_url(&delivery.target).map_err(SendError::Permanent)?;
        let rendered = templates::render(event);
        let response = self
            .http
            .post(url)
            .json(&json!({"text": format!("*{}*: {}", rendered.subject, rendered.text)}))
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        classify_http(status, &response.text().await.unwrap_or_default())
    }

    async fn sms(&self, delivery: &ClaimedDelivery, event: &TransferStatusChanged) -> Result<(), SendError> {
        let Some(provider) = &self.config.sms else {
            return Err(SendError::Permanent("no SMS provider configured".to_owned()));
        };
        if !valid_phone_number(&delivery.target) {
            return Err(SendError::Permanent(format!("{:?} is not an E.164 phone number", delivery.target)));
        }
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            provider.base_url.trim_end_matches('/'),
            provider.account_sid
        );
        let body = templates::render(event).short;
        let response = self
            .provider_http
            .post(url)
            .basic_auth(&provider.account_sid, Some(&provider.auth_token))
            .form(&[("To", delivery.target.as_str()), ("From", provider.from.as_str()), ("Body", body.as_str())])
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        // The provider refuses a message it can never send (bad number,
        // unsubscribed) with a 400; that will not change by retrying.
        if status == reqwest::StatusCode::BAD_REQUEST {
            return Err(SendError::Permanent(format!(
                "SMS provider refused: {}",
                text.chars().take(200).collect::<String>()
            )));
        }
        classify_http(status, &text)
    }

    async fn email(&self, delivery: &ClaimedDelivery, event: &TransferStatusChanged) -> Result<(), SendError> {
        let Some((transport, from)) = &self.smtp else {
            return Err(SendError::Permanent("no SMTP server configured".to_owned()));
        };
        let to: Mailbox = delivery
            .target
            .parse()
            .map_err(|_| SendError::Permanent(format!("{:?} is not an email address", delivery.target)))?;
        let rendered = templates::render(event);
        let message = Message::builder()
            .from(from.clone())
            .to(to)
            .subject(&rendered.subject)
            .message_id(Some(format!("<{}.{}@bridge>", delivery.event_id, delivery.subscription_id)))
            .multipart(
                MultiPart::alternative()
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(rendered.text))
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(rendered.html)),
            )
            .map_err(|error| SendError::Permanent(format!("email not buildable: {error}")))?;
        match transport.send(message).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_permanent() => Err(SendError::Permanent(format!("SMTP refused: {error}"))),
            Err(error) => Err(SendError::Transient(format!("SMTP: {error}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_validated_per_channel() {
        assert!(validate_target("sms", "+447700900123", &OutboundPolicy::default()).is_ok());
        for bad in ["447700900123", "+0123456789", "+12", "+44 7700 900123", "+4477009001234567"] {
            assert!(validate_target("sms", bad, &OutboundPolicy::default()).is_err(), "{bad}");
        }
        assert!(validate_target("email", "ops@example.com", &OutboundPolicy::default()).is_ok());
        assert!(validate_target("email", "not an address", &OutboundPolicy::default()).is_err());
        assert!(validate_target("webhook", "https://example.com/hook", &OutboundPolicy::default()).is_ok());
        assert!(validate_target("webhook", "ftp://example.com", &OutboundPolicy::default()).is_err());
        assert!(validate_target("pigeon", "x", &OutboundPolicy::default()).is_err());
    }
}
