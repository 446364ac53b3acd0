//! Reference-guided generation (paper §3.3): Algorithm 4's mask alignment, DDIM inversion and
//! Algorithm 2's guided denoising; subject masks from the model's own attention and SAM.

pub mod align;
pub mod daam;
pub mod grounding;
pub mod invert;
pub mod job;
pub mod reference;
