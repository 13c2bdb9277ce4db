//! Integration tests: the real server on port 0 with its embedded agent, real supervisor
//! processes (the built `muster` binary) and real shell commands; the crash tests run the real
//! `muster up` binary and `kill -9` it.

mod harness;

mod access;
mod api;
mod cluster;
mod crash;
mod jobs;
mod logs;
mod nodes;
