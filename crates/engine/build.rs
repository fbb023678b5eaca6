//! With `cpu-dispatch`, llama.cpp's CPU kernels are loadable modules, one per instruction-set
//! level (`libggml-cpu-<variant>.so`), and llama.cpp and ggml are shared libraries. Both are put
//! beside the binaries of this build, the libraries under the names binaries ask for
//! (`libllama.so.0`: `llama-cpp-sys-2` itself places only the unversioned links, which point
//! nowhere there), so that a binary's directory holds all it loads and can be shipped as it is.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    let Some(modules) = std::env::var_os("DEP_LLAMA_BACKENDS_DIR").map(PathBuf::from) else {
        return;
    };
    println!("cargo:rerun-if-changed={}", modules.display());
    // OUT_DIR is <target>/<profile>/build/engine-<hash>/out.
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let Some(binaries) = out_dir.ancestors().nth(3) else {
        return;
    };
    // `llama-cpp-sys-2` installs the libraries in `lib/` beside `backends/`.
    let libraries = modules.with_file_name("lib");
    // Tests and examples run from `deps/` and `examples/`, where `llama-cpp-sys-2` puts its
    // unversioned links too; once they point somewhere its next build no longer fails on them.
    for placed in [
        place_beside(&modules, binaries),
        place_libraries(&libraries, binaries),
        place_libraries(&libraries, &binaries.join("deps")),
        place_libraries(&libraries, &binaries.join("examples")),
    ] {
        if let Err(error) = placed {
            println!(
                "cargo:warning=llama.cpp's libraries not placed in {}: {error}",
                binaries.display()
            );
        }
    }
    // An example run from its own directory finds them one level up.
    println!("cargo:rustc-link-arg-examples=-Wl,-rpath,$ORIGIN/..");
}

/// Each shared library under its soname (`libggml-base.so.0`, a link in `lib/` to the versioned
/// file), as the file itself.
fn place_libraries(libraries: &Path, binaries: &Path) -> std::io::Result<()> {
    if !binaries.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(libraries)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let soname = name
            .strip_prefix("lib")
            .and_then(|rest| rest.split_once(".so."))
            .is_some_and(|(_, version)| version.chars().all(|c| c.is_ascii_digit()));
        if soname {
            link_or_copy(&std::fs::canonicalize(&path)?, &binaries.join(name))?;
        }
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
    }
    Ok(())
}

fn place_beside(modules: &Path, binaries: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(modules)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if !(name.starts_with("libggml-cpu-") && name.ends_with(".so")) {
            continue;
        }
        link_or_copy(&path, &binaries.join(name))?;
    }
    Ok(())
}
