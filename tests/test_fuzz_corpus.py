"""The atheris target's function over its seed corpus and random inputs: the fuzz run itself
is not part of the suite (see fuzz/fuzz_protocol.py), but its harness and seeds stay working."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).parent.parent / "fuzz"


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_protocol", FUZZ / "fuzz_protocol.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_protocol", module)
    spec.loader.exec_module(module)
    return module


TARGET = load_target()


def test_seed_corpus_runs_clean() -> None:
    seeds = sorted((FUZZ / "corpus").iterdir())
    assert len(seeds) >= 4
    for seed in seeds:
        TARGET.fuzz_one(seed.read_bytes())


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_inputs_run_clean(data: bytes) -> None:
    TARGET.fuzz_one(data)
