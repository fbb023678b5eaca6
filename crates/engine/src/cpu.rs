//! Which CPU kernels this build of llama.cpp runs: the instruction sets its quantized dot
//! products and matrix multiplications were compiled for (`AVX2`, `AVX512`, `NEON`, `DOTPROD`,
//! `MATMUL_INT8` …), as llama.cpp itself reports them. Two vehicles whose kernels differ may
//! round differently, which decides whether a generation moved between them continues bit for
//! bit; the agent sends this in its registration and the engine logs it at start-up.
//!
//! And the switch to ggml's reference kernels ([`with_reference_kernels`]): every operation
//! computes a row as it computes that row alone, attention included, whatever the batch.

use std::cell::Cell;
use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

/// llama.cpp's system information, e.g. `CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 |
/// FMA = 1 | OPENMP = 1 | REPACK = 1 |`, trimmed. In a build that chooses its kernels at run
/// time (feature `cpu-dispatch`) it ends with the variant chosen, e.g. `VARIANT = haswell |`.
/// Read once per process, after llama.cpp's backend is initialised (so that the chosen
/// variant is loaded): llama.cpp builds it in a static buffer that a second caller would
/// overwrite.
pub fn cpu_kernels() -> &'static str {
    static KERNELS: OnceLock<String> = OnceLock::new();
    KERNELS.get_or_init(|| {
        if let Err(error) = crate::tokenizer::backend() {
            return format!("unknown ({error})");
        }
        // SAFETY: `llama_print_system_info` takes no arguments and returns a pointer to a
        // NUL-terminated string in a static buffer of llama.cpp's; the OnceLock makes this the
        // only call in the process, and the text is copied before anything else runs.
        let text = unsafe { CStr::from_ptr(sys::llama_print_system_info()) };
        let text = text.to_string_lossy().trim().to_owned();
        match dispatch::loaded_variant() {
            Some(variant) => format!("{text} VARIANT = {variant} |"),
            None => text,
        }
    })
}

/// Choosing the CPU kernels at run time: llama.cpp built with `GGML_BACKEND_DL` and
/// `GGML_CPU_ALL_VARIANTS` has no CPU backend linked in; it carries one loadable module per
/// instruction-set level (`libggml-cpu-haswell.so`, `…-skylakex.so`, `…-icelake.so`, `…-zen4.so`
/// …; on aarch64 `…-armv8.2_1.so` … `…-armv9.2_2.so`). Each module scores itself against the
/// running CPU and ggml loads the best.
#[cfg(feature = "cpu-dispatch")]
pub mod dispatch {
    use std::ffi::CString;
    use std::path::{Path, PathBuf};

    use llama_cpp_sys_2 as sys;

    /// A directory of CPU kernel modules to load instead of the ones this binary would find.
    pub const BACKENDS_ENV: &str = "FLEETGRID_CPU_BACKENDS";

    /// A variant to load instead of the best (e.g. `haswell` where the AVX-512 kernels are the
    /// slower, as they are for some models on some CPUs): refused when it does not run here.
    pub const VARIANT_ENV: &str = "FLEETGRID_CPU_VARIANT";

    /// The module file names: `libggml-cpu-<variant>.so`.
    const PREFIX: &str = "libggml-cpu-";
    const SUFFIX: &str = ".so";

    /// Where the modules are: `$FLEETGRID_CPU_BACKENDS` when set; else the binary's own
    /// directory when it holds them (a binary shipped with its modules beside it); else where
    /// this build put them. Never the working directory, which ggml's own default searches.
    pub fn backends_dir() -> Result<PathBuf, String> {
        if let Some(dir) = std::env::var_os(BACKENDS_ENV) {
            return Ok(PathBuf::from(dir));
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        let built = sys::BACKENDS_DIR.map(PathBuf::from);
        beside
            .into_iter()
            .chain(built)
            .find(|dir| !variants_in(dir).is_empty())
            .ok_or_else(|| {
                format!(
                    "no CPU kernel modules ({PREFIX}*{SUFFIX}) beside this binary or in {}; \
                     set {BACKENDS_ENV} to their directory",
                    sys::BACKENDS_DIR.unwrap_or("this build's backends directory")
                )
            })
    }

    /// The variants whose modules `dir` holds, sorted.
    pub fn variants_in(dir: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut variants: Vec<String> = entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                Some(name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.to_owned())
            })
            .collect();
        variants.sort();
        variants
    }

    /// Loads the best CPU kernels of this machine from [`backends_dir`], or the variant
    /// [`VARIANT_ENV`] names. Called once, before llama.cpp's backend is initialised; fails when
    /// no module runs here, or the named one does not.
    pub(crate) fn load() -> Result<String, String> {
        let dir = backends_dir()?;
        let c_path = |path: &Path| {
            path.to_str()
                .and_then(|path| CString::new(path).ok())
                .ok_or_else(|| format!("{} is not a usable path", path.display()))
        };
        if let Some(variant) = std::env::var_os(VARIANT_ENV) {
            let variant = variant.to_string_lossy();
            let module = dir.join(format!("{PREFIX}{variant}{SUFFIX}"));
            if !module.is_file() {
                return Err(format!(
                    "{VARIANT_ENV}={variant}: no such CPU kernel module in {} (it holds {})",
                    dir.display(),
                    variants_in(&dir).join(", ")
                ));
            }
            let text = c_path(&module)?;
            // SAFETY: a NUL-terminated path that outlives the call. ggml loads the module only
            // when its own score says it runs on this CPU.
            let registry = unsafe { sys::ggml_backend_load(text.as_ptr()) };
            if registry.is_null() {
                return Err(format!(
                    "{VARIANT_ENV}={variant}: the module does not run on this machine"
                ));
            }
        } else {
            let text = c_path(&dir)?;
            // SAFETY: a NUL-terminated path that outlives the call; ggml copies what it keeps.
            unsafe { sys::ggml_backend_load_all_from_path(text.as_ptr()) };
        }
        // SAFETY: the registry's CPU device, if a module registered one.
        let device = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
        if device.is_null() {
            let carried = variants_in(&dir);
            return Err(if carried.is_empty() {
                format!(
                    "{} holds no CPU kernel modules ({PREFIX}*{SUFFIX})",
                    dir.display()
                )
            } else {
                format!(
                    "none of the CPU kernel modules in {} ({}) runs on this machine",
                    dir.display(),
                    carried.join(", ")
                )
            });
        }
        loaded_variant().ok_or_else(|| "a CPU backend was loaded from no known module".to_owned())
    }

    /// The variant whose module this process has loaded, read from its memory map.
    pub fn loaded_variant() -> Option<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines().find_map(|line| {
            let name = line.rsplit('/').next()?;
            Some(name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.to_owned())
        })
    }
}

/// Without `cpu-dispatch` the CPU kernels are linked in and there is nothing to choose.
#[cfg(not(feature = "cpu-dispatch"))]
mod dispatch {
    pub fn loaded_variant() -> Option<String> {
        None
    }
}

/// ggml's device interface (`struct ggml_backend_device_i` in `ggml-backend-impl.h`, ggml
/// 0.26.0) up to `init_backend`, the function llama.cpp's context calls to create its CPU
/// backend. A device struct begins with its interface. [`install_reference_switch`] checks every
/// field of it against ggml's public accessors before it changes anything.
#[repr(C)]
struct DeviceInterfaceHead {
    get_name: Option<unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *const c_char>,
    get_description: Option<unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *const c_char>,
    get_memory: Option<unsafe extern "C" fn(sys::ggml_backend_dev_t, *mut usize, *mut usize)>,
    get_type: Option<unsafe extern "C" fn(sys::ggml_backend_dev_t) -> sys::ggml_backend_dev_type>,
    get_props:
        Option<unsafe extern "C" fn(sys::ggml_backend_dev_t, *mut sys::ggml_backend_dev_props)>,
    init_backend: Option<InitBackend>,
}

type InitBackend =
    unsafe extern "C" fn(sys::ggml_backend_dev_t, *const c_char) -> sys::ggml_backend_t;

type SetUseRef = unsafe extern "C" fn(sys::ggml_backend_t, bool);

/// ggml's own `init_backend` of the CPU device, kept when the switch is installed.
static CPU_INIT_BACKEND: OnceLock<InitBackend> = OnceLock::new();

/// ggml's `ggml_backend_cpu_set_use_ref`, found through the CPU backend's registry, since in a
/// build with `cpu-dispatch` it is a function of the loaded module, not of this binary.
static CPU_SET_USE_REF: OnceLock<SetUseRef> = OnceLock::new();

thread_local! {
    /// Whether CPU backends created on this thread now take the reference kernels.
    static REFERENCE_WANTED: Cell<bool> = const { Cell::new(false) };
    /// CPU backends created on this thread with the reference kernels.
    static REFERENCE_BACKENDS: Cell<u32> = const { Cell::new(0) };
}

/// The CPU device's `init_backend` while the switch is installed: ggml's own, then the
/// reference kernels for a backend created inside [`with_reference_kernels`].
unsafe extern "C" fn init_backend(
    device: sys::ggml_backend_dev_t,
    params: *const c_char,
) -> sys::ggml_backend_t {
    let Some(original) = CPU_INIT_BACKEND.get() else {
        return std::ptr::null_mut();
    };
    // SAFETY: ggml's own function, called with the arguments ggml passed.
    let backend = unsafe { original(device, params) };
    let Some(set_use_ref) = CPU_SET_USE_REF.get() else {
        return backend;
    };
    // SAFETY: `backend` is null or a live backend just created.
    if REFERENCE_WANTED.get() && !backend.is_null() && unsafe { is_cpu(backend) } {
        // SAFETY: a live CPU backend, not yet shared with anything.
        unsafe { set_use_ref(backend, true) };
        REFERENCE_BACKENDS.set(REFERENCE_BACKENDS.get() + 1);
    }
    backend
}

/// Whether `backend` (live) runs on the CPU device; ggml's `ggml_backend_is_cpu` is a function
/// of the CPU module, which a build with `cpu-dispatch` does not link.
unsafe fn is_cpu(backend: sys::ggml_backend_t) -> bool {
    // SAFETY: the caller's live backend; its device is a static of ggml's.
    unsafe {
        let device = sys::ggml_backend_get_device(backend);
        !device.is_null() && sys::ggml_backend_dev_type(device) == sys::GGML_BACKEND_DEVICE_TYPE_CPU
    }
}

fn c_text(text: *const c_char) -> Option<String> {
    // SAFETY: ggml's device names and descriptions are NUL-terminated static strings.
    (!text.is_null()).then(|| {
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Route the creation of CPU backends through [`init_backend`], so that an engine can ask for
/// ggml's reference kernels ([`with_reference_kernels`]). llama.cpp creates its context's CPU
/// backend itself and gives no handle to it; ggml's switch (`ggml_backend_cpu_set_use_ref`)
/// takes one. Called once, when llama.cpp's backend is initialised and before any context
/// exists. The interface's layout is checked field by field against ggml's accessors first; on
/// any disagreement nothing is changed and the reference kernels are unavailable.
pub(crate) fn install_reference_switch() -> Result<(), String> {
    // SAFETY: the registry's CPU device is a static of ggml's that lives as long as the process.
    let device = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if device.is_null() {
        return Err("llama.cpp has no CPU device".to_owned());
    }
    let head = device.cast::<DeviceInterfaceHead>();
    // SAFETY: a device struct begins with its interface, whose first six fields
    // `DeviceInterfaceHead` mirrors; each is compared with ggml's accessor before use.
    let fields = unsafe { head.read() };
    let mismatch = |field: &str| Err(format!("ggml's CPU device interface differs at {field}"));
    let (Some(get_name), Some(get_description), Some(get_memory), Some(get_type), Some(get_props)) = (
        fields.get_name,
        fields.get_description,
        fields.get_memory,
        fields.get_type,
        fields.get_props,
    ) else {
        return mismatch("a missing function");
    };
    // SAFETY (this block): each function is called as ggml's accessors call it.
    unsafe {
        if c_text(get_name(device)) != c_text(sys::ggml_backend_dev_name(device)) {
            return mismatch("get_name");
        }
        if c_text(get_description(device)) != c_text(sys::ggml_backend_dev_description(device)) {
            return mismatch("get_description");
        }
        let (mut free, mut total) = (0, 0);
        get_memory(device, &mut free, &mut total);
        let (mut public_free, mut public_total) = (0, 0);
        sys::ggml_backend_dev_memory(device, &mut public_free, &mut public_total);
        if total != public_total {
            return mismatch("get_memory");
        }
        if get_type(device) != sys::GGML_BACKEND_DEVICE_TYPE_CPU {
            return mismatch("get_type");
        }
        let mut props = std::mem::zeroed::<sys::ggml_backend_dev_props>();
        get_props(device, &mut props);
        if c_text(props.name) != c_text(sys::ggml_backend_dev_name(device)) {
            return mismatch("get_props");
        }
        let Some(original) = fields.init_backend else {
            return mismatch("init_backend");
        };
        let probe = original(device, std::ptr::null());
        if probe.is_null() || !is_cpu(probe) {
            return mismatch("init_backend");
        }
        sys::ggml_backend_free(probe);
        let registry = sys::ggml_backend_dev_backend_reg(device);
        let address = sys::ggml_backend_reg_get_proc_address(
            registry,
            c"ggml_backend_cpu_set_use_ref".as_ptr(),
        );
        if address.is_null() {
            return Err("ggml's CPU backend does not offer its reference kernels".to_owned());
        }
        // SAFETY: ggml's CPU registry hands out `ggml_backend_cpu_set_use_ref` under its own
        // name (`ggml-cpu.cpp`, `ggml_backend_cpu_get_proc_address`), with this signature.
        let set_use_ref = std::mem::transmute::<*mut std::ffi::c_void, SetUseRef>(address);
        let _ = CPU_SET_USE_REF.set(set_use_ref);
        let _ = CPU_INIT_BACKEND.set(original);
        // No other thread touches llama.cpp yet (see `tokenizer::backend`).
        std::ptr::addr_of_mut!((*head).init_backend).write(Some(init_backend));
    }
    Ok(())
}

/// Run `create` (which creates a llama.cpp context on this thread) with ggml's reference
/// kernels for the CPU backends it creates when `reference` is true. Fails, rather than run
/// without them, when they were asked for and no CPU backend took them.
pub(crate) fn with_reference_kernels<T>(
    reference: bool,
    create: impl FnOnce() -> T,
) -> Result<T, String> {
    if !reference {
        return Ok(create());
    }
    if CPU_INIT_BACKEND.get().is_none() {
        return Err("ggml's reference kernels cannot be switched on in this build".to_owned());
    }
    /// Clears the request however `create` returns, unwinding included.
    struct Wanted;
    impl Drop for Wanted {
        fn drop(&mut self) {
            REFERENCE_WANTED.set(false);
        }
    }
    let before = REFERENCE_BACKENDS.get();
    REFERENCE_WANTED.set(true);
    let wanted = Wanted;
    let created = create();
    drop(wanted);
    if REFERENCE_BACKENDS.get() == before {
        return Err("no CPU backend took ggml's reference kernels".to_owned());
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_of_this_build_are_named() {
        let kernels = cpu_kernels();
        assert!(kernels.contains("CPU"), "{kernels}");
        #[cfg(target_arch = "x86_64")]
        assert!(kernels.contains("AVX2 = 1"), "{kernels}");
        #[cfg(target_arch = "aarch64")]
        assert!(kernels.contains("NEON = 1"), "{kernels}");
    }

    /// A CPU backend created inside `with_reference_kernels` goes through the switch; asking
    /// for the reference kernels and creating no backend is an error, not a silent default.
    #[test]
    fn the_reference_kernels_reach_a_backend_created_for_them() {
        crate::tokenizer::backend().expect("initialise llama.cpp");
        // SAFETY: the registry's CPU device, created and freed as llama.cpp's context does.
        let create = || unsafe {
            let device = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
            let backend = sys::ggml_backend_dev_init(device, std::ptr::null());
            assert!(!backend.is_null());
            sys::ggml_backend_free(backend);
        };
        let before = REFERENCE_BACKENDS.get();
        with_reference_kernels(false, create).expect("default kernels");
        assert_eq!(REFERENCE_BACKENDS.get(), before);
        with_reference_kernels(true, create).expect("reference kernels");
        assert_eq!(REFERENCE_BACKENDS.get(), before + 1);
        with_reference_kernels(true, || ()).expect_err("no backend was created");
    }

    /// A build that chooses its kernels at run time loads, of the variants it carries, the one
    /// with the most instruction-set extensions this CPU has: ggml's own score
    /// (`ggml-cpu/arch/x86/cpu-feats.cpp`), recomputed here from the kernel's view of the CPU
    /// with the variants' extensions as `ggml/src/CMakeLists.txt` lists them.
    #[cfg(all(feature = "cpu-dispatch", target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn the_best_variant_this_cpu_runs_is_chosen() {
        let kernels = cpu_kernels();
        let chosen = dispatch::loaded_variant().expect("a CPU kernel module is loaded");
        assert!(
            kernels.ends_with(&format!("VARIANT = {chosen} |")),
            "{kernels}"
        );
        let dir = dispatch::backends_dir().expect("the modules are found");
        let carried = dispatch::variants_in(&dir);
        assert!(carried.len() >= 10, "{carried:?}");
        // Each extension's place in ggml's score, and the CPU flags it needs.
        const SCORE: &[(&str, u32, &[&str])] = &[
            ("FMA", 0, &["fma"]),
            ("F16C", 1, &["f16c"]),
            ("SSE42", 2, &["sse4_2"]),
            ("BMI2", 3, &["bmi2"]),
            ("AVX", 4, &["avx"]),
            ("AVX2", 5, &["avx2"]),
            ("AVX_VNNI", 6, &["avx_vnni"]),
            (
                "AVX512",
                7,
                &["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"],
            ),
            ("AVX512_VBMI", 8, &["avx512_vbmi"]),
            ("AVX512_BF16", 9, &["avx512_bf16"]),
            ("AVX512_VNNI", 10, &["avx512_vnni"]),
            ("AMX_INT8", 11, &["amx_int8"]),
        ];
        const VARIANTS: &[(&str, &str)] = &[
            ("x64", ""),
            ("sse42", "SSE42"),
            ("sandybridge", "SSE42 AVX"),
            ("ivybridge", "SSE42 AVX F16C"),
            ("piledriver", "SSE42 AVX F16C FMA"),
            ("haswell", "SSE42 AVX F16C FMA AVX2 BMI2"),
            ("skylakex", "SSE42 AVX F16C FMA AVX2 BMI2 AVX512"),
            (
                "cannonlake",
                "SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI",
            ),
            (
                "cascadelake",
                "SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VNNI",
            ),
            (
                "icelake",
                "SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI",
            ),
            (
                "cooperlake",
                "SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VNNI AVX512_BF16",
            ),
            (
                "zen4",
                "SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16",
            ),
            ("alderlake", "SSE42 AVX F16C FMA AVX2 BMI2 AVX_VNNI"),
            (
                "sapphirerapids",
                "SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_INT8",
            ),
        ];
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("flags"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, flags)| flags.split_whitespace().collect())
            .expect("the CPU's flags");
        let score = |extensions: &str| -> Option<u32> {
            extensions
                .split_whitespace()
                .try_fold(1, |score, extension| {
                    let (_, bit, needs) = SCORE.iter().find(|(name, ..)| *name == extension)?;
                    needs
                        .iter()
                        .all(|flag| flags.contains(flag))
                        .then_some(score + (1 << bit))
                })
        };
        let best = VARIANTS
            .iter()
            .filter(|(name, _)| carried.iter().any(|c| c == name))
            .filter_map(|(name, extensions)| Some((score(extensions)?, *name)))
            .max()
            .expect("some variant runs here");
        assert_eq!(chosen, best.1, "flags {flags:?}");
    }

    /// Repacked weights would make a token's numbers depend on its batch (`crate::worker`);
    /// `.cargo/config.toml` builds llama.cpp without them.
    #[test]
    fn this_build_keeps_weights_in_their_own_layout() {
        let kernels = cpu_kernels();
        assert!(!kernels.contains("REPACK = 1"), "{kernels}");
    }
}
