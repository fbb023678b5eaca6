//! The reference tools rebuilt on the very llama.cpp library the engine links.
//!
//! `llama-cpp-sys-2` vendors llama.cpp's library (`include/`, `src/`, `ggml/`) but ships its
//! tools as READMEs only. The tree built here is that library, byte for byte the sources the
//! engine was compiled from (their directory is recorded by `build.rs` from
//! `llama-cpp-sys-2`'s CMake cache), with the drivers taken from the `llama-cpp-python` tree:
//! `common/`, and the `llama-bench`, `llama-server`, `llama-quantize` tools with what they need
//! (`mtmd`, the web UI's asset script). The drivers only call the library; the kernels, the
//! graph and the KV cache they time are the engine's own. So a gap between the engine and this
//! `llama-bench` is our code between llama.cpp calls, and a gap between this `llama-bench` and
//! `llama-cpp-python`'s is the llama.cpp version.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{fetch, LLAMA_CPP_PYTHON_VERSION, REFERENCE_LLAMA_CPP_COMMIT};
use crate::process::{remove_dir_if_present, run_logged};
use crate::BenchError;

/// The llama.cpp tree the engine was compiled from, or empty when the build could not tell.
pub const ENGINE_LLAMA_CPP_SOURCE: &str = env!("BENCH_ENGINE_LLAMA_CPP_SOURCE");

/// Paths taken from the `llama-cpp-python` tree into the engine's, replacing what is there.
const DRIVER_PATHS: [&str; 7] = [
    "common",
    "tools/llama-bench",
    "tools/server",
    "tools/ui",
    "tools/mtmd",
    "tools/quantize",
    "scripts/ui-assets.cmake",
];

/// The tools' list of subdirectories: only the tools built here.
const TOOLS_CMAKE_LISTS: &str = "llama_add_compile_flags()\n\
    add_subdirectory(llama-bench)\n\
    add_subdirectory(quantize)\n\
    add_subdirectory(ui)\n\
    add_subdirectory(mtmd)\n\
    add_subdirectory(server)\n";

/// Marks a complete merged tree and records what it was merged from.
const TREE_STAMP_FILE_NAME: &str = "fleetgrid-tree.stamp";

/// The merged tree in `cache_dir` and what it is, merging it when missing or made from other
/// sources.
pub(super) fn ensure_tree(cache_dir: &Path) -> Result<(PathBuf, String), BenchError> {
    let engine_tree = engine_tree()?;
    let drivers = fetch::ensure_source(cache_dir)?;
    let tree = cache_dir.join("same-version").join("llama.cpp");
    let stamp = format!(
        "library {}\ndrivers llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n",
        engine_tree.display()
    );
    let crate_name = engine_tree
        .parent()
        .and_then(Path::file_name)
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
    let describe = |ggml_version: &str| {
        format!(
            "the engine's llama.cpp library (ggml {ggml_version}, {crate_name}) with the tools of \
             llama.cpp {REFERENCE_LLAMA_CPP_COMMIT} from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"
        )
    };
    let stamp_path = tree.join(TREE_STAMP_FILE_NAME);
    if !std::fs::read_to_string(&stamp_path).is_ok_and(|found| found == stamp) {
        merge(
            &engine_tree,
            &drivers,
            &tree,
            &cache_dir.join("same-version-copy.log"),
        )?;
        std::fs::write(&stamp_path, stamp).map_err(|e| BenchError::io("write", &stamp_path, e))?;
    }
    let ggml_version = super::read_ggml_version(&tree)?;
    Ok((tree, describe(&ggml_version)))
}

/// Makes `tree` afresh: a copy of `library` with [`DRIVER_PATHS`] taken from `drivers`, and a
/// tools list of only the tools built here.
fn merge(library: &Path, drivers: &Path, tree: &Path, log: &Path) -> Result<(), BenchError> {
    remove_dir_if_present(tree)?;
    if let Some(parent) = tree.parent() {
        std::fs::create_dir_all(parent).map_err(|e| BenchError::io("create", parent, e))?;
    }
    copy_tree(library, tree, log)?;
    for path in DRIVER_PATHS {
        let target = tree.join(path);
        if target.is_dir() {
            remove_dir_if_present(&target)?;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| BenchError::io("create", parent, e))?;
        }
        copy_tree(&drivers.join(path), &target, log)?;
    }
    let tools = tree.join("tools").join("CMakeLists.txt");
    std::fs::write(&tools, TOOLS_CMAKE_LISTS).map_err(|e| BenchError::io("write", &tools, e))
}

/// The engine's llama.cpp tree, as this build recorded it.
fn engine_tree() -> Result<PathBuf, BenchError> {
    let tree = PathBuf::from(ENGINE_LLAMA_CPP_SOURCE);
    if ENGINE_LLAMA_CPP_SOURCE.is_empty() || !tree.join("CMakeLists.txt").is_file() {
        return Err(BenchError::InvalidSetting(format!(
            "the llama.cpp sources the engine was built from are not at hand ({ENGINE_LLAMA_CPP_SOURCE:?}); \
             the same-version reference is built where this binary was built"
        )));
    }
    Ok(tree)
}

/// `cp -a from to`.
fn copy_tree(from: &Path, to: &Path, log: &Path) -> Result<(), BenchError> {
    let mut copy = Command::new("cp");
    copy.arg("-a").arg(from).arg(to);
    run_logged(&mut copy, "cp", log).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_merged_tree_is_the_library_with_the_other_trees_drivers() {
        let dir = tempfile::tempdir().unwrap();
        let (library, drivers) = (dir.path().join("library"), dir.path().join("drivers"));
        write(&library.join("ggml/src/kernel.c"), "the engine's kernel");
        write(&library.join("src/llama.cpp"), "the engine's graph");
        write(&library.join("common/common.cpp"), "newer common");
        write(&library.join("common/only-newer.h"), "gone after the merge");
        write(
            &library.join("tools/llama-bench/README.md"),
            "a readme only",
        );
        write(&library.join("tools/CMakeLists.txt"), "every tool");
        write(&drivers.join("ggml/src/kernel.c"), "the older kernel");
        for path in DRIVER_PATHS {
            let file = if path.ends_with(".cmake") {
                drivers.join(path)
            } else {
                drivers.join(path).join("driver.cpp")
            };
            write(&file, &format!("older {path}"));
        }
        let tree = dir.path().join("merged").join("llama.cpp");
        merge(&library, &drivers, &tree, &dir.path().join("copy.log")).unwrap();

        assert_eq!(read(&tree.join("ggml/src/kernel.c")), "the engine's kernel");
        assert_eq!(read(&tree.join("src/llama.cpp")), "the engine's graph");
        assert_eq!(read(&tree.join("common/driver.cpp")), "older common");
        assert!(!tree.join("common/only-newer.h").exists());
        assert!(!tree.join("tools/llama-bench/README.md").exists());
        assert_eq!(
            read(&tree.join("tools/llama-bench/driver.cpp")),
            "older tools/llama-bench"
        );
        assert_eq!(
            read(&tree.join("scripts/ui-assets.cmake")),
            "older scripts/ui-assets.cmake"
        );
        assert_eq!(read(&tree.join("tools/CMakeLists.txt")), TOOLS_CMAKE_LISTS);

        // Merged again (another library), nothing of the first merge is left behind.
        std::fs::remove_file(library.join("src/llama.cpp")).unwrap();
        merge(&library, &drivers, &tree, &dir.path().join("copy.log")).unwrap();
        assert!(!tree.join("src/llama.cpp").exists());
    }
}
