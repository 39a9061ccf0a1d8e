//! Real QEMU processes and guests for tests, captures, benchmarks and the demo.
