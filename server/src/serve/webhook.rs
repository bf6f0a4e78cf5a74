//! Completion webhooks: when a job ends, its outcome is POSTed as JSON to the service's
//! `--webhook` and, when the operator allows it, to the job's own `extra_data.nova.webhook`.
//!
//! A job's webhook is a request the service makes on a client's behalf, so it is held to an
//! allow-list the operator sets (`--webhook-allow`):
//! - **Off by default.** Without `--webhook-allow`, a job that names a webhook is refused (400)
//!   at submission.
//! - **Targets match the list.** An entry is `HOST[:PORT]`: a name (the URL's host, exactly),
//!   an IP address, or a CIDR block (`10.0.0.0/8`, `[fd00::]/8`); without a port any port
//!   matches. The URL is parsed as browsers parse it, so `2130706433`, `0x7f.0.0.1` and
//!   `127.1` are the address they spell, 127.0.0.1, and must be allowed as that.
//! - **Checked after DNS.** At delivery the host is resolved and every address is checked: a
//!   name the list allows must not resolve to a loopback, unspecified, link-local, IPv6
//!   unique-local or multicast address unless an address entry allows it, and a name matched
//!   only by address entries must resolve inside them. The connection goes to the address that was checked (the
//!   resolution is pinned), never to a second lookup's answer.
//! - **Never the service itself**: its own listening address and port are refused whatever
//!   the list says.
//! - **No redirects** are followed, for any webhook.
//! - **Uniform errors.** A refused target gets one message whatever the reason, and a failed
//!   delivery of a job's webhook is recorded as `not delivered` whatever happened (refused,
//!   no connection, timeout, an error status): the record cannot be used to scan ports. The
//!   operator's log has the details.
//!
//! Delivery is retried on any failure, `webhook_attempts` times, the wait doubling from
//! `webhook_backoff`; each attempt's result is recorded in the job's record (`GET
//! /api/jobs/{id}` shows it). Only `http://` URLs: the build carries no TLS stack (a reverse
//! proxy or a local relay can forward to https).
//!
//! Body: `{"prompt_id", "status": "success"|"error"|"interrupted", "outputs", "error",
//! "started_ms", "finished_ms", "number", "priority"}`.

use super::store::{JobRecord, WebhookDelivery};
use super::App;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The message every refused job webhook gets, whatever the reason.
pub(crate) const REFUSED: &str =
    "extra_data.nova.webhook: this target is not allowed (the operator allows targets with --webhook-allow)";

/// What a failed delivery of a job's webhook records.
const NOT_DELIVERED: &str = "not delivered";

/// One `--webhook-allow` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    /// A host name, matched exactly (lower case).
    Name { name: String, port: Option<u16> },
    /// An address block.
    Net {
        addr: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
}

impl AllowEntry {
    /// Parses `HOST[:PORT]`, `IP[:PORT]`, `[IPv6][:PORT]` or `CIDR[:PORT]`.
    pub fn parse(s: &str) -> Result<AllowEntry, String> {
        let bad =
            || format!("--webhook-allow '{s}': expected HOST[:PORT], IP[:PORT] or CIDR[:PORT]");
        let s = s.trim();
        if s.is_empty() {
            return Err(bad());
        }
        // Split off a port: after "]" for bracketed IPv6, else after the last ':' when the
        // rest has no other ':' (a bare IPv6 address has several).
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
            let (prefix_part, after) = match after.strip_prefix('/') {
                Some(a) => {
                    let (p, rest) = a.split_once(':').map_or((a, ""), |(p, r)| (p, r));
                    (Some(p), if rest.is_empty() { None } else { Some(rest) })
                }
                None => (None, after.strip_prefix(':')),
            };
            let host = match prefix_part {
                Some(p) => format!("{inside}/{p}"),
                None => inside.to_string(),
            };
            (host, prefix_part.map_or(after, |_| after))
        } else if s.matches(':').count() == 1 {
            let (h, p) = s.split_once(':').expect("one ':'");
            (h.to_string(), Some(p))
        } else {
            (s.to_string(), None)
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
            None => None,
        };
        if let Some((a, p)) = host.split_once('/') {
            let addr: IpAddr = a.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = p.parse().ok().filter(|p| *p <= max).ok_or_else(bad)?;
            return Ok(AllowEntry::Net { addr, prefix, port });
        }
        if let Ok(addr) = host.parse::<IpAddr>() {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(AllowEntry::Net { addr, prefix, port });
        }
        let name = host.to_ascii_lowercase();
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(bad());
        }
        Ok(AllowEntry::Name { name, port })
    }

    fn port_ok(port: Option<u16>, p: u16) -> bool {
        port.is_none_or(|x| x == p)
    }

    fn allows_addr(&self, a: IpAddr, p: u16) -> bool {
        match self {
            AllowEntry::Net { addr, prefix, port } => {
                Self::port_ok(*port, p) && in_block(a, *addr, *prefix)
            }
            AllowEntry::Name { .. } => false,
        }
    }

    fn allows_name(&self, n: &str, p: u16) -> bool {
        match self {
            AllowEntry::Name { name, port } => Self::port_ok(*port, p) && name == n,
            AllowEntry::Net { .. } => false,
        }
    }
}

fn in_block(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let to_bits = |ip: IpAddr| -> (u128, u32) {
        match ip {
            IpAddr::V4(v) => (u32::from(v) as u128, 32),
            IpAddr::V6(v) => match v.to_ipv4_mapped() {
                Some(v4) => (u32::from(v4) as u128, 32),
                None => (u128::from(v), 128),
            },
        }
    };
    let ((x, wx), (y, wy)) = (to_bits(a), to_bits(net));
    if wx != wy {
        return false;
    }
    let shift = wx - u32::from(prefix).min(wx);
    if shift >= 128 {
        return true;
    }
    (x >> shift) == (y >> shift)
}

/// Addresses a name on the list must not resolve to unless an address entry allows them.
fn internal(a: IpAddr) -> bool {
    let a = match a {
        IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v)),
        v => v,
    };
    match a {
        IpAddr::V4(v) => {
            v.is_loopback()
                || v.is_unspecified()
                || v.is_link_local()
                || v.is_multicast()
                || v.is_broadcast()
        }
        IpAddr::V6(v) => {
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (v.segments()[0] & 0xffc0) == 0xfe80
                // Unique-local fc00::/7, where clouds put their metadata services.
                || (v.segments()[0] & 0xfe00) == 0xfc00
        }
    }
}

/// Checks that a URL is one this build can deliver to (the operator's own `--webhook`).
pub(crate) fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook '{url}': {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!(
            "webhook '{url}': only http:// URLs are supported (this build has no TLS)"
        ));
    }
    if parsed.host_str().is_none() {
        return Err(format!("webhook '{url}': no host"));
    }
    Ok(parsed)
}

/// Where a job's webhook may go: the operator's list and the service's own address.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub allow: Vec<AllowEntry>,
    /// The service's own listening address (never a target).
    pub own: Option<SocketAddr>,
}

impl Policy {
    /// Whether job webhooks are on at all.
    pub fn enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Whether `a:port` reaches this service: its own address, a loopback or unspecified
    /// address when it listens on one, or any address at its port when it listens on every
    /// address.
    fn is_own(&self, a: IpAddr, port: u16) -> bool {
        let Some(own) = self.own else { return false };
        let local = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
        own.port() == port
            && (a == own.ip() || own.ip().is_unspecified() || (local(a) && local(own.ip())))
    }

    /// Checks a job's webhook URL; resolves its host and returns the address to connect to.
    /// Every refusal is [`REFUSED`].
    pub async fn resolve(&self, url: &str) -> Result<(reqwest::Url, SocketAddr), String> {
        let refused = || REFUSED.to_string();
        if !self.enabled() {
            return Err(refused());
        }
        let parsed = check_url(url).map_err(|_| refused())?;
        let port = parsed.port_or_known_default().ok_or_else(refused)?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(refused());
        }
        let (name, mut addrs): (Option<String>, Vec<IpAddr>) = match parsed.host() {
            Some(url::Host::Ipv4(v)) => (None, vec![IpAddr::V4(v)]),
            Some(url::Host::Ipv6(v)) => (None, vec![IpAddr::V6(v)]),
            Some(url::Host::Domain(d)) => {
                let d = d.to_ascii_lowercase();
                let found = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::lookup_host((d.as_str(), port)),
                )
                .await
                .map_err(|_| refused())?
                .map_err(|_| refused())?;
                let addrs: Vec<IpAddr> = found.map(|s| s.ip()).collect();
                (Some(d), addrs)
            }
            None => return Err(refused()),
        };
        if addrs.is_empty() {
            return Err(refused());
        }
        let named = name
            .as_deref()
            .is_some_and(|n| self.allow.iter().any(|e| e.allows_name(n, port)));
        for a in &mut addrs {
            if let IpAddr::V6(v) = *a {
                if let Some(v4) = v.to_ipv4_mapped() {
                    *a = IpAddr::V4(v4);
                }
            }
        }
        for &a in &addrs {
            if self.is_own(a, port) {
                return Err(refused());
            }
            let by_addr = self.allow.iter().any(|e| e.allows_addr(a, port));
            let ok = by_addr || (named && !internal(a));
            if !ok {
                return Err(refused());
            }
        }
        Ok((parsed, SocketAddr::new(addrs[0], port)))
    }
}

/// The client webhooks are delivered with: no redirects, no proxy.
fn client(pin: Option<(&str, SocketAddr)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if let Some((host, addr)) = pin {
        b = b.resolve(host, addr);
    }
    b.build().unwrap_or_else(|_| reqwest::Client::new())
}

/// Delivers a finished job's webhooks in the background, if it has any.
pub(crate) fn spawn(app: Arc<App>, rec: JobRecord) {
    let job_url = rec
        .extra_data
        .get("nova")
        .and_then(|n| n.get("webhook"))
        .and_then(|u| u.as_str())
        .map(str::to_string);
    if app.config.webhook.is_none() && job_url.is_none() {
        return;
    }
    tokio::spawn(async move {
        let body = json!({
            "prompt_id": rec.id,
            "status": rec.state,
            "outputs": rec.outputs,
            "error": rec.error,
            "started_ms": rec.started_ms,
            "finished_ms": rec.finished_ms,
            "number": rec.number,
            "priority": rec.priority,
        });
        let mut deliveries = vec![];
        if let Some(url) = app.config.webhook.clone() {
            deliveries.push(deliver(&app, &url, &body, client(None), false).await);
        }
        if let Some(url) = job_url {
            let d = match app.webhooks.resolve(&url).await {
                Ok((parsed, addr)) => {
                    let host = parsed.host_str().unwrap_or("").to_string();
                    deliver(&app, &url, &body, client(Some((&host, addr))), true).await
                }
                Err(_) => WebhookDelivery {
                    url: url.clone(),
                    attempts: 0,
                    delivered: false,
                    last_error: Some(NOT_DELIVERED.into()),
                },
            };
            deliveries.push(d);
        }
        // Record the outcome on the latest version of the record.
        if let Ok(Some(mut latest)) = app.store.get(&rec.id) {
            latest.webhooks = deliveries;
            if let Err(e) = app.store.update(latest).await {
                eprintln!("nova serve: recording webhook delivery of {}: {e}", rec.id);
            }
        }
    });
}

async fn deliver(
    app: &App,
    url: &str,
    body: &serde_json::Value,
    http: reqwest::Client,
    uniform: bool,
) -> WebhookDelivery {
    let mut d = WebhookDelivery {
        url: url.to_string(),
        ..WebhookDelivery::default()
    };
    let mut wait = app.config.webhook_backoff;
    for attempt in 1..=app.config.webhook_attempts.max(1) {
        d.attempts = attempt;
        let r = http.post(url).json(body).send().await;
        let error = match r {
            Ok(resp) if resp.status().is_success() => {
                d.delivered = true;
                d.last_error = None;
                app.metrics.webhook("delivered");
                return d;
            }
            Ok(resp) => format!("HTTP {}", resp.status()),
            Err(e) => e.to_string(),
        };
        if uniform {
            eprintln!("nova serve: webhook {url}: attempt {attempt}: {error}");
            d.last_error = Some(NOT_DELIVERED.into());
        } else {
            d.last_error = Some(error);
        }
        app.metrics.webhook("retry");
        if attempt < app.config.webhook_attempts {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    app.metrics.webhook("failed");
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_parse_names_addresses_blocks_and_ports() {
        assert_eq!(
            AllowEntry::parse("hooks.example.com:8080").unwrap(),
            AllowEntry::Name {
                name: "hooks.example.com".into(),
                port: Some(8080)
            }
        );
        assert_eq!(
            AllowEntry::parse("10.0.0.0/8").unwrap(),
            AllowEntry::Net {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8,
                port: None
            }
        );
        assert_eq!(
            AllowEntry::parse("[::1]:9000").unwrap(),
            AllowEntry::Net {
                addr: "::1".parse().unwrap(),
                prefix: 128,
                port: Some(9000)
            }
        );
        assert!(AllowEntry::parse("").is_err());
        assert!(AllowEntry::parse("a b").is_err());
        assert!(AllowEntry::parse("10.0.0.0/33").is_err());
        assert!(AllowEntry::parse("host:99999").is_err());
        assert!(in_block(
            "10.1.2.3".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            8
        ));
        assert!(!in_block(
            "11.1.2.3".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            8
        ));
        assert!(in_block(
            "::ffff:10.1.2.3".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            8
        ));
    }

    #[test]
    fn every_spelling_of_loopback_is_loopback_and_refused_alike() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let policy = Policy {
            allow: vec![AllowEntry::parse("hooks.example.com").unwrap()],
            own: Some("127.0.0.1:8188".parse().unwrap()),
        };
        for url in [
            "http://127.0.0.1:8188/api/queue/pause",
            "http://localhost:8188/",
            "http://2130706433:8188/",
            "http://0x7f.0.0.1:8188/",
            "http://127.1:8188/",
            "http://[::1]:8188/",
            "http://127.0.0.1:9/",
            "https://hooks.example.com/",
            "http://user:pw@hooks.example.com/",
        ] {
            assert_eq!(
                rt.block_on(policy.resolve(url)).unwrap_err(),
                REFUSED,
                "{url}"
            );
        }
        let off = Policy::default();
        assert_eq!(
            rt.block_on(off.resolve("http://hooks.example.com/"))
                .unwrap_err(),
            REFUSED
        );
        // An address entry allows that address, but never the service itself.
        let local = Policy {
            allow: vec![AllowEntry::parse("127.0.0.0/8").unwrap()],
            own: Some("127.0.0.1:8188".parse().unwrap()),
        };
        assert!(rt
            .block_on(local.resolve("http://127.0.0.1:9000/hook"))
            .is_ok());
        assert!(rt.block_on(local.resolve("http://127.1:9000/hook")).is_ok());
        assert!(rt
            .block_on(local.resolve("http://127.0.0.1:8188/api/queue/pause"))
            .is_err());
        assert!(rt
            .block_on(local.resolve("http://127.0.0.2:8188/x"))
            .is_err());
    }
}
