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
    let placements = [
        (
            &modules,
            binaries.to_path_buf(),
            is_module as fn(&str) -> bool,
        ),
        (&libraries, binaries.to_path_buf(), is_soname),
        (&libraries, binaries.join("deps"), is_soname),
        (&libraries, binaries.join("examples"), is_soname),
    ];
    for (from, to, wanted) in placements {
        if let Err(error) = place(from, &to, wanted) {
            println!(
                "cargo:warning=llama.cpp's libraries not placed in {}: {error}",
                to.display()
            );
        }
    }
    // An example run from its own directory finds them one level up.
    println!("cargo:rustc-link-arg-examples=-Wl,-rpath,$ORIGIN/..");
}

/// A CPU kernel module: `libggml-cpu-<variant>.so`.
fn is_module(name: &str) -> bool {
    name.starts_with("libggml-cpu-") && name.ends_with(".so")
}

/// A shared library's soname (`libggml-base.so.0`, a link in `lib/` to the versioned file).
fn is_soname(name: &str) -> bool {
    name.strip_prefix("lib")
        .and_then(|rest| rest.split_once(".so."))
        .is_some_and(|(_, version)| version.chars().all(|c| c.is_ascii_digit()))
}

/// Each file of `from` that is `wanted`, as the file itself (links resolved) under its own name
/// in `to`, when `to` exists.
fn place(from: &Path, to: &Path, wanted: fn(&str) -> bool) -> std::io::Result<()> {
    if !to.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if !wanted(name) {
            continue;
        }
        let (file, placed) = (std::fs::canonicalize(&path)?, to.join(name));
        let _ = std::fs::remove_file(&placed);
        if std::fs::hard_link(&file, &placed).is_err() {
            std::fs::copy(&file, &placed)?;
        }
    }
    Ok(())
}
