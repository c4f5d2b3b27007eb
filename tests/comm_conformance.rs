//! One conformance suite for every `Communicator`: the same cases (every collective and dtype,
//! sizes from 0 to 100 MB, views at offsets, in place, mismatched calls, a peer that leaves)
//! against the ring over TCP, Unix sockets and shared memory, shared buffers, the hierarchical
//! all-reduce, the strict device wrapper, MPI (under mpirun) and NCCL (where there are GPUs).
//!
//! A new backend is one file in `conformance/backends/` plus one line in its `backends!` list.
//! `cargo test --release --test comm_conformance [backend]`.

mod common;
mod conformance;
