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
/// FMA = 1 | OPENMP = 1 | REPACK = 1 |`, trimmed. Read once per process: llama.cpp builds it in
/// a static buffer that a second caller would overwrite.
pub fn cpu_kernels() -> &'static str {
    static KERNELS: OnceLock<String> = OnceLock::new();
    KERNELS.get_or_init(|| {
        // SAFETY: `llama_print_system_info` takes no arguments and returns a pointer to a
        // NUL-terminated string in a static buffer of llama.cpp's; the OnceLock makes this the
        // only call in the process, and the text is copied before anything else runs.
        let text = unsafe { CStr::from_ptr(sys::llama_print_system_info()) };
        text.to_string_lossy().trim().to_owned()
    })
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

/// ggml's own `init_backend` of the CPU device, kept when the switch is installed.
static CPU_INIT_BACKEND: OnceLock<InitBackend> = OnceLock::new();

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
    // SAFETY: `backend` is null or a live backend just created.
    if REFERENCE_WANTED.get() && !backend.is_null() && unsafe { sys::ggml_backend_is_cpu(backend) }
    {
        // SAFETY: a live CPU backend, not yet shared with anything.
        unsafe { sys::ggml_backend_cpu_set_use_ref(backend, true) };
        REFERENCE_BACKENDS.set(REFERENCE_BACKENDS.get() + 1);
    }
    backend
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
        if probe.is_null() || !sys::ggml_backend_is_cpu(probe) {
            return mismatch("init_backend");
        }
        sys::ggml_backend_free(probe);
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

    /// Repacked weights would make a token's numbers depend on its batch (`crate::worker`);
    /// `.cargo/config.toml` builds llama.cpp without them.
    #[test]
    fn this_build_keeps_weights_in_their_own_layout() {
        let kernels = cpu_kernels();
        assert!(!kernels.contains("REPACK = 1"), "{kernels}");
    }
}
