//! `pull`: resumable HTTP(S) download of a model file (Hugging Face style `resolve` URLs or any
//! server that honours Range requests), verified before it is moved into the store.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;

use crate::limits::{
    PULL_ATTEMPTS_MAX, PULL_BYTES_MAX, PULL_CONNECT_TIMEOUT, PULL_READ_TIMEOUT, PULL_RETRY_DELAY,
};
use crate::{ModelError, ModelStore, Sha256Digest, VerifiedModel};

/// Buffer between the network and the partial file, so the file is not written per tiny chunk.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// Why one download attempt stopped.
enum AttemptError {
    /// Worth another request (dropped connection, timeout, 5xx); the partial file is kept.
    Transient(String),
    /// Retrying cannot help (404, disk full, size limit).
    Fatal(ModelError),
}

impl ModelStore {
    /// Downloads `url` into the store under `name`, resuming a previous interrupted download from
    /// its `.partial` file with a Range request, retrying up to [`PULL_ATTEMPTS_MAX`] times, and
    /// refusing the file unless it hashes to `expected`. Returns at once when the blob is already
    /// present and verified.
    pub async fn pull(
        &self,
        name: &str,
        url: &str,
        expected: &Sha256Digest,
    ) -> Result<VerifiedModel, ModelError> {
        let existing = {
            let (store, name, expected) = (self.clone(), name.to_owned(), *expected);
            run_blocking(move || store.existing(&name, &expected)).await?
        };
        if let Some(model) = existing {
            return Ok(model);
        }
        let http_error = |message: String| ModelError::Http {
            url: url.to_owned(),
            message,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(PULL_CONNECT_TIMEOUT)
            .read_timeout(PULL_READ_TIMEOUT)
            .build()
            .map_err(|e| http_error(format!("build http client: {e}")))?;
        let partial = self.partial_dir().join(format!("{expected}.partial"));
        let progress = progress_bar(name);
        let mut attempt = 1;
        loop {
            match download_once(&client, url, &partial, &progress).await {
                Ok(()) => break,
                Err(AttemptError::Fatal(error)) => return Err(error),
                Err(AttemptError::Transient(message)) if attempt >= PULL_ATTEMPTS_MAX => {
                    return Err(http_error(format!(
                        "{message} (gave up after {attempt} attempts)"
                    )))
                }
                Err(AttemptError::Transient(message)) => {
                    tracing::warn!(model = name, url, attempt, %message, "download interrupted, retrying");
                    tokio::time::sleep(PULL_RETRY_DELAY * attempt).await;
                    attempt += 1;
                }
            }
        }
        progress.finish_and_clear();
        let (store, name, expected, url) =
            (self.clone(), name.to_owned(), *expected, url.to_owned());
        run_blocking(move || store.install_partial(&name, &url, &partial, &expected)).await
    }

    /// Hashes a completed download and, if it matches, renames it to its blob path.
    fn install_partial(
        &self,
        name: &str,
        url: &str,
        partial: &Path,
        expected: &Sha256Digest,
    ) -> Result<VerifiedModel, ModelError> {
        let actual = Sha256Digest::of_file(partial)?;
        if &actual != expected {
            // A finished download with the wrong bytes would only poison the next resume.
            let _ = std::fs::remove_file(partial);
            return Err(ModelError::ChecksumMismatch {
                origin: url.to_owned(),
                expected: *expected,
                actual,
            });
        }
        let blob = self.blob_path(expected);
        std::fs::rename(partial, &blob)
            .map_err(|e| ModelError::io("move download into place at", blob, e))?;
        self.adopt(name, expected)
    }
}

/// One GET, resuming from whatever the partial file already holds.
async fn download_once(
    client: &reqwest::Client,
    url: &str,
    partial: &Path,
    progress: &ProgressBar,
) -> Result<(), AttemptError> {
    let offset = tokio::fs::metadata(partial).await.map_or(0, |m| m.len());
    let mut request = client.get(url);
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let response = request
        .send()
        .await
        .map_err(|e| AttemptError::Transient(format!("request failed: {e}")))?;
    let status = response.status();
    let resume = match status {
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            check_content_range(&response, offset)?;
            true
        }
        // The server ignored the Range header (or there was none): start over.
        StatusCode::OK => false,
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            return range_not_satisfiable(&response, offset, partial).await
        }
        _ if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT =>
        {
            return Err(AttemptError::Transient(format!("server answered {status}")))
        }
        _ => {
            return Err(AttemptError::Fatal(ModelError::Http {
                url: url.to_owned(),
                message: format!("server answered {status}"),
            }))
        }
    };
    let start = if resume { offset } else { 0 };
    let expected_total = response.content_length().map(|length| start + length);
    progress.set_length(expected_total.unwrap_or(0));
    progress.set_position(start);
    let written = write_body(response, partial, resume, start, url, progress).await?;
    match expected_total {
        Some(total) if written < total => Err(AttemptError::Transient(format!(
            "connection closed after {written} of {total} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Streams the body into the partial file (appending when resuming). Returns the file's length.
async fn write_body(
    response: reqwest::Response,
    partial: &Path,
    resume: bool,
    start: u64,
    url: &str,
    progress: &ProgressBar,
) -> Result<u64, AttemptError> {
    let fatal_io = |action, e| AttemptError::Fatal(ModelError::io(action, partial, e));
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume)
        .truncate(!resume)
        .open(partial)
        .await
        .map_err(|e| fatal_io("open", e))?;
    let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
    let mut written = start;
    let mut body = response.bytes_stream();
    let mut interrupted = None;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                interrupted = Some(format!("transfer interrupted: {e}"));
                break;
            }
        };
        written += chunk.len() as u64;
        if written > PULL_BYTES_MAX {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(AttemptError::Fatal(ModelError::Http {
                url: url.to_owned(),
                message: format!("body exceeds the {PULL_BYTES_MAX}-byte limit"),
            }));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| fatal_io("write", e))?;
        progress.set_position(written);
    }
    // Whatever arrived before an interruption is kept: the next attempt resumes after it.
    file.flush().await.map_err(|e| fatal_io("write", e))?;
    file.get_ref()
        .sync_all()
        .await
        .map_err(|e| fatal_io("sync", e))?;
    match interrupted {
        Some(message) => Err(AttemptError::Transient(message)),
        None => Ok(written),
    }
}

/// A 206 must start exactly where the partial file ends, or appending would corrupt it.
fn check_content_range(response: &reqwest::Response, offset: u64) -> Result<(), AttemptError> {
    let content_range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let starts_at_offset = content_range
        .strip_prefix("bytes ")
        .and_then(|range| range.split_once('-'))
        .is_some_and(|(first, _)| first.trim() == offset.to_string());
    if starts_at_offset {
        Ok(())
    } else {
        Err(AttemptError::Transient(format!(
            "resume from byte {offset} answered with content-range {content_range:?}"
        )))
    }
}

/// 416 on a resume: either the partial file is already complete, or it is longer than the file
/// on the server (a stale leftover), which is discarded.
async fn range_not_satisfiable(
    response: &reqwest::Response,
    offset: u64,
    partial: &Path,
) -> Result<(), AttemptError> {
    let total = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|range| range.strip_prefix("bytes */"))
        .and_then(|total| total.trim().parse::<u64>().ok());
    if total == Some(offset) {
        return Ok(());
    }
    tokio::fs::remove_file(partial)
        .await
        .map_err(|e| AttemptError::Fatal(ModelError::io("remove stale download", partial, e)))?;
    Err(AttemptError::Transient(format!(
        "stale partial download of {offset} bytes discarded"
    )))
}

/// A byte progress bar on stderr, hidden when stderr is not a terminal (logs, CI).
fn progress_bar(name: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(style);
    bar.set_message(format!("pull {name}"));
    bar
}

/// Runs file hashing and renames off the async runtime's worker threads.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ModelError> + Send + 'static,
) -> Result<T, ModelError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ModelError::io(
            "run blocking task",
            PathBuf::new(),
            std::io::Error::other(e),
        )
    })?
}
