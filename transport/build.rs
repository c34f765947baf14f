//! With feature `ofi`: builds the libfabric shim (`ofi/shim.c`, real symbols for the
//! library's `static inline` calls) and generates the bindings of `ofi/shim.h` with
//! bindgen. Needs Debian's `libfabric-dev` (1.10 or newer), `libclang-dev` and pkg-config.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The build dependencies are there only with the feature.
    #[cfg(feature = "ofi")]
    ofi();
}

#[cfg(feature = "ofi")]
fn ofi() {
    println!("cargo:rerun-if-changed=ofi/shim.h");
    println!("cargo:rerun-if-changed=ofi/shim.c");
    let lib = match pkg_config::Config::new()
        .atleast_version("1.10")
        .probe("libfabric")
    {
        Ok(lib) => lib,
        Err(e) => panic!(
            "feature `ofi` needs libfabric 1.10 or newer with its headers and pkg-config file \
             (Debian: apt-get install libfabric-dev pkg-config): {e}"
        ),
    };
    let mut cc = cc::Build::new();
    cc.file("ofi/shim.c").warnings(true);
    for p in &lib.include_paths {
        cc.include(p);
    }
    cc.compile("colo_ofi_shim");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bindings = bindgen::Builder::default()
        .header("ofi/shim.h")
        .clang_args(
            lib.include_paths
                .iter()
                .map(|p| format!("-I{}", p.display())),
        )
        .allowlist_function("colo_fi_.*")
        .allowlist_function("fi_getinfo|fi_freeinfo|fi_fabric|fi_strerror")
        .allowlist_type("fi_.*|fid_.*")
        .allowlist_var("FI_.*")
        .rust_edition(bindgen::RustEdition::Edition2024)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| {
            panic!("bindgen could not read ofi/shim.h (libclang-dev installed?): {e}")
        });
    bindings
        .write_to_file(out.join("ofi_bindings.rs"))
        .expect("write the libfabric bindings");
}
