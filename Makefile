# Convenience only: the documented commands are `python3 dev.py demo` and `python3 dev.py test`.
PYTHON ?= python3

.PHONY: demo test

demo:
	$(PYTHON) dev.py demo $(ARGS)

test:
	$(PYTHON) dev.py test $(ARGS)
