//! The `x-fleetgrid-deadline-ms` request header: a client (typically a spot
//! tenant) says how long it is willing to wait for its generation to start.
//! If no node has started it by then, the scheduler fails it with a clear
//! error (`DeadlineExpired`) instead of leaving it queued.

use axum::http::HeaderMap;

use super::ApiError;
use crate::limits;

/// The header's name.
pub const DEADLINE_HEADER: &str = "x-fleetgrid-deadline-ms";

/// The longest deadline accepted: a request never waits longer than the
/// gateway's own request timeout anyway.
pub fn deadline_ms_max() -> u64 {
    u64::try_from(limits::REQUEST_TIMEOUT.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds from now within which the generation must start, if the
/// client set a deadline; 400 for a value that is not a whole number of
/// milliseconds between 1 and the maximum.
pub fn from_headers(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(DEADLINE_HEADER) else {
        return Ok(None);
    };
    let max = deadline_ms_max();
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|ms| (1..=max).contains(ms))
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "{DEADLINE_HEADER} must be a whole number of milliseconds between 1 and {max}"
                ),
                Some(DEADLINE_HEADER),
                "invalid_deadline",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn parse(value: Option<&str>) -> Result<Option<u64>, ApiError> {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(
                DEADLINE_HEADER,
                HeaderValue::from_str(value).expect("value"),
            );
        }
        from_headers(&headers)
    }

    #[test]
    fn deadlines_are_whole_milliseconds_within_the_request_timeout() {
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some("1500")), Ok(Some(1500)));
        for bad in ["0", "-5", "1.5", "soon", "600001"] {
            let error = parse(Some(bad)).expect_err(bad);
            assert_eq!(error.status, 400, "{bad}");
            assert_eq!(error.param.as_deref(), Some(DEADLINE_HEADER));
        }
    }
}
