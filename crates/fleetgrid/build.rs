//! With `cpu-dispatch`, llama.cpp is shared libraries (`libllama.so`, `libggml*.so`) and CPU
//! kernel modules that the build puts beside the binary (`llama-cpp-sys-2`'s and `engine`'s
//! build scripts). The binary looks for them in its own directory, so that the directory can be
//! shipped as it is.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CPU_DISPATCH").is_some()
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    }
}
