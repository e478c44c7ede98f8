# Entry points; each target is a script under scripts/ that also works alone.
.PHONY: build check test demo demo-stop deb

build:
	cargo build --release

check:
	scripts/check.sh

test:
	scripts/test.sh

demo:
	scripts/demo.sh

demo-stop:
	scripts/demo.sh stop

deb:
	scripts/package-deb.sh
