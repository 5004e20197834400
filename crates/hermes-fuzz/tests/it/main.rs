//! The fuzz smoke run: every committed corpus input replayed through its harness.

mod corpus;
