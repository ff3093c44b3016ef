//! `ferrocd-bench`: the load generator and side-by-side comparison with etcd (not built yet;
//! see the tools-and-benchmarks issue).
