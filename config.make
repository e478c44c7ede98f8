# Makefile fragment for ngx_http_websocket_chat_module (sourced by nginx's
# auto/make; see ./config).
#
# make cannot see the Rust sources or Cargo.lock, so the library's recipe
# runs every time and leaves it to cargo to decide what is stale (cargo does
# not touch the .a when nothing changed, so the module is not relinked).
# Without `export-modules`: nginx generates the ngx_modules table itself.

case "$NGX_OBJS" in
    /*) ngx_wschat_objs_abs=$NGX_OBJS ;;
    *)  ngx_wschat_objs_abs=$PWD/$NGX_OBJS ;;
esac

cat << END                                                    >> $NGX_MAKEFILE

.NGX_WSCHAT_ALWAYS: ;

$ngx_wschat_lib: .NGX_WSCHAT_ALWAYS
	NGINX_BUILD_DIR="$ngx_wschat_objs_abs" NGINX_SOURCE_DIR="$PWD" \\
	$NGX_CARGO rustc --lib --release --crate-type staticlib \\
		--no-default-features \\
		--manifest-path "$ngx_wschat_dir/Cargo.toml" \\
		--target-dir "$ngx_wschat_target"

END

if [ "$ngx_wschat_link" = DYNAMIC ]; then
    cat << END                                                >> $NGX_MAKEFILE
$NGX_OBJS${ngx_dirsep}ngx_http_websocket_chat_module$ngx_modext: $ngx_wschat_lib

END
fi
