//! How Bridge authenticates to Kafka and to the schema registry: TLS (with
//! a private CA, mutual TLS, hostname verification) and SASL (PLAIN,
//! SCRAM-SHA-256/512, OAUTHBEARER with OIDC client credentials), as typed
//! settings rather than raw librdkafka keys, so a missing password or an
//! unknown mechanism is refused at start-up with a sentence, not discovered
//! as a connection that never authenticates.

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;

/// The Kafka connection's security. Empty means plaintext, no SASL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`; unset: `ssl` or
    /// `sasl_ssl` when a TLS or SASL setting is given, else plaintext.
    pub protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    /// OAUTHBEARER: the identity provider's token endpoint, where librdkafka
    /// exchanges the client id and secret for a token (client credentials
    /// grant) and refreshes it before it expires.
    pub oauth_token_url: Option<String>,
    pub oauth_client_id: Option<String>,
    pub oauth_client_secret: Option<String>,
    pub oauth_scope: Option<String>,
    /// PEM file of the CA(s) that sign the brokers' certificates; unset:
    /// the system's trust store.
    pub ca_file: Option<String>,
    /// Mutual TLS: the client's PEM certificate and private key.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub key_password: Option<String>,
    /// Check that the broker's certificate names the host connected to.
    /// Turning it off lets anyone with a certificate from the CA pose as a
    /// broker; it exists for brokers addressed by names their certificates
    /// lack, and is logged as a warning.
    pub verify_hostname: bool,
}

impl KafkaSecurity {
    pub fn new() -> Self {
        Self { verify_hostname: true, ..Self::default() }
    }

    fn tls_settings(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// The protocol in force, checked against the other settings.
    pub fn protocol(&self) -> Result<&'static str> {
        let sasl = self.sasl_mechanism.is_some();
        let protocol = match self.protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None if sasl => "sasl_ssl",
            None if self.tls_settings() => "ssl",
            None | Some("plaintext") => "plaintext",
            Some("ssl") => "ssl",
            Some("sasl_plaintext") => "sasl_plaintext",
            Some("sasl_ssl") => "sasl_ssl",
            Some(other) => {
                bail!("Unknown Kafka security protocol {other:?}: expected plaintext, ssl, sasl_plaintext or sasl_ssl")
            }
        };
        let uses_sasl = protocol.starts_with("sasl_");
        if uses_sasl && !sasl {
            bail!("Kafka security protocol {protocol} needs a SASL mechanism (--kafka-sasl-mechanism)");
        }
        if sasl && !uses_sasl {
            bail!("A SASL mechanism is set but the Kafka security protocol {protocol} does not use SASL");
        }
        if self.tls_settings() && !matches!(protocol, "ssl" | "sasl_ssl") {
            bail!("TLS files are set but the Kafka security protocol {protocol} does not use TLS");
        }
        Ok(protocol)
    }

    /// Sets librdkafka's keys for these settings.
    pub fn apply(&self, client: &mut ClientConfig) -> Result<()> {
        let protocol = self.protocol()?;
        client.set("security.protocol", protocol);
        if matches!(protocol, "ssl" | "sasl_ssl") {
            // Without a CA file, the system's trust store: `probe` looks in
            // the places distributions keep it, not only where the OpenSSL
            // linked was configured to look.
            client.set("ssl.ca.location", self.ca_file.as_deref().unwrap_or("probe"));
            match (&self.cert_file, &self.key_file) {
                (Some(cert), Some(key)) => {
                    client.set("ssl.certificate.location", cert).set("ssl.key.location", key);
                    if let Some(password) = &self.key_password {
                        client.set("ssl.key.password", password);
                    }
                }
                (None, None) => {}
                _ => bail!("Mutual TLS needs both the client certificate and its key"),
            }
            if !self.verify_hostname {
                tracing::warn!("Kafka broker hostname verification is off: any certificate the CA signed is accepted");
            }
            client.set("ssl.endpoint.identification.algorithm", if self.verify_hostname { "https" } else { "none" });
        }
        if let Some(mechanism) = &self.sasl_mechanism {
            let mechanism = mechanism.to_ascii_uppercase();
            match mechanism.as_str() {
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
                    let username = self.sasl_username.as_deref().context("SASL needs a username")?;
                    let password = self.sasl_password.as_deref().context("SASL needs a password")?;
                    if mechanism == "PLAIN" && protocol == "sasl_plaintext" {
                        tracing::warn!("SASL PLAIN without TLS sends the Kafka password in the clear");
                    }
                    client.set("sasl.username", username).set("sasl.password", password);
                }
                "OAUTHBEARER" => {
                    let url = self.oauth_token_url.as_deref().context("OAUTHBEARER needs the token endpoint URL")?;
                    let id = self.oauth_client_id.as_deref().context("OAUTHBEARER needs a client id")?;
                    let secret = self.oauth_client_secret.as_deref().context("OAUTHBEARER needs a client secret")?;
                    client
                        .set("sasl.oauthbearer.method", "oidc")
                        .set("sasl.oauthbearer.token.endpoint.url", url)
                        .set("sasl.oauthbearer.client.id", id)
                        .set("sasl.oauthbearer.client.secret", secret);
                    if let Some(scope) = &self.oauth_scope {
                        client.set("sasl.oauthbearer.scope", scope);
                    }
                }
                other => bail!(
                    "Unknown SASL mechanism {other:?}: expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"
                ),
            }
            client.set("sasl.mechanism", &mechanism);
        }
        Ok(())
    }
}

/// How Bridge authenticates to the schema registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// HTTP basic authentication (Confluent Cloud: API key and secret).
    pub username: Option<String>,
    pub password: Option<String>,
    /// A bearer token instead.
    pub token: Option<String>,
    /// PEM file of the CA that signs the registry's certificate.
    pub ca_file: Option<String>,
}

impl RegistryAuth {
    /// An HTTP client that trusts `ca_file` (besides the usual roots).
    pub fn client(&self, timeout_ms: u64) -> Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_millis(timeout_ms));
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).with_context(|| format!("Failed to read the schema registry CA {path}"))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("The schema registry CA {path} is not PEM"))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        builder.build().context("Failed to build the schema registry client")
    }

    /// Adds the credentials to a request.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> Result<reqwest::RequestBuilder> {
        Ok(match (&self.username, &self.password, &self.token) {
            (Some(_), _, Some(_)) => bail!("Give the schema registry a username and password, or a token, not both"),
            (Some(username), password, None) => request.basic_auth(username, password.as_deref()),
            (None, Some(_), _) => bail!("A schema registry password needs its username"),
            (None, None, Some(token)) => request.bearer_auth(token),
            (None, None, None) => request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(security: &KafkaSecurity) -> Result<std::collections::BTreeMap<String, String>> {
        let mut client = ClientConfig::new();
        security.apply(&mut client)?;
        Ok(client.config_map().iter().map(|(key, value)| (key.to_string(), value.to_string())).collect())
    }

    #[test]
    fn protocol_follows_the_settings_given() {
        assert_eq!(KafkaSecurity::new().protocol().unwrap(), "plaintext");
        let tls = KafkaSecurity { ca_file: Some("ca.pem".into()), ..KafkaSecurity::new() };
        assert_eq!(tls.protocol().unwrap(), "ssl");
        let sasl = KafkaSecurity {
            sasl_mechanism: Some("scram-sha-512".into()),
            sasl_username: Some("bridge".into()),
            sasl_password: Some("pw".into()),
            ..KafkaSecurity::new()
        };
        let applied = settings(&sasl).unwrap();
        assert_eq!(applied["security.protocol"], "sasl_ssl");
        assert_eq!(applied["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(applied["ssl.ca.location"], "probe");
        assert_eq!(applied["ssl.endpoint.identification.algorithm"], "https");
    }

    #[test]
    fn contradictions_and_gaps_are_refused() {
        let plain_with_ca = KafkaSecurity {
            protocol: Some("plaintext".into()),
            ca_file: Some("ca.pem".into()),
            ..KafkaSecurity::new()
        };
        assert!(plain_with_ca.protocol().is_err());
        let sasl_without_mechanism = KafkaSecurity { protocol: Some("sasl_ssl".into()), ..KafkaSecurity::new() };
        assert!(sasl_without_mechanism.protocol().is_err());
        let no_password = KafkaSecurity {
            sasl_mechanism: Some("PLAIN".into()),
            sasl_username: Some("bridge".into()),
            ..KafkaSecurity::new()
        };
        assert!(settings(&no_password).is_err());
        let half_mtls = KafkaSecurity { cert_file: Some("client.pem".into()), ..KafkaSecurity::new() };
        assert!(settings(&half_mtls).is_err());
        let unknown = KafkaSecurity { sasl_mechanism: Some("GSSAPI".into()), ..KafkaSecurity::new() };
        assert!(settings(&unknown).is_err());
        let oauth = KafkaSecurity { sasl_mechanism: Some("OAUTHBEARER".into()), ..KafkaSecurity::new() };
        assert!(settings(&oauth).is_err());
    }
}
