//! End-to-end scenarios live in `tests/`; each runs against both the
//! in-process cluster and the standalone broker through `bridge-testkit`.
