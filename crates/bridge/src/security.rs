//! The Kafka and schema-registry security settings every subcommand takes.
//! Secret-valued ones accept `credential:<name>` (read from the encrypted
//! store) and are redacted by `bridge config`.

use anyhow::Result;
use clap::{ArgAction, Args};

use bridge_pipeline::security::{KafkaSecurity, RegistryAuth};

use crate::credentials;

#[derive(Args, Clone, Debug)]
pub struct SecurityArgs {
    /// Kafka security protocol: plaintext, ssl, sasl_plaintext or sasl_ssl
    /// (unset: ssl when a TLS file is given, sasl_ssl when a SASL mechanism
    /// is, else plaintext).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", global = true)]
    pub kafka_security_protocol: Option<String>,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER
    /// (OIDC client credentials).
    #[arg(long, env = "KAFKA_SASL_MECHANISM", global = true)]
    pub kafka_sasl_mechanism: Option<String>,
    #[arg(long, env = "KAFKA_SASL_USERNAME", global = true)]
    pub kafka_sasl_username: Option<String>,
    /// The SASL password (`credential:<name>` reads it from the store).
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true, global = true)]
    pub kafka_sasl_password: Option<String>,
    /// OAUTHBEARER: the identity provider's token endpoint.
    #[arg(long, env = "KAFKA_OAUTH_TOKEN_URL", global = true)]
    pub kafka_oauth_token_url: Option<String>,
    #[arg(long, env = "KAFKA_OAUTH_CLIENT_ID", global = true)]
    pub kafka_oauth_client_id: Option<String>,
    /// OAUTHBEARER client secret (`credential:<name>` reads it from the store).
    #[arg(long, env = "KAFKA_OAUTH_CLIENT_SECRET", hide_env_values = true, global = true)]
    pub kafka_oauth_client_secret: Option<String>,
    #[arg(long, env = "KAFKA_OAUTH_SCOPE", global = true)]
    pub kafka_oauth_scope: Option<String>,
    /// PEM file of the CA that signs the brokers' certificates (unset: the
    /// system's trust store).
    #[arg(long, env = "KAFKA_SSL_CA_FILE", global = true)]
    pub kafka_ssl_ca_file: Option<String>,
    /// Mutual TLS: the client certificate (PEM).
    #[arg(long, env = "KAFKA_SSL_CERT_FILE", global = true)]
    pub kafka_ssl_cert_file: Option<String>,
    /// Mutual TLS: the client's private key (PEM).
    #[arg(long, env = "KAFKA_SSL_KEY_FILE", global = true)]
    pub kafka_ssl_key_file: Option<String>,
    /// Password of the private key, if it is encrypted.
    #[arg(long, env = "KAFKA_SSL_KEY_PASSWORD", hide_env_values = true, global = true)]
    pub kafka_ssl_key_password: Option<String>,
    /// Check that a broker's certificate names the host connected to.
    #[arg(long, env = "KAFKA_SSL_VERIFY_HOSTNAME", default_value_t = true, action = ArgAction::Set, global = true)]
    pub kafka_ssl_verify_hostname: bool,
    /// Schema registry basic-auth user (Confluent Cloud: the API key).
    #[arg(long, env = "SCHEMA_REGISTRY_USERNAME", global = true)]
    pub schema_registry_username: Option<String>,
    /// Schema registry basic-auth password (`credential:<name>` reads it
    /// from the store).
    #[arg(long, env = "SCHEMA_REGISTRY_PASSWORD", hide_env_values = true, global = true)]
    pub schema_registry_password: Option<String>,
    /// Schema registry bearer token, instead of a username and password.
    #[arg(long, env = "SCHEMA_REGISTRY_TOKEN", hide_env_values = true, global = true)]
    pub schema_registry_token: Option<String>,
    /// PEM file of the CA that signs the schema registry's certificate.
    #[arg(long, env = "SCHEMA_REGISTRY_CA_FILE", global = true)]
    pub schema_registry_ca_file: Option<String>,
    /// Register Bridge's schemas at start-up. `false` for registries that
    /// applications may only read: processes then look their schemas up
    /// and refuse to start while one is missing, and the deployment runs
    /// `bridge schemas register` first.
    #[arg(long, env = "SCHEMA_REGISTRY_AUTO_REGISTER", default_value_t = true, action = ArgAction::Set, global = true)]
    pub schema_registry_auto_register: bool,
}

impl SecurityArgs {
    fn secrets(&mut self) -> [&mut Option<String>; 5] {
        [
            &mut self.kafka_sasl_password,
            &mut self.kafka_oauth_client_secret,
            &mut self.kafka_ssl_key_password,
            &mut self.schema_registry_password,
            &mut self.schema_registry_token,
        ]
    }

    /// Replaces `credential:<name>` values with the stored secrets. The
    /// database is opened only when one is used.
    pub async fn resolve_credentials(
        &mut self,
        database_url: &str,
        pool_settings: &bridge_store::PoolSettings,
    ) -> Result<()> {
        let uses_store = self
            .secrets()
            .iter()
            .any(|value| value.as_deref().is_some_and(|text| text.starts_with(bridge_secrets::REFERENCE_PREFIX)));
        if !uses_store {
            return Ok(());
        }
        let pool = bridge_store::connect(database_url, pool_settings).await?;
        for value in self.secrets() {
            credentials::resolve_option(&pool, value).await?;
        }
        pool.close().await;
        Ok(())
    }

    pub fn kafka(&self) -> KafkaSecurity {
        KafkaSecurity {
            protocol: self.kafka_security_protocol.clone(),
            sasl_mechanism: self.kafka_sasl_mechanism.clone(),
            sasl_username: self.kafka_sasl_username.clone(),
            sasl_password: self.kafka_sasl_password.clone(),
            oauth_token_url: self.kafka_oauth_token_url.clone(),
            oauth_client_id: self.kafka_oauth_client_id.clone(),
            oauth_client_secret: self.kafka_oauth_client_secret.clone(),
            oauth_scope: self.kafka_oauth_scope.clone(),
            ca_file: self.kafka_ssl_ca_file.clone(),
            cert_file: self.kafka_ssl_cert_file.clone(),
            key_file: self.kafka_ssl_key_file.clone(),
            key_password: self.kafka_ssl_key_password.clone(),
            verify_hostname: self.kafka_ssl_verify_hostname,
        }
    }

    pub fn registry(&self) -> RegistryAuth {
        RegistryAuth {
            username: self.schema_registry_username.clone(),
            password: self.schema_registry_password.clone(),
            token: self.schema_registry_token.clone(),
            ca_file: self.schema_registry_ca_file.clone(),
        }
    }
}
