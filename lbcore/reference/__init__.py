"""Pure-Python oracles for every fast path in ext/: the C core is tested
against these slot for slot and byte for byte (STYLE.md rule 8)."""
