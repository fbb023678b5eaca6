//! Extractors for the parts of a request's URL whose rejections are answered
//! in the gateway's own OpenAI shape (a 400 naming what was wrong) instead of
//! axum's plain-text ones.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query};

use super::ApiError;

/// `axum::extract::Path`, rejected with an OpenAI-shaped 400.
#[derive(FromRequestParts)]
#[from_request(via(Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `axum::extract::Query`, rejected with an OpenAI-shaped 400.
#[derive(FromRequestParts)]
#[from_request(via(Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::invalid(
            format!("the request path is not valid: {}", rejection.body_text()),
            Some("path"),
            "invalid_path",
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::invalid(
            format!("the query string is not valid: {}", rejection.body_text()),
            Some("query"),
            "invalid_query",
        )
    }
}
