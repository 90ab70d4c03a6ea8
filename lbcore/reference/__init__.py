"""Pure-Python oracles for every fast path in ext/ (hash, Maglev, packet parse and NAT) and for
the generated BPF filters: the C core is tested against these slot for slot and byte for byte,
so each oracle is written for clarity, never for speed."""
