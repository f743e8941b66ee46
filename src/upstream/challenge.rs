//! Parsing of `WWW-Authenticate` headers (RFC 9110 §11.6.1) into challenges.
//!
//! Pure and total: any input yields a (possibly empty) list, never a panic, because the
//! header comes from the network. Scheme and parameter names are lowercased; values keep
//! their case. This module decides nothing about which challenge to answer.

/// One challenge: a scheme (`bearer`, `basic`, ...) and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme, lowercased.
    pub scheme: String,
    /// Parameters in header order, names lowercased. A token68 (`Negotiate abc==`) is
    /// not a parameter and is dropped.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The first value of parameter `name` (give it lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one header value, which may hold several comma-separated challenges.
///
/// Lenient where servers are sloppy: unquoted values may contain `/` or `:` (realm URLs),
/// an unterminated quoted string runs to the end, and garbage is skipped up to the next
/// comma instead of failing the whole header.
pub fn parse(header: &str) -> Vec<Challenge> {
    let mut p = Parser {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        p.skip(|b| is_ws(b) || b == b',');
        if p.eof() {
            break;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            p.skip_garbage();
            continue;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        let had_space = p.skip(is_ws) > 0;
        if had_space {
            p.skip_token68();
        }
        // Parameters, until something that is not `name = value` (the next scheme).
        loop {
            p.skip(|b| is_ws(b) || b == b',');
            let start = p.i;
            let name = p.token();
            if name.is_empty() {
                if p.eof() {
                    break;
                }
                p.skip_garbage();
                continue;
            }
            p.skip(is_ws);
            if p.peek() != Some(b'=') {
                // `name` is the scheme of the next challenge.
                p.i = start;
                break;
            }
            p.i += 1;
            p.skip(is_ws);
            let value = if p.peek() == Some(b'"') {
                p.quoted()
            } else {
                p.bare_value()
            };
            let name = name.to_ascii_lowercase();
            if challenge.param(&name).is_none() {
                challenge.params.push((name, value));
            }
            p.skip(is_ws);
            if !p.eof() && p.peek() != Some(b',') {
                p.skip_garbage();
            }
        }
        out.push(challenge);
    }
    out
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Advances over bytes matching `f`; returns how many.
    fn skip(&mut self, f: impl Fn(u8) -> bool) -> usize {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        self.i - start
    }

    fn text(&self, start: usize, end: usize) -> String {
        String::from_utf8_lossy(&self.s[start..end]).into_owned()
    }

    fn token(&mut self) -> String {
        let start = self.i;
        self.skip(is_tchar);
        self.text(start, self.i)
    }

    /// An unquoted value: everything up to a comma or whitespace.
    fn bare_value(&mut self) -> String {
        let start = self.i;
        self.skip(|b| b != b',' && !is_ws(b));
        self.text(start, self.i)
    }

    /// A quoted string starting at `"`; backslash escapes the next byte.
    fn quoted(&mut self) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.i += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Skips a token68 credential right after the scheme (`Negotiate abc==`), recognised
    /// by being followed by a comma or the end rather than by `= value`.
    fn skip_token68(&mut self) {
        let start = self.i;
        if self.skip(is_token68_char) == 0 {
            return;
        }
        self.skip(|b| b == b'=');
        self.skip(is_ws);
        if !(self.eof() || self.peek() == Some(b',')) {
            self.i = start;
        }
    }

    /// Skips to the next comma that is not inside a quoted string.
    fn skip_garbage(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b',' => return,
                b'"' => {
                    self.quoted();
                }
                _ => self.i += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn docker_hub_bearer() {
        let h = concat!(
            r#"Bearer realm="https://auth.docker.io/token","#,
            r#"service="registry.docker.io",scope="repository:library/alpine:pull""#
        );
        let c = parse(h);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "https://auth.docker.io/token"),
                ("service", "registry.docker.io"),
                ("scope", "repository:library/alpine:pull"),
            ]
        );
    }

    #[test]
    fn case_insensitive_scheme_and_names_keep_value_case() {
        let c = parse(r#"BEARER Realm="https://A/Token", SERVICE=Quay.IO"#);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://A/Token"));
        assert_eq!(c[0].param("service"), Some("Quay.IO"));
    }

    #[test]
    fn quoted_strings_hold_commas_and_escaped_quotes() {
        let c = parse(r#"Bearer realm="a,b \"c\" \\d",scope="repository:x:pull,push""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].param("realm"), Some(r#"a,b "c" \d"#));
        assert_eq!(c[0].param("scope"), Some("repository:x:pull,push"));
    }

    #[test]
    fn unquoted_url_values_and_spaces_around_equals() {
        let c = parse("Bearer realm = https://auth.example/token?x=1 , service=svc");
        assert_eq!(c[0].param("realm"), Some("https://auth.example/token?x=1"));
        assert_eq!(c[0].param("service"), Some("svc"));
    }

    #[test]
    fn several_challenges_in_one_header() {
        // RFC 9110's own example.
        let h = r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#;
        let c = parse(h);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "newauth");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "apps"),
                ("type", "1"),
                ("title", r#"Login to "apps""#)
            ]
        );
        assert_eq!(c[1].scheme, "basic");
        assert_eq!(c[1].param("realm"), Some("simple"));
    }

    #[test]
    fn token68_and_bare_schemes() {
        let c = parse("Negotiate abc==, Basic realm=x, Bearer");
        let schemes: Vec<&str> = c.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["negotiate", "basic", "bearer"]);
        assert!(c[0].params.is_empty());
        assert_eq!(c[1].param("realm"), Some("x"));
        let c = parse("Negotiate abcdef");
        assert_eq!(c.len(), 1);
        assert!(c[0].params.is_empty());
    }

    #[test]
    fn first_duplicate_parameter_wins() {
        let c = parse("Bearer realm=a, realm=b");
        assert_eq!(c[0].param("realm"), Some("a"));
        assert_eq!(c[0].params.len(), 1);
    }

    #[test]
    fn hostile_input_never_panics() {
        for h in [
            "",
            ",,,",
            "\"",
            "Bearer realm=\"unterminated",
            "Bearer =x",
            "Bearer realm=",
            "= = =",
            "Bearer realm=\"a\"garbage, service=s",
            "Bearer \u{e9}=x, realm=y",
            "Basic\trealm=x",
        ] {
            let _ = parse(h);
        }
        let c = parse("Bearer realm=\"unterminated");
        assert_eq!(c[0].param("realm"), Some("unterminated"));
        let c = parse("Bearer realm=\"a\"garbage, service=s");
        assert_eq!(c[0].param("realm"), Some("a"));
        assert_eq!(c[0].param("service"), Some("s"));
        // Grammatically a token68 (base64 padding), not an empty realm.
        assert!(parse("Bearer realm=")[0].params.is_empty());
        assert_eq!(
            parse("Bearer realm=,service=s")[0].param("service"),
            Some("s")
        );
    }
}
