"""The module's docstring examples are part of the spec: run them all."""
from __future__ import annotations

import doctest

import resize_block_size


def test_every_docstring_example_in_the_module_holds():
    result = doctest.testmod(resize_block_size, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10, f"only {result.attempted} examples were found; were the docstrings lost?"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed (run with -s)"
