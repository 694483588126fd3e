//! Where a delivery may go. A request's `callback_url` is chosen by whoever calls the API, so
//! without a check it could make the workers POST into the network they run in (SSRF): the
//! cloud's metadata service, Redis, the node's RPC. So a target must be HTTPS, and its host
//! must resolve only to public addresses: not loopback, private, carrier-grade NAT,
//! link-local (the metadata service, 169.254.169.254), unique-local (fd00:ec2::254),
//! multicast, reserved or unspecified. `webhooks.allow_hosts` lifts both rules for the hosts it
//! names: receivers inside the network, and the tests' loopback receiver.
//!
//! The check runs when the API accepts a callback (a clear `VALIDATION_ERROR`) and again at
//! every connection: the delivery client resolves names through [`Guard`], so a name that
//! resolved to a public address at the POST and to a private one later (DNS rebinding) is
//! refused, and redirects are never followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use alloy::transports::http::reqwest;

/// Longest accepted callback URL.
pub const MAX_URL_LEN: usize = 2048;

/// Whether a delivery may not connect to `ip` (unless its host is allow-listed).
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return forbidden_v4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
            }
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, fd00:ec2::254 among them
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
                || s[0] == 0x2001 && s[1] == 0x0db8 // documentation
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240 // reserved
}

/// The allow-list and the resolver that enforces the rules at connection time.
#[derive(Clone)]
pub struct Guard {
    allow: Arc<Vec<String>>,
}

impl Guard {
    pub fn new(allow_hosts: &[String]) -> Guard {
        Guard {
            allow: Arc::new(
                allow_hosts
                    .iter()
                    .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                    .collect(),
            ),
        }
    }

    pub fn allowed(&self, host: &str) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        self.allow.contains(&host)
    }

    /// Checks a target URL without resolving it: the scheme, and an IP-literal host (which the
    /// HTTP client connects to without asking the resolver).
    pub fn check_static(&self, raw: &str) -> Result<url::Url, String> {
        if raw.len() > MAX_URL_LEN {
            return Err(format!("longer than {MAX_URL_LEN} characters"));
        }
        let u = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        let host = u.host_str().ok_or("has no host")?.to_owned();
        let allowed = self.allowed(&host);
        match u.scheme() {
            "https" => {}
            "http" if allowed => {}
            _ => return Err("must be an https URL".into()),
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("must not carry credentials".into());
        }
        if !allowed {
            if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
                if forbidden(ip) {
                    return Err(format!(
                        "{ip} is a loopback, private, link-local or reserved address"
                    ));
                }
            }
        }
        Ok(u)
    }

    /// Checks a target URL as the API accepts a callback: [`check_static`](Self::check_static),
    /// then every address its host resolves to.
    pub async fn check(&self, raw: &str) -> Result<url::Url, String> {
        let u = self.check_static(raw)?;
        let host = u.host_str().unwrap_or_default().to_owned();
        if self.allowed(&host) || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
            return Ok(u);
        }
        let port = u.port_or_known_default().unwrap_or(443);
        self.resolve_checked(&host, port).await?;
        Ok(u)
    }

    /// Resolves `host`, refusing it when any address is forbidden (a name with one private
    /// address among public ones is not trusted either).
    async fn resolve_checked(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host, port)),
        )
        .await
        .map_err(|_| format!("{host} did not resolve within 5 s"))?
        .map_err(|e| format!("{host} does not resolve: {e}"))?
        .collect();
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        if !self.allowed(host) {
            if let Some(bad) = addrs.iter().find(|a| forbidden(a.ip())) {
                return Err(format!(
                    "{host} resolves to {}, a loopback, private, link-local or reserved address",
                    bad.ip()
                ));
            }
        }
        Ok(addrs)
    }
}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = guard
                .resolve_checked(&host, 0)
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_forbidden_and_public_ones_are_not() {
        for bad in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(forbidden(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "93.184.216.34",
        ] {
            assert!(!forbidden(good.parse().unwrap()), "{good}");
        }
    }

    #[tokio::test]
    async fn callbacks_must_be_https_and_public_unless_allowed() {
        let g = Guard::new(&[]);
        for (url, why) in [
            ("http://example.com/h", "https"),
            ("https://127.0.0.1/h", "127.0.0.1"),
            (
                "https://169.254.169.254/latest/meta-data",
                "169.254.169.254",
            ),
            ("https://10.0.0.1/h", "10.0.0.1"),
            ("https://[::1]:8443/h", "::1"),
            ("https://localhost/h", "localhost resolves to"),
            ("https://u:p@example.com/h", "credentials"),
            ("ftp://example.com/h", "https"),
        ] {
            let e = g.check(url).await.unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
        let g = Guard::new(&["127.0.0.1".into(), "localhost".into()]);
        assert!(g.check("http://127.0.0.1:9/h").await.is_ok());
        assert!(g.check("https://localhost:9/h").await.is_ok());
    }
}
