//! The one error type of the HTTP API, shaped like OpenAI's.
//!
//! `{"error": {"message", "type", "param", "code"}}` with the matching status;
//! 429 and 503 carry `Retry-After`. A 5xx never shows internals: the details
//! are logged where the error is made, the client gets a generic message.
//!
//! Lower layers speak their own errors; the ones a handler passes on with `?`
//! become an `ApiError` here, in one place (billing's below).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::billing::BillingError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_seconds: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
pub(crate) struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400 for a request that is wrong as written.
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: Some(code),
            retry_after_seconds: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after_seconds: None,
        }
    }

    /// 429: the caller should slow down and retry.
    pub fn too_many(message: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after_seconds: Some(retry_after_seconds),
        }
    }

    /// 503: no capacity can serve this now.
    pub fn unavailable(message: impl Into<String>, retry_after_seconds: u64) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("no_capacity"),
            retry_after_seconds: Some(retry_after_seconds),
        }
    }

    /// 500 with a generic message; the cause must be logged by the caller.
    pub fn internal() -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the server had an error while processing your request".into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_seconds: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            retry_after_seconds: None,
        }
    }

    /// 404 for a model this gateway does not serve, as OpenAI answers it;
    /// `hint` says what is served instead.
    pub fn model_not_found(requested: &str, hint: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model '{requested}' does not exist; {hint}"),
            kind: "invalid_request_error",
            param: Some("model".to_string()),
            code: Some("model_not_found"),
            retry_after_seconds: None,
        }
    }

    /// The JSON body alone, for an error sent inside an event stream.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: self.fields(),
        })
        .unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }

    fn fields(&self) -> ErrorFields<'_> {
        ErrorFields {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body_json(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after_seconds {
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Billing's refusals and failures as the client sees them: 402 for a
/// tenant that cannot pay (with the ledger's amounts in the message), 503 and
/// `Retry-After` when the balance moves too fast to admit, the ledger cannot
/// be reached or does not take a settlement, and a generic 500 for the rest
/// (logged by billing).
impl From<BillingError> for ApiError {
    fn from(error: BillingError) -> ApiError {
        match error {
            BillingError::Refused(refusal) => ApiError {
                status: StatusCode::PAYMENT_REQUIRED,
                message: refusal.to_string(),
                kind: "insufficient_quota",
                param: None,
                code: Some("insufficient_quota"),
                retry_after_seconds: None,
            },
            BillingError::Contended {
                retry_after_seconds,
            } => ApiError::unavailable(error.to_string(), retry_after_seconds),
            BillingError::LedgerUnavailable {
                retry_after_seconds,
            }
            | BillingError::Unavailable {
                retry_after_seconds,
            }
            | BillingError::SettlementPending {
                retry_after_seconds,
            } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: error.to_string(),
                kind: "server_error",
                param: None,
                code: Some("billing_unavailable"),
                retry_after_seconds: Some(retry_after_seconds),
            },
            BillingError::UnknownPrice { .. }
            | BillingError::Internal(_)
            | BillingError::Open { .. }
            | BillingError::Dir { .. }
            | BillingError::Unpriced { .. }
            | BillingError::Invalid(_) => ApiError::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::admission::PaymentRequired;
    use ledger::core::MicroUsd;

    #[test]
    fn billing_refusals_keep_their_status_code_and_figures() {
        let refused = ApiError::from(BillingError::Refused(
            PaymentRequired::InsufficientBalance {
                worst_case: MicroUsd(1_000),
                available: MicroUsd(999),
            },
        ));
        assert_eq!(refused.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(refused.code, Some("insufficient_quota"));
        assert!(refused.message.contains("$0.001000"), "{}", refused.message);
        assert_eq!(refused.retry_after_seconds, None);

        let unavailable = ApiError::from(BillingError::LedgerUnavailable {
            retry_after_seconds: 3,
        });
        assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.code, Some("billing_unavailable"));
        assert_eq!(unavailable.retry_after_seconds, Some(3));

        let internal = ApiError::from(BillingError::Internal("read the daily cap"));
        assert_eq!(internal, ApiError::internal());
    }
}
