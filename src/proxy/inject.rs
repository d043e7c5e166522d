//! What the app receives (docs/HEADERS.md §1): the session headers' names under the configured
//! prefix, the values the present phase adds, and their signature.

use http::{HeaderName, HeaderValue};

use super::{Access, Pipeline};
use crate::session::{Loaded, Millis, json};

/// The request headers the sidecar adds, named with the configured prefix.
pub(super) struct Names {
    pub data: HeaderName,
    pub status: HeaderName,
    pub expiry_age: HeaderName,
    pub id: HeaderName,
    pub csrf: HeaderName,
    pub subject: HeaderName,
    pub signature: HeaderName,
    /// `[identity] header`: the app's own user header, set from the subject.
    pub identity: Option<HeaderName>,
}

impl Names {
    /// What `X-Session-Signature` covers: every header the sidecar may add.
    fn signed(&self) -> Vec<&HeaderName> {
        let mut names = vec![
            &self.data,
            &self.status,
            &self.expiry_age,
            &self.id,
            &self.csrf,
            &self.subject,
        ];
        names.extend(&self.identity);
        names
    }
}

pub(super) fn header_name(prefix: &str, suffix: &str) -> HeaderName {
    HeaderName::from_bytes(format!("{prefix}{suffix}").as_bytes())
        .expect("the prefix was validated as a header name")
}

impl Pipeline {
    /// The session headers the app receives (docs/HEADERS.md §1), signed when a key is set.
    pub(super) fn inject(
        &self,
        h: &mut http::HeaderMap,
        loaded: &Loaded,
        now: Millis,
        info: &mut Access,
    ) {
        h.insert(
            &self.names.data,
            HeaderValue::from_str(&json::encode_ascii(loaded.data()))
                .expect("the encoder writes visible ASCII only"),
        );
        let status = if loaded.is_existing() {
            "existing"
        } else {
            "new"
        };
        info.session = status;
        h.insert(&self.names.status, HeaderValue::from_static(status));
        h.insert(
            &self.names.expiry_age,
            HeaderValue::from(self.sessions.expiry_age(loaded, now)),
        );
        if self.config.expose_id
            && let Some(key) = loaded.key()
        {
            h.insert(&self.names.id, HeaderValue::from_str(key).expect("hex key"));
        }
        // Subjects are visible ASCII (docs/HEADERS.md §2); one that is not is not handed on.
        if let Some(subject) = loaded
            .record()
            .and_then(|r| r.subject.as_deref())
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            if let Some(identity) = &self.names.identity {
                h.insert(identity, subject.clone());
            }
            h.insert(&self.names.subject, subject);
        }
        if let Some(signer) = &self.signer {
            let signature = signer.sign(h, &self.names.signed(), now / 1000);
            h.insert(&self.names.signature, signature);
        }
    }
}
