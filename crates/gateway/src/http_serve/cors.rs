//! Cross-origin requests from browsers (CORS), for the origins the operator
//! allows (`--cors-allow-origin`); off by default, when no response carries
//! a CORS header.
//!
//! A preflight (`OPTIONS`) is answered by the layer itself, before any
//! handler: it needs no API key. The headers allowed are the gateway's own
//! and those the OpenAI JavaScript SDK sends from a browser; the headers
//! exposed are those the gateway sets on its answers. Credentials (cookies)
//! are never allowed: the API key travels in `Authorization`.

use axum::http::{HeaderName, HeaderValue, Method};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::{deadline::DEADLINE_HEADER, IDEMPOTENCY_HEADER};
use crate::limits;

/// Request headers a browser may send: the gateway's own, and those the
/// OpenAI JavaScript SDK adds to every request (the `x-stainless-*` family
/// describes the SDK and its retries; `user-agent` is sent by browsers that
/// let a page set it).
const ALLOWED_REQUEST_HEADERS: [&str; 16] = [
    "authorization",
    "content-type",
    IDEMPOTENCY_HEADER,
    DEADLINE_HEADER,
    "openai-organization",
    "openai-project",
    "user-agent",
    "x-stainless-arch",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
];

/// Response headers a page may read: those the gateway sets.
const EXPOSED_RESPONSE_HEADERS: [&str; 5] = [
    "retry-after",
    "x-request-id",
    "x-fleetgrid-tier",
    "x-fleetgrid-route-reason",
    "idempotent-replayed",
];

/// Which origins may call the API from a browser.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers at all: browsers allow only same-origin pages.
    #[default]
    Off,
    /// Any origin (`*`).
    AnyOrigin,
    /// These origins exactly, as browsers send them (`https://app.example`).
    Origins(Vec<HeaderValue>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorsError {
    #[error("'{origin}' is not an origin: {why} (an origin is SCHEME://HOST[:PORT], such as https://app.example.com, or '*' for any)")]
    NotAnOrigin { origin: String, why: &'static str },
    #[error("'*' allows any origin; give it alone, not with other origins")]
    WildcardWithOthers,
}

impl Cors {
    /// The allow-list as given on the command line: none is off, `*` any
    /// origin, else each an origin (scheme and host are matched without
    /// regard to case, as browsers send them in lowercase).
    pub fn allow_origins(origins: &[String]) -> Result<Cors, CorsError> {
        if origins.is_empty() {
            return Ok(Cors::Off);
        }
        if origins.iter().any(|origin| origin == "*") {
            return match origins.len() {
                1 => Ok(Cors::AnyOrigin),
                _ => Err(CorsError::WildcardWithOthers),
            };
        }
        let checked = origins
            .iter()
            .map(|origin| checked_origin(origin))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Cors::Origins(checked))
    }

    /// `app` answering cross-origin requests as allowed; `app` itself when off.
    pub fn apply(&self, app: Router) -> Router {
        let allow_origin = match self {
            Cors::Off => return app,
            Cors::AnyOrigin => AllowOrigin::any(),
            Cors::Origins(origins) => AllowOrigin::list(origins.iter().cloned()),
        };
        let layer = CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(ALLOWED_REQUEST_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSED_RESPONSE_HEADERS.map(HeaderName::from_static))
            .max_age(limits::CORS_PREFLIGHT_MAX_AGE);
        app.layer(layer)
    }
}

/// `origin` as browsers send it in `Origin`, or why it cannot be one.
fn checked_origin(origin: &str) -> Result<HeaderValue, CorsError> {
    let refuse = |why| CorsError::NotAnOrigin {
        origin: origin.to_string(),
        why,
    };
    let Some((scheme, host)) = origin.split_once("://") else {
        return Err(refuse("it has no scheme"));
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(refuse("its scheme is not valid"));
    }
    if host.is_empty() {
        return Err(refuse("it has no host"));
    }
    if host.contains(['/', '?', '#']) {
        return Err(refuse(
            "browsers send an origin without a path, not even '/'",
        ));
    }
    if !host.chars().all(|c| c.is_ascii_graphic()) {
        return Err(refuse("it has spaces or characters outside ASCII"));
    }
    HeaderValue::from_str(&origin.to_ascii_lowercase())
        .map_err(|_| refuse("it is not a header value"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    /// `HeaderName::from_static` panics on a name that is not lowercase
    /// and valid: each listed name is checked here, not first in a server.
    #[test]
    fn every_listed_header_is_a_valid_name() {
        for name in ALLOWED_REQUEST_HEADERS
            .iter()
            .chain(&EXPOSED_RESPONSE_HEADERS)
        {
            assert_eq!(HeaderName::from_static(name).as_str(), *name);
        }
        assert!(EXPOSED_RESPONSE_HEADERS.contains(&header::RETRY_AFTER.as_str()));
    }

    #[test]
    fn origins_are_checked_and_star_stands_alone() {
        let allow = |origins: &[&str]| {
            Cors::allow_origins(&origins.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(allow(&[]), Ok(Cors::Off));
        assert_eq!(allow(&["*"]), Ok(Cors::AnyOrigin));
        assert_eq!(
            allow(&["https://App.example", "http://localhost:5173"]),
            Ok(Cors::Origins(vec![
                HeaderValue::from_static("https://app.example"),
                HeaderValue::from_static("http://localhost:5173"),
            ]))
        );
        assert_eq!(
            allow(&["*", "https://app.example"]),
            Err(CorsError::WildcardWithOthers)
        );
        for bad in [
            "app.example",
            "https://app.example/",
            "https://",
            "1x://a",
            "https://a b",
        ] {
            assert!(
                matches!(allow(&[bad]), Err(CorsError::NotAnOrigin { .. })),
                "{bad}"
            );
        }
    }
}
