"""`headend serve` with a fault injected, for acceptance tests of supervision (issue #14):
`python -m tests.fault_serve serve --config site.toml` with `HEADEND_TEST_FAULT` set to
`module:Class.method:N` makes the first N calls of that method raise, then runs the real CLI.
The product has no fault hook of its own; the fault is patched in here, in the test process
tree only."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from typing import Any


class InjectedFault(RuntimeError):
    """The exception a test injected."""


def inject(spec: str) -> None:
    module_name, target, count = spec.split(":")
    class_name, method_name = target.split(".")
    owner = getattr(importlib.import_module(module_name), class_name)
    original = getattr(owner, method_name)
    left = {"n": int(count)}

    def should_fail() -> bool:
        if left["n"] <= 0:
            return False
        left["n"] -= 1
        return True

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def failing_async(*args: Any, **kwargs: Any) -> Any:
            if should_fail():
                raise InjectedFault(f"fault injected into {target}")
            return await original(*args, **kwargs)

        setattr(owner, method_name, failing_async)
    else:

        @functools.wraps(original)
        def failing(*args: Any, **kwargs: Any) -> Any:
            if should_fail():
                raise InjectedFault(f"fault injected into {target}")
            return original(*args, **kwargs)

        setattr(owner, method_name, failing)


if __name__ == "__main__":
    inject(os.environ["HEADEND_TEST_FAULT"])
    from headend.cli import main

    sys.argv = ["headend", *sys.argv[1:]]
    sys.exit(main())
