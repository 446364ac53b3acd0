//! Reference-guided generation (paper §3.3): Algorithm 4's mask alignment, DDIM inversion and
//! Algorithm 2's guided denoising.

pub mod align;
pub mod daam;
pub mod invert;
pub mod job;
pub mod reference;
