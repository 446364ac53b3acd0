//! Subject representation learning (paper §3.2): the n-token embedding c_s spliced into the
//! last n positions of the 77-token prompt ([c, c_s]), its masked, regularised loss (Eq. 5–6),
//! the step-wise embeddings c_s^t of Algorithm 1 and their use in generation (Eq. 7); and
//! classic textual inversion, the paper's baseline and the ecosystem's exchange format.

pub mod adam;
pub mod conditioning;
pub mod data;
pub mod file;
pub mod job;
pub mod learn;
pub mod ti;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where c_s replaces the last n rows of the prompt (see [`conditioning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    /// The text encoder's input token embeddings (default; gradients flow through the encoder).
    Input,
    /// The text encoder's output (77 × d), directly.
    Output,
}

impl Space {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "input" => Ok(Space::Input),
            "output" => Ok(Space::Output),
            _ => bail!("--space must be input or output, got {s:?}"),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Space::Input => "input",
            Space::Output => "output",
        }
    }
}

/// What `learn` optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// HiFi Tuner: c_s in the padding positions, masked loss, φ_s regulariser, Algorithm 1.
    Hifi,
    /// Classic textual inversion: n new tokens in the caption.
    Ti,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "hifi" => Ok(Mode::Hifi),
            "ti" => Ok(Mode::Ti),
            _ => bail!("--mode must be hifi or ti, got {s:?}"),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Hifi => "hifi",
            Mode::Ti => "ti",
        }
    }
}
