//! Integration tests: the real server on port 0 with its embedded agent, real supervisor
//! processes (the built `muster` binary) and real shell commands; the crash tests run the real
//! `muster up` binary and `kill -9` it.

#[path = "../support/mod.rs"]
mod support;

mod harness;

/// What the tests of muster-models share (the Python environments kept between runs, the iris
/// bundle), for the predictor and models tests.
#[path = "../../../muster-models/tests/support/mod.rs"]
mod model_support;

mod access;
mod api;
mod batch;
mod cluster;
mod crash;
mod daemons;
mod disk;
mod hq;
mod jobs;
mod logs;
mod models;
mod nodes;
mod onnxmodels;
mod predictor;
mod procs;
mod rmodels;
mod secrets;
mod services;
