//! Where notifications may be sent. A webhook or Slack target is a URL an
//! API caller chose, and the notifier sends signed requests to it from
//! inside the deployment; without a check it would reach whatever the
//! deployment can (the database, the cloud's metadata service, the API's own
//! admin endpoints). So a target's host must be a public address:
//! loopback, private, link-local, shared (CGNAT), multicast, unspecified and
//! reserved addresses are refused, in every spelling the URL parser accepts
//! (decimal and hexadecimal IPv4, IPv4-mapped and NAT64 IPv6). A URL with
//! credentials in it (`user:password@`) is refused too: it is how a host is
//! hidden from a reader, and receivers authenticate us by our signature.
//!
//! Names are checked when they are resolved, at each connection, by the
//! HTTP client's resolver (`SafeResolver`), so a name that resolved to a
//! public address when the target was stored and to an internal one later
//! (DNS rebinding) is refused then; redirects are not followed. Operators
//! who want an internal receiver on purpose list it
//! (`BRIDGE_NOTIFY_ALLOWED_HOSTS`: host names, addresses or CIDR ranges).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;

/// The operator's exceptions to the public-address rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    hosts: Vec<String>,
    networks: Vec<IpNet>,
}

impl OutboundPolicy {
    /// A comma-separated list of host names, addresses and CIDR ranges.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut policy = Self::default();
        for item in list.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            if let Ok(network) = item.parse::<IpNet>() {
                policy.networks.push(network);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                policy.networks.push(IpNet::from(ip));
            } else if item.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                policy.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(format!("{item:?} is not a host name, an address or a CIDR range"));
            }
        }
        Ok(policy)
    }

    fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(host))
    }

    /// Whether a connection to `ip` is allowed.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        forbidden(ip).is_none() || self.networks.iter().any(|network| network.contains(&ip))
    }

    /// Parses a webhook or Slack target and checks what can be checked
    /// without resolving it: http(s), no credentials, and an address host
    /// that is allowed. Names are checked at each connection.
    pub fn check_url(&self, target: &str) -> Result<Url, String> {
        // Errors name the target redacted: they are stored with the
        // delivery and shown to operators, and the URL may be a secret.
        let shown = redacted(target);
        let url = Url::parse(target).map_err(|error| format!("{shown:?} is not a URL: {error}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("{shown:?} is not an http(s) URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "a target URL may not carry credentials (user:password@); receivers verify our signature".to_owned()
            );
        }
        let ip = match url.host() {
            None => return Err(format!("{shown:?} has no host")),
            Some(url::Host::Domain(name)) => {
                // "localhost" and friends resolve to loopback everywhere.
                let name = name.trim_end_matches('.');
                if (name == "localhost" || name.ends_with(".localhost")) && !self.allows_host(name) {
                    return Err(format!("{name} is a loopback name; notifications go to public hosts only"));
                }
                return Ok(url);
            }
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        };
        match forbidden(ip) {
            Some(kind) if !self.allows_ip(ip) => {
                Err(format!("{ip} is a {kind} address; notifications go to public hosts only"))
            }
            _ => Ok(url),
        }
    }
}

/// A target as it may be shown: scheme, host, port and the first path
/// segment; the rest of the path and the query (where webhook services
/// put their tokens, as Slack's incoming webhooks do) replaced by `…`.
pub fn redacted(target: &str) -> String {
    let Ok(url) = Url::parse(target) else { return "…".to_owned() };
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    let mut segments = url.path_segments().into_iter().flatten().filter(|segment| !segment.is_empty());
    match segments.next() {
        Some(first) => {
            shown.push('/');
            shown.push_str(first);
            if segments.next().is_some() || url.query().is_some() {
                shown.push_str("/…");
            }
        }
        None if url.query().is_some() => shown.push_str("/?…"),
        None => shown.push('/'),
    }
    shown
}

/// `text` with every http(s) URL in it redacted as [`redacted`] does: for
/// error texts stored before they were kept free of URLs, and for any
/// other text that may quote a target.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = ["https://", "http://"].iter().filter_map(|scheme| rest.find(scheme)).min() {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '<' | '>' | ','))
            .unwrap_or(tail.len());
        out.push_str(&redacted(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Seals a webhook or Slack target in the credentials store: the reference
/// to keep, and the redacted form to store and show in its place.
pub async fn seal(
    conn: &mut sqlx::PgConnection,
    keyring: &bridge_secrets::Keyring,
    target: &str,
) -> Result<(String, String), bridge_secrets::Error> {
    let value = bridge_secrets::SecretString::from(target.to_owned());
    let reference = bridge_secrets::store_new(conn, keyring, "notification-target", &value).await?;
    Ok((reference, redacted(target)))
}

/// Why `ip` is not a public unicast address, if it is not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => forbidden_v4(ip),
        IpAddr::V6(ip) => {
            let segments = ip.segments();
            // IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and the
            // deprecated IPv4-compatible (::a.b.c.d) forms reach the IPv4
            // address inside.
            let embedded = Ipv4Addr::from(((segments[6] as u32) << 16) | segments[7] as u32);
            if ip.to_ipv4_mapped().is_some() || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return forbidden_v4(embedded);
            }
            if ip.is_unspecified() {
                Some("unspecified")
            } else if ip.is_loopback() {
                Some("loopback")
            } else if segments[..6] == [0; 6] {
                forbidden_v4(embedded).or(Some("reserved"))
            } else if ip.is_multicast() {
                Some("multicast")
            } else if ip.is_unicast_link_local() {
                Some("link-local")
            } else if ip.is_unique_local() {
                Some("private")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// The HTTP client's resolver: a name's addresses that are not allowed are
/// dropped, and a name left with none fails to connect with the reason.
pub struct SafeResolver {
    pub policy: Arc<OutboundPolicy>,
}

impl reqwest::dns::Resolve for SafeResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy.allows_host(host.trim_end_matches('.')) {
                return Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs);
            }
            let allowed: Vec<SocketAddr> =
                addresses.into_iter().filter(|address| policy.allows_ip(address.ip())).collect();
            if allowed.is_empty() {
                return Err(
                    format!("{host} resolves to no address notifications may be sent to (only public hosts)").into()
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_targets_are_refused_in_every_spelling() {
        let policy = OutboundPolicy::default();
        for target in [
            "http://127.0.0.1:5432/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/",
            "http://2130706433:18080/",
            "http://0x7f.1:18080/",
            "https://example.com@127.0.0.1:18080/",
            "https://user:password@hooks.example.com/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::]/",
            "http://localhost:8080/",
            "ftp://example.com/",
        ] {
            assert!(policy.check_url(target).is_err(), "{target} was allowed");
        }
        for target in
            ["https://hooks.slack.com/services/T0/B0/x", "https://93.184.215.14/hook", "http://[2606:4700::1]/"]
        {
            assert!(policy.check_url(target).is_ok(), "{target} was refused");
        }
    }

    #[test]
    fn operators_may_allow_internal_hosts_on_purpose() {
        let policy = OutboundPolicy::parse("127.0.0.1, 10.20.0.0/16, receiver.internal").expect("parses");
        assert!(policy.check_url("http://127.0.0.1:18080/hook").is_ok());
        let refused = policy.check_url("ftp://hooks.example.com/services/T1/B2/secret").unwrap_err();
        assert!(!refused.contains("secret"), "{refused}");
        assert!(policy.check_url("http://10.20.3.4/hook").is_ok());
        assert!(policy.check_url("http://10.21.3.4/hook").is_err());
        assert!(policy.allows_host("receiver.internal"));
        assert!(OutboundPolicy::parse("not a host!").is_err());
    }

    #[test]
    fn targets_are_shown_without_their_secret_parts() {
        assert_eq!(
            redacted("https://hooks.slack.com/services/T0001/B0002/XXXXsecret"),
            "https://hooks.slack.com/services/…"
        );
        assert_eq!(redacted("https://example.com:8443/hook?token=abc"), "https://example.com:8443/hook/…");
        assert_eq!(redacted("https://example.com/?token=abc"), "https://example.com/?…");
        assert_eq!(redacted("https://example.com/hook"), "https://example.com/hook");
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_internal_addresses() {
        use reqwest::dns::Resolve;
        let resolver = SafeResolver { policy: Arc::new(OutboundPolicy::default()) };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        let error = resolver.resolve(name).await.err().expect("localhost resolved");
        assert!(error.to_string().contains("only public hosts"), "{error}");
        let allowing = SafeResolver { policy: Arc::new(OutboundPolicy::parse("localhost").expect("parses")) };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        assert!(allowing.resolve(name).await.is_ok());
    }

    #[test]
    fn urls_in_error_texts_are_redacted() {
        let text = "request failed: error sending request for url (https://hooks.slack.com/services/T1/B2/XXsecretXX): timed out";
        let shown = redact_urls(text);
        assert!(!shown.contains("XXsecretXX"), "{shown}");
        assert!(shown.contains("https://hooks.slack.com/services/…") && shown.ends_with("): timed out"), "{shown}");
        assert_eq!(redact_urls("no url here, ünïcode"), "no url here, ünïcode");
        assert_eq!(redact_urls("http://"), "…");
    }
}
