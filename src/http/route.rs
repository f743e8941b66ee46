//! The router: `(method, path, query)` → a typed [`Route`], as a pure function.
//!
//! Every name, tag and digest in a URL is validated here, once; handlers receive only
//! validated newtypes. Repository names may contain `/`, so the operation is recognised
//! from the end of the path.

use http::Method;

use crate::auth::Action;
use crate::oci::{Digest, NameError, Reference, RepoName};

/// Query parameters for paginated lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub n: Option<usize>,
    pub last: Option<String>,
}

/// A recognised request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`
    Base,
    /// `GET /v2/_catalog`
    Catalog(Page),
    GetManifest {
        repo: RepoName,
        reference: Reference,
        head: bool,
    },
    PutManifest {
        repo: RepoName,
        reference: Reference,
    },
    DeleteManifest {
        repo: RepoName,
        reference: Reference,
    },
    GetBlob {
        repo: RepoName,
        digest: Digest,
        head: bool,
    },
    DeleteBlob {
        repo: RepoName,
        digest: Digest,
    },
    /// `POST /v2/<name>/blobs/uploads/` with optional `digest`, or `mount` + `from`.
    StartUpload {
        repo: RepoName,
        digest: Option<Digest>,
        mount: Option<(Digest, Option<RepoName>)>,
    },
    UploadStatus {
        repo: RepoName,
        id: String,
    },
    PatchUpload {
        repo: RepoName,
        id: String,
    },
    FinishUpload {
        repo: RepoName,
        id: String,
        digest: Digest,
    },
    CancelUpload {
        repo: RepoName,
        id: String,
    },
    Tags {
        repo: RepoName,
        page: Page,
    },
    Referrers {
        repo: RepoName,
        digest: Digest,
        artifact_type: Option<String>,
    },
    /// `GET /token` (the registry token flow). The `service` parameter is not checked:
    /// a token from this endpoint only ever works here.
    Token {
        scopes: Vec<String>,
    },
    Health,
    Ready,
    /// `GET /metrics` (Prometheus text).
    Metrics,
}

/// Why a request could not be routed; each maps to one OCI error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    MethodNotAllowed,
    Name(NameError),
    /// A digest in the path or query is invalid.
    Digest(String),
    /// A query parameter is malformed.
    BadQuery(&'static str),
    /// A GET or HEAD of a manifest by a reference that cannot be a tag: no such manifest
    /// can exist (registries answer 404 here; a PUT with it is invalid, 400).
    NoSuchManifest,
}

impl From<NameError> for RouteError {
    fn from(e: NameError) -> RouteError {
        match e {
            NameError::BadDigest(d) => RouteError::Digest(d.to_string()),
            other => RouteError::Name(other),
        }
    }
}

impl Route {
    /// The repository and action the caller must be allowed, if the route concerns one.
    /// Catalog and token are filtered by the handler instead.
    pub fn scope(&self) -> Option<(&RepoName, Action)> {
        use Route::*;
        match self {
            // An upload's status is a read (clients ask with a pull token, as they do for
            // every GET); the session answers only to the principal that opened it.
            GetManifest { repo, .. }
            | GetBlob { repo, .. }
            | Tags { repo, .. }
            | Referrers { repo, .. }
            | UploadStatus { repo, .. } => Some((repo, Action::Pull)),
            PutManifest { repo, .. }
            | StartUpload { repo, .. }
            | PatchUpload { repo, .. }
            | FinishUpload { repo, .. }
            | CancelUpload { repo, .. } => Some((repo, Action::Push)),
            DeleteManifest { repo, .. } | DeleteBlob { repo, .. } => Some((repo, Action::Delete)),
            Base | Catalog(_) | Token { .. } | Health | Ready | Metrics => None,
        }
    }

    /// The repository named in the URL, for namespace resolution to rewrite.
    pub fn repo_mut(&mut self) -> Option<&mut RepoName> {
        use Route::*;
        match self {
            GetManifest { repo, .. }
            | PutManifest { repo, .. }
            | DeleteManifest { repo, .. }
            | GetBlob { repo, .. }
            | DeleteBlob { repo, .. }
            | StartUpload { repo, .. }
            | UploadStatus { repo, .. }
            | PatchUpload { repo, .. }
            | FinishUpload { repo, .. }
            | CancelUpload { repo, .. }
            | Tags { repo, .. }
            | Referrers { repo, .. } => Some(repo),
            Base | Catalog(_) | Token { .. } | Health | Ready | Metrics => None,
        }
    }

    /// A short, stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        use Route::*;
        match self {
            Base => "base",
            Catalog(_) => "catalog",
            GetManifest { head: true, .. } => "head_manifest",
            GetManifest { .. } => "get_manifest",
            PutManifest { .. } => "put_manifest",
            DeleteManifest { .. } => "delete_manifest",
            GetBlob { head: true, .. } => "head_blob",
            GetBlob { .. } => "get_blob",
            DeleteBlob { .. } => "delete_blob",
            StartUpload { .. } => "start_upload",
            UploadStatus { .. } => "upload_status",
            PatchUpload { .. } => "patch_upload",
            FinishUpload { .. } => "finish_upload",
            CancelUpload { .. } => "cancel_upload",
            Tags { .. } => "tags",
            Referrers { .. } => "referrers",
            Token { .. } => "token",
            Health => "healthz",
            Ready => "readyz",
            Metrics => "metrics",
        }
    }
}

/// Decodes `%XX` escapes and `+` in a query value.
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parsed query string: repeated keys keep every value in order.
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(query: Option<&str>) -> Result<Query, RouteError> {
        let mut pairs = Vec::new();
        for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = unescape(k).ok_or(RouteError::BadQuery(
                "query is not valid percent-encoded UTF-8",
            ))?;
            let v = unescape(v).ok_or(RouteError::BadQuery(
                "query is not valid percent-encoded UTF-8",
            ))?;
            pairs.push((k, v));
        }
        Ok(Query(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn page(&self) -> Result<Page, RouteError> {
        let n = match self.get("n") {
            None | Some("") => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| RouteError::BadQuery("n must be a non-negative integer"))?,
            ),
        };
        Ok(Page {
            n,
            last: self
                .get("last")
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        })
    }

    fn digest(&self, key: &str) -> Result<Option<Digest>, RouteError> {
        self.get(key)
            .map(|d| {
                d.parse()
                    .map_err(|e: crate::oci::DigestError| RouteError::Digest(e.to_string()))
            })
            .transpose()
    }
}

fn repo(segments: &[&str]) -> Result<RepoName, RouteError> {
    Ok(segments.join("/").parse()?)
}

/// Routes a request. `path` is the raw URL path; `query` the raw query string.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    let q = Query::parse(query)?;
    let get_or_head = method == Method::GET || method == Method::HEAD;
    let head = method == Method::HEAD;
    match path {
        "/healthz" => {
            return if get_or_head {
                Ok(Route::Health)
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        "/readyz" => {
            return if get_or_head {
                Ok(Route::Ready)
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        "/metrics" => {
            return if get_or_head {
                Ok(Route::Metrics)
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        "/token" => {
            return if get_or_head {
                Ok(Route::Token {
                    scopes: q
                        .all("scope")
                        .flat_map(|s| s.split(' '))
                        .map(str::to_owned)
                        .collect(),
                })
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        "/v2" | "/v2/" => {
            return if get_or_head {
                Ok(Route::Base)
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        "/v2/_catalog" => {
            return if get_or_head {
                Ok(Route::Catalog(q.page()?))
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        _ => {}
    }
    let rest = path.strip_prefix("/v2/").ok_or(RouteError::NotFound)?;
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    // Longest suffixes first: `blobs/uploads/<id>` before `blobs/<digest>`.
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        let repo = repo(&segs[..n - 3])?;
        let id = segs[n - 1];
        if id.is_empty() {
            if method != Method::POST {
                return Err(RouteError::MethodNotAllowed);
            }
            let mount = match q.digest("mount")? {
                Some(d) => {
                    let from = q.get("from").map(|f| f.parse::<RepoName>()).transpose()?;
                    Some((d, from))
                }
                None => None,
            };
            return Ok(Route::StartUpload {
                repo,
                digest: q.digest("digest")?,
                mount,
            });
        }
        let id = id.to_owned();
        return match *method {
            Method::GET | Method::HEAD => Ok(Route::UploadStatus { repo, id }),
            Method::PATCH => Ok(Route::PatchUpload { repo, id }),
            Method::PUT => {
                let digest = q.digest("digest")?.ok_or(RouteError::Digest(
                    "digest query parameter is required".into(),
                ))?;
                Ok(Route::FinishUpload { repo, id, digest })
            }
            Method::DELETE => Ok(Route::CancelUpload { repo, id }),
            _ => Err(RouteError::MethodNotAllowed),
        };
    }
    if n >= 3 && segs[n - 2] == "manifests" {
        let repo = repo(&segs[..n - 2])?;
        let reference: Reference = match segs[n - 1].parse() {
            Err(NameError::BadTag) if matches!(*method, Method::GET | Method::HEAD) => {
                return Err(RouteError::NoSuchManifest);
            }
            other => other?,
        };
        return match *method {
            Method::GET | Method::HEAD => Ok(Route::GetManifest {
                repo,
                reference,
                head,
            }),
            Method::PUT => Ok(Route::PutManifest { repo, reference }),
            Method::DELETE => Ok(Route::DeleteManifest { repo, reference }),
            _ => Err(RouteError::MethodNotAllowed),
        };
    }
    if n >= 3 && segs[n - 2] == "blobs" {
        let repo = repo(&segs[..n - 2])?;
        let digest: Digest = segs[n - 1]
            .parse()
            .map_err(|e: crate::oci::DigestError| RouteError::Digest(e.to_string()))?;
        return match *method {
            Method::GET | Method::HEAD => Ok(Route::GetBlob { repo, digest, head }),
            Method::DELETE => Ok(Route::DeleteBlob { repo, digest }),
            _ => Err(RouteError::MethodNotAllowed),
        };
    }
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        if !get_or_head {
            return Err(RouteError::MethodNotAllowed);
        }
        return Ok(Route::Tags {
            repo: repo(&segs[..n - 2])?,
            page: q.page()?,
        });
    }
    if n >= 3 && segs[n - 2] == "referrers" {
        if !get_or_head {
            return Err(RouteError::MethodNotAllowed);
        }
        let digest: Digest = segs[n - 1]
            .parse()
            .map_err(|e: crate::oci::DigestError| RouteError::Digest(e.to_string()))?;
        return Ok(Route::Referrers {
            repo: repo(&segs[..n - 2])?,
            digest,
            artifact_type: q
                .get("artifactType")
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
        });
    }
    Err(RouteError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    fn r(method: Method, path: &str, query: Option<&str>) -> Result<Route, RouteError> {
        route(&method, path, query)
    }

    #[test]
    fn routes_manifests_by_tag_and_digest() {
        let got = r(
            Method::HEAD,
            "/v2/library/alpine/manifests/latest",
            Some("ns=docker.io"),
        );
        assert!(matches!(got, Ok(Route::GetManifest { head: true, .. })));
        let got = r(Method::PUT, &format!("/v2/a/manifests/{}", d()), None);
        assert!(matches!(
            got,
            Ok(Route::PutManifest {
                reference: Reference::Digest(_),
                ..
            })
        ));
    }

    #[test]
    fn repository_names_may_contain_keywords() {
        let got = r(Method::GET, "/v2/manifests/blobs/tags/manifests/v1", None).expect("routes");
        let Route::GetManifest { repo, .. } = got else {
            panic!("wrong route {got:?}")
        };
        assert_eq!(repo.as_str(), "manifests/blobs/tags");
    }

    #[test]
    fn uploads() {
        let got = r(
            Method::POST,
            "/v2/a/b/blobs/uploads/",
            Some(&format!("mount={}&from=c/d", d())),
        );
        let Ok(Route::StartUpload {
            mount: Some((_, Some(from))),
            ..
        }) = got
        else {
            panic!("{got:?}")
        };
        assert_eq!(from.as_str(), "c/d");
        assert!(matches!(
            r(Method::PATCH, "/v2/a/blobs/uploads/abc", None),
            Ok(Route::PatchUpload { .. })
        ));
        assert!(matches!(
            r(Method::PUT, "/v2/a/blobs/uploads/abc", None),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            r(
                Method::PUT,
                "/v2/a/blobs/uploads/abc",
                Some(&format!("digest={}", d().replace(':', "%3A")))
            ),
            Ok(Route::FinishUpload { .. })
        ));
        assert_eq!(
            r(Method::GET, "/v2/a/blobs/uploads/", None),
            Err(RouteError::MethodNotAllowed)
        );
    }

    #[test]
    fn refuses_hostile_input() {
        assert!(matches!(
            r(Method::GET, "/v2/../etc/manifests/x", None),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            r(Method::GET, "/v2/A/manifests/x", None),
            Err(RouteError::Name(_))
        ));
        assert!(matches!(
            r(Method::GET, "/v2/a/blobs/sha256:xyz", None),
            Err(RouteError::Digest(_))
        ));
        assert!(matches!(
            r(Method::GET, "/v2/a/blobs/md5:abc", None),
            Err(RouteError::Digest(_))
        ));
        // Regression (conformance): a GET of a reference that cannot be a tag is an
        // unknown manifest (404), not an invalid one; a PUT of it stays invalid (400).
        assert_eq!(
            r(Method::GET, "/v2/a/manifests/-bad", None),
            Err(RouteError::NoSuchManifest)
        );
        assert_eq!(
            r(Method::HEAD, "/v2/a/manifests/-bad", None),
            Err(RouteError::NoSuchManifest)
        );
        assert!(matches!(
            r(Method::PUT, "/v2/a/manifests/-bad", None),
            Err(RouteError::Name(NameError::BadTag))
        ));
        assert_eq!(
            r(Method::GET, "/etc/passwd", None),
            Err(RouteError::NotFound)
        );
        assert!(matches!(
            r(Method::GET, "/v2/_catalog", Some("n=-1")),
            Err(RouteError::BadQuery(_))
        ));
        assert!(matches!(
            r(Method::GET, "/v2/a/tags/list", Some("n=%zz")),
            Err(RouteError::BadQuery(_))
        ));
        let long = format!("/v2/{}/manifests/x", "a".repeat(300));
        assert!(matches!(
            r(Method::GET, &long, None),
            Err(RouteError::Name(NameError::TooLong))
        ));
    }

    #[test]
    fn lists_and_token() {
        let got = r(Method::GET, "/v2/a/tags/list", Some("n=2&last=b")).expect("routes");
        assert_eq!(
            got,
            Route::Tags {
                repo: "a".parse().expect("valid"),
                page: Page {
                    n: Some(2),
                    last: Some("b".into())
                }
            }
        );
        let got = r(
            Method::GET,
            "/token",
            Some("service=outpost&scope=repository:a:pull&scope=repository:b:push"),
        )
        .expect("routes");
        let Route::Token { scopes } = got else {
            panic!()
        };
        assert_eq!(scopes, vec!["repository:a:pull", "repository:b:push"]);
        let got = r(
            Method::GET,
            &format!("/v2/a/referrers/{}", d()),
            Some("artifactType=application%2Fx"),
        )
        .expect("routes");
        let Route::Referrers { artifact_type, .. } = got else {
            panic!()
        };
        assert_eq!(artifact_type.as_deref(), Some("application/x"));
    }

    #[test]
    fn scopes_follow_methods() {
        let status = r(Method::GET, "/v2/a/blobs/uploads/abc", None).expect("routes");
        assert_eq!(status.scope().map(|s| s.1), Some(Action::Pull));
        let patch = r(Method::PATCH, "/v2/a/blobs/uploads/abc", None).expect("routes");
        assert_eq!(patch.scope().map(|s| s.1), Some(Action::Push));
        let del = r(Method::DELETE, "/v2/a/manifests/v1", None).expect("routes");
        assert_eq!(del.scope().map(|s| s.1), Some(Action::Delete));
    }
}
