//! Client configuration that points nodes at this Outpost, generated from the configured
//! upstreams: containerd's `hosts.toml` files (one directory per registry host, Outpost as
//! an `ns`-aware mirror host) and the `registries.conf` entries of podman, CRI-O and
//! skopeo (Outpost as a path-prefix mirror).
//!
//! Pure: text from a [`Config`] and options. Reading the key file and writing files are
//! the CLI's job. An API key put into a `hosts.toml` only ever leaves this module inside a
//! [`GeneratedFile`] marked secret, whose `Debug` does not show its contents.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::auth::Secret;
use crate::config::{Config, UpstreamConfig};

/// Where containerd's CRI plugin is usually told to look (`config_path`).
pub const CONTAINERD_DEFAULT_DIR: &str = "/etc/containerd/certs.d";

/// Docker Hub's registry API host: what containerd itself talks to for `docker.io`.
const DOCKER_HUB_SERVER: &str = "https://registry-1.docker.io";

/// Why client configuration cannot be generated.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error(
        "mirror URL {0:?} must be http:// or https:// and a host with an optional port, \
         without a path, user or query (containerd and registries.conf address a registry \
         at its root)"
    )]
    BadMirrorUrl(String),
    #[error(
        "upstream {upstream:?}: {host:?} is not a registry host (host[:port]), so it \
         cannot name a client configuration entry or directory"
    )]
    BadHost { upstream: String, host: String },
    #[error("the configuration has no [[upstream]]: there is nothing to point clients at")]
    NoUpstreams,
    #[error(
        "the key holds characters an HTTP header cannot carry (only visible ASCII, no \
         spaces); is it the key alone?"
    )]
    BadKey,
    #[error(
        "--ca {0:?} must be an absolute path (containerd takes a relative one from each \
         hosts.toml's own directory)"
    )]
    RelativeCa(PathBuf),
}

/// One file to write: `path` is relative to the directory it is written to.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    pub path: PathBuf,
    pub contents: String,
    /// Holds a credential: write it readable by its owner only, never print it.
    pub secret: bool,
}

impl fmt::Debug for GeneratedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("GeneratedFile");
        d.field("path", &self.path).field("secret", &self.secret);
        if self.secret {
            d.field("contents", &"[REDACTED]");
        } else {
            d.field("contents", &self.contents);
        }
        d.finish()
    }
}

/// Outpost's URL as nodes reach it: `http(s)://host[:port]`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorUrl {
    tls: bool,
    authority: String,
}

impl MirrorUrl {
    /// Validates `url` (a trailing `/` is dropped).
    pub fn parse(url: &str) -> Result<MirrorUrl, ClientConfigError> {
        let bad = || ClientConfigError::BadMirrorUrl(url.to_owned());
        let trimmed = url.strip_suffix('/').unwrap_or(url);
        let (tls, authority) = if let Some(rest) = trimmed.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = trimmed.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad());
        };
        if !valid_host(authority) {
            return Err(bad());
        }
        Ok(MirrorUrl {
            tls,
            authority: authority.to_owned(),
        })
    }

    /// `host[:port]`, as registries.conf locations write it.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Whether the host is `localhost` or a loopback address: only this machine.
    pub fn is_loopback(&self) -> bool {
        let host = match self.authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => host,
            _ => &self.authority,
        };
        host.eq_ignore_ascii_case("localhost") || host.starts_with("127.") || host == "[::1]"
    }

    /// Plain HTTP: clients must be told to allow it, and a key would travel in clear.
    pub fn is_plain_http(&self) -> bool {
        !self.tls
    }
}

impl fmt::Display for MirrorUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// The `Authorization` header a `hosts.toml` carries to Outpost.
#[derive(Debug, Clone, Copy)]
pub enum KeyHeader<'a> {
    None,
    /// `Authorization: Bearer <key>`: the file becomes secret.
    Key(&'a Secret),
    /// The header's place, with `[REDACTED]` for the key: for showing files to a person.
    Redacted,
}

/// What goes into each `hosts.toml` besides the upstream.
#[derive(Debug, Clone)]
pub struct ContainerdOptions<'a> {
    pub mirror: MirrorUrl,
    pub key: KeyHeader<'a>,
    /// CA certificate (on the node) that signed Outpost's TLS certificate.
    pub ca: Option<PathBuf>,
    pub skip_verify: bool,
}

/// Checks that a key can be sent as a header value. The error never contains the key.
pub fn check_key(key: &Secret) -> Result<(), ClientConfigError> {
    let k = key.expose();
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientConfigError::BadKey);
    }
    Ok(())
}

/// `<host>/hosts.toml` for every configured upstream's name and aliases, sorted by path.
///
/// containerd tries the `[host]` (Outpost) first, adding `?ns=<host>` to every request,
/// and falls back to `server`, the registry itself, when Outpost fails.
pub fn containerd_hosts(
    config: &Config,
    opts: &ContainerdOptions<'_>,
) -> Result<Vec<GeneratedFile>, ClientConfigError> {
    if let KeyHeader::Key(key) = opts.key {
        check_key(key)?;
    }
    if let Some(ca) = &opts.ca
        && !ca.is_absolute()
    {
        return Err(ClientConfigError::RelativeCa(ca.clone()));
    }
    let mirror = toml_string(&opts.mirror.to_string());
    let mut files = Vec::new();
    for (upstream, host) in registry_hosts(config)? {
        let mut text = format!(
            "# Written by `outpost client-config containerd`. Pulls of {host} go to Outpost\n\
             # first (as ?ns={host}), then to the registry itself when Outpost fails.\n\
             server = {server}\n\n\
             [host.{mirror}]\n  capabilities = [\"pull\", \"resolve\"]\n",
            server = toml_string(&fallback_server(upstream, host)),
        );
        if let Some(ca) = &opts.ca {
            let _ = writeln!(text, "  ca = {}", toml_string(&ca.to_string_lossy()));
        }
        if opts.skip_verify {
            text.push_str("  skip_verify = true\n");
        }
        let value = match opts.key {
            KeyHeader::None => None,
            KeyHeader::Key(key) => Some(key.expose()),
            KeyHeader::Redacted => Some("[REDACTED]"),
        };
        if let Some(value) = value {
            let _ = write!(
                text,
                "\n[host.{mirror}.header]\n  Authorization = {}\n",
                toml_string(&format!("Bearer {value}"))
            );
        }
        files.push(GeneratedFile {
            path: Path::new(host).join("hosts.toml"),
            contents: text,
            secret: matches!(opts.key, KeyHeader::Key(_)),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// `registries.conf` (v2) entries: for every upstream name and alias, a `[[registry]]`
/// whose mirror is Outpost in the path-prefix form, `<outpost host:port>/<upstream name>`
/// (an alias such as `central.corp:5000` cannot be a path component, so its mirror
/// names the upstream).
pub fn registries_conf(config: &Config, mirror: &MirrorUrl) -> Result<String, ClientConfigError> {
    let mut text = String::from(
        "# Written by `outpost client-config registries-conf` (containers-registries.conf(5),\n\
         # version 2). Pulls of each registry go to Outpost first, then to the registry itself.\n",
    );
    for (upstream, host) in registry_hosts(config)? {
        let _ = write!(
            text,
            "\n[[registry]]\nprefix = {host}\nlocation = {host}\n\n\
             [[registry.mirror]]\nlocation = {location}\n",
            host = toml_string(host),
            location = toml_string(&format!("{}/{}", mirror.authority(), upstream.name)),
        );
        if mirror.is_plain_http() {
            text.push_str("insecure = true\n");
        }
    }
    Ok(text)
}

/// Every registry host clients may write for an upstream (its name, then its aliases),
/// each checked to be a `host[:port]` that is safe as a directory name.
fn registry_hosts(config: &Config) -> Result<Vec<(&UpstreamConfig, &str)>, ClientConfigError> {
    if config.upstreams.is_empty() {
        return Err(ClientConfigError::NoUpstreams);
    }
    let mut hosts = Vec::new();
    for u in &config.upstreams {
        for host in std::iter::once(&u.name).chain(&u.aliases) {
            if !valid_host(host) {
                return Err(ClientConfigError::BadHost {
                    upstream: u.name.clone(),
                    host: host.clone(),
                });
            }
            hosts.push((u, host.as_str()));
        }
    }
    Ok(hosts)
}

/// Whether `host` looks like `host[:port]` (IPv6 in brackets allowed): never empty, no
/// `/`, no leading `.` (so never `.` or `..`), nothing that needs quoting anywhere.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && !host.starts_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b))
}

/// The registry containerd falls back to for `host`: the upstream's own URL when it is
/// that very host (so a plain-http registry stays reachable), Docker Hub's API host for
/// `docker.io`, else `https://<host>` — what containerd would use without a hosts.toml.
fn fallback_server(upstream: &UpstreamConfig, host: &str) -> String {
    let origin = upstream
        .url
        .split_once("://")
        .map(|(scheme, rest)| (scheme, rest.split('/').next().unwrap_or(rest)));
    match origin {
        Some((scheme, authority)) if authority.eq_ignore_ascii_case(host) => {
            format!("{scheme}://{authority}")
        }
        _ if host == "docker.io" => DOCKER_HUB_SERVER.to_owned(),
        _ => format!("https://{host}"),
    }
}

/// `s` as a TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(public_url: &str, upstreams: &str) -> Config {
        Config::from_toml(&format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = {public_url:?}\n\
             [storage]\npath = \"x\"\n{upstreams}"
        ))
        .expect("valid config")
    }

    const UPSTREAMS: &str = "\
[[upstream]]
name = \"docker.io\"
url = \"https://registry-1.docker.io\"
[[upstream]]
name = \"central.corp\"
url = \"https://central.corp:5000\"
aliases = [\"central.corp:5000\"]
";

    fn options(url: &str) -> ContainerdOptions<'static> {
        ContainerdOptions {
            mirror: MirrorUrl::parse(url).expect("mirror url"),
            key: KeyHeader::None,
            ca: None,
            skip_verify: false,
        }
    }

    fn parse(text: &str) -> toml::Table {
        toml::from_str(text).unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}"))
    }

    fn file<'f>(files: &'f [GeneratedFile], path: &str) -> &'f GeneratedFile {
        files
            .iter()
            .find(|f| f.path == Path::new(path))
            .unwrap_or_else(|| panic!("no {path} in {files:?}"))
    }

    #[test]
    fn docker_hub_falls_back_to_its_api_host() {
        let c = config("http://outpost.site:5000", UPSTREAMS);
        let files = containerd_hosts(&c, &options("http://outpost.site:5000/")).expect("files");
        let hub = file(&files, "docker.io/hosts.toml");
        assert!(!hub.secret);
        assert_eq!(
            hub.contents,
            "# Written by `outpost client-config containerd`. Pulls of docker.io go to Outpost\n\
             # first (as ?ns=docker.io), then to the registry itself when Outpost fails.\n\
             server = \"https://registry-1.docker.io\"\n\n\
             [host.\"http://outpost.site:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        let t = parse(&hub.contents);
        let host = &t["host"]["http://outpost.site:5000"];
        assert_eq!(host["capabilities"].as_array().map(Vec::len), Some(2));
        assert!(host.get("header").is_none());
    }

    #[test]
    fn every_alias_gets_its_own_directory() {
        let c = config("https://outpost.site", UPSTREAMS);
        let files = containerd_hosts(&c, &options("https://outpost.site")).expect("files");
        let paths: Vec<_> = files.iter().map(|f| f.path.to_string_lossy()).collect();
        assert_eq!(
            paths,
            [
                "central.corp/hosts.toml",
                "central.corp:5000/hosts.toml",
                "docker.io/hosts.toml"
            ]
        );
        // The alias is the upstream's URL, so the fallback is that URL; the name is not.
        let t = parse(&file(&files, "central.corp:5000/hosts.toml").contents);
        assert_eq!(t["server"].as_str(), Some("https://central.corp:5000"));
        let t = parse(&file(&files, "central.corp/hosts.toml").contents);
        assert_eq!(t["server"].as_str(), Some("https://central.corp"));
        assert!(t["host"].get("https://outpost.site").is_some());
    }

    #[test]
    fn a_plain_http_upstream_stays_the_fallback_of_its_own_host() {
        let c = config(
            "http://o:5000",
            "[[upstream]]\nname = \"reg.lan\"\nurl = \"http://reg.lan:5000/\"\n\
             aliases = [\"reg.lan:5000\"]\n",
        );
        let files = containerd_hosts(&c, &options("http://o:5000")).expect("files");
        let t = parse(&file(&files, "reg.lan:5000/hosts.toml").contents);
        assert_eq!(t["server"].as_str(), Some("http://reg.lan:5000"));
    }

    #[test]
    fn a_key_becomes_a_bearer_header_and_makes_the_file_secret() {
        let c = config("https://outpost.site:5443", UPSTREAMS);
        let key = Secret::new("opk1.abc.def");
        let opts = ContainerdOptions {
            key: KeyHeader::Key(&key),
            ..options("https://outpost.site:5443")
        };
        let files = containerd_hosts(&c, &opts).expect("files");
        for f in &files {
            assert!(f.secret, "{f:?}");
            let t = parse(&f.contents);
            assert_eq!(
                t["host"]["https://outpost.site:5443"]["header"]["Authorization"].as_str(),
                Some("Bearer opk1.abc.def")
            );
            let shown = format!("{f:?}");
            assert!(!shown.contains("opk1"), "{shown}");
        }

        let opts = ContainerdOptions {
            key: KeyHeader::Redacted,
            ..options("https://outpost.site:5443")
        };
        let files = containerd_hosts(&c, &opts).expect("files");
        assert!(files.iter().all(|f| !f.secret));
        assert!(
            files[0]
                .contents
                .contains("Authorization = \"Bearer [REDACTED]\"")
        );
    }

    #[test]
    fn a_key_that_cannot_be_a_header_is_refused_without_showing_it() {
        let c = config("https://o", UPSTREAMS);
        for bad in ["", "opk1.abc def", "opk1.abc\r\nX-Evil: 1", "opk1.ü"] {
            let key = Secret::new(bad);
            let opts = ContainerdOptions {
                key: KeyHeader::Key(&key),
                ..options("https://o")
            };
            let e = containerd_hosts(&c, &opts).expect_err(bad);
            assert!(matches!(e, ClientConfigError::BadKey), "{bad:?}: {e}");
            if !bad.is_empty() {
                assert!(!e.to_string().contains(bad));
            }
        }
    }

    #[test]
    fn ca_and_skip_verify_are_written_and_strings_are_escaped() {
        let c = config("https://o", UPSTREAMS);
        let ca = PathBuf::from("/etc/out\"post\\ca\tdir/ca.pem");
        let opts = ContainerdOptions {
            ca: Some(ca.clone()),
            skip_verify: true,
            ..options("https://o")
        };
        let files = containerd_hosts(&c, &opts).expect("files");
        let f = file(&files, "docker.io/hosts.toml");
        assert!(
            f.contents
                .contains(r#"ca = "/etc/out\"post\\ca\tdir/ca.pem""#),
            "{}",
            f.contents
        );
        let host = &parse(&f.contents)["host"]["https://o"];
        assert_eq!(host["ca"].as_str(), ca.to_str());
        assert_eq!(host["skip_verify"].as_bool(), Some(true));

        let relative = ContainerdOptions {
            ca: Some(PathBuf::from("ca.pem")),
            ..options("https://o")
        };
        assert!(matches!(
            containerd_hosts(&c, &relative),
            Err(ClientConfigError::RelativeCa(_))
        ));
    }

    #[test]
    fn toml_strings_escape_what_toml_requires() {
        for s in [
            "plain",
            "a\"b",
            "back\\slash",
            "tab\there",
            "nl\nx",
            "bell\u{7}",
            "ü",
        ] {
            let t = parse(&format!("v = {}", toml_string(s)));
            assert_eq!(t["v"].as_str(), Some(s));
        }
        assert_eq!(toml_string("a\"b\\c\u{1}"), r#""a\"b\\c\u0001""#);
    }

    #[test]
    fn registries_conf_uses_the_path_prefix_form() {
        let c = config("http://outpost.site:5000", UPSTREAMS);
        let mirror = MirrorUrl::parse(&c.server.public_url).expect("url");
        let text = registries_conf(&c, &mirror).expect("text");
        assert!(
            text.contains(
                "\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
                 [[registry.mirror]]\nlocation = \"outpost.site:5000/docker.io\"\ninsecure = true\n"
            ),
            "{text}"
        );
        let t = parse(&text);
        let registries = t["registry"].as_array().expect("registries");
        let entries: Vec<(&str, &str)> = registries
            .iter()
            .map(|r| {
                let m = &r["mirror"][0];
                assert_eq!(r["prefix"].as_str(), r["location"].as_str());
                assert_eq!(m["insecure"].as_bool(), Some(true));
                (
                    r["prefix"].as_str().unwrap_or_default(),
                    m["location"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("docker.io", "outpost.site:5000/docker.io"),
                ("central.corp", "outpost.site:5000/central.corp"),
                // An alias with a port cannot be a path component: its mirror is the name.
                ("central.corp:5000", "outpost.site:5000/central.corp"),
            ]
        );
    }

    #[test]
    fn registries_conf_over_https_is_not_insecure() {
        let c = config("https://outpost.site", UPSTREAMS);
        let mirror = MirrorUrl::parse("https://outpost.site").expect("url");
        let text = registries_conf(&c, &mirror).expect("text");
        assert!(!text.contains("insecure"), "{text}");
        assert!(
            text.contains("location = \"outpost.site/docker.io\""),
            "{text}"
        );
    }

    #[test]
    fn mirror_urls_are_scheme_and_authority_only() {
        let ok = MirrorUrl::parse("https://outpost.site:5443/").expect("valid");
        assert_eq!(ok.to_string(), "https://outpost.site:5443");
        assert_eq!(ok.authority(), "outpost.site:5443");
        assert!(!ok.is_plain_http());
        assert!(!ok.is_loopback());
        for local in [
            "http://localhost:5000",
            "http://127.0.0.1",
            "http://[::1]:5000",
        ] {
            assert!(
                MirrorUrl::parse(local).is_ok_and(|m| m.is_loopback()),
                "{local}"
            );
        }
        assert!(MirrorUrl::parse("http://[::1]").is_ok_and(|m| m.is_loopback()));
        assert!(MirrorUrl::parse("http://[::1]:5000").is_ok());
        for bad in [
            "outpost:5000",
            "ftp://outpost",
            "http://",
            "http://outpost/prefix",
            "http://user@outpost",
            "http://outpost?x=1",
            "http://out post",
            "http://\"x\"",
        ] {
            assert!(MirrorUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_that_could_escape_the_directory_are_refused() {
        let c = config(
            "http://o",
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://x\"\naliases = [\"../etc\"]\n",
        );
        let e = containerd_hosts(&c, &options("http://o")).expect_err("bad alias");
        assert!(e.to_string().contains("../etc"), "{e}");
        let empty = config("http://o", "");
        assert!(matches!(
            registries_conf(&empty, &MirrorUrl::parse("http://o").expect("url")),
            Err(ClientConfigError::NoUpstreams)
        ));
    }
}
