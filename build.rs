//! Checks the nginx this module is built against (reported by nginx-sys,
//! which runs bindgen over that nginx's headers) and gives scripts a stable
//! path to the nginx binary built next to the module.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    zlib_bindings();
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");

    // An HTTP module cannot load into an nginx configured without HTTP.
    let features = env::var("DEP_NGINX_FEATURES").unwrap_or_default();
    if !features.split(',').any(|f| f.trim() == "http") {
        panic!(
            "the nginx tree being built against has no HTTP module (configured --without-http?)"
        );
    }

    if let (Ok(objs), Some(profile_dir)) = (env::var("DEP_NGINX_BUILD_DIR"), profile_dir()) {
        link_nginx_binary(Path::new(&objs), &profile_dir);
    }
}

/// permessage-deflate uses zlib, which nginx links too: bindings for the
/// few calls it needs, from the system's zlib.h.
fn zlib_bindings() {
    println!("cargo::rustc-link-lib=z");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindgen::Builder::default()
        .header_contents("zlib_wrap.h", "#include <zlib.h>")
        .allowlist_function("(deflate|inflate)(Init2_|Reset|End)?|zlibVersion")
        .allowlist_type("z_stream")
        .allowlist_var("Z_(OK|STREAM_END|BUF_ERROR|SYNC_FLUSH|FINISH|NO_FLUSH|DEFLATED|DEFAULT_STRATEGY|DEFAULT_COMPRESSION)")
        .generate()
        .expect("zlib.h (install zlib1g-dev)")
        .write_to_file(out.join("zlib.rs"))
        .expect("writing the zlib bindings");
}

/// `target/<profile>`: OUT_DIR is `target/<profile>/build/<pkg>-<hash>/out`.
fn profile_dir() -> Option<PathBuf> {
    let out = PathBuf::from(env::var_os("OUT_DIR")?);
    Some(out.ancestors().nth(3)?.to_path_buf())
}

/// `target/<profile>/nginx` → the nginx binary of the tree the module was
/// built against (when that tree has one: the vendored build always does).
fn link_nginx_binary(objs: &Path, profile_dir: &Path) {
    let binary = objs.join("nginx");
    let link = profile_dir.join("nginx");
    let _ = std::fs::remove_file(&link);
    if binary.exists() {
        if let Err(err) = std::os::unix::fs::symlink(&binary, &link) {
            println!("cargo::warning=could not link {}: {err}", link.display());
        }
    }
}
