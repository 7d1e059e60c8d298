"""Code shared by the benchmarks and checks in scripts/ (held-out recall, GPU check pieces), importable as a package
so no script has to edit sys.path to reach a sibling."""
