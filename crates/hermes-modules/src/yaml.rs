//! Reading a YAML configuration file (static modules, profiles) into a typed value: the one
//! place that maps read and parse failures to errors naming the file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads a YAML file into `T`, naming the file in errors.
pub(crate) fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
        path: PathBuf::from(path),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|source| Error::ConfigParse {
        path: PathBuf::from(path),
        source: Box::new(source),
    })
}
