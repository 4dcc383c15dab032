"""The benchmarks B1-B7, one module each, and the recorder that writes BENCHMARKS.md."""
