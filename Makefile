# Entry points; each target is a script under scripts/ that also works alone.
.PHONY: build check test demo demo-stop

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
