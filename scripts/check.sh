#!/usr/bin/env bash
# Style gate: formatting and lints, as CI runs them.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WSCHAT_ROOT"
ensure_packages "${WSCHAT_BUILD_PACKAGES[@]}"
cargo fmt --all --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
