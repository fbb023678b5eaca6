//! With `cpu-dispatch`, llama.cpp's CPU kernels are loadable modules, one per instruction-set
//! level (`libggml-cpu-<variant>.so`). They are put beside the binaries of this build, where
//! `llama-cpp-sys-2` puts llama.cpp's shared libraries, so that a binary's directory holds all
//! it loads and can be shipped as it is.

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
    if let Err(error) = place_beside(&modules, binaries) {
        println!(
            "cargo:warning=CPU kernel modules not placed in {}: {error}",
            binaries.display()
        );
    }
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
        let placed = binaries.join(name);
        let _ = std::fs::remove_file(&placed);
        if std::fs::hard_link(&path, &placed).is_err() {
            std::fs::copy(&path, &placed)?;
        }
    }
    Ok(())
}
