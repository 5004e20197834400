//! The fuzz smoke run: every committed corpus and regression input, replayed through its harness.

mod corpus;
