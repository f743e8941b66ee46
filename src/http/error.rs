//! The one mapping from domain errors to OCI error JSON and HTTP status codes.
//!
//! Conversions here never log; the request boundary logs once. Messages never contain
//! credentials: auth errors carry only their kind.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use super::route::RouteError;
use crate::auth::AccessError;
use crate::hosted::HostedError;
use crate::oci::manifest::ManifestError;
use crate::oci::{ErrorCode, NameError};
use crate::pullthrough::CacheError;
use crate::storage::{PutManifestError, StorageError, UploadError};
use crate::upstream::UpstreamError;

/// An error response: status, OCI code, message, and extra headers.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// For our own failures: what went wrong, with its source chain. Logged once at the
    /// request boundary, never sent to the client.
    pub cause: Option<String>,
}

/// An error and its sources, outermost first, without repeating a source whose text the
/// error already showed.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
            cause: None,
        }
    }

    /// Records our own failure behind this answer (see [`ApiError::cause`]).
    pub fn caused_by(mut self, e: &dyn std::error::Error) -> ApiError {
        self.cause = Some(chain(e));
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    /// The JSON body `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> Bytes {
        let mut err = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        if let Some(d) = &self.detail {
            err["detail"] = d.clone();
        }
        Bytes::from(serde_json::json!({ "errors": [err] }).to_string())
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unavailable,
            message,
        )
    }

    pub fn blob_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobUnknown,
            "blob unknown to registry",
        )
    }

    pub fn manifest_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            "manifest unknown",
        )
    }

    pub fn upload_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadUnknown,
            "blob upload unknown to registry",
        )
    }

    pub fn name_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            "repository name not known to registry",
        )
    }

    pub fn denied(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, message)
    }

    pub fn too_large(what: &str, limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::SizeInvalid,
            format!("{what} is larger than the limit of {limit} bytes"),
        )
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> ApiError {
        match e {
            AccessError::Unauthenticated { message, challenge } => {
                let err = ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message);
                match challenge.and_then(|c| HeaderValue::from_str(&c.header_value()).ok()) {
                    Some(v) => err.with_header(http::header::WWW_AUTHENTICATE, v),
                    None => err,
                }
            }
            AccessError::Denied(message) => ApiError::denied(message),
            AccessError::Throttled { retry_after } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                e.to_string(),
            )
            .with_header(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            ),
            AccessError::Internal(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> ApiError {
        match e {
            RouteError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::Unsupported,
                "no such endpoint",
            ),
            RouteError::MethodNotAllowed => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                "method not allowed here",
            ),
            RouteError::Name(NameError::BadTag) => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::ManifestInvalid,
                "invalid tag",
            ),
            RouteError::Name(n) => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                n.to_string(),
            ),
            RouteError::Digest(d) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, d)
            }
            RouteError::NoSuchManifest => ApiError::manifest_unknown(),
            RouteError::BadQuery(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, m)
            }
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        storage_error(&e)
    }
}

fn storage_error(e: &StorageError) -> ApiError {
    if e.is_disk_full() {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::Unavailable,
            "storage is full",
        )
        .caused_by(e)
    } else {
        ApiError::internal(e.to_string()).caused_by(e)
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> ApiError {
        match e {
            CacheError::Upstream(UpstreamError::NotFound) => ApiError::name_unknown(),
            CacheError::Upstream(UpstreamError::Denied) => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                "the upstream refused access to this repository",
            ),
            CacheError::Upstream(UpstreamError::RateLimited { retry_after }) => {
                let e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::TooManyRequests,
                    "the upstream is rate-limiting requests and nothing is cached",
                );
                match retry_after {
                    Some(d) => e.with_header(
                        http::header::RETRY_AFTER,
                        HeaderValue::from(d.as_secs().max(1)),
                    ),
                    None => e,
                }
            }
            CacheError::Upstream(UpstreamError::CircuitOpen {
                message,
                retry_after,
            }) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("the upstream is unavailable and nothing is cached: {message}"),
            )
            .with_header(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            ),
            CacheError::Upstream(UpstreamError::Unavailable(reason)) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("the upstream is unavailable and nothing is cached: {reason}"),
            ),
            CacheError::Upstream(UpstreamError::Invalid(reason)) | CacheError::Invalid(reason) => {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    format!("the upstream sent invalid content: {reason}"),
                )
            }
            CacheError::Storage(s) => storage_error(&s),
            CacheError::Abandoned => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the upstream fetch was abandoned; retry",
            ),
            e @ CacheError::PlatformLeftOut { .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::ManifestUnknown,
                e.to_string(),
            ),
        }
    }
}

impl From<HostedError> for ApiError {
    fn from(e: HostedError) -> ApiError {
        match e {
            HostedError::DigestMismatch { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::DigestInvalid,
                e.to_string(),
            ),
            HostedError::Invalid(m) => m.into(),
            HostedError::Put(p) => p.into(),
            HostedError::Protected(message) => ApiError::denied(message),
            HostedError::Unknown => ApiError::manifest_unknown(),
            HostedError::Storage(s) => s.into(),
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        match e {
            UploadError::Unknown => ApiError::upload_unknown(),
            UploadError::OutOfOrder { offset } => {
                let range = if offset == 0 {
                    "0-0".to_owned()
                } else {
                    format!("0-{}", offset - 1)
                };
                let err = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    ErrorCode::BlobUploadInvalid,
                    format!("chunk must start at offset {offset}"),
                );
                match HeaderValue::from_str(&range) {
                    Ok(v) => err.with_header(http::header::RANGE, v),
                    Err(_) => err,
                }
            }
            UploadError::Busy => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::BlobUploadInvalid,
                "another request is writing to this upload",
            ),
            UploadError::DigestMismatch => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::DigestInvalid,
                "provided digest did not match uploaded content",
            ),
            UploadError::Body(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BlobUploadInvalid,
                format!("request body was not received: {e}"),
            ),
            UploadError::RangeMismatch { .. } => ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BlobUploadInvalid,
                e.to_string(),
            ),
            UploadError::TooMany { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                e.to_string(),
            ),
            UploadError::Storage(s) => s.into(),
        }
    }
}

impl From<PutManifestError> for ApiError {
    fn from(e: PutManifestError) -> ApiError {
        match e {
            PutManifestError::BlobUnknown(d) | PutManifestError::ManifestUnknown(d) => {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::ManifestBlobUnknown,
                    format!("manifest references {d}, which is not in this repository"),
                )
                .with_detail(serde_json::json!({ "digest": d.to_string() }))
            }
            PutManifestError::Immutable(rule) => ApiError::denied(format!(
                "tag is immutable under {rule}; it already points to another manifest"
            )),
            PutManifestError::Storage(s) => s.into(),
        }
    }
}

impl From<ManifestError> for ApiError {
    fn from(e: ManifestError) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::ManifestInvalid,
            e.to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_of_a_storage_failure_keeps_its_source_and_is_never_sent() {
        let io = std::io::Error::other("disk on fire");
        let e = ApiError::from(StorageError::Io(io));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        let cause = e.cause.as_deref().expect("a cause");
        assert!(cause.contains("disk on fire"), "{cause}");
        // The source's text is shown once, not repeated by the chain.
        assert_eq!(cause.matches("disk on fire").count(), 1, "{cause}");
        let body = String::from_utf8_lossy(&e.body()).into_owned();
        assert!(!body.contains("cause"), "{body}");
        let full = ApiError::from(StorageError::Io(std::io::Error::from(
            std::io::ErrorKind::StorageFull,
        )));
        assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE);
        assert!(full.cause.is_some_and(|c| c.contains("storage")));
    }
}
