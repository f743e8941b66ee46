//! Manifest and index parsing: enough structure to validate a pushed body, find the blobs
//! and child manifests it references, its `subject`, and its platform entries.
//!
//! Bodies are never re-serialized: the registry stores and serves the exact bytes it was
//! given, so digests stay stable. Unknown fields are ignored, as the spec requires.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The media type of the referrers response and of the empty index.
pub const OCI_EMPTY_JSON: &str = "application/vnd.oci.empty.v1+json";

/// Whether a manifest lists other manifests (index) or layers (image or artifact).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Image,
    Index,
}

/// Media types this registry accepts as manifests.
pub fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        _ => None,
    }
}

/// Why a manifest body was refused; all map to `MANIFEST_INVALID`.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported manifest media type {0:?}")]
    MediaType(String),
    #[error("Content-Type {header:?} does not match the manifest's mediaType {body:?}")]
    MediaTypeMismatch { header: String, body: String },
    #[error("schemaVersion must be 2")]
    SchemaVersion,
    #[error("descriptor has an invalid digest {0:?}")]
    Digest(String),
    #[error("an image manifest needs a config descriptor")]
    MissingConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
    subject: Option<RawDescriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    urls: Vec<String>,
    artifact_type: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
    platform: Option<Platform>,
}

/// A platform as it appears in an index entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A validated content descriptor.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Foreign layers carry URLs and need not be present in the registry.
    pub external: bool,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub platform: Option<Platform>,
}

impl TryFrom<RawDescriptor> for Descriptor {
    type Error = ManifestError;

    fn try_from(raw: RawDescriptor) -> Result<Descriptor, ManifestError> {
        let digest = raw
            .digest
            .parse()
            .map_err(|_| ManifestError::Digest(raw.digest.chars().take(80).collect()))?;
        Ok(Descriptor {
            media_type: raw.media_type,
            digest,
            size: raw.size,
            external: !raw.urls.is_empty(),
            artifact_type: raw.artifact_type,
            annotations: raw.annotations,
            platform: raw.platform,
        })
    }
}

/// A parsed manifest or index.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The media type it is stored and served with.
    pub media_type: String,
    pub kind: Kind,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    /// `artifactType`, or for an image manifest without one, the config's media type
    /// (the referrers API reports it so).
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// Parses `body`, taking the media type from `content_type` (the request header) when
    /// given, else from the body, else inferring it from the shape of the document.
    pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = serde_json::from_slice(body)?;
        let header = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| !c.is_empty() && *c != "application/json");
        let media_type = match (header, raw.media_type.as_deref()) {
            (Some(h), Some(b)) if h != b => {
                return Err(ManifestError::MediaTypeMismatch {
                    header: h.to_owned(),
                    body: b.to_owned(),
                });
            }
            (Some(h), _) => h.to_owned(),
            (None, Some(b)) => b.to_owned(),
            (None, None) if !raw.manifests.is_empty() => OCI_INDEX.to_owned(),
            (None, None) => OCI_MANIFEST.to_owned(),
        };
        let kind =
            kind_of(&media_type).ok_or_else(|| ManifestError::MediaType(media_type.clone()))?;
        if raw.schema_version != Some(2) {
            return Err(ManifestError::SchemaVersion);
        }
        let config = raw.config.map(Descriptor::try_from).transpose()?;
        if kind == Kind::Image && config.is_none() {
            return Err(ManifestError::MissingConfig);
        }
        let layers = raw
            .layers
            .into_iter()
            .map(Descriptor::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let manifests = raw
            .manifests
            .into_iter()
            .map(Descriptor::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let subject = raw.subject.map(Descriptor::try_from).transpose()?;
        let artifact_type = raw.artifact_type.or_else(|| match kind {
            Kind::Image => config.as_ref().map(|c| c.media_type.clone()),
            Kind::Index => None,
        });
        Ok(Manifest {
            media_type,
            kind,
            config,
            layers,
            manifests,
            subject,
            artifact_type,
            annotations: raw.annotations,
        })
    }

    /// Blobs that must be present in the repository before this manifest is accepted.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config
            .iter()
            .chain(self.layers.iter().filter(|l| !l.external))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn parses_image_manifest_with_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.example+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"x","digest":"{}","size":5}},
                      {{"mediaType":"y","digest":"{}","size":5,"urls":["http://x"]}}],
            "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10}},
            "unknownField":1}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let m = Manifest::parse(body.as_bytes(), None).expect("valid");
        assert_eq!(m.kind, Kind::Image);
        assert_eq!(
            m.required_blobs().count(),
            2,
            "foreign layer is not required"
        );
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.example+json")
        );
        assert_eq!(m.subject.map(|s| s.digest.to_string()), Some(d('e')));
    }

    #[test]
    fn infers_index_and_checks_header() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":3,
               "platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            d('a')
        );
        let m = Manifest::parse(body.as_bytes(), None).expect("valid");
        assert_eq!(m.kind, Kind::Index);
        assert_eq!(m.media_type, OCI_INDEX);
        assert_eq!(
            m.manifests[0]
                .platform
                .as_ref()
                .map(|p| p.architecture.as_str()),
            Some("arm64")
        );
        let m = Manifest::parse(body.as_bytes(), Some(DOCKER_LIST)).expect("valid");
        assert_eq!(m.media_type, DOCKER_LIST);
    }

    #[test]
    fn refuses_bad_manifests() {
        let mismatch = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(matches!(
            Manifest::parse(mismatch.as_bytes(), Some(OCI_MANIFEST)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        assert!(Manifest::parse(b"not json", None).is_err());
        assert!(Manifest::parse(br#"{"schemaVersion":1}"#, None).is_err());
        let no_config =
            format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
        assert!(matches!(
            Manifest::parse(no_config.as_bytes(), None),
            Err(ManifestError::MissingConfig)
        ));
        let bad_digest =
            r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1}}"#;
        assert!(matches!(
            Manifest::parse(bad_digest.as_bytes(), None),
            Err(ManifestError::Digest(_))
        ));
        let negative = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":-1}}}}"#,
            d('a')
        );
        assert!(Manifest::parse(negative.as_bytes(), None).is_err());
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":2}"#, Some("text/plain")),
            Err(ManifestError::MediaType(_))
        ));
    }
}
